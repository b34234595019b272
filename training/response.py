"""Response model: P(convert | user, offer) for every offer and none.

Two stages, trained on a randomized past campaign. XGBoost trees on the user features
fit conversion without an offer, on the control rows. An elasticity model then fits
the offers' effect on the treated rows. An offer adds its discount depth times the
user's elasticity to the log-odds of conversion. The log of the elasticity is linear
in the channel's reach, the offer's kind and the user's price-sensitivity signals.
Offers enter as attributes, not ids, so a coupon that was never sent can be scored.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import xgboost as xgb
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from couponflow.allocation.scoring import (
    BasketPrior,
    fit_basket_prior,
    shrunk_basket_cents,
)
from couponflow.schemas import (
    ALL_CATEGORIES,
    CATEGORIES,
    CHANNELS,
    CONTROL_ARM,
    COUPON_KINDS,
)
from couponflow.uplift import auuc, qini_coefficient, uplift_at_k

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

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
OFFER_REQUIRED_COLUMNS: tuple[str, ...] = (
    "coupon_id",
    "kind",
    "value",
    "min_spend_cents",
)

# Conversion without an offer: shallow, slowly learning trees with large leaves, since
# a few thousand control rows carry the signal. XGBoost uses every core unless params
# set "nthread".
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
DEFAULT_NUM_BOOST_ROUND = 200

# The elasticity model. Its log-elasticity has one reach term per channel for app
# users and one for the others, a term per offer kind after the first of COUPON_KINDS,
# and a term per signal of ELASTICITY_SIGNALS. The signals of HINGE_SIGNALS also get
# hinge terms max(0, signal - knot), with knots at HINGE_QUANTILES of the training
# users, so that their effect can bend. Every coupon's effect comes from these shared
# terms, which measured far better on the simulated store than trees that fit each
# coupon's effect (benchmarks/decision_quality.py), because the trees fitted each
# arm's sampling noise and gave seldom-redeemable coupons spurious effects.
# NOTE: an effect that varies along a user feature outside these signals is not
# learned; add a signal for it.
ELASTICITY_SIGNALS: tuple[str, ...] = (
    "views_per_session_30d",
    "has_sessions_30d",
    "log_view_price_index_90d",
    "has_priced_views_90d",
    "log_orders_90d",
    "cart_rate",
    "recency_months",
    "offer_category_affinity",
)
HINGE_SIGNALS: tuple[str, ...] = (
    "views_per_session_30d",
    "log_view_price_index_90d",
    "cart_rate",
)
HINGE_QUANTILES: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
# Penalty on the squared coefficients of the terms scaled to unit standard deviation,
# added to the weighted negative log-likelihood summed over the treated rows (weights
# of mean 1). On simulated stores of 30,000 users (benchmarks/decision_quality.py) a
# penalty of 1 overfit some worlds, and 10 and 50 measured alike.
DEFAULT_EFFECT_L2 = 10.0
# The log-elasticity is clipped to this maximum so that exp() stays finite. The
# largest fitted on a simulated store of 30,000 users was about 3.4.
MAX_LOG_ELASTICITY = 5.0
# Recency counts up to this many days, in months of 30 days.
RECENCY_CAP_DAYS = 90.0

SPEC_FORMAT_VERSION = 3
# Top share of the holdout for the uplift@k metric of evaluate().
UPLIFT_AT_K = 0.3
# Users scored per chunk of predict_conversion, to bound memory.
_PREDICT_CHUNK_USERS = 200_000


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


@dataclass(frozen=True)
class OfferEffect:
    """Fitted elasticity model of how offers raise the log-odds of conversion.

    An offer of discount depth ``d`` adds ``d * exp(index)`` to the log-odds, where
    ``index`` is the dot product of ``coefficients`` with the terms named
    ``term_names`` (see ELASTICITY_SIGNALS), and ``knots`` are the hinge knots of
    each of HINGE_SIGNALS. Depth is the percent of a percent_off offer, and for the
    other kinds the value's share of the user's expected basket, at most 1. That
    basket is :func:`shrunk_basket_cents` under ``basket_prior``, or without a
    prior the user's aov_cents, with ``fallback_basket_cents`` for a user without a
    purchase.
    """

    term_names: tuple[str, ...]
    coefficients: tuple[float, ...]
    knots: Mapping[str, tuple[float, ...]]
    basket_prior: BasketPrior | None
    fallback_basket_cents: int

    def __post_init__(self) -> None:
        if len(self.term_names) != len(self.coefficients):
            raise ValueError(
                f"OfferEffect has {len(self.term_names)} terms but "
                f"{len(self.coefficients)} coefficients"
            )
        if self.fallback_basket_cents < 0:
            raise ValueError(
                f"fallback_basket_cents must be >= 0, got {self.fallback_basket_cents}"
            )

    def baskets(self, users: pd.DataFrame) -> FloatArray:
        """Return the expected basket in cents of each user, as depth uses it."""
        if self.basket_prior is not None:
            basket = shrunk_basket_cents(users, self.basket_prior)
            return np.asarray(basket, dtype=np.float64)
        aov = _float_column(users, "aov_cents").fillna(0.0).to_numpy()
        fallback = float(self.fallback_basket_cents)
        return np.asarray(np.where(aov > 0, aov, fallback), dtype=np.float64)

    def log_odds_gain(
        self,
        users: pd.DataFrame,
        offer_rows: pd.DataFrame,
        baskets: FloatArray,
        encoding: FeatureEncoding,
    ) -> FloatArray:
        """Return the log-odds each offer row adds for the user row beside it."""
        depth = _offer_depth(offer_rows, baskets)
        terms = _elasticity_terms(users, offer_rows, self.knots, encoding)
        index = terms.to_numpy(dtype=np.float64) @ np.asarray(self.coefficients)
        return np.asarray(
            depth * np.exp(np.minimum(index, MAX_LOG_ELASTICITY)), dtype=np.float64
        )

    def to_spec(self) -> dict[str, Any]:
        """Return the effect as JSON-ready data, for :meth:`from_spec`."""
        return {
            "term_names": list(self.term_names),
            "coefficients": [float(c) for c in self.coefficients],
            "knots": {name: list(values) for name, values in self.knots.items()},
            "basket_prior": (
                None if self.basket_prior is None else asdict(self.basket_prior)
            ),
            "fallback_basket_cents": int(self.fallback_basket_cents),
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> OfferEffect:
        """Rebuild an effect from the output of :meth:`to_spec`."""
        prior = spec.get("basket_prior")
        return cls(
            term_names=tuple(spec["term_names"]),
            coefficients=tuple(float(c) for c in spec["coefficients"]),
            knots={
                str(name): tuple(float(k) for k in values)
                for name, values in spec["knots"].items()
            },
            basket_prior=None if prior is None else BasketPrior(**prior),
            fallback_basket_cents=int(spec["fallback_basket_cents"]),
        )


@dataclass(frozen=True)
class FeatureEncoding:
    """Vocabularies that turn offer attributes into model inputs."""

    categories: tuple[str, ...] = CATEGORIES
    offer_kinds: tuple[str, ...] = COUPON_KINDS
    channels: tuple[str, ...] = CHANNELS


@dataclass
class ResponseModel:
    """A trained baseline booster and offer effect that score (user, offer) pairs."""

    booster: xgb.Booster
    user_features: tuple[str, ...]
    categories: tuple[str, ...] = CATEGORIES
    offer_kinds: tuple[str, ...] = COUPON_KINDS
    channels: tuple[str, ...] = CHANNELS
    params: dict[str, Any] = field(default_factory=dict)
    num_boost_round: int = DEFAULT_NUM_BOOST_ROUND
    trained_arms: tuple[str, ...] = ()
    # None until train_response_model fits it.
    effect: OfferEffect | None = None
    # Registered version URI (models:/<name>/<version>) when loaded from MLflow.
    model_uri: str | None = None

    @property
    def feature_names(self) -> list[str]:
        """Columns of the booster's input, in its order."""
        return _feature_names(self.user_features, self.categories)

    @property
    def encoding(self) -> FeatureEncoding:
        """The model's vocabularies of categories, offer kinds and channels."""
        return FeatureEncoding(self.categories, self.offer_kinds, self.channels)

    def predict_conversion(
        self, users: pd.DataFrame, offers: pd.DataFrame
    ) -> npt.NDArray[np.float64]:
        """Predict P(convert) of every user under no offer and under each offer.

        Returns an array of shape ``(len(users), 1 + len(offers))``. Column 0 is no
        offer, and column ``j`` is the offer in row ``j - 1`` of ``offers``. Offers
        follow the COUPONS contract; an offer counts as sent by the channel that
        :func:`validate_offers` gives it, and stock and dates are not used.
        """
        effect = self._trained_effect()
        users = users.reset_index(drop=True)
        offers = validate_offers(offers, self.offer_kinds, self.categories)
        n_users = len(users)
        result = np.empty((n_users, 1 + len(offers)), dtype=np.float64)
        for start in range(0, n_users, _PREDICT_CHUNK_USERS):
            chunk = users.iloc[start : start + _PREDICT_CHUNK_USERS]
            chunk = chunk.reset_index(drop=True)
            margin = self._baseline_margin(chunk)
            baskets = effect.baskets(chunk)
            rows = slice(start, start + len(chunk))
            result[rows, 0] = expit(margin)
            for j in range(len(offers)):
                offer_rows = offers.iloc[[j] * len(chunk)].reset_index(drop=True)
                gain = effect.log_odds_gain(chunk, offer_rows, baskets, self.encoding)
                result[rows, j + 1] = expit(margin + gain)
        return result

    def predict_assigned(
        self, frame: pd.DataFrame, coupons: pd.DataFrame
    ) -> npt.NDArray[np.float64]:
        """Predict P(convert) of each row of ``frame`` under the arm in its column.

        A ``channel`` column of ``frame`` gives the channel each offer was sent by.
        Without one, an offer counts as sent by its coupon's first listed channel.
        """
        effect = self._trained_effect()
        frame = frame.reset_index(drop=True)
        offer_rows = self._assigned_offer_rows(frame, coupons)
        margin = self._baseline_margin(frame)
        gain = effect.log_odds_gain(
            frame, offer_rows, effect.baskets(frame), self.encoding
        )
        return np.asarray(expit(margin + gain), dtype=np.float64)

    def assigned_design_matrix(
        self, frame: pd.DataFrame, coupons: pd.DataFrame
    ) -> pd.DataFrame:
        """Build the booster's input for each row of ``frame``, after checking its arm.

        The booster predicts conversion without an offer, so its input contains only
        the user features, and the arm acts through :attr:`effect`.
        """
        frame = frame.reset_index(drop=True)
        self._assigned_offer_rows(frame, coupons)
        return self.design_matrix(frame)

    def design_matrix(self, users: pd.DataFrame) -> pd.DataFrame:
        """Build the booster's input, one row per row of ``users``."""
        missing = [
            c for c in (*self.user_features, TOP_CATEGORY_COLUMN) if c not in users
        ]
        if missing:
            raise ValueError(
                f"user frame is missing columns {missing}, which the response model "
                "was trained on; pass the user feature frame of the same feature run"
            )
        block = _user_feature_block(users, self.user_features, self.categories)
        return block[self.feature_names]

    def to_spec(self) -> dict[str, Any]:
        """Return the encoding and the offer effect as JSON-ready data."""
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
            "trained_arms": list(self.trained_arms),
            "effect": None if self.effect is None else self.effect.to_spec(),
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
        effect_spec = spec.get("effect")
        model = cls(
            booster=booster,
            user_features=tuple(spec["user_features"]),
            categories=tuple(spec["categories"]),
            offer_kinds=tuple(spec["offer_kinds"]),
            channels=tuple(spec["channels"]),
            params=dict(spec.get("params", {})),
            num_boost_round=int(spec.get("num_boost_round", 0)),
            trained_arms=tuple(spec.get("trained_arms", ())),
            effect=None if effect_spec is None else OfferEffect.from_spec(effect_spec),
        )
        stored_names = list(spec["feature_names"])
        if model.feature_names != stored_names or booster.feature_names != stored_names:
            raise ValueError(
                "response model spec and booster disagree on the feature names "
                f"(spec {stored_names}, booster {booster.feature_names}); the "
                "artifacts do not belong together, so re-register the model"
            )
        if model.effect is not None:
            expected_terms = _term_names(model.encoding, model.effect.knots)
            if list(model.effect.term_names) != expected_terms:
                raise ValueError(
                    "response model spec has effect terms "
                    f"{list(model.effect.term_names)}, but its encoding gives "
                    f"{expected_terms}; re-register the model"
                )
        return model

    def _trained_effect(self) -> OfferEffect:
        if self.effect is None:
            raise ValueError(
                "response model has no offer effect; train it with "
                "train_response_model before predicting"
            )
        return self.effect

    def _baseline_margin(self, users: pd.DataFrame) -> FloatArray:
        design = self.design_matrix(users)
        matrix = xgb.DMatrix(
            design.to_numpy(dtype=np.float64), feature_names=list(design.columns)
        )
        margin = self.booster.predict(matrix, output_margin=True)
        return np.asarray(margin, dtype=np.float64)

    def _assigned_offer_rows(
        self, frame: pd.DataFrame, coupons: pd.DataFrame
    ) -> pd.DataFrame:
        coupons = validate_offers(
            coupons, self.offer_kinds, self.categories, drop_repeated=True
        )
        offer_rows = _offer_rows_for_arms(frame, coupons)
        if "channel" in frame.columns:
            offer_rows["channel"] = frame["channel"].astype("string")
        return offer_rows


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

    The booster fits conversion without an offer on the control rows. The offer
    effect (see :class:`OfferEffect`) is then fitted by maximum likelihood on the
    treated rows, with the booster's prediction as offset, so that every coupon's
    effect comes from the same few coefficients. The basket prior that depth uses
    is fitted on ``train_frame`` and kept, so that a user's prediction does not
    depend on the other users scored with it.

    ``params`` override DEFAULT_PARAMS. Its key ``num_boost_round`` sets the
    booster's trees and ``effect_l2`` the effect's penalty (DEFAULT_EFFECT_L2).
    """
    merged_params = {**DEFAULT_PARAMS, **dict(params or {})}
    num_boost_round = int(merged_params.pop("num_boost_round", DEFAULT_NUM_BOOST_ROUND))
    effect_l2 = float(merged_params.pop("effect_l2", DEFAULT_EFFECT_L2))
    if effect_l2 < 0:
        raise ValueError(f"effect_l2 must be >= 0, got {effect_l2}")
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
        trained_arms=tuple(sorted(arms.unique().tolist())),
    )
    offer_rows = model._assigned_offer_rows(frame, coupons)
    design = model.design_matrix(frame)
    log.info(
        "training response model on %d rows (%d control, %d arms, %d features)",
        len(frame),
        n_control,
        len(model.trained_arms),
        len(design.columns),
    )
    model.booster = _train_baseline(
        design, labels, weights, is_control, merged_params, num_boost_round
    )
    treated = ~is_control
    model.effect = _fit_offer_effect(
        frame[treated].reset_index(drop=True),
        offer_rows[treated].reset_index(drop=True),
        model._baseline_margin(frame)[treated],
        labels[treated],
        weights[treated],
        model.encoding,
        effect_l2,
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
    user_features: tuple[str, ...], categories: tuple[str, ...]
) -> list[str]:
    return [
        *user_features,
        *(f"top_category_{category}" for category in categories),
    ]


def _train_baseline(
    design: pd.DataFrame,
    labels: FloatArray,
    weights: FloatArray,
    is_control: npt.NDArray[np.bool_],
    params: dict[str, Any],
    rounds: int,
) -> xgb.Booster:
    # The trees start from the control rows' conversion rate.
    base_rate = float(np.average(labels[is_control], weights=weights[is_control]))
    base_score = min(max(base_rate, 1e-6), 1.0 - 1e-6)
    rows = xgb.DMatrix(
        design.to_numpy(dtype=np.float64)[is_control],
        label=labels[is_control],
        weight=weights[is_control],
        feature_names=list(design.columns),
    )
    return xgb.train({**params, "base_score": base_score}, rows, num_boost_round=rounds)


def _fit_offer_effect(
    users: pd.DataFrame,
    offer_rows: pd.DataFrame,
    margin: FloatArray,
    labels: FloatArray,
    weights: FloatArray,
    encoding: FeatureEncoding,
    l2: float,
) -> OfferEffect:
    """Fit the effect's coefficients on treated rows by penalized likelihood."""
    aov = _float_column(users, "aov_cents").fillna(0.0).to_numpy()
    bought = aov[aov > 0]
    prior = fit_basket_prior(users)
    effect = OfferEffect(
        term_names=(),
        coefficients=(),
        knots=_fit_knots(users),
        basket_prior=prior,
        fallback_basket_cents=int(np.median(bought)) if bought.size else 0,
    )
    depth = _offer_depth(offer_rows, effect.baskets(users))
    terms = _elasticity_terms(users, offer_rows, effect.knots, encoding)
    # The penalty acts on coefficients of terms scaled to unit standard deviation,
    # so that it does not depend on a term's units.
    scale = terms.to_numpy(dtype=np.float64).std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    matrix = terms.to_numpy(dtype=np.float64) / scale

    def penalized_loss(coefficients: FloatArray) -> tuple[float, FloatArray]:
        index = matrix @ coefficients
        elasticity = np.exp(np.minimum(index, MAX_LOG_ELASTICITY))
        log_odds = margin + depth * elasticity
        # -log p = log(1 + e^-z) and -log(1 - p) = log(1 + e^z), without overflow.
        loss = np.where(
            labels > 0, np.logaddexp(0.0, -log_odds), np.logaddexp(0.0, log_odds)
        )
        residual = weights * (expit(log_odds) - labels)
        slope = depth * elasticity * (index < MAX_LOG_ELASTICITY)
        gradient = matrix.T @ (residual * slope) + 2.0 * l2 * coefficients
        value = float(np.dot(weights, loss) + l2 * np.dot(coefficients, coefficients))
        return value, gradient

    result = minimize(
        penalized_loss, np.zeros(matrix.shape[1]), jac=True, method="L-BFGS-B"
    )
    if not result.success:
        log.warning(
            "offer effect fit stopped before converging (%s); using its last "
            "coefficients",
            result.message,
        )
    log.info(
        "fitted offer effect on %d treated rows: %s",
        len(users),
        ", ".join(
            f"{n} {c:+.2f}" for n, c in zip(terms.columns, result.x, strict=True)
        ),
    )
    return OfferEffect(
        term_names=tuple(terms.columns),
        coefficients=tuple(float(c) for c in result.x / scale),
        knots=effect.knots,
        basket_prior=prior,
        fallback_basket_cents=effect.fallback_basket_cents,
    )


