"""Tests of the HTTP API: offers, grants, redemptions, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from couponflow.allocation import PLAN_COLUMNS, write_allocation
from couponflow.features import FEATURE_COLUMNS, write_user_features
from couponflow.lake import write_lake_partitions
from couponflow.schemas import COUPONS, UTC_TS, coerce
from couponflow.settings import Settings
from couponflow.store import coupon_stock, get_engine, grants, metadata
from serving.app import create_app

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CAMPAIGN = "spring"
STARTS_AT = datetime(2026, 5, 1, tzinfo=UTC)
SEND_AT = datetime(2026, 5, 4, 9, 0, tzinfo=UTC)
NOW = datetime(2026, 5, 4, 10, 0, tzinfo=UTC)
CONCURRENT_REQUESTS = 8
# Feature values of the users in the online store; other features are 0 or "none".
FEATURE_ROWS: dict[str, dict[str, Any]] = {
    "0": {"frequency_30d": 3, "recency_days": 2.5, "top_category": "home"},
    "3": {"frequency_30d": 4, "recency_days": 9.0, "top_category": "beauty"},
}

# coupon_id: kind, value, min_spend_cents, stock
COUPON_SPECS = {
    "five_off": ("amount_off", 500, 2_000, 100),
    "pct15": ("percent_off", 1_500, 0, 100),
    "ship": ("free_shipping", 499, 0, 100),
    "scarce": ("amount_off", 300, 0, 2),
}
# user_id: group_name, arm
PLAN_SPECS = {
    "0": ("treatment", "five_off"),
    "1": ("holdout", "control"),
    "2": ("treatment", "control"),
    "3": ("treatment", "pct15"),
    "4": ("treatment", "ship"),
    "5": ("treatment", "scarce"),
    "6": ("treatment", "scarce"),
    "7": ("treatment", "scarce"),
}


@dataclass
class FixedClock:
    now: datetime = NOW

    def __call__(self) -> datetime:
        return self.now


def write_online_features(settings: Settings) -> None:
    """Materialize feature rows of users "0" and "3" into a real Feast online store."""
    from couponflow.feature_store import apply_definitions, materialize

    now = datetime.now(UTC)
    users = list(FEATURE_ROWS)
    columns: dict[str, pd.Series] = {}
    for column, dtype in FEATURE_COLUMNS.items():
        if column == "user_id":
            columns[column] = pd.Series(users, dtype="string")
        elif dtype == UTC_TS:
            columns[column] = pd.Series([now - timedelta(days=1)] * len(users))
        elif column in FEATURE_ROWS["0"]:
            values = [FEATURE_ROWS[user][column] for user in users]
            columns[column] = pd.Series(values, dtype=dtype)
        elif dtype == "string":
            columns[column] = pd.Series(["none"] * len(users), dtype="string")
        else:
            columns[column] = pd.Series([0] * len(users), dtype=dtype)
    write_user_features(settings, pd.DataFrame(columns))
    apply_definitions(settings)
    materialize(settings, now)


def write_coupons(settings: Settings) -> None:
    frame = pd.DataFrame(
        {
            "coupon_id": list(COUPON_SPECS),
            "kind": [spec[0] for spec in COUPON_SPECS.values()],
            "value": [spec[1] for spec in COUPON_SPECS.values()],
            "min_spend_cents": [spec[2] for spec in COUPON_SPECS.values()],
            "category": "all",
            "valid_days": 7,
            "stock": [spec[3] for spec in COUPON_SPECS.values()],
            "channels": "email,push",
            "starts_at": STARTS_AT,
            "ends_at": STARTS_AT + timedelta(days=30),
        }
    )
    write_lake_partitions(settings, COUPONS, "coupons-1", coerce(frame, COUPONS))


def plan_frame(specs: dict[str, tuple[str, str]]) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "user_id": list(specs),
            "group_name": [group for group, _ in specs.values()],
            "arm": [arm for _, arm in specs.values()],
            "policy_arm": [arm for _, arm in specs.values()],
            "channel": [
                "email" if arm != "control" else None for _, arm in specs.values()
            ],
            "send_at": [
                SEND_AT if arm != "control" else None for _, arm in specs.values()
            ],
            "propensity": 0.9,
            "score_uplift": 0.05,
            "expected_profit_cents": 120,
            "expected_cost_cents": 80,
        }
    )
    return frame[list(PLAN_COLUMNS)]


def build_client(settings: Settings, **kwargs: Any) -> TestClient:
    settings.ensure_dirs()
    write_coupons(settings)
    engine = get_engine(settings.campaign_db_url)
    write_allocation(
        engine, CAMPAIGN, plan_frame(PLAN_SPECS), "models:/m/1", 10_000, {}
    )
    kwargs.setdefault("clock", FixedClock())
    return TestClient(create_app(settings, **kwargs))


@pytest.fixture(scope="module")
def feast_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A couponflow home whose Feast online store holds the FEATURE_ROWS users."""
    home = tmp_path_factory.mktemp("feast-home")
    settings = Settings(home=home)
    settings.ensure_dirs()
    write_online_features(settings)
    return home


