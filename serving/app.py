"""HTTP API of couponflow: a user's current offer, grants of offers, and redemptions.

Offers come from the current allocation version in the campaign store, coupon
details from the lake's coupons table, and features from the Feast online store.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.metadata import version as package_version
from typing import Annotated, Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from fastapi import FastAPI, HTTPException, Path, Query, Response, status
from pydantic import BaseModel, Field
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from couponflow import lake
from couponflow.allocation import HOLDOUT, current_version, read_current_allocation
from couponflow.money import percent_of_cents
from couponflow.schemas import CONTROL_ARM
from couponflow.settings import Settings
from couponflow.store import (
    allocation_versions,
    coupon_stock,
    get_engine,
    grants,
    redemptions,
)

log = logging.getLogger(__name__)

API_VERSION = package_version("couponflow")
FeatureValue = float | int | str | bool | None
# Returns one row of online features per requested user id, with a user_id column.
FeaturesLookup = Callable[[Settings, list[str]], pd.DataFrame]
Clock = Callable[[], datetime]


class CouponDetails(BaseModel):
    """A coupon as the lake's coupons table describes it."""

    coupon_id: str
    kind: str
    value: int = Field(
        description="Cents for amount_off, basis points for percent_off, shipping "
        "cents waived for free_shipping."
    )
    min_spend_cents: int
    category: str | None
    valid_days: int | None
    channels: list[str]
    starts_at: datetime
    ends_at: datetime


class Offer(BaseModel):
    """The coupon the current allocation gives a user, and how it is sent."""

    coupon_id: str
    coupon: CouponDetails | None = Field(
        description="None when the coupon is missing from the lake's coupons table."
    )
    channel: str | None
    send_at: datetime | None
    propensity: float = Field(description="Probability the policy gives this arm.")
    score_uplift: float
    expected_cost_cents: int


class OfferResponse(BaseModel):
    """A user's entry in the current allocation of one campaign."""

    campaign_id: str
    version: int
    user_id: str
    group: str = Field(description="'holdout' or 'treatment'.")
    offer: Offer | None
    reason: str | None = Field(description="Why offer is None, else None.")
    features: dict[str, FeatureValue] | None = Field(
        description="Online features of the user; None when the lookup failed."
    )
    features_error: str | None = None


class GrantRequest(BaseModel):
    """A request to grant a user the offer of the campaign's current allocation."""

    campaign_id: str = Field(min_length=1, max_length=100)
    user_id: str = Field(min_length=1, max_length=100)


class GrantResponse(BaseModel):
    """A recorded grant; ``created`` is False when an earlier request made it."""

    grant_id: str
    campaign_id: str
    user_id: str
    coupon_id: str
    granted_at: datetime
    created: bool


class RedemptionRequest(BaseModel):
    """An order paid with a granted coupon."""

    order_cents: int = Field(strict=True, ge=0, description="Order value in cents.")


class RedemptionResponse(BaseModel):
    """A recorded redemption with the discount it earned."""

    grant_id: str
    coupon_id: str
    order_cents: int
    discount_cents: int
    redeemed_at: datetime


class HealthResponse(BaseModel):
    """Liveness of the service and reachability of the campaign store."""

    status: str
    version: str


