"""Tests of the simulated store: contracts, determinism, truth and the response loop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from couponflow import lake
from couponflow.schemas import CONTROL_ARM, EVENT_TYPES, TABLES
from couponflow.settings import Settings
from couponflow.simulate import (
    ATTRIBUTION_DAYS,
    MIN_DAYS,
    PAST_CAMPAIGN_ID,
    World,
    expected_response,
    load_world_truth,
    respond,
    simulate_world,
    true_incremental_profit_cents,
    write_world,
)

SMALL_USERS = 600
SMALL_DAYS = 14
LARGE_USERS = 20_000
# Sampling-error checks allow this many standard errors. Under a normal approximation
# one check fails a correct simulator with probability about 6e-5.
MAX_STANDARD_ERRORS = 4.0


@pytest.fixture(scope="module")
def world() -> World:
    return simulate_world(SMALL_USERS, SMALL_DAYS, seed=11)


@pytest.fixture(scope="module")
def large_world() -> World:
    return simulate_world(LARGE_USERS, MIN_DAYS, seed=5)


def _tables(world: World) -> dict[str, pd.DataFrame]:
    return {
        "users": world.users,
        "events": world.events,
        "coupons": world.coupons,
        "exposures": world.exposures,
        "outcomes": world.outcomes,
    }


def _uplift(world: World) -> pd.DataFrame:
    p = world.truth.pivot(index="user_id", columns="coupon_id", values="p_convert")
    p = p.reindex(world.latent["user_id"])
    return p.drop(columns=CONTROL_ARM).sub(p[CONTROL_ARM], axis=0)


def test_same_seed_identical_frames(world: World) -> None:
    again = simulate_world(SMALL_USERS, SMALL_DAYS, seed=11)
    for name, frame in _tables(world).items():
        pd.testing.assert_frame_equal(frame, _tables(again)[name], check_exact=True)
        original = pd.util.hash_pandas_object(frame, index=True).to_numpy()
        repeated = pd.util.hash_pandas_object(_tables(again)[name], index=True)
        assert np.array_equal(original, repeated.to_numpy()), name
    pd.testing.assert_frame_equal(world.latent, again.latent, check_exact=True)
    pd.testing.assert_frame_equal(world.truth, again.truth, check_exact=True)
    assert world.meta == again.meta


def test_other_seed_differs(world: World) -> None:
    other = simulate_world(SMALL_USERS, SMALL_DAYS, seed=12)
    assert not other.latent["p0"].equals(world.latent["p0"])
    assert len(other.events) != len(world.events)


def test_tables_match_contracts(world: World) -> None:
    for name, frame in _tables(world).items():
        schema = TABLES[name]
        assert list(frame.columns) == list(schema.columns), name
        dtypes = {column: str(dtype) for column, dtype in frame.dtypes.items()}
        assert dtypes == schema.columns, name
        for column in schema.required:
            assert frame[column].notna().all(), f"{name}.{column}"
        assert not frame.duplicated(list(schema.key)).any(), name


def test_user_zero_has_events(world: World) -> None:
    assert world.users["user_id"].iloc[0] == "0"
    assert (world.events["user_id"] == "0").sum() > 0
    assert (world.exposures["user_id"] == "0").sum() == 1


def test_every_user_has_a_session(world: World) -> None:
    active = set(world.events["user_id"])
    assert active == set(world.users["user_id"])


def test_events_are_well_formed(world: World) -> None:
    events = world.events
    assert events["event_ts"].is_monotonic_increasing
    assert events["event_id"].is_unique
    assert (events["price_cents"] > 0).all()
    assert (events["quantity"] >= 1).all()
    assert (events["dwell_seconds"] >= 0).all()
    assert set(events["event_type"]) == set(EVENT_TYPES)
    assert events["event_ts"].min() >= world.meta["start"]
    assert events["event_ts"].max() < world.meta["end"]


def test_events_follow_signup(world: World) -> None:
    first = world.events.groupby("user_id")["event_ts"].min()
    signup = world.users.set_index("user_id")["signup_ts"].reindex(first.index)
    assert (first >= signup).all()
    new_users = world.users["signup_ts"] >= world.meta["start"]
    assert new_users.any()
    assert (~new_users).any()
    assert (world.users["signup_ts"] < world.meta["send_at"]).all()


def test_high_p0_users_purchase_more(large_world: World) -> None:
    purchases = large_world.events[large_world.events["event_type"] == "purchase"]
    orders = purchases.groupby("user_id")["session_id"].nunique()
    latent = large_world.latent.set_index("user_id")
    counts = orders.reindex(latent.index).fillna(0).to_numpy(float)
    correlation = np.corrcoef(latent["p0"].to_numpy(), counts)[0, 1]
    assert correlation > 0.5


def test_past_campaign_is_uniform(world: World) -> None:
    exposures = world.exposures
    arms = {CONTROL_ARM, *world.coupons["coupon_id"]}
    assert set(exposures["arm"]) == arms
    assert (exposures["campaign_id"] == PAST_CAMPAIGN_ID).all()
    assert (exposures["policy"] == "uniform").all()
    # One row per user, so the policy's probabilities over all arms sum to 1.
    total = exposures.groupby("user_id")["propensity"].sum() * len(arms)
    assert np.allclose(total.to_numpy(), 1.0)
    assert exposures["user_id"].is_unique
    assert len(exposures) == SMALL_USERS
    control = exposures[exposures["arm"] == CONTROL_ARM]
    assert (control["channel"] == "email").all()
    send_day = world.meta["send_at"]
    assert (exposures["send_at"].dt.normalize() == send_day).all()


def test_coupon_channels_respected(world: World) -> None:
    allowed = world.coupons.set_index("coupon_id")["channels"].str.split(",")
    treated = world.exposures[world.exposures["arm"] != CONTROL_ARM]
    for arm, channel in zip(treated["arm"], treated["channel"], strict=True):
        assert channel in allowed[arm], (arm, channel)


def test_outcomes_are_consistent(world: World) -> None:
    outcomes = world.outcomes.merge(world.exposures[["user_id", "arm", "send_at"]])
    control = outcomes["arm"] == CONTROL_ARM
    assert not outcomes.loc[control, "redeemed"].any()
    assert not outcomes.loc[control, "opened"].any()
    assert (outcomes.loc[~outcomes["redeemed"], "discount_cents"] == 0).all()
    assert (outcomes["redeemed"] <= outcomes["converted"]).all()
    assert (outcomes["visited"] >= outcomes["converted"]).all()
    assert (outcomes.loc[~outcomes["converted"], "revenue_cents"] == 0).all()
    assert (outcomes.loc[outcomes["converted"], "revenue_cents"] > 0).all()
    window = pd.Timedelta(days=ATTRIBUTION_DAYS)
    assert (outcomes["observed_at"] == outcomes["send_at"] + window).all()
    spend = world.coupons.set_index("coupon_id")["min_spend_cents"]
    redeemed = outcomes[outcomes["redeemed"]]
    assert (redeemed["revenue_cents"] >= redeemed["arm"].map(spend)).all()


def test_truth_effects_are_heterogeneous(world: World) -> None:
    uplift = _uplift(world)
    latent = world.latent.set_index("user_id")
    assert (uplift < -0.01).to_numpy().any(), "no user is put off by a coupon"
    assert (uplift > 0.05).to_numpy().any(), "no user responds strongly"
    sure = (latent["p0"] > 0.8) & (uplift.abs().max(axis=1) < 0.01)
    assert sure.sum() >= 5, "too few sure things"
    assert uplift.to_numpy().std() > 0.01


def test_truth_rows_cover_every_arm(world: World) -> None:
    truth = world.truth
    n_arms = len(world.coupons) + 1
    assert len(truth) == SMALL_USERS * n_arms
    assert truth.groupby("user_id")["coupon_id"].nunique().eq(n_arms).all()
    assert truth["p_convert"].between(0, 1).all()
    control = truth[truth["coupon_id"] == CONTROL_ARM]
    assert (control["expected_discount_cents"] == 0).all()


def test_incremental_profit_formula(world: World) -> None:
    margin = 0.3
    profit = true_incremental_profit_cents(world.truth, margin)
    assert profit.shape == (SMALL_USERS, len(world.coupons))
    assert list(profit.index[:3]) == ["0", "1", "2"]
    rows = world.truth[world.truth["user_id"] == "7"].set_index("coupon_id")
    coupon_id = str(world.coupons["coupon_id"].iloc[2])
    expected = (
        margin
        * (
            rows.loc[coupon_id, "expected_revenue_cents"]
            - rows.loc[CONTROL_ARM, "expected_revenue_cents"]
        )
        - rows.loc[coupon_id, "expected_discount_cents"]
    )
    assert profit.loc["7", coupon_id] == pytest.approx(expected)
    assert (profit > 0).to_numpy().any()
    assert (profit < 0).to_numpy().any()
    with pytest.raises(ValueError, match="margin_rate"):
        true_incremental_profit_cents(world.truth, 1.5)


def _assert_rates_match_truth(outcomes: pd.DataFrame, truth: pd.DataFrame) -> None:
    """Check conversion, revenue and discount per arm, and pooled, against the truth."""
    joined = outcomes.merge(truth, on=["user_id", "coupon_id"], validate="one_to_one")
    groups = [*joined.groupby("coupon_id"), ("pooled", joined)]
    for arm, rows in groups:
        n = len(rows)
        p = rows["p_convert"].to_numpy()
        rate_error = np.sqrt((p * (1 - p)).sum()) / n
        gap = abs(rows["converted"].mean() - p.mean())
        assert gap <= MAX_STANDARD_ERRORS * rate_error, (arm, gap, rate_error)
        for observed, expected in (
            ("revenue_cents", "expected_revenue_cents"),
            ("discount_cents", "expected_discount_cents"),
        ):
            values = rows[observed].to_numpy(float)
            error = max(values.std(ddof=1) / np.sqrt(n), 1e-9)
            gap = abs(values.mean() - rows[expected].mean())
            assert gap <= MAX_STANDARD_ERRORS * error, (arm, observed, gap, error)


def test_past_outcomes_match_truth(large_world: World) -> None:
    # The past campaign sends by any of a coupon's channels, so its truth is that
    # of each exposure's own channel and hour.
    truth = expected_response(large_world, large_world.exposures)
    outcomes = large_world.outcomes.assign(
        coupon_id=large_world.exposures["arm"].to_numpy()
    )
    _assert_rates_match_truth(outcomes, truth)


def test_respond_matches_truth_per_arm(large_world: World) -> None:
    users = large_world.latent["user_id"]
    send_at = large_world.meta["end"]
    channels = large_world.coupons.set_index("coupon_id")["channels"].str.split(",")
    for arm in [CONTROL_ARM, *large_world.coupons["coupon_id"]]:
        channel = "email" if arm == CONTROL_ARM else channels[arm][0]
        assignments = pd.DataFrame(
            {"user_id": users, "arm": arm, "channel": channel, "send_at": send_at}
        )
        outcomes = respond(large_world, assignments, f"check-{arm}", seed=3)
        truth = expected_response(large_world, assignments)
        _assert_rates_match_truth(outcomes.assign(coupon_id=arm), truth)


def _usual_hour_sends(world: World, arm: str, channel: str) -> pd.DataFrame:
    """Send ``arm`` to every user by ``channel`` at their usual hour after the end."""
    hour = np.round(world.latent["pref_hour"].to_numpy()).astype(int) % 24
    return pd.DataFrame(
        {
            "user_id": world.latent["user_id"],
            "arm": arm,
            "channel": channel,
            "send_at": world.meta["end"] + pd.to_timedelta(hour, unit="h"),
        }
    )


def test_truth_is_first_channel_at_usual_hour(world: World) -> None:
    channels = world.coupons.set_index("coupon_id")["channels"].str.split(",")
    truth = world.truth.set_index(["user_id", "coupon_id"])
    for arm in [CONTROL_ARM, *world.coupons["coupon_id"]]:
        channel = "email" if arm == CONTROL_ARM else channels[arm][0]
        expected = expected_response(world, _usual_hour_sends(world, arm, channel))
        keys = zip(expected["user_id"], expected["coupon_id"], strict=True)
        default = truth.loc[list(keys)]
        for column in (
            "p_convert",
            "expected_revenue_cents",
            "expected_discount_cents",
        ):
            np.testing.assert_allclose(
                expected[column].to_numpy(), default[column].to_numpy(), rtol=1e-12
            )


def test_push_works_for_app_users(world: World) -> None:
    app_user = world.latent["app_user"].to_numpy()
    assert app_user.any()
    assert (~app_user).any()
    push = expected_response(world, _usual_hour_sends(world, "ship-free", "push"))
    sms = expected_response(world, _usual_hour_sends(world, "ship-free", "sms"))
    control = world.truth[world.truth["coupon_id"] == CONTROL_ARM]
    base = control.set_index("user_id")["p_convert"].loc[push["user_id"]].to_numpy()
    push_uplift = push["p_convert"].to_numpy() - base
    sms_uplift = sms["p_convert"].to_numpy() - base
    assert push_uplift[app_user].mean() > sms_uplift[app_user].mean()
    assert push_uplift[~app_user].mean() < sms_uplift[~app_user].mean()
    # The discount is paid on every redeemed order, read or not.
    paid = push["expected_discount_cents"].to_numpy()
    assert (paid[~app_user] > 0).mean() > 0.9


def test_usual_hour_beats_off_hours(world: World) -> None:
    usual = _usual_hour_sends(world, "pct-10", "email")
    off_hours = usual.assign(send_at=usual["send_at"] + pd.Timedelta(hours=12))
    at_usual = expected_response(world, usual)
    at_off_hours = expected_response(world, off_hours)
    control = world.truth[world.truth["coupon_id"] == CONTROL_ARM]
    base = control.set_index("user_id")["p_convert"].loc[usual["user_id"]].to_numpy()
    gain_usual = np.abs(at_usual["p_convert"].to_numpy() - base)
    gain_off = np.abs(at_off_hours["p_convert"].to_numpy() - base)
    assert (gain_off <= gain_usual + 1e-12).all()
    assert gain_off.sum() < 0.8 * gain_usual.sum()


def test_expected_response_rejects_bad_rows(world: World) -> None:
    sends = _usual_hour_sends(world, "pct-10", "email").head(3)
    assert len(expected_response(world, pd.concat([sends, sends]))) == 6
    with pytest.raises(ValueError, match="allows only"):
        expected_response(world, sends.assign(arm="amt-1500-elec", channel="sms"))
    with pytest.raises(ValueError, match="unknown arms"):
        expected_response(world, sends.assign(arm="pct-99"))


def test_app_users_use_the_app(world: World) -> None:
    device = world.users.set_index("user_id")["device"]
    app_user = world.latent.set_index("user_id")["app_user"]
    assert (device[app_user[app_user].index] == "app").all()
    assert (device[app_user[~app_user].index] != "app").all()


def test_order_value_tracks_basket(large_world: World) -> None:
    events = large_world.events
    purchases = events[events["event_type"] == "purchase"]
    value = (
        (purchases["price_cents"] * purchases["quantity"])
        .groupby([purchases["user_id"], purchases["session_id"]])
        .sum()
    )
    per_user = np.log(value).groupby(level="user_id").mean()
    basket = large_world.latent.set_index("user_id")["basket_cents"]
    correlation = np.corrcoef(per_user, np.log(basket.loc[per_user.index]))[0, 1]
    assert correlation > 0.6


def test_deal_seekers_browse_more_and_cheaper(large_world: World) -> None:
    views = large_world.events[large_world.events["event_type"] == "view"]
    per_session = views.groupby(["user_id", "session_id"]).size()
    views_per_session = per_session.groupby(level="user_id").mean()
    seeker = large_world.latent.set_index("user_id")["deal_seeker"]
    seeker = seeker.loc[views_per_session.index]
    assert views_per_session[seeker].mean() > views_per_session[~seeker].mean() + 1.0
    price = views.groupby("user_id")["price_cents"].median().loc[seeker.index]
    assert price[seeker].median() < price[~seeker].median()


def test_write_world_layout(tmp_path: Path, world: World) -> None:
    settings = Settings(home=tmp_path)
    written = write_world(settings, world)
    assert settings.truth_dir is not None
    users = lake.list_raw_batches(settings, "users")
    assert [p.stem for p in users] == ["users-0001"]
    events = lake.list_raw_batches(settings, "events")
    assert len(events) == SMALL_DAYS
    assert events[0].stem == "events-2026-09-01"
    assert events[-1].stem == "events-2026-09-14"
    assert [p.stem for p in lake.list_raw_batches(settings, "exposures")] == [
        f"exposures-{PAST_CAMPAIGN_ID}"
    ]
    assert [p.stem for p in lake.list_raw_batches(settings, "outcomes")] == [
        f"outcomes-{PAST_CAMPAIGN_ID}"
    ]
    assert all(p.parent == settings.truth_dir for p in written["truth"])
    assert settings.raw_dir is not None
    assert not settings.truth_dir.is_relative_to(settings.raw_dir)
    read_back = pd.concat([pd.read_parquet(p) for p in events], ignore_index=True)
    pd.testing.assert_frame_equal(read_back, world.events)


def test_respond_on_persisted_world(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    world = simulate_world(4_000, MIN_DAYS, seed=21)
    write_world(settings, world)
    del world

    loaded = load_world_truth(settings)
    assert loaded.meta["past_campaign_id"] == PAST_CAMPAIGN_ID
    send_at = loaded.meta["end"] + pd.Timedelta(hours=10)
    users = loaded.latent["user_id"]
    arms = [CONTROL_ARM, "pct-10", "ship-free"]
    assignments = pd.DataFrame(
        {
            "user_id": users,
            "arm": [arms[i % len(arms)] for i in range(len(users))],
            "channel": "push",
            "send_at": send_at,
        }
    )
    outcomes = respond(loaded, assignments, "camp-002", seed=1)
    truth = expected_response(loaded, assignments)

    schema = TABLES["outcomes"]
    assert {c: str(t) for c, t in outcomes.dtypes.items()} == schema.columns
    assert outcomes["user_id"].tolist() == users.tolist()
    assert (outcomes["campaign_id"] == "camp-002").all()
    window = pd.Timedelta(days=ATTRIBUTION_DAYS)
    assert (outcomes["observed_at"] == send_at + window).all()
    is_control = (assignments["arm"] == CONTROL_ARM).to_numpy()
    assert not outcomes.loc[is_control, "redeemed"].any()
    assert outcomes.loc[~is_control, "redeemed"].any()
    again = respond(loaded, assignments, "camp-002", seed=1)
    pd.testing.assert_frame_equal(outcomes, again)
    _assert_rates_match_truth(
        outcomes.assign(coupon_id=assignments["arm"].to_numpy()), truth
    )


RESPOND_SCRIPT = """
import sys
from pathlib import Path
import pandas as pd
from couponflow.settings import Settings
from couponflow.simulate import load_world_truth, respond
settings = Settings(home=Path(sys.argv[1]))
assignments = pd.read_parquet(sys.argv[2])
truth = load_world_truth(settings)
respond(truth, assignments, "camp-003", seed=9).to_parquet(sys.argv[3])
"""


def test_respond_in_new_process(tmp_path: Path, world: World) -> None:
    settings = Settings(home=tmp_path / "home")
    write_world(settings, world)
    assignments = pd.DataFrame(
        {
            "user_id": world.users["user_id"],
            "arm": "pct-10",
            "channel": "email",
            "send_at": world.meta["end"],
        }
    )
    assignments_path = tmp_path / "assignments.parquet"
    assignments.to_parquet(assignments_path)
    result_path = tmp_path / "outcomes.parquet"
    subprocess.run(
        [
            sys.executable,
            "-c",
            RESPOND_SCRIPT,
            str(settings.home),
            str(assignments_path),
            str(result_path),
        ],
        check=True,
        timeout=120,
    )
    expected = respond(world, assignments, "camp-003", seed=9)
    pd.testing.assert_frame_equal(pd.read_parquet(result_path), expected)


def test_progress_reports_stages() -> None:
    stages: list[str] = []
    simulate_world(50, MIN_DAYS, seed=0, progress=stages.append)
    assert stages == ["latent", "users", "events", "truth", "past campaign"]


def test_respond_rejects_bad_assignments(world: World) -> None:
    send_at = world.meta["end"]
    good = pd.DataFrame(
        {"user_id": ["0"], "arm": ["pct-10"], "channel": ["sms"], "send_at": [send_at]}
    )
    assert len(respond(world, good, "camp-x", seed=0)) == 1
    with pytest.raises(ValueError, match="unknown arms"):
        respond(world, good.assign(arm="pct-99"), "camp-x", seed=0)
    with pytest.raises(ValueError, match="not in the simulated world"):
        respond(world, good.assign(user_id="999999"), "camp-x", seed=0)
    with pytest.raises(ValueError, match="allows only"):
        respond(world, good.assign(arm="amt-1500-elec"), "camp-x", seed=0)
    late = send_at + pd.Timedelta(days=400)
    with pytest.raises(ValueError, match="outside its validity"):
        respond(world, good.assign(send_at=late), "camp-x", seed=0)
    with pytest.raises(KeyError, match="channel"):
        respond(world, good.drop(columns="channel"), "camp-x", seed=0)


def test_load_truth_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="write_world"):
        load_world_truth(Settings(home=tmp_path))


def test_simulate_rejects_short_window() -> None:
    with pytest.raises(ValueError, match="days must be"):
        simulate_world(10, MIN_DAYS - 1, seed=0)