def _user_signals(users: pd.DataFrame) -> dict[str, FloatArray]:
    """Return the user columns of ELASTICITY_SIGNALS, 0 where a signal is missing."""
    sessions = _float_column(users, "sessions_30d").fillna(0.0).to_numpy() > 0
    views = _float_column(users, "views_per_session_30d").fillna(0.0).to_numpy()
    price_index = _float_column(users, "view_price_index_90d").fillna(0.0).to_numpy()
    priced = price_index > 0
    orders = _float_column(users, "orders_90d").fillna(0.0).to_numpy()
    recency = _float_column(users, "recency_days").fillna(RECENCY_CAP_DAYS).to_numpy()
    cart_rate = _float_column(users, "cart_rate").fillna(0.0).to_numpy()
    return {
        "views_per_session_30d": np.where(sessions, views, 0.0),
        "has_sessions_30d": sessions.astype(np.float64),
        "log_view_price_index_90d": np.log(np.where(priced, price_index, 1.0)),
        "has_priced_views_90d": priced.astype(np.float64),
        "log_orders_90d": np.log1p(np.maximum(orders, 0.0)),
        "cart_rate": cart_rate,
        "recency_months": np.clip(recency, 0.0, RECENCY_CAP_DAYS) / 30.0,
    }


def _fit_knots(users: pd.DataFrame) -> dict[str, tuple[float, ...]]:
    """Return HINGE_QUANTILES of each hinge signal over the users who have it."""
    signals = _user_signals(users)
    present = {
        "views_per_session_30d": signals["has_sessions_30d"] > 0,
        "log_view_price_index_90d": signals["has_priced_views_90d"] > 0,
    }
    knots: dict[str, tuple[float, ...]] = {}
    for name in HINGE_SIGNALS:
        values = signals[name][present.get(name, np.ones(len(users), dtype=bool))]
        if values.size == 0:
            knots[name] = ()
            continue
        quantiles = np.unique(np.quantile(values, HINGE_QUANTILES))
        knots[name] = tuple(float(q) for q in quantiles)
    return knots


