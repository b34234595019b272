"""Task bodies' own logic: snapshot times, campaign ids, baskets, offer selection."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from couponflow.allocation import expected_basket_cents
from couponflow.pipeline import (
    active_offers,
    campaign_dir,
    campaign_id_or_default,
    check_request,
    snapshot_times,
)
from couponflow.settings import Settings, get_settings, reset_settings
from couponflow.simulate import coupon_catalogue


def test_snapshot_times_end_after_last_event() -> None:
    last = pd.Timestamp("2026-10-14T17:30:00Z")
    times = snapshot_times(last, 3)
    assert [t.isoformat() for t in times] == [
        "2026-10-13T00:00:00+00:00",
        "2026-10-14T00:00:00+00:00",
        "2026-10-15T00:00:00+00:00",
    ]
    assert all(t.tzinfo is not None for t in times)


def test_snapshot_times_rejects_zero_days() -> None:
    with pytest.raises(ValueError, match="snapshot_days must be >= 1"):
        snapshot_times(pd.Timestamp("2026-10-14T00:00:00Z"), 0)


def test_campaign_id_validation(tmp_path) -> None:
    settings = Settings(home=tmp_path)
    assert campaign_dir(settings, "spring-001") == tmp_path / "campaigns" / "spring-001"
    for bad in ("", "../escape", "a/b", "x" * 101):
        with pytest.raises(ValueError, match="invalid campaign_id"):
            campaign_dir(settings, bad)


def test_campaign_id_default_from_run_id() -> None:
    assert campaign_id_or_default("mine", "manual__2026") == "mine"
    derived = campaign_id_or_default("", "manual__2026-12-04T03:28:59.019083+00:00")
    assert derived == "cmp-20261204032859"


def test_basket_falls_back_to_median_of_buyers() -> None:
    users = pd.DataFrame({"aov_cents": [0, 1000, 3000, 0, 2000]})
    basket = expected_basket_cents(users)
    assert basket.dtype == np.int64
    assert basket.tolist() == [2000, 1000, 3000, 2000, 2000]


def test_basket_without_any_buyer_is_zero() -> None:
    assert expected_basket_cents(pd.DataFrame({"aov_cents": [0, 0]})).tolist() == [0, 0]


def test_active_offers_filters_and_checks() -> None:
    start = pd.Timestamp("2026-09-01T00:00:00Z")
    catalogue = coupon_catalogue(start, start + pd.Timedelta(days=30), 100)
    at = start + pd.Timedelta(days=10)
    chosen, skipped = active_offers(catalogue, ["pct-10", "amt-500"], at)
    assert sorted(chosen["coupon_id"]) == ["amt-500", "pct-10"]
    assert skipped == []
    everything, _ = active_offers(catalogue, [], at)
    assert len(everything) == len(catalogue)
    with pytest.raises(ValueError, match="unknown offers"):
        active_offers(catalogue, ["nope"], at)
    with pytest.raises(ValueError, match="no coupon of the catalogue is valid"):
        active_offers(catalogue, [], start - pd.Timedelta(days=1))


def test_requested_offer_out_of_its_window_is_named() -> None:
    start = pd.Timestamp("2026-09-01T00:00:00Z")
    catalogue = coupon_catalogue(start, start + pd.Timedelta(days=30), 100)
    ended = catalogue["coupon_id"] == "pct-10"
    catalogue.loc[ended, "ends_at"] = start + pd.Timedelta(days=2)
    at = start + pd.Timedelta(days=10)
    with pytest.raises(ValueError, match=r"not valid at the send time .*pct-10 \("):
        active_offers(catalogue, ["pct-10", "amt-500"], at)
    # Without a request the ended coupon is skipped and reported.
    chosen, skipped = active_offers(catalogue, [], at)
    assert "pct-10" not in set(chosen["coupon_id"])
    assert skipped == ["pct-10"]


@pytest.fixture
def home_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """Settings read from the environment, with the home in a fresh folder."""
    monkeypatch.setenv("COUPONFLOW_HOME", str(tmp_path))
    reset_settings()
    yield get_settings()
    reset_settings()


def _request(**overrides: object) -> dict[str, object]:
    return {"campaign_id": "c-1", "budget_cents": 1_000, "seed": 1, **overrides}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"holdout_fraction": 0.95, "explore_fraction": 0.05}, "explore_fraction"),
        ({"channel_capacity": {"whatsapp": 10}}, "unknown channels"),
        ({"message_cost_cents": {"sms": -1}}, "whole number"),
        ({"budget_cents": 10**19}, "between 0 and"),
        ({"budget_cents": 1.5}, "whole number of cents"),
        ({"send_after": "2026-12-05T09:00"}, "time zone"),
        ({"send_after": "tomorrow"}, "ISO 8601"),
        ({"campaign_id": "bad id!"}, "invalid campaign_id"),
    ],
)
def test_check_request_refuses_bad_params(
    home_settings: Settings, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_request(_request(**overrides), None)


def test_check_request_merges_message_costs(home_settings: Settings) -> None:
    request = check_request(_request(message_cost_cents={"email": 1}), None)
    assert request["message_cost_cents"] == {"email": 1, "push": 0, "sms": 5}
    assert request["send_after"] is None
    timed = check_request(_request(send_after="2026-12-05T10:00:00+01:00"), None)
    assert timed["send_after"] == "2026-12-05T09:00:00+00:00"


def test_check_request_refuses_a_campaign_with_grants(home_settings: Settings) -> None:
    from datetime import UTC, datetime

    from couponflow.store import get_engine, grants

    with get_engine(home_settings.campaign_db_url).begin() as connection:
        connection.execute(
            grants.insert().values(
                grant_id="g-1",
                campaign_id="c-1",
                user_id="u-1",
                coupon_id="pct-10",
                granted_at=datetime(2026, 12, 1, tzinfo=UTC),
            )
        )
    with pytest.raises(ValueError, match="already has 1 grants"):
        check_request(_request(), None)
    assert check_request(_request(campaign_id="c-2"), None)["campaign_id"] == "c-2"


def _write_summary(settings: Settings, campaign: str, stamp: str, **fields) -> None:
    import json

    assert settings.reports_dir is not None
    folder = settings.reports_dir / campaign
    folder.mkdir(parents=True)
    summary = {
        "summary_version": 2,
        "generated_at": stamp,
        "trustworthy": True,
        "arms": [
            {"arm": "pct-10", "decision": "drop"},
            {"arm": "amt-500", "decision": "keep"},
        ],
        **fields,
    }
    (folder / "summary.json").write_text(json.dumps(summary))


def test_last_experiment_drops_losing_offers(tmp_path) -> None:
    from couponflow.pipeline import drop_losing_offers

    settings = Settings(home=tmp_path)
    start = pd.Timestamp("2026-09-01T00:00:00Z")
    catalogue = coupon_catalogue(start, start + pd.Timedelta(days=30), 100)
    kept, dropped = drop_losing_offers(settings, catalogue)
    assert dropped == []
    assert len(kept) == len(catalogue)

    _write_summary(settings, "older", "2026-10-01T00:00:00+00:00")
    _write_summary(
        settings,
        "untrusted",
        "2026-12-01T00:00:00+00:00",
        trustworthy=False,
        arms=[{"arm": "amt-500", "decision": "drop"}],
    )
    kept, dropped = drop_losing_offers(settings, catalogue)
    assert dropped == ["pct-10"]
    assert "pct-10" not in set(kept["coupon_id"])
    assert "amt-500" in set(kept["coupon_id"])
    assert len(kept) == len(catalogue) - 1