def create_app(
    settings: Settings,
    features_lookup: FeaturesLookup | None = None,
    clock: Clock | None = None,
) -> FastAPI:
    """Build the API over ``settings``' campaign store, lake and online store.

    ``features_lookup`` replaces :func:`couponflow.feature_store.online_features`
    and ``clock`` the UTC wall clock. Database tables are created on first use.
    """
    engine = get_engine(settings.campaign_db_url)
    service = _Service(
        settings=settings,
        engine=engine,
        features_lookup=features_lookup or _feast_online_features,
        clock=clock or (lambda: datetime.now(UTC)),
    )
    app = FastAPI(
        title="couponflow",
        version=API_VERSION,
        description="Current coupon offers per user, grants and redemptions.",
    )

    @app.get("/healthz", response_model=HealthResponse, tags=["health"])
    def get_health() -> HealthResponse:
        try:
            with engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
        except SQLAlchemyError as error:
            log.error("health check failed: campaign store unreachable: %s", error)
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"campaign store unreachable: {type(error).__name__}",
            ) from error
        return HealthResponse(status="ok", version=API_VERSION)

    @app.get(
        "/v1/users/{user_id}/offers",
        response_model=OfferResponse,
        tags=["offers"],
        responses={404: {"description": "Unknown campaign or user."}},
    )
    def get_user_offer(
        user_id: Annotated[str, Path(min_length=1, max_length=100)],
        campaign_id: Annotated[
            str | None,
            Query(
                description="Campaign to read; default is the campaign whose current "
                "allocation was created last."
            ),
        ] = None,
    ) -> OfferResponse:
        return service.user_offer(user_id, campaign_id)

    @app.post(
        "/v1/grants",
        response_model=GrantResponse,
        status_code=status.HTTP_201_CREATED,
        tags=["grants"],
        responses={
            200: {"description": "The grant existed already; it is returned as is."},
            404: {"description": "Unknown campaign or user."},
            409: {
                "description": "No offer for this user, or the coupon is out of stock."
            },
        },
    )
    def post_grant(request: GrantRequest, response: Response) -> GrantResponse:
        grant = service.grant(request.campaign_id, request.user_id)
        if not grant.created:
            response.status_code = status.HTTP_200_OK
        return grant

    @app.post(
        "/v1/grants/{grant_id}/redemptions",
        response_model=RedemptionResponse,
        status_code=status.HTTP_201_CREATED,
        tags=["grants"],
        responses={
            404: {"description": "Unknown grant."},
            409: {"description": "Already redeemed, or the coupon is not valid now."},
            422: {"description": "Order below the coupon's minimum spend."},
        },
    )
    def post_redemption(
        grant_id: Annotated[str, Path(min_length=1, max_length=64)],
        request: RedemptionRequest,
    ) -> RedemptionResponse:
        return service.redeem(grant_id, request.order_cents)

    return app


@dataclass
class _Allocation:
    version: int
    plan: pd.DataFrame


