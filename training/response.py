"""XGBoost uplift response model: P(convert | user, offer) for every offer and none.

One booster trained in two stages on a randomized past campaign: trees on the user
features fit conversion without an offer, then trees on interactions of the offer
with a few user signals fit its effect. Offers enter as attributes, not ids.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import xgboost as xgb
from scipy.special import logit
from sklearn.metrics import roc_auc_score

from couponflow.schemas import (
    ALL_CATEGORIES,
    CATEGORIES,
    CHANNELS,
    CONTROL_ARM,
    COUPON_KINDS,
)
from couponflow.uplift import auuc, qini_coefficient, uplift_at_k

log = logging.getLogger(__name__)

# Numeric columns of the user feature frame that every model uses.
USER_FEATURES: tuple[str, ...] = (
    "recency_days",
    "frequency_30d",
    "spend_30d_cents",
    "aov_cents",
    "events_30d",
    "sessions_30d",
    "browse_seconds_30d",
    "click_depth",
    "cart_rate",
    *(f"affinity_{category}" for category in CATEGORIES),
    "peak_hour",
    "hour_share_night",
    "hour_share_morning",
    "hour_share_afternoon",
    "hour_share_evening",
    "days_since_signup",
    "orders_90d",
    "views_per_session_30d",
    "view_price_index_90d",
    "uses_app",
)
# Profile outputs, used when the training frame has them. The profile segment is left
# out on purpose: KMeans renumbers its clusters on every profile run, so a segment id
# means nothing to a model trained on another run's ids.
OPTIONAL_USER_FEATURES: tuple[str, ...] = ("purchasing_power",)
TOP_CATEGORY_COLUMN = "top_category"
# Offer attributes after the treated flag and the one-hot kind columns; all are 0 for
# no offer.
OFFER_ATTRIBUTE_FEATURES: tuple[str, ...] = (
    "offer_value",
    "offer_min_spend_cents",
    "offer_valid_days",
    "offer_matches_top_category",
    "offer_category_affinity",
    "offer_discount_share_of_aov",
    "offer_min_spend_over_aov",
)
# Interactions of the offer with user signals that commonly modify coupon effects,
# all 0 for no offer. The signals are price sensitivity (views per session and the
# cheapness of the items viewed), reach (push to app users), purchase frequency and
# cart abandonment (cart rate). "Depth" is the discount's share of the average order
# value and "cheapness" the inverse of the view price index, so an offer's effect
# can grow with both, per channel. The effect stage's trees split on these.
EFFECT_FEATURES: tuple[str, ...] = (
    "effect_depth_x_views",
    "effect_depth_x_cheapness",
    "effect_depth_x_views_push_app",
    "effect_depth_x_cheapness_push_app",
    "effect_depth_x_views_sms",
    "effect_depth_x_views_email",
    "effect_push_app",
    "effect_views",
    "effect_cheapness",
    "effect_orders",
    "effect_cart_rate",
)
# Columns that the effect stage's trees split on. Leaving out the offer's kind,
# channel and value makes every offer's effect a function of these shared signals,
# and leaving out the other user features keeps the stage from fitting noise: both
# measured better on the simulator (benchmarks/decision_quality.py).
# NOTE: an effect that varies along a user feature outside these signals is not
# learned; add an effect_ interaction for it.
EFFECT_STAGE_FEATURES = frozenset(
    {"treated", "offer_discount_share_of_aov", "offer_category_affinity"}
) | frozenset(EFFECT_FEATURES)
# The effect stage's trees may only raise the effect along these features.
_INCREASING_EFFECT_FEATURES = frozenset(
    {
        "effect_depth_x_views",
        "effect_depth_x_cheapness",
        "effect_depth_x_views_push_app",
        "effect_depth_x_cheapness_push_app",
        "effect_depth_x_views_sms",
        "effect_depth_x_views_email",
    }
)
OFFER_REQUIRED_COLUMNS: tuple[str, ...] = (
    "coupon_id",
    "kind",
    "value",
    "min_spend_cents",
)

# Shallow, slowly learning trees with large leaves: offer effects are a few points of
# conversion rate, and deeper trees or smaller leaves fit outcome noise before they
# fit the effects. XGBoost uses every core unless params set "nthread".
DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary:logistic",
    "eval_metric": "logloss",
    "tree_method": "hist",
    "max_depth": 3,
    "eta": 0.05,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "min_child_weight": 50.0,
    "lambda": 1.0,
}
# Trees of the first stage, on the control rows.
DEFAULT_NUM_BOOST_ROUND = 200
# The effect stage's trees are shallower: two levels combine two interactions, and
# three measured worse on simulated campaigns of 30,000 users.
EFFECT_PARAMS: dict[str, Any] = {"max_depth": 2}
DEFAULT_EFFECT_BOOST_ROUND = 200
SPEC_FORMAT_VERSION = 2
# Top share of the holdout for the uplift@k metric of evaluate().
UPLIFT_AT_K = 0.3
# Rows of the (user, offer) design matrix scored per XGBoost call, to bound memory.
_PREDICT_CHUNK_ROWS = 500_000


def split_holdout(
    user_ids: Iterable[str], fraction: float = 0.3, salt: str = "couponflow"
) -> npt.NDArray[np.bool_]:
    """Return a mask that is True for the users in the holdout.

    A user is in the holdout when the BLAKE2b hash of ``salt`` and the user id, read
    as a number in [0, 1), is below ``fraction``. The split depends only on the id
    and the salt, so every training run and every champion comparison that uses the
    same salt gets the same holdout users.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    ids = pd.Series(list(user_ids), dtype="object")
    if ids.isna().any():
        raise ValueError(
            f"user_ids contains {int(ids.isna().sum())} missing ids; drop them first"
        )
    prefix = salt.encode() + b"\x1f"
    positions = np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(prefix + str(uid).encode(), digest_size=8).digest(),
                "big",
            )
            for uid in ids
        ),
        dtype=np.float64,
        count=len(ids),
    )
    return np.asarray(positions / 2.0**64 < fraction, dtype=np.bool_)


