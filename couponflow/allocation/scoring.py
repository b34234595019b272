"""Expected incremental profit and cost, in cents, of each offer for each user."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd

from couponflow.money import percent_of_cents_array
from couponflow.schemas import COUPON_KINDS

log = logging.getLogger(__name__)

FloatMatrix = npt.NDArray[np.float64]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

OFFER_COLUMNS: tuple[str, ...] = ("coupon_id", "kind", "value", "min_spend_cents")
# Buyers needed per order count for its variance to enter the basket prior's fit.
MIN_BUYERS_PER_ORDER_COUNT = 30


@dataclass(frozen=True)
class OfferScores:
    """Per-user, per-offer scores, where column ``j`` of a matrix is ``offer_ids[j]``.

    ``profit_cents`` is the expected incremental profit, ``cost_cents`` the expected
    discount paid, ``uplift`` the predicted change in conversion probability and
    ``discount_cents`` the discount if the user converts (None when only the other
    matrices were saved). Matrices are ``(n_users, n_offers)``, and a mismatch
    raises ``ValueError`` at construction.
    """

    offer_ids: Sequence[str]
    profit_cents: FloatMatrix
    cost_cents: FloatMatrix
    uplift: FloatMatrix
    discount_cents: npt.NDArray[np.int64] | None = None

    def __post_init__(self) -> None:
        # Any sequence of ids (a list, a pandas column) is kept as an immutable tuple.
        object.__setattr__(self, "offer_ids", tuple(str(c) for c in self.offer_ids))
        shape = np.shape(self.profit_cents)
        matrices: dict[str, npt.NDArray[Any]] = {
            "cost_cents": self.cost_cents,
            "uplift": self.uplift,
        }
        if self.discount_cents is not None:
            matrices["discount_cents"] = self.discount_cents
        for name, matrix in matrices.items():
            if np.shape(matrix) != shape:
                raise ValueError(
                    f"{name} has shape {np.shape(matrix)} but profit_cents has "
                    f"shape {shape}"
                )
        if len(shape) != 2 or shape[1] != len(self.offer_ids):
            raise ValueError(
                f"profit_cents must have shape (n_users, {len(self.offer_ids)}) for "
                f"{len(self.offer_ids)} offer_ids, got {shape}"
            )

    @property
    def n_users(self) -> int:
        return int(self.profit_cents.shape[0])

    @property
    def n_offers(self) -> int:
        return int(self.profit_cents.shape[1])


class ConversionModel(Protocol):
    """Response model interface of scoring: P(convert) without and with each offer."""

    def predict_conversion(
        self, users: pd.DataFrame, offers: pd.DataFrame
    ) -> npt.NDArray[np.float64]: ...


@dataclass(frozen=True)
class BasketPrior:
    """Population model of users' mean order values, in natural-log cents.

    A user's log mean basket is normal with mean ``log_mean`` and variance
    ``between_variance`` across users. The log of one order's value varies around
    it with variance ``order_variance``, so the log of an average over ``n``
    orders has about ``order_variance / n`` of noise.
    """

    log_mean: float
    between_variance: float
    order_variance: float

    def __post_init__(self) -> None:
        if not np.isfinite(self.log_mean):
            raise ValueError(f"log_mean must be finite, got {self.log_mean}")
        for name in ("between_variance", "order_variance"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value}")


def fit_basket_prior(users: pd.DataFrame) -> BasketPrior | None:
    """Fit a :class:`BasketPrior` to the buyers' ``aov_cents`` and ``orders_90d``.

    Among buyers with ``n`` orders, the variance of ``log(aov_cents)`` is
    ``between_variance + order_variance / n``. A least-squares line through the
    variance of each order count with at least MIN_BUYERS_PER_ORDER_COUNT buyers,
    weighted by the buyers, gives both variances. Returns None when fewer than two
    order counts have that many buyers, or when the fit leaves a variance <= 0,
    because then the two sources of spread cannot be separated.
    """
    _require_user_columns(users, ("aov_cents", "orders_90d"))
    aov, orders = _aov_and_orders(users)
    bought = aov > 0
    log_aov = np.log(aov[bought])
    n_orders = orders[bought]

    counts, index, sizes = np.unique(n_orders, return_inverse=True, return_counts=True)
    fitted = np.flatnonzero(sizes >= MIN_BUYERS_PER_ORDER_COUNT)
    if fitted.size < 2:
        return None
    variances = np.array([log_aov[index == g].var(ddof=1) for g in fitted])
    design = np.column_stack([np.ones(fitted.size), 1.0 / counts[fitted]])
    root_weight = np.sqrt(sizes[fitted].astype(np.float64))
    coefficients, *_ = np.linalg.lstsq(
        design * root_weight[:, None], variances * root_weight, rcond=None
    )
    between, order = (float(c) for c in coefficients)
    if between <= 0 or order <= 0:
        log.info(
            "basket prior fit gave variances %.4f (between users) and %.4f (per "
            "order); no prior is fitted",
            between,
            order,
        )
        return None
    # The log of an average of n orders falls about order_variance / (2 n) below
    # the log of the mean basket, so that bias is added back before averaging.
    log_mean = float(np.mean(log_aov + order / (2.0 * n_orders)))
    return BasketPrior(log_mean, between, order)


def expected_basket_cents(users: pd.DataFrame) -> IntArray:
    """Return each user's expected order value in cents, for discount and margin.

    A buyer's basket is their ``aov_cents``. A user with no purchase in the feature
    window has ``aov_cents`` 0; their basket is taken as the median order value of
    the users who did buy, or 0 when no user bought, since a conversion of theirs
    is still an order of ordinary size. Raises ``ValueError`` on a missing
    ``aov_cents`` column or negative values.

    NOTE: :func:`shrunk_basket_cents` estimates each basket with less noise, but
    scoring on it earned less true profit per cent of true discount in
    benchmarks/decision_quality.py, mostly because users without a purchase then
    get the population's mean basket, which is above the median.
    """
    _require_user_columns(users, ("aov_cents",))
    return _observed_baskets(_aov_and_orders(users, need_orders=False)[0])


def shrunk_basket_cents(users: pd.DataFrame, prior: BasketPrior) -> IntArray:
    """Return each user's posterior mean order value in cents under ``prior``.

    Each buyer's ``aov_cents`` is shrunk toward the population, the less the more
    orders (``orders_90d``) it averages. When the two variances of the prior are
    equal, a buyer with one order gets the geometric midpoint of their
    ``aov_cents`` and the population's typical basket. A user without a purchase
    (``aov_cents`` 0) gets the population's mean basket,
    ``exp(log_mean + between_variance / 2)``. Raises ``ValueError`` on missing
    columns or negative values.
    """
    _require_user_columns(users, ("aov_cents", "orders_90d"))
    aov, orders = _aov_and_orders(users)
    return _shrunk_baskets(aov, orders, prior)


def _shrunk_baskets(
    aov: FloatArray, orders: FloatArray, prior: BasketPrior
) -> IntArray:
    bought = aov > 0
    noise = np.where(bought, prior.order_variance / np.maximum(orders, 1.0), np.inf)
    reliability = np.where(
        bought, prior.between_variance / (prior.between_variance + noise), 0.0
    )
    log_aov = np.log(np.where(bought, aov, 1.0)) + np.where(bought, noise, 0.0) / 2.0
    posterior_mean = reliability * log_aov + (1.0 - reliability) * prior.log_mean
    posterior_variance = (1.0 - reliability) * prior.between_variance
    mean = np.exp(posterior_mean + posterior_variance / 2.0)
    return np.floor(mean + 0.5).astype(np.int64)


def _observed_baskets(aov: FloatArray) -> IntArray:
    cents = np.floor(aov + 0.5).astype(np.int64)
    bought = cents[cents > 0]
    fallback = int(np.median(bought)) if bought.size else 0
    return np.where(cents > 0, cents, fallback).astype(np.int64)


def _aov_and_orders(
    users: pd.DataFrame, need_orders: bool = True
) -> tuple[FloatArray, FloatArray]:
    """Return aov_cents and orders_90d as floats, with at least one order per buyer.

    Missing values count as 0. Raises ``ValueError`` on negative values.
    """
    aov = np.asarray(
        pd.to_numeric(users["aov_cents"]).astype("float64").fillna(0.0), np.float64
    )
    if (aov < 0).any():
        raise ValueError(f"aov_cents must be >= 0, got minimum {aov.min()}")
    if not need_orders:
        return aov, np.zeros_like(aov)
    orders = pd.to_numeric(users["orders_90d"]).astype("float64").fillna(0.0)
    orders_array = np.asarray(orders, np.float64)
    if (orders_array < 0).any():
        raise ValueError(f"orders_90d must be >= 0, got minimum {orders_array.min()}")
    counted = np.where(aov > 0, np.maximum(orders_array, 1.0), 0.0)
    return aov, np.asarray(counted, np.float64)


def _require_user_columns(users: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in users.columns]
    if missing:
        raise ValueError(
            f"users has no {', '.join(missing)} column; pass the user feature "
            "frame, which the expected basket of each user comes from"
        )


def score_users(
    model: ConversionModel,
    users: pd.DataFrame,
    offers: pd.DataFrame,
    margin_rate: float,
    channel: str | None = None,
) -> tuple[npt.NDArray[np.float64], OfferScores]:
    """Predict and score every user x offer; return the probabilities and scores.

    Each offer counts as sent by ``channel``, or by its first listed channel when
    ``channel`` is None. The probabilities are the model's ``(n_users, 1 +
    n_offers)`` output; the scores are those of :func:`score_offers` on each user's
    :func:`expected_basket_cents`. Every caller that turns a response model into
    profit (campaigns, the promotion gate, coupon design, the benchmarks) goes
    through here, so they all value an offer alike.
    """
    sent = offers if channel is None else offers.assign(channel=channel)
    p = model.predict_conversion(users, sent)
    basket = expected_basket_cents(users)
    return p, score_offers(p, basket, offers, margin_rate)


def score_offers(
    p: npt.ArrayLike,
    aov_cents: npt.ArrayLike,
    offers: pd.DataFrame,
    margin_rate: float,
) -> OfferScores:
    """Score every offer for every user from the response model's probabilities.

    ``p`` has shape ``(n_users, 1 + n_offers)``: column 0 is the conversion
    probability without an offer and column ``j`` the probability with the offer in
    row ``j - 1`` of ``offers`` (the COUPONS contract). For a user with expected
    basket ``aov`` and an offer with discount ``d``::

        profit = margin_rate * aov * (p[:, j] - p[:, 0]) - p[:, j] * d
        cost = p[:, j] * d

    A coupon of any kind whose ``min_spend_cents`` exceeds the user's expected
    basket counts as not redeemable, so its discount is 0 and its predicted
    conversion is replaced by ``p[:, 0]``: uplift, profit and cost are all 0 for
    that pair, so a basket of 0 takes only coupons without a minimum spend. An
    ``amount_off`` discount is capped at the basket.

    NOTE: a category coupon's discount is charged on every conversion, though the
    store grants it only on orders that contain the category, so its cost is
    overstated. Weighting the discount by the chance that the basket contains the
    category, or the minimum spend by the chance that an order reaches it, earned
    less true profit in benchmarks/decision_quality.py, with both the elasticity
    response model and the per-coupon trees it replaced. A coupon that looks cheap
    is granted widely, so every error in its predicted uplift is multiplied.
    Raises ``ValueError`` naming the invalid input.
    """
    probabilities = _validate_probabilities(p)
    n_users, n_columns = probabilities.shape
    basket = _validate_aov(aov_cents, n_users)
    _validate_offers(offers, n_columns - 1)
    if not 0.0 <= margin_rate <= 1.0:
        raise ValueError(f"margin_rate must be in [0, 1], got {margin_rate}")

    n_offers = len(offers)
    discount = np.zeros((n_users, n_offers), dtype=np.int64)
    with_offer = probabilities[:, 1:].copy()
    base = probabilities[:, 0]
    for j, offer in enumerate(offers.itertuples(index=False)):
        usable = _usable(offer, basket)
        discount[:, j] = np.where(usable, _discount_cents(offer, basket), 0)
        with_offer[:, j] = np.where(usable, with_offer[:, j], base)

    uplift = with_offer - base[:, None]
    cost = with_offer * discount
    profit = margin_rate * basket[:, None] * uplift - cost
    log.info(
        "scored %d users x %d offers; %d pairs with positive expected profit",
        n_users,
        n_offers,
        int((profit > 0).sum()),
    )
    return OfferScores(
        offer_ids=offers["coupon_id"].tolist(),
        profit_cents=profit,
        cost_cents=cost,
        uplift=uplift,
        discount_cents=discount,
    )


def _usable(offer: Any, basket: IntArray) -> npt.NDArray[np.bool_]:
    return np.asarray(basket >= int(offer.min_spend_cents))


def _discount_cents(offer: Any, basket: IntArray) -> IntArray:
    value = int(offer.value)
    if offer.kind == "percent_off":
        return percent_of_cents_array(basket, value)
    if offer.kind == "amount_off":
        # A discount larger than the basket is capped at the basket.
        return np.minimum(basket, value)
    return np.full(basket.shape, value, dtype=np.int64)


def _validate_probabilities(p: npt.ArrayLike) -> FloatMatrix:
    probabilities = np.asarray(p, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] < 2:
        raise ValueError(
            "p must have shape (n_users, 1 + n_offers) with at least one offer, "
            f"got shape {probabilities.shape}"
        )
    if not np.isfinite(probabilities).all():
        raise ValueError(
            "p contains NaN or infinite values, so check the response model's output"
        )
    if probabilities.min(initial=0.0) < 0.0 or probabilities.max(initial=0.0) > 1.0:
        raise ValueError(
            "p must contain probabilities in [0, 1], got values in "
            f"[{probabilities.min()}, {probabilities.max()}]"
        )
    return probabilities


def _validate_aov(aov_cents: npt.ArrayLike, n_users: int) -> IntArray:
    basket = np.asarray(aov_cents)
    if basket.shape != (n_users,):
        raise ValueError(
            f"aov_cents must have shape ({n_users},) to match p, got {basket.shape}"
        )
    if not np.issubdtype(basket.dtype, np.integer):
        raise ValueError(
            f"aov_cents must be integer cents, got dtype {basket.dtype}; round the "
            "expected basket to cents first"
        )
    if basket.size and basket.min() < 0:
        raise ValueError(f"aov_cents must be >= 0, got minimum {basket.min()}")
    return basket.astype(np.int64)


def _validate_offers(offers: pd.DataFrame, n_offers: int) -> None:
    missing = [c for c in OFFER_COLUMNS if c not in offers.columns]
    if missing:
        raise ValueError(f"offers is missing columns {missing} of the COUPONS contract")
    if len(offers) != n_offers:
        raise ValueError(
            f"p has {n_offers} offer columns but offers has {len(offers)} rows; "
            "column j of p must be the offer in row j - 1"
        )
    ids = offers["coupon_id"]
    if ids.isna().any() or ids.duplicated().any():
        raise ValueError("offers.coupon_id must be unique and not missing")
    unknown = sorted(set(offers["kind"]) - set(COUPON_KINDS))
    if unknown:
        raise ValueError(
            f"unknown coupon kind {unknown}; expected one of {COUPON_KINDS}"
        )
    if (offers["value"] < 0).any() or (offers["min_spend_cents"] < 0).any():
        raise ValueError("offers.value and offers.min_spend_cents must be >= 0")
    percent = offers["kind"] == "percent_off"
    if (offers.loc[percent, "value"] > 10_000).any():
        raise ValueError("percent_off value is in basis points and must be <= 10000")