@pytest.fixture
def settings(tmp_path: Path, feast_home: Path) -> Settings:
    """Settings with the shared Feast store and a campaign store and lake per test."""
    return Settings(
        home=feast_home,
        campaign_db_url=f"sqlite:///{tmp_path / 'campaign.db'}",
        lake_dir=tmp_path / "lake",
    )


@pytest.fixture
def client(settings: Settings) -> TestClient:
    return build_client(settings)


def grant(client: TestClient, user_id: str, campaign_id: str = CAMPAIGN) -> Any:
    return client.post(
        "/v1/grants", json={"campaign_id": campaign_id, "user_id": user_id}
    )


def remaining_stock(settings: Settings, coupon_id: str) -> int:
    engine = get_engine(settings.campaign_db_url)
    with engine.connect() as connection:
        return int(
            connection.execute(
                sa.select(coupon_stock.c.remaining).where(
                    coupon_stock.c.campaign_id == CAMPAIGN,
                    coupon_stock.c.coupon_id == coupon_id,
                )
            ).scalar_one()
        )


def grant_rows(settings: Settings, user_id: str) -> int:
    engine = get_engine(settings.campaign_db_url)
    with engine.connect() as connection:
        return int(
            connection.execute(
                sa.select(sa.func.count())
                .select_from(grants)
                .where(grants.c.campaign_id == CAMPAIGN, grants.c.user_id == user_id)
            ).scalar_one()
        )


def post_concurrently(app_client: TestClient, user_ids: list[str]) -> list[Any]:
    """Post one grant per user id from its own thread, all released at once."""
    barrier = threading.Barrier(len(user_ids))
    responses: list[Any] = [None] * len(user_ids)

    def worker(index: int) -> None:
        local = TestClient(app_client.app)
        barrier.wait()
        responses[index] = grant(local, user_ids[index])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(user_ids))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return responses


class TestMeta:
    def test_healthz(self, client: TestClient) -> None:
        response = client.get("/healthz")
        assert response.status_code == 200
        assert response.json()["status"] == "ok"

    def test_openapi_lists_routes(self, client: TestClient) -> None:
        schema = client.get("/openapi.json").json()
        assert "/v1/users/{user_id}/offers" in schema["paths"]
        assert "/v1/grants" in schema["paths"]
        assert "/v1/grants/{grant_id}/redemptions" in schema["paths"]
        assert "OfferResponse" in schema["components"]["schemas"]