def _term_names(
    encoding: FeatureEncoding, knots: Mapping[str, tuple[float, ...]]
) -> list[str]:
    names = [
        f"reach_{channel}_{audience}"
        for channel in encoding.channels
        for audience in ("app", "other")
    ]
    names += [f"kind_{kind}" for kind in encoding.offer_kinds[1:]]
    for signal in ELASTICITY_SIGNALS:
        names.append(signal)
        names += [f"{signal}_over_{i}" for i in range(len(knots.get(signal, ())))]
    return names


def _elasticity_terms(
    users: pd.DataFrame,
    offer_rows: pd.DataFrame,
    knots: Mapping[str, tuple[float, ...]],
    encoding: FeatureEncoding,
) -> pd.DataFrame:
    """Build the terms of the log-elasticity, one row per (user, offer) row pair.

    Rows without an offer get the terms too; their depth of 0 cancels them.
    """
    if len(users) != len(offer_rows):
        raise ValueError(
            f"the offer effect needs one offer row per user row, got "
            f"{len(offer_rows)} offer rows for {len(users)} user rows"
        )
    signals = _user_signals(users)
    signals["offer_category_affinity"] = _offer_category_affinity(
        users, offer_rows, encoding.categories
    )
    uses_app = _float_column(users, "uses_app").fillna(0.0).to_numpy() > 0
    channel = offer_rows["channel"].astype("string")
    kind = offer_rows["kind"].astype("string")

    columns: dict[str, FloatArray] = {}
    for name in encoding.channels:
        sent_by = (channel == name).fillna(False).to_numpy(dtype=bool)
        columns[f"reach_{name}_app"] = (sent_by & uses_app).astype(np.float64)
        columns[f"reach_{name}_other"] = (sent_by & ~uses_app).astype(np.float64)
    for name in encoding.offer_kinds[1:]:
        is_kind = (kind == name).fillna(False).to_numpy(dtype=bool)
        columns[f"kind_{name}"] = is_kind.astype(np.float64)
    for signal in ELASTICITY_SIGNALS:
        values = signals[signal]
        columns[signal] = values
        for i, knot in enumerate(knots.get(signal, ())):
            columns[f"{signal}_over_{i}"] = np.maximum(0.0, values - knot)
    terms = pd.DataFrame(columns, index=users.index)
    return terms[_term_names(encoding, knots)]