@dataclass
class _Service:
    """Request handling shared by the routes; one instance per app."""

    settings: Settings
    engine: Engine
    features_lookup: FeaturesLookup
    clock: Clock

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._allocations: dict[str, _Allocation] = {}
        self._coupons_key: tuple[tuple[str, int], ...] | None = None
        self._coupons: dict[str, CouponDetails] = {}
        self._coupon_stock: dict[str, int] = {}

    def user_offer(self, user_id: str, campaign_id: str | None) -> OfferResponse:
        campaign = campaign_id if campaign_id is not None else self._latest_campaign()
        allocation = self._allocation(campaign)
        row = _plan_row(allocation, campaign, user_id)

        group = str(row["group_name"])
        arm = str(row["arm"])
        offer: Offer | None = None
        reason: str | None = None
        if group == HOLDOUT:
            reason = "holdout: the user is in the randomized holdout and gets no offer"
        elif arm == CONTROL_ARM:
            reason = "no offer: the policy gives this user no coupon"
        else:
            offer = Offer(
                coupon_id=arm,
                coupon=self._coupon(arm),
                channel=_optional_str(row["channel"]),
                send_at=_optional_time(row["send_at"]),
                propensity=float(row["propensity"]),
                score_uplift=float(row["score_uplift"]),
                expected_cost_cents=int(row["expected_cost_cents"]),
            )
            if offer.coupon is None:
                log.warning(
                    "coupon %s of campaign %s is missing from the lake's coupons table",
                    arm,
                    campaign,
                )

        features, features_error = self._features(user_id)
        return OfferResponse(
            campaign_id=campaign,
            version=allocation.version,
            user_id=user_id,
            group=group,
            offer=offer,
            reason=reason,
            features=features,
            features_error=features_error,
        )

    def grant(self, campaign_id: str, user_id: str) -> GrantResponse:
        """Record the grant of the user's current offer, at most once per user.

        The stock decrement and the grant insert share one transaction. When a
        concurrent request inserts the grant first, the unique constraint on
        (campaign_id, user_id) fails this insert, the rollback restores the stock,
        and the earlier grant is returned.
        """
        existing = self._find_grant(campaign_id, user_id)
        if existing is not None:
            return existing
        allocation = self._allocation(campaign_id)
        row = _plan_row(allocation, campaign_id, user_id)
        coupon_id = str(row["arm"])
        if str(row["group_name"]) == HOLDOUT or coupon_id == CONTROL_ARM:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"user {user_id!r} has no offer in campaign {campaign_id!r} "
                f"(group {row['group_name']}), so there is nothing to grant",
            )
        granted_at = self.clock()
        coupon = self._coupon(coupon_id)
        if coupon is not None and granted_at > coupon.ends_at:
            log.info("rejected grant of expired coupon %s to %s", coupon_id, user_id)
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"coupon {coupon_id!r} ended at {coupon.ends_at.isoformat()}, so it "
                "cannot be granted any more",
            )
        self._ensure_stock_row(campaign_id, coupon_id)

        grant_id = uuid.uuid4().hex
        try:
            with self.engine.begin() as connection:
                decremented = connection.execute(
                    sa.update(coupon_stock)
                    .where(
                        coupon_stock.c.campaign_id == campaign_id,
                        coupon_stock.c.coupon_id == coupon_id,
                        coupon_stock.c.remaining > 0,
                    )
                    .values(remaining=coupon_stock.c.remaining - 1)
                )
                if decremented.rowcount == 0:
                    raise _OutOfStockError
                connection.execute(
                    grants.insert().values(
                        grant_id=grant_id,
                        campaign_id=campaign_id,
                        user_id=user_id,
                        coupon_id=coupon_id,
                        granted_at=granted_at,
                    )
                )
        except _OutOfStockError:
            log.info("coupon %s of campaign %s is out of stock", coupon_id, campaign_id)
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"coupon {coupon_id!r} of campaign {campaign_id!r} is out of stock",
            ) from None
        except IntegrityError:
            earlier = self._find_grant(campaign_id, user_id)
            if earlier is None:
                raise
            log.info(
                "grant of user %s in campaign %s was made by a concurrent request: %s",
                user_id,
                campaign_id,
                earlier.grant_id,
            )
            return earlier

        log.info(
            "granted %s to user %s in campaign %s as %s",
            coupon_id,
            user_id,
            campaign_id,
            grant_id,
        )
        return GrantResponse(
            grant_id=grant_id,
            campaign_id=campaign_id,
            user_id=user_id,
            coupon_id=coupon_id,
            granted_at=granted_at,
            created=True,
        )

    def redeem(self, grant_id: str, order_cents: int) -> RedemptionResponse:
        """Record the one redemption of a grant, with the discount it earns."""
        with self.engine.connect() as connection:
            grant = connection.execute(
                sa.select(grants).where(grants.c.grant_id == grant_id)
            ).first()
        if grant is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"grant {grant_id!r} not found"
            )
        coupon = self._coupon(grant.coupon_id)
        if coupon is None:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"coupon {grant.coupon_id!r} of grant {grant_id!r} is missing from the "
                "lake's coupons table; ingest the coupons before redeeming",
            )
        redeemed_at = self.clock()
        _check_redeemable(coupon, _as_utc(grant.granted_at), redeemed_at, order_cents)
        discount_cents = discount_for(coupon, order_cents)
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    redemptions.insert().values(
                        grant_id=grant_id,
                        redeemed_at=redeemed_at,
                        order_cents=order_cents,
                        discount_cents=discount_cents,
                    )
                )
        except IntegrityError:
            log.info("rejected a second redemption of grant %s", grant_id)
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"grant {grant_id!r} is already redeemed; a grant redeems once",
            ) from None
        log.info(
            "redeemed grant %s: order %d cents, discount %d cents",
            grant_id,
            order_cents,
            discount_cents,
        )
        return RedemptionResponse(
            grant_id=grant_id,
            coupon_id=grant.coupon_id,
            order_cents=order_cents,
            discount_cents=discount_cents,
            redeemed_at=redeemed_at,
        )

    def _latest_campaign(self) -> str:
        statement = (
            sa.select(allocation_versions.c.campaign_id)
            .where(allocation_versions.c.is_current)
            .order_by(
                allocation_versions.c.created_at.desc(),
                allocation_versions.c.campaign_id,
            )
            .limit(1)
        )
        with self.engine.connect() as connection:
            campaign_id = connection.execute(statement).scalar_one_or_none()
        if campaign_id is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                "no campaign has a current allocation; run allocate_campaign first "
                "or pass campaign_id",
            )
        return str(campaign_id)

    def _allocation(self, campaign_id: str) -> _Allocation:
        """Return the current plan of ``campaign_id``, cached per version.

        NOTE: the first request after a new version reads the whole plan, which
        takes seconds for millions of users.
        """
        version = current_version(self.engine, campaign_id)
        if version is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"campaign {campaign_id!r} has no current allocation",
            )
        with self._lock:
            cached = self._allocations.get(campaign_id)
        if cached is not None and cached.version == version:
            return cached

        plan = read_current_allocation(self.engine, campaign_id)
        if plan.empty:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"campaign {campaign_id!r} has no current allocation rows",
            )
        # A writer may have made a newer version current since current_version().
        loaded = _Allocation(
            version=int(plan["version"].iloc[0]),
            plan=plan.set_index("user_id", drop=False),
        )
        with self._lock:
            self._allocations[campaign_id] = loaded
        log.info(
            "loaded allocation %s version %d with %d users",
            campaign_id,
            loaded.version,
            len(plan),
        )
        return loaded

    def _coupon(self, coupon_id: str) -> CouponDetails | None:
        self._refresh_coupons()
        with self._lock:
            return self._coupons.get(coupon_id)

    def _refresh_coupons(self) -> None:
        files = lake.lake_files(self.settings, "coupons")
        key = tuple((str(path), path.stat().st_mtime_ns) for path in files)
        with self._lock:
            if key == self._coupons_key:
                return
        frame = lake.read_lake_table(self.settings, "coupons")
        # When batches disagree on a coupon id, the row with the latest starts_at
        # is used.
        frame = frame.sort_values("starts_at", kind="stable").drop_duplicates(
            "coupon_id", keep="last"
        )
        coupons = {
            str(row.coupon_id): _coupon_details(row) for row in frame.itertuples()
        }
        stock = {
            str(coupon_id): int(value)
            for coupon_id, value in zip(frame["coupon_id"], frame["stock"], strict=True)
            if not pd.isna(value)
        }
        with self._lock:
            self._coupons, self._coupon_stock, self._coupons_key = coupons, stock, key

    def _ensure_stock_row(self, campaign_id: str, coupon_id: str) -> None:
        """Seed the campaign's stock of a coupon from the lake on its first grant.

        Each campaign starts with the full ``stock`` of the lake's coupons table.
        """
        with self.engine.connect() as connection:
            present = connection.execute(
                sa.select(coupon_stock.c.remaining).where(
                    coupon_stock.c.campaign_id == campaign_id,
                    coupon_stock.c.coupon_id == coupon_id,
                )
            ).first()
        if present is not None:
            return
        self._refresh_coupons()
        with self._lock:
            initial = self._coupon_stock.get(coupon_id)
        if initial is None:
            log.warning(
                "coupon %s of campaign %s has no stock row and no lake stock",
                coupon_id,
                campaign_id,
            )
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"coupon {coupon_id!r} of campaign {campaign_id!r} has no stock row "
                "and no stock in the lake's coupons table; ingest the coupons first",
            )
        with self.engine.begin() as connection:
            _insert_stock_if_absent(connection, campaign_id, coupon_id, initial)

    def _find_grant(self, campaign_id: str, user_id: str) -> GrantResponse | None:
        with self.engine.connect() as connection:
            row = connection.execute(
                sa.select(grants).where(
                    grants.c.campaign_id == campaign_id, grants.c.user_id == user_id
                )
            ).first()
        if row is None:
            return None
        return GrantResponse(
            grant_id=row.grant_id,
            campaign_id=row.campaign_id,
            user_id=row.user_id,
            coupon_id=row.coupon_id,
            granted_at=_as_utc(row.granted_at),
            created=False,
        )

    def _features(
        self, user_id: str
    ) -> tuple[dict[str, FeatureValue] | None, str | None]:
        try:
            raw = self.features_lookup(self.settings, [user_id])
            return _features_by_user(raw, [user_id]).get(user_id, {}), None
        except Exception as error:
            # The lookup crosses Feast, its registry and the online store, which raise
            # many unrelated types; the offer itself does not depend on it.
            log.error("online feature lookup failed for user %s: %r", user_id, error)
            return None, f"online feature lookup failed: {type(error).__name__}"