class TestOffers:
    def test_user_zero_gets_offer(self, client: TestClient) -> None:
        response = client.get("/v1/users/0/offers", params={"campaign_id": CAMPAIGN})
        body = response.json()

        assert response.status_code == 200
        assert body["user_id"] == "0"
        assert body["version"] == 1
        assert body["group"] == "treatment"
        assert body["reason"] is None
        offer = body["offer"]
        assert offer["coupon_id"] == "five_off"
        assert offer["coupon"]["kind"] == "amount_off"
        assert offer["coupon"]["value"] == 500
        assert offer["coupon"]["channels"] == ["email", "push"]
        assert offer["channel"] == "email"
        assert datetime.fromisoformat(offer["send_at"]) == SEND_AT
        assert offer["propensity"] == pytest.approx(0.9)

    def test_offer_carries_features(self, client: TestClient) -> None:
        body = client.get("/v1/users/0/offers").json()
        features = body["features"]

        assert body["features_error"] is None
        assert features["frequency_30d"] == 3
        assert features["recency_days"] == 2.5
        assert features["top_category"] == "home"
        # No profile row was materialized, so the profile features are null.
        assert features["purchasing_power"] is None
        assert features["segment"] is None
        assert "user_id" not in features

    def test_features_are_per_user(self, client: TestClient) -> None:
        features = client.get("/v1/users/3/offers").json()["features"]
        assert features["frequency_30d"] == 4
        assert features["top_category"] == "beauty"

    def test_user_outside_store_gets_nulls(self, client: TestClient) -> None:
        features = client.get("/v1/users/1/offers").json()["features"]
        assert features
        assert set(features.values()) == {None}

    def test_holdout_user_gets_null_offer(self, client: TestClient) -> None:
        body = client.get("/v1/users/1/offers").json()
        assert body["offer"] is None
        assert body["group"] == "holdout"
        assert body["reason"].startswith("holdout")

    def test_user_without_offer(self, client: TestClient) -> None:
        body = client.get("/v1/users/2/offers").json()
        assert body["offer"] is None
        assert body["group"] == "treatment"
        assert body["reason"].startswith("no offer")

    def test_unknown_user_is_404(self, client: TestClient) -> None:
        response = client.get("/v1/users/nobody/offers")
        assert response.status_code == 404
        detail = response.json()["detail"]
        assert "'nobody'" in detail
        assert f"'{CAMPAIGN}'" in detail

    def test_unknown_campaign_is_404(self, client: TestClient) -> None:
        response = client.get("/v1/users/0/offers", params={"campaign_id": "autumn"})
        assert response.status_code == 404
        assert "'autumn'" in response.json()["detail"]

    def test_default_is_latest_campaign(
        self, client: TestClient, settings: Settings
    ) -> None:
        engine = get_engine(settings.campaign_db_url)
        write_allocation(
            engine, "summer", plan_frame({"0": ("treatment", "pct15")}), "m", 1, {}
        )
        body = client.get("/v1/users/0/offers").json()
        assert body["campaign_id"] == "summer"
        assert body["offer"]["coupon_id"] == "pct15"

    def test_new_version_replaces_cached(
        self, client: TestClient, settings: Settings
    ) -> None:
        assert client.get("/v1/users/0/offers").json()["version"] == 1
        engine = get_engine(settings.campaign_db_url)
        write_allocation(
            engine, CAMPAIGN, plan_frame({"0": ("treatment", "ship")}), "m", 1, {}
        )
        body = client.get("/v1/users/0/offers").json()
        assert body["version"] == 2
        assert body["offer"]["coupon_id"] == "ship"
        assert client.get("/v1/users/3/offers").status_code == 404

    def test_failed_feature_lookup_keeps_offer(self, settings: Settings) -> None:
        def broken(settings: Settings, user_ids: list[str]) -> pd.DataFrame:
            raise ConnectionError("online store down")

        client = build_client(settings, features_lookup=broken)
        body = client.get("/v1/users/0/offers").json()
        assert body["offer"]["coupon_id"] == "five_off"
        assert body["features"] is None
        assert "ConnectionError" in body["features_error"]


class TestGrants:
    def test_grant_is_idempotent(self, client: TestClient, settings: Settings) -> None:
        first = grant(client, "0")
        second = grant(client, "0")

        assert first.status_code == 201
        assert second.status_code == 200
        assert first.json()["created"] is True
        assert second.json()["created"] is False
        assert first.json()["grant_id"] == second.json()["grant_id"]
        assert first.json()["coupon_id"] == "five_off"
        assert remaining_stock(settings, "five_off") == 99
        assert grant_rows(settings, "0") == 1

    def test_concurrent_grants_yield_one(
        self, client: TestClient, settings: Settings
    ) -> None:
        responses = post_concurrently(client, ["0"] * CONCURRENT_REQUESTS)

        assert all(response is not None for response in responses)
        codes = sorted(response.status_code for response in responses)
        assert codes == [200] * (CONCURRENT_REQUESTS - 1) + [201]
        assert len({response.json()["grant_id"] for response in responses}) == 1
        assert grant_rows(settings, "0") == 1
        assert remaining_stock(settings, "five_off") == 99

    def test_stock_never_below_zero(
        self, client: TestClient, settings: Settings
    ) -> None:
        responses = post_concurrently(client, ["5", "6", "7"])

        codes = sorted(response.status_code for response in responses)
        assert codes == [201, 201, 409]
        refused = next(r for r in responses if r.status_code == 409)
        assert "out of stock" in refused.json()["detail"]
        assert remaining_stock(settings, "scarce") == 0

    def test_ended_coupon_grant_is_409(self, settings: Settings) -> None:
        clock = FixedClock(now=STARTS_AT + timedelta(days=31))
        client = build_client(settings, clock=clock)
        response = grant(client, "0")
        assert response.status_code == 409
        assert "cannot be granted" in response.json()["detail"]
        assert grant_rows(settings, "0") == 0

    def test_holdout_grant_is_409(self, client: TestClient) -> None:
        response = grant(client, "1")
        assert response.status_code == 409
        assert "no offer" in response.json()["detail"]

    def test_unknown_user_grant_is_404(self, client: TestClient) -> None:
        response = grant(client, "nobody")
        assert response.status_code == 404
        assert "'nobody'" in response.json()["detail"]