def _offer_category_affinity(
    users: pd.DataFrame, offer_rows: pd.DataFrame, categories: tuple[str, ...]
) -> FloatArray:
    """Return the user's affinity for the offer's category, 1 for every category."""
    category = offer_rows["category"].astype("string")
    affinity = np.ones(len(users))
    for name in categories:
        rows = (category == name).fillna(False).to_numpy(dtype=bool)
        if rows.any():
            column = _float_column(users, f"affinity_{name}").fillna(0.0).to_numpy()
            affinity[rows] = column[rows]
    return affinity


def _offer_depth(offer_rows: pd.DataFrame, baskets: FloatArray) -> FloatArray:
    """Return each offer's discount share of the basket in [0, 1], 0 for no offer.

    percent_off gives its percent; the other kinds give their value over the
    basket, and 0 for a basket of 0.
    """
    treated = offer_rows["coupon_id"].notna().to_numpy()
    percent = (offer_rows["kind"] == "percent_off").fillna(False).to_numpy(dtype=bool)
    value = offer_rows["value"].to_numpy(dtype=np.float64, na_value=0.0)
    share = np.divide(value, baskets, out=np.zeros(len(offer_rows)), where=baskets > 0)
    depth = np.where(percent, value / 10_000.0, share)
    return np.asarray(np.where(treated, np.clip(depth, 0.0, 1.0), 0.0), np.float64)


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