@dataclass
class ResponseModel:
    """A trained booster and the feature encoding that scores (user, offer) rows."""

    booster: xgb.Booster
    user_features: tuple[str, ...]
    categories: tuple[str, ...] = CATEGORIES
    offer_kinds: tuple[str, ...] = COUPON_KINDS
    channels: tuple[str, ...] = CHANNELS
    params: dict[str, Any] = field(default_factory=dict)
    num_boost_round: int = DEFAULT_NUM_BOOST_ROUND
    effect_num_boost_round: int = DEFAULT_EFFECT_BOOST_ROUND
    trained_arms: tuple[str, ...] = ()
    # Registered version URI (models:/<name>/<version>) when loaded from MLflow.
    model_uri: str | None = None

    @property
    def feature_names(self) -> list[str]:
        """Columns of the design matrix, in the booster's order."""
        return _feature_names(
            self.user_features, self.categories, self.offer_kinds, self.channels
        )

    def predict_conversion(
        self, users: pd.DataFrame, offers: pd.DataFrame
    ) -> npt.NDArray[np.float64]:
        """Predict P(convert) of every user under no offer and under each offer.

        Returns an array of shape ``(len(users), 1 + len(offers))``. Column 0 is no
        offer, and column ``j`` is the offer in row ``j - 1`` of ``offers``. Offers
        follow the COUPONS contract; an offer counts as sent by the channel that
        :func:`validate_offers` gives it, and stock and dates are not used.
        """
        users = users.reset_index(drop=True)
        offers = validate_offers(offers, self.offer_kinds, self.categories)
        n_users = len(users)
        n_columns = 1 + len(offers)
        result = np.empty((n_users, n_columns), dtype=np.float64)
        if n_users == 0:
            return result

        users_per_chunk = max(1, _PREDICT_CHUNK_ROWS // n_columns)
        for start in range(0, n_users, users_per_chunk):
            chunk = users.iloc[start : start + users_per_chunk].reset_index(drop=True)
            repeated_users = pd.concat([chunk] * n_columns, ignore_index=True)
            offer_rows = _offer_rows_for_every_column(offers, len(chunk))
            design = self.design_matrix(repeated_users, offer_rows)
            scores = self._predict_design(design)
            result[start : start + len(chunk)] = scores.reshape(n_columns, -1).T
        return result

    def predict_assigned(
        self, frame: pd.DataFrame, coupons: pd.DataFrame
    ) -> npt.NDArray[np.float64]:
        """Predict P(convert) of each row of ``frame`` under the arm in its column."""
        return self._predict_design(self.assigned_design_matrix(frame, coupons))

    def assigned_design_matrix(
        self, frame: pd.DataFrame, coupons: pd.DataFrame
    ) -> pd.DataFrame:
        """Build the booster's input for each row of ``frame`` under its ``arm``.

        A ``channel`` column of ``frame`` gives the channel each offer was sent by.
        Without one, an offer counts as sent by its coupon's first listed channel.
        """
        coupons = validate_offers(
            coupons, self.offer_kinds, self.categories, drop_repeated=True
        )
        frame = frame.reset_index(drop=True)
        offer_rows = _offer_rows_for_arms(frame, coupons)
        if "channel" in frame.columns:
            offer_rows["channel"] = frame["channel"].astype("string")
        return self.design_matrix(frame, offer_rows)

    def design_matrix(
        self, users: pd.DataFrame, offer_rows: pd.DataFrame
    ) -> pd.DataFrame:
        """Build the booster's input: row i pairs user row i with offer row i.

        ``offer_rows`` has the columns of :func:`validate_offers`, with a missing
        ``coupon_id`` for no offer. Both frames must have a default RangeIndex of
        the same length.
        """
        missing = [
            c for c in (*self.user_features, TOP_CATEGORY_COLUMN) if c not in users
        ]
        if missing:
            raise ValueError(
                f"user frame is missing columns {missing}, which the response model "
                "was trained on; pass the user feature frame of the same feature run"
            )
        user_part = _user_feature_block(users, self.user_features, self.categories)
        offer_part = _offer_feature_block(
            users, offer_rows, self.categories, self.offer_kinds, self.channels
        )
        effect_part = _effect_feature_block(users, offer_part)
        design = pd.concat([user_part, offer_part, effect_part], axis=1)
        return design[self.feature_names]

    def to_spec(self) -> dict[str, Any]:
        """Return the feature encoding as JSON-ready data, for from_spec."""
        return {
            "format_version": SPEC_FORMAT_VERSION,
            "user_features": list(self.user_features),
            "categories": list(self.categories),
            "offer_kinds": list(self.offer_kinds),
            "channels": list(self.channels),
            "feature_names": self.feature_names,
            "control_arm": CONTROL_ARM,
            "params": dict(self.params),
            "num_boost_round": self.num_boost_round,
            "effect_num_boost_round": self.effect_num_boost_round,
            "trained_arms": list(self.trained_arms),
        }

    @classmethod
    def from_spec(cls, booster: xgb.Booster, spec: Mapping[str, Any]) -> ResponseModel:
        """Rebuild a model from its booster and the output of :meth:`to_spec`."""
        version = spec.get("format_version")
        if version != SPEC_FORMAT_VERSION:
            raise ValueError(
                f"response model spec has format_version {version!r}, this code reads "
                f"{SPEC_FORMAT_VERSION}; retrain and register the model with this code"
            )
        if spec.get("control_arm") != CONTROL_ARM:
            raise ValueError(
                f"response model spec uses control arm {spec.get('control_arm')!r}, "
                f"expected {CONTROL_ARM!r}; retrain the model"
            )
        model = cls(
            booster=booster,
            user_features=tuple(spec["user_features"]),
            categories=tuple(spec["categories"]),
            offer_kinds=tuple(spec["offer_kinds"]),
            channels=tuple(spec["channels"]),
            params=dict(spec.get("params", {})),
            num_boost_round=int(spec.get("num_boost_round", 0)),
            effect_num_boost_round=int(spec.get("effect_num_boost_round", 0)),
            trained_arms=tuple(spec.get("trained_arms", ())),
        )
        stored_names = list(spec["feature_names"])
        if model.feature_names != stored_names or booster.feature_names != stored_names:
            raise ValueError(
                "response model spec and booster disagree on the feature names "
                f"(spec {stored_names}, booster {booster.feature_names}); the "
                "artifacts do not belong together, so re-register the model"
            )
        return model

    def _predict_design(self, design: pd.DataFrame) -> npt.NDArray[np.float64]:
        matrix = xgb.DMatrix(
            design.to_numpy(dtype=np.float64), feature_names=list(design.columns)
        )
        return np.asarray(self.booster.predict(matrix), dtype=np.float64)


def train_response_model(
    train_frame: pd.DataFrame,
    coupons: pd.DataFrame,
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
) -> ResponseModel:
    """Train the response model on a randomized campaign: one row per exposed user.

    ``train_frame`` contains the user features and the columns ``arm`` (a coupon id of
    ``coupons``, or "control") and ``converted``, and optionally ``channel`` and
    ``propensity``. Rows are weighted by the inverse of the propensity, so that a
    non-uniform random assignment still gives unbiased effects.

    The first stage fits conversion without an offer on the control rows, so its trees
    split on user features only. The second stage starts from it and fits every row
    with trees on EFFECT_STAGE_FEATURES only, which are 0 for no offer: its trees
    change the prediction of offered rows and shift control rows by one constant.
    Both stages end up in one booster.

    ``params`` override DEFAULT_PARAMS in both stages, and EFFECT_PARAMS override
    them in the second. Its key ``num_boost_round`` sets the first stage's trees and
    ``effect_num_boost_round`` the second's.
    """
    merged_params = {**DEFAULT_PARAMS, **dict(params or {})}
    num_boost_round = int(merged_params.pop("num_boost_round", DEFAULT_NUM_BOOST_ROUND))
    effect_rounds = int(
        merged_params.pop("effect_num_boost_round", DEFAULT_EFFECT_BOOST_ROUND)
    )
    merged_params["seed"] = seed

    coupons = validate_offers(coupons, COUPON_KINDS, CATEGORIES, drop_repeated=True)
    frame = train_frame.reset_index(drop=True)
    _require_columns(frame, ("arm", "converted"), "train_frame")
    user_features = USER_FEATURES + tuple(
        c for c in OPTIONAL_USER_FEATURES if c in frame.columns
    )
    arms = frame["arm"].astype("string")
    is_control = (arms == CONTROL_ARM).to_numpy(dtype=bool)
    n_control = int(is_control.sum())
    if n_control == 0 or n_control == len(frame):
        raise ValueError(
            f"train_frame has {n_control} control rows out of {len(frame)}; the "
            "response model learns offer effects against control, so it needs both "
            "control and treated rows from a randomized campaign"
        )

    labels = _binary_labels(frame["converted"], "train_frame.converted")
    weights = _inverse_propensity_weights(frame)
    model = ResponseModel(
        booster=xgb.Booster(),
        user_features=user_features,
        params=merged_params,
        num_boost_round=num_boost_round,
        effect_num_boost_round=effect_rounds,
        trained_arms=tuple(sorted(arms.unique().tolist())),
    )
    design = model.assigned_design_matrix(frame, coupons)
    log.info(
        "training response model on %d rows (%d control, %d arms, %d features)",
        len(frame),
        n_control,
        len(model.trained_arms),
        len(design.columns),
    )
    model.booster = _train_two_stages(
        design,
        labels,
        weights,
        is_control,
        params=merged_params,
        rounds=(num_boost_round, effect_rounds),
    )
    return model


def evaluate(
    model: ResponseModel, holdout_frame: pd.DataFrame, coupons: pd.DataFrame
) -> dict[str, float]:
    """Score the model on a randomized holdout: conversion AUC and uplift metrics.

    Overall keys: ``auc`` of P(convert | the arm each user got); ``qini``, ``auuc``
    and ``uplift_at_30pct`` of the best-offer uplift (the maximum over ``coupons`` of
    P(offer) - P(no offer)) against treated = arm != control; and row counts. For
    each coupon that appears as an arm, ``auc/<id>`` on its rows, and ``qini/<id>``,
    ``auuc/<id>`` of that offer's uplift on its rows and the control rows. AUC is NaN
    where the rows contain a single class.
    """
    frame = holdout_frame.reset_index(drop=True)
    _require_columns(frame, ("arm", "converted"), "holdout_frame")
    coupons = validate_offers(
        coupons, model.offer_kinds, model.categories, drop_repeated=True
    )
    probabilities = model.predict_conversion(frame, coupons)
    coupon_ids = coupons["coupon_id"].tolist()
    column_of_arm = {CONTROL_ARM: 0} | {cid: j + 1 for j, cid in enumerate(coupon_ids)}
    arms = frame["arm"].astype("string")
    _check_known_arms(arms, column_of_arm, "holdout_frame")

    converted = _binary_labels(frame["converted"], "holdout_frame.converted")
    assigned_column = arms.map(column_of_arm).to_numpy(dtype=np.int64)
    assigned = probabilities[np.arange(len(frame)), assigned_column]
    treated = (arms != CONTROL_ARM).to_numpy(dtype=bool)
    uplift = probabilities[:, 1:] - probabilities[:, [0]]
    best_uplift = uplift.max(axis=1) if len(coupon_ids) else np.zeros(len(frame))

    metrics: dict[str, float] = {
        "n_rows": float(len(frame)),
        "n_treated": float(treated.sum()),
        "n_converted": float(converted.sum()),
        "auc": _auc(converted, assigned),
        "qini": qini_coefficient(best_uplift, treated, converted),
        "auuc": auuc(best_uplift, treated, converted),
        "uplift_at_30pct": uplift_at_k(best_uplift, treated, converted, UPLIFT_AT_K),
    }
    is_control = ~treated
    for j, coupon_id in enumerate(coupon_ids):
        got_offer = (arms == coupon_id).to_numpy(dtype=bool)
        if not got_offer.any():
            continue
        key = metric_key(coupon_id)
        rows = got_offer | is_control
        metrics[f"auc/{key}"] = _auc(converted[got_offer], assigned[got_offer])
        metrics[f"qini/{key}"] = qini_coefficient(
            uplift[rows, j], got_offer[rows], converted[rows]
        )
        metrics[f"auuc/{key}"] = auuc(uplift[rows, j], got_offer[rows], converted[rows])
        metrics[f"n_rows/{key}"] = float(got_offer.sum())
    return metrics


def validate_offers(
    offers: pd.DataFrame,
    offer_kinds: tuple[str, ...] = COUPON_KINDS,
    categories: tuple[str, ...] = CATEGORIES,
    *,
    drop_repeated: bool = False,
) -> pd.DataFrame:
    """Return the offer columns the model reads, checked, with a default index.

    The ``channel`` of an offer is its ``channel`` column when ``offers`` has one,
    else the first of its ``channels``, else missing (no channel features).
    With ``drop_repeated``, rows that repeat another row's columns exactly are
    dropped first, because the offline store can hold one coupon from several
    ingested batches. Raises ValueError on a missing column, a duplicate or reserved
    coupon id, an unknown kind or category, or a missing value or minimum spend.
    """
    _require_columns(offers, OFFER_REQUIRED_COLUMNS, "offers")
    out = pd.DataFrame(
        {
            "coupon_id": offers["coupon_id"].astype("string"),
            "kind": offers["kind"].astype("string"),
            "value": _float_column(offers, "value"),
            "min_spend_cents": _float_column(offers, "min_spend_cents"),
            "category": (
                offers["category"].astype("string")
                if "category" in offers
                else pd.Series(pd.NA, index=offers.index, dtype="string")
            ),
            "valid_days": (
                _float_column(offers, "valid_days")
                if "valid_days" in offers
                else pd.Series(np.nan, index=offers.index)
            ),
            "channel": _offer_channel(offers),
        }
    ).reset_index(drop=True)
    if drop_repeated:
        out = out.drop_duplicates(ignore_index=True)

    duplicated = out["coupon_id"][out["coupon_id"].duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(
            f"offers has duplicate coupon_id values {duplicated[:5]} with different "
            "attributes; keep one row per coupon"
        )
    if out["coupon_id"].isna().any() or (out["coupon_id"] == CONTROL_ARM).any():
        raise ValueError(
            f"offers has a missing coupon_id or one equal to {CONTROL_ARM!r}, which "
            "is reserved for no offer"
        )
    bad_kinds = sorted(set(out["kind"].dropna()) - set(offer_kinds))
    if bad_kinds or out["kind"].isna().any():
        raise ValueError(
            f"offers has unknown or missing kinds {bad_kinds}; expected one of "
            f"{list(offer_kinds)}"
        )
    known = set(categories) | {ALL_CATEGORIES}
    bad_categories = sorted(set(out["category"].dropna()) - known)
    if bad_categories:
        raise ValueError(
            f"offers has unknown categories {bad_categories}; expected one of "
            f"{sorted(known)}, or empty for every category"
        )
    for column in ("value", "min_spend_cents"):
        if out[column].isna().any():
            raise ValueError(
                f"offers.{column} has missing values; every offer needs one"
            )
    return out


def _offer_channel(offers: pd.DataFrame) -> pd.Series:
    if "channel" in offers:
        return offers["channel"].astype("string")
    if "channels" in offers:
        first = offers["channels"].astype("string").str.split(",").str[0].str.strip()
        return first.where(first != "").astype("string")
    return pd.Series(pd.NA, index=offers.index, dtype="string")


def metric_key(name: str) -> str:
    """Return ``name`` with each character that MLflow metric keys reject as '_'."""
    return re.sub(r"[^0-9A-Za-z_.\-/ ]", "_", str(name))


def _feature_names(
    user_features: tuple[str, ...],
    categories: tuple[str, ...],
    offer_kinds: tuple[str, ...],
    channels: tuple[str, ...],
) -> list[str]:
    return [
        *user_features,
        *(f"top_category_{category}" for category in categories),
        "treated",
        *(f"kind_{kind}" for kind in offer_kinds),
        *(f"channel_{channel}" for channel in channels),
        *OFFER_ATTRIBUTE_FEATURES,
        *EFFECT_FEATURES,
    ]


def _user_feature_block(
    users: pd.DataFrame, user_features: tuple[str, ...], categories: tuple[str, ...]
) -> pd.DataFrame:
    block = pd.DataFrame(
        {name: _float_column(users, name) for name in user_features}, index=users.index
    )
    top = users[TOP_CATEGORY_COLUMN].astype("string")
    for category in categories:
        block[f"top_category_{category}"] = (
            (top == category).fillna(False).astype(float)
        )
    return block


def _offer_feature_block(
    users: pd.DataFrame,
    offer_rows: pd.DataFrame,
    categories: tuple[str, ...],
    offer_kinds: tuple[str, ...],
    channels: tuple[str, ...],
) -> pd.DataFrame:
    if len(users) != len(offer_rows):
        raise ValueError(
            f"design_matrix needs one offer row per user row, got {len(offer_rows)} "
            f"offer rows for {len(users)} user rows"
        )
    treated = offer_rows["coupon_id"].notna().to_numpy()
    kind = offer_rows["kind"].astype("string")
    value = offer_rows["value"].to_numpy(dtype=np.float64, na_value=np.nan)
    min_spend = offer_rows["min_spend_cents"].to_numpy(
        dtype=np.float64, na_value=np.nan
    )
    valid_days = offer_rows["valid_days"].to_numpy(dtype=np.float64, na_value=np.nan)
    category = offer_rows["category"].astype("string")
    for_every_category = (category.isna() | (category == ALL_CATEGORIES)).to_numpy()

    top = users[TOP_CATEGORY_COLUMN].astype("string")
    matches_top = (category == top).fillna(False).to_numpy(dtype=bool)
    matches_top = treated & (matches_top | for_every_category)

    affinity_columns = [f"affinity_{c}" for c in categories]
    affinities = np.column_stack([_float_column(users, c) for c in affinity_columns])
    category_index = category.map({c: i for i, c in enumerate(categories)})
    index = category_index.fillna(0).to_numpy(dtype=np.int64)
    offer_affinity = affinities[np.arange(len(users)), index]
    # An offer valid in every category applies to the whole basket.
    offer_affinity = np.where(
        for_every_category, affinities.sum(axis=1), offer_affinity
    )

    aov = _float_column(users, "aov_cents").to_numpy()
    aov = np.where(aov > 0, aov, np.nan)
    is_percent = (kind == "percent_off").fillna(False).to_numpy(dtype=bool)
    discount_share = np.where(is_percent, value / 10_000.0, value / aov)

    block = pd.DataFrame(index=users.index)
    block["treated"] = treated.astype(float)
    for offer_kind in offer_kinds:
        block[f"kind_{offer_kind}"] = (kind == offer_kind).fillna(False).astype(float)
    channel = offer_rows["channel"].astype("string")
    for name in channels:
        sent_by = (channel == name).fillna(False).to_numpy(dtype=bool)
        block[f"channel_{name}"] = (treated & sent_by).astype(float)
    block["offer_value"] = np.where(treated, value, 0.0)
    block["offer_min_spend_cents"] = np.where(treated, min_spend, 0.0)
    block["offer_valid_days"] = np.where(treated, valid_days, 0.0)
    block["offer_matches_top_category"] = matches_top.astype(float)
    block["offer_category_affinity"] = np.where(treated, offer_affinity, 0.0)
    block["offer_discount_share_of_aov"] = np.where(treated, discount_share, 0.0)
    block["offer_min_spend_over_aov"] = np.where(treated, min_spend / aov, 0.0)
    return block


def _effect_feature_block(
    users: pd.DataFrame, offer_part: pd.DataFrame
) -> pd.DataFrame:
    """Build EFFECT_FEATURES from the user columns and the offer block.

    Missing inputs (no order, so no depth of an amount; no priced view, so no
    cheapness) stay missing, and XGBoost learns where such rows go.
    """
    treated = offer_part["treated"].to_numpy()
    depth = np.where(treated > 0, offer_part["offer_discount_share_of_aov"], 0.0)
    views = _float_column(users, "views_per_session_30d").to_numpy()
    price_index = _float_column(users, "view_price_index_90d").to_numpy()
    cheapness = np.divide(
        1.0, price_index, out=np.full(len(users), np.nan), where=price_index > 0
    )
    push_app = (
        offer_part["channel_push"].to_numpy()
        * _float_column(users, "uses_app").to_numpy()
    )
    sms = offer_part["channel_sms"].to_numpy()
    email = offer_part["channel_email"].to_numpy()

    block = pd.DataFrame(index=users.index)
    block["effect_depth_x_views"] = depth * views
    block["effect_depth_x_cheapness"] = depth * cheapness
    block["effect_depth_x_views_push_app"] = depth * views * push_app
    block["effect_depth_x_cheapness_push_app"] = depth * cheapness * push_app
    block["effect_depth_x_views_sms"] = depth * views * sms
    block["effect_depth_x_views_email"] = depth * views * email
    block["effect_push_app"] = push_app
    block["effect_views"] = treated * views
    # 0 * NaN is NaN, so rows without an offer get an explicit 0.
    block["effect_cheapness"] = np.where(treated > 0, cheapness, 0.0)
    block["effect_orders"] = treated * _float_column(users, "orders_90d").to_numpy()
    block["effect_cart_rate"] = treated * _float_column(users, "cart_rate").to_numpy()
    for name in ("effect_depth_x_cheapness", "effect_depth_x_cheapness_push_app"):
        block[name] = np.where(treated > 0, block[name], 0.0)
    return block


def _train_two_stages(
    design: pd.DataFrame,
    labels: npt.NDArray[np.float64],
    weights: npt.NDArray[np.float64],
    is_control: npt.NDArray[np.bool_],
    params: dict[str, Any],
    rounds: tuple[int, int],
) -> xgb.Booster:
    """Fit the user stage on control rows, then the effect stage on every row.

    In the second stage every column outside EFFECT_STAGE_FEATURES is set to 0, so
    its trees cannot split on them, and its base margin adds back what the first
    stage predicts from the real columns.
    """
    names = list(design.columns)
    values = design.to_numpy(dtype=np.float64)
    # One explicit base score for both stages, so the second stage's margin is the
    # first stage's prediction and not a re-estimated intercept.
    base_rate = float(np.average(labels[is_control], weights=weights[is_control]))
    base_score = min(max(base_rate, 1e-6), 1.0 - 1e-6)
    user_params = {**params, "base_score": base_score}
    user_rows = xgb.DMatrix(
        values[is_control],
        label=labels[is_control],
        weight=weights[is_control],
        feature_names=names,
    )
    booster = xgb.train(user_params, user_rows, num_boost_round=rounds[0])

    offer_values = values.copy()
    hidden = [i for i, name in enumerate(names) if name not in EFFECT_STAGE_FEATURES]
    offer_values[:, hidden] = 0.0
    user_margin = booster.predict(
        xgb.DMatrix(values, feature_names=names), output_margin=True
    )
    blank_margin = booster.predict(
        xgb.DMatrix(offer_values, feature_names=names), output_margin=True
    )
    monotone = ",".join(
        "1" if name in _INCREASING_EFFECT_FEATURES else "0" for name in names
    )
    effect_params = {
        **params,
        **EFFECT_PARAMS,
        "base_score": base_score,
        "monotone_constraints": f"({monotone})",
    }
    offer_rows = xgb.DMatrix(
        offer_values,
        label=labels,
        weight=weights,
        feature_names=names,
        base_margin=user_margin - blank_margin + logit(base_score),
    )
    return xgb.train(
        effect_params, offer_rows, num_boost_round=rounds[1], xgb_model=booster
    )


def _offer_rows_for_every_column(offers: pd.DataFrame, n_users: int) -> pd.DataFrame:
    no_offer = pd.DataFrame(index=range(n_users), columns=offers.columns)
    blocks = [no_offer.astype(offers.dtypes.to_dict())]
    for j in range(len(offers)):
        blocks.append(offers.iloc[[j] * n_users])
    return pd.concat(blocks, ignore_index=True)


def _offer_rows_for_arms(frame: pd.DataFrame, coupons: pd.DataFrame) -> pd.DataFrame:
    arms = frame["arm"].astype("string")
    column_of_arm = {CONTROL_ARM: 0} | {cid: 1 for cid in coupons["coupon_id"]}
    _check_known_arms(arms, column_of_arm, "frame")
    by_id = coupons.set_index("coupon_id")
    rows = by_id.reindex(arms.where(arms != CONTROL_ARM).to_numpy())
    rows = rows.reset_index(names="coupon_id")
    # reindex leaves the id of unmatched (control) rows as NA, which means no offer.
    return rows


def _check_known_arms(
    arms: pd.Series, column_of_arm: Mapping[str, int], frame_name: str
) -> None:
    if arms.isna().any():
        raise ValueError(
            f"{frame_name}.arm has {int(arms.isna().sum())} missing values; every "
            f"exposure needs a coupon id or {CONTROL_ARM!r}"
        )
    unknown = sorted(set(arms.unique()) - set(column_of_arm))
    if unknown:
        raise ValueError(
            f"{frame_name}.arm has coupon ids {unknown[:5]} that are not in the coupon "
            "catalogue; pass the coupons of the campaign that produced the exposures"
        )


def _binary_labels(column: pd.Series, name: str) -> npt.NDArray[np.float64]:
    if column.isna().any():
        raise ValueError(f"{name} has {int(column.isna().sum())} missing values")
    values = column.to_numpy(dtype=np.float64)
    if not np.isin(values, (0.0, 1.0)).all():
        raise ValueError(f"{name} must be boolean or 0/1")
    return values


def _inverse_propensity_weights(frame: pd.DataFrame) -> npt.NDArray[np.float64]:
    if "propensity" not in frame.columns:
        return np.ones(len(frame))
    propensity = frame["propensity"].to_numpy(dtype=np.float64, na_value=np.nan)
    invalid = ~((propensity > 0) & (propensity <= 1))
    if invalid.any():
        raise ValueError(
            f"train_frame.propensity has {int(invalid.sum())} values outside (0, 1] "
            "or missing; it must be the probability that the logging policy chose "
            "the row's arm"
        )
    weights = 1.0 / propensity
    return weights / weights.mean()


def _auc(labels: npt.NDArray[np.float64], scores: npt.NDArray[np.float64]) -> float:
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def _float_column(frame: pd.DataFrame, name: str) -> pd.Series:
    return pd.Series(
        pd.to_numeric(frame[name], errors="raise").to_numpy(
            dtype=np.float64, na_value=np.nan
        ),
        index=frame.index,
        name=name,
    )


def _require_columns(
    frame: pd.DataFrame, columns: Iterable[str], frame_name: str
) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{frame_name} is missing columns {missing}")