class TestRedemptions:
    @pytest.mark.parametrize(
        ("user_id", "order_cents", "discount_cents"),
        [("0", 3_000, 500), ("3", 3_490, 524), ("4", 1_000, 499)],
    )
    def test_discount_per_kind(
        self, client: TestClient, user_id: str, order_cents: int, discount_cents: int
    ) -> None:
        grant_id = grant(client, user_id).json()["grant_id"]
        response = client.post(
            f"/v1/grants/{grant_id}/redemptions", json={"order_cents": order_cents}
        )
        assert response.status_code == 201
        assert response.json()["discount_cents"] == discount_cents
        assert datetime.fromisoformat(response.json()["redeemed_at"]) == NOW

    def test_second_redemption_is_409(self, client: TestClient) -> None:
        grant_id = grant(client, "0").json()["grant_id"]
        path = f"/v1/grants/{grant_id}/redemptions"
        first = client.post(path, json={"order_cents": 3_000})
        second = client.post(path, json={"order_cents": 3_000})
        assert first.status_code == 201
        assert second.status_code == 409
        assert "already redeemed" in second.json()["detail"]

    def test_below_min_spend_is_422(self, client: TestClient) -> None:
        grant_id = grant(client, "0").json()["grant_id"]
        response = client.post(
            f"/v1/grants/{grant_id}/redemptions", json={"order_cents": 1_999}
        )
        assert response.status_code == 422
        assert "minimum spend 2000" in response.json()["detail"]

    def test_expired_grant_is_409(self, settings: Settings) -> None:
        clock = FixedClock()
        client = build_client(settings, clock=clock)
        grant_id = grant(client, "0").json()["grant_id"]
        clock.now = NOW + timedelta(days=8)
        response = client.post(
            f"/v1/grants/{grant_id}/redemptions", json={"order_cents": 3_000}
        )
        assert response.status_code == 409
        assert "expired" in response.json()["detail"]

    def test_unknown_grant_is_404(self, client: TestClient) -> None:
        response = client.post("/v1/grants/nope/redemptions", json={"order_cents": 1})
        assert response.status_code == 404
        assert "'nope'" in response.json()["detail"]

    @pytest.mark.parametrize("order_cents", [-1, 12.5, "100"])
    def test_invalid_order_is_422(self, client: TestClient, order_cents: Any) -> None:
        grant_id = grant(client, "3").json()["grant_id"]
        response = client.post(
            f"/v1/grants/{grant_id}/redemptions", json={"order_cents": order_cents}
        )
        assert response.status_code == 422


@pytest.fixture
def postgres_settings(tmp_path: Path, feast_home: Path) -> Iterator[Settings]:
    """Settings whose campaign store is a private schema of the test database."""
    admin = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with admin.connect():
            pass
    except sa.exc.OperationalError as error:
        admin.dispose()
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} is unreachable: {error.orig}")
    schema = f"couponflow_serving_{uuid.uuid4().hex[:12]}"
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    try:
        yield Settings(home=feast_home, campaign_db_url=url, lake_dir=tmp_path / "lake")
    finally:
        get_engine(url).dispose()
        with admin.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


class TestPostgres:
    def test_grant_and_redeem(self, postgres_settings: Settings) -> None:
        client = build_client(postgres_settings)
        engine = get_engine(postgres_settings.campaign_db_url)
        with engine.connect() as connection:
            tables = set(sa.inspect(connection).get_table_names())

        responses = post_concurrently(client, ["0"] * CONCURRENT_REQUESTS)
        grant_id = responses[0].json()["grant_id"]
        redeemed = client.post(
            f"/v1/grants/{grant_id}/redemptions", json={"order_cents": 3_000}
        )
        again = client.post(
            f"/v1/grants/{grant_id}/redemptions", json={"order_cents": 3_000}
        )
        scarce = post_concurrently(client, ["5", "6", "7"])

        assert set(metadata.tables) <= tables
        assert len({response.json()["grant_id"] for response in responses}) == 1
        assert grant_rows(postgres_settings, "0") == 1
        assert remaining_stock(postgres_settings, "five_off") == 99
        assert redeemed.status_code == 201
        assert redeemed.json()["discount_cents"] == 500
        assert again.status_code == 409
        assert sorted(r.status_code for r in scarce) == [201, 201, 409]
        assert remaining_stock(postgres_settings, "scarce") == 0