class _OutOfStockError(Exception):
    pass


def discount_for(coupon: CouponDetails, order_cents: int) -> int:
    """Return the discount in cents that ``coupon`` gives an order of ``order_cents``.

    amount_off takes its value off, capped at the order; percent_off takes
    ``value`` basis points, rounded half up; free_shipping waives ``value`` cents.
    """
    if order_cents < 0:
        raise ValueError(f"order_cents must be >= 0, got {order_cents}")
    if coupon.kind == "amount_off":
        return min(coupon.value, order_cents)
    if coupon.kind == "percent_off":
        return percent_of_cents(order_cents, coupon.value)
    if coupon.kind == "free_shipping":
        return coupon.value
    raise ValueError(
        f"coupon {coupon.coupon_id!r} has unknown kind {coupon.kind!r}; expected "
        "amount_off, percent_off or free_shipping"
    )


def _check_redeemable(
    coupon: CouponDetails, granted_at: datetime, now: datetime, order_cents: int
) -> None:
    expires_at = coupon.ends_at
    if coupon.valid_days is not None:
        expires_at = min(expires_at, granted_at + timedelta(days=coupon.valid_days))
    if now < coupon.starts_at:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"coupon {coupon.coupon_id!r} is valid from "
            f"{coupon.starts_at.isoformat()}, not yet at {now.isoformat()}",
        )
    if now > expires_at:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"coupon {coupon.coupon_id!r} expired at {expires_at.isoformat()}",
        )
    if order_cents < coupon.min_spend_cents:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"order_cents {order_cents} is below the minimum spend "
            f"{coupon.min_spend_cents} of coupon {coupon.coupon_id!r}",
        )


def _plan_row(allocation: _Allocation, campaign_id: str, user_id: str) -> pd.Series:
    try:
        row = allocation.plan.loc[user_id]
    except KeyError:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"user {user_id!r} not found in the current allocation (version "
            f"{allocation.version}) of campaign {campaign_id!r}",
        ) from None
    # user_id is unique per version, so .loc returns one row.
    assert isinstance(row, pd.Series)
    return row


def _insert_stock_if_absent(
    connection: Connection, campaign_id: str, coupon_id: str, remaining: int
) -> None:
    values = {
        "campaign_id": campaign_id,
        "coupon_id": coupon_id,
        "remaining": remaining,
    }
    if connection.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        connection.execute(
            pg_insert(coupon_stock).values(values).on_conflict_do_nothing()
        )
    elif connection.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        connection.execute(
            sqlite_insert(coupon_stock).values(values).on_conflict_do_nothing()
        )
    else:
        raise NotImplementedError(
            f"seeding coupon_stock supports PostgreSQL and SQLite, not "
            f"{connection.dialect.name}"
        )


def _coupon_details(row: Any) -> CouponDetails:
    channels = _optional_str(row.channels)
    return CouponDetails(
        coupon_id=str(row.coupon_id),
        kind=str(row.kind),
        value=int(row.value),
        min_spend_cents=int(row.min_spend_cents),
        category=_optional_str(row.category),
        valid_days=None if pd.isna(row.valid_days) else int(row.valid_days),
        channels=[c.strip() for c in channels.split(",") if c.strip()]
        if channels
        else [],
        starts_at=_as_utc(row.starts_at),
        ends_at=_as_utc(row.ends_at),
    )


def _feast_online_features(settings: Settings, user_ids: list[str]) -> pd.DataFrame:
    # Imported on first use, because importing Feast takes seconds.
    from couponflow.feature_store import online_features

    return online_features(settings, user_ids)


def _features_by_user(
    frame: pd.DataFrame, user_ids: Sequence[str]
) -> dict[str, dict[str, FeatureValue]]:
    """Return the features of each requested user from a lookup's frame.

    The frame has one row per user with a ``user_id`` column, as
    :func:`couponflow.feature_store.online_features` returns it.
    """
    if not isinstance(frame, pd.DataFrame) or "user_id" not in frame.columns:
        raise TypeError(
            f"online features lookup returned {type(frame).__name__}; expected a "
            "DataFrame with a user_id column"
        )
    wanted = set(user_ids)
    features: dict[str, dict[str, FeatureValue]] = {}
    for record in frame.to_dict(orient="records"):
        user_id = str(record["user_id"])
        if user_id in wanted:
            features[user_id] = _clean_features(
                {str(name): value for name, value in record.items()}
            )
    return features


def _clean_features(record: Mapping[str, Any]) -> dict[str, FeatureValue]:
    cleaned: dict[str, FeatureValue] = {}
    for name, value in record.items():
        if name == "user_id":
            continue
        cleaned[str(name)] = _json_scalar(value)
    return cleaned


def _json_scalar(value: Any) -> FeatureValue:
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, pd.Timestamp | datetime):
        return _as_utc(value).isoformat()
    if pd.isna(value):
        return None
    return str(value)


def _optional_str(value: Any) -> str | None:
    if value is None or pd.isna(value):
        return None
    return str(value)


def _optional_time(value: Any) -> datetime | None:
    if value is None or pd.isna(value):
        return None
    return _as_utc(value)


def _as_utc(value: Any) -> datetime:
    """Return ``value`` as an aware UTC datetime; naive values are taken as UTC.

    SQLite returns naive datetimes for timezone-aware columns, and every time this
    project stores is UTC.
    """
    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize(UTC) if stamp.tzinfo is None else stamp.tz_convert(UTC)
    result: datetime = stamp.to_pydatetime()
    return result
