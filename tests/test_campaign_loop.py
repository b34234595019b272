"""The whole campaign loop as a chain of real DAG runs on a small simulated world."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from couponflow import lake
from couponflow.settings import Settings, get_settings, reset_settings

pytestmark = pytest.mark.slow

LOOP_USERS = 400
LOOP_DAYS = 24
LOOP_SEED = 5
CAMPAIGN = "loop-001"
PAST_CAMPAIGN = "past-001"


@pytest.fixture(scope="module")
def settings(session_home: Path) -> Settings:
    reset_settings()
    return get_settings()


@pytest.fixture(scope="module")
def loop(settings: Settings) -> dict[str, object]:
    """Run every DAG in order once; later tests read what the runs left behind."""
    from couponflow.dagrun import run_dag, task_states
    from couponflow.demo import answer_campaign, demo_budget, simulate_to_raw

    simulate_to_raw(settings, LOOP_USERS, LOOP_DAYS, LOOP_SEED)
    states = {"ingest_events": task_states(run_dag(settings, "ingest_events"))}
    states["build_features"] = task_states(run_dag(settings, "build_features"))
    states["train_models"] = task_states(
        run_dag(settings, "train_models", {"profile_epochs": 1, "seed": LOOP_SEED})
    )
    budget = demo_budget(settings)
    states["allocate_campaign"] = task_states(
        run_dag(
            settings,
            "allocate_campaign",
            {
                "campaign_id": CAMPAIGN,
                "budget_cents": budget,
                "holdout_fraction": 0.2,
                "seed": LOOP_SEED,
            },
        )
    )
    answer_campaign(settings, CAMPAIGN, LOOP_SEED)
    states["ingest_outcomes"] = task_states(run_dag(settings, "ingest_events"))
    # An empty campaign id analyzes every campaign with outcomes: the randomized
    # past campaign and the one just allocated.
    states["analyze_experiment"] = task_states(
        run_dag(settings, "analyze_experiment", {"campaign_id": ""})
    )
    return {"states": states, "budget": budget}


def test_every_task_succeeds(loop: dict[str, object]) -> None:
    states = loop["states"]
    assert isinstance(states, dict)
    for dag_id, tasks in states.items():
        if dag_id == "ingest_outcomes":
            # No new behaviour arrived with the campaign's outcomes, so the lake
            # asset is not published and build_features is not scheduled again.
            assert tasks["publish_lake"] == "skipped"
            assert tasks["publish_outcomes"] == "success"
            continue
        failed = {t: s for t, s in tasks.items() if s != "success"}
        assert not failed, f"{dag_id}: {failed}"


def test_ingestion_counts_add_up(loop: dict[str, object], settings: Settings) -> None:
    from couponflow.store import get_engine, ingest_ledger

    with get_engine(settings.campaign_db_url).connect() as connection:
        rows = connection.execute(sa.select(ingest_ledger)).mappings().all()
    assert rows
    for row in rows:
        assert row["rows_in"] == row["rows_accepted"] + row["rows_quarantined"]
    events = lake.read_lake_table(settings, "events")
    accepted = sum(r["rows_accepted"] for r in rows if r["table_name"] == "events")
    assert len(events) == accepted


def test_allocation_respects_budget(
    loop: dict[str, object], settings: Settings
) -> None:
    from couponflow.allocation import read_current_allocation
    from couponflow.store import get_engine

    plan = read_current_allocation(get_engine(settings.campaign_db_url), CAMPAIGN)
    assert len(plan) == LOOP_USERS
    assert plan["user_id"].is_unique
    treatment = plan[plan["group_name"] == "treatment"]
    assert treatment["expected_cost_cents"].sum() <= loop["budget"]
    assert (plan["propensity"] > 0).all()
    assert (plan["propensity"] <= 1).all()
    assert set(plan.loc[plan["group_name"] == "holdout", "arm"]) == {"control"}
    assert "0" in set(plan["user_id"])


def test_allocation_sends_on_listed_channels_at_user_hours(
    loop: dict[str, object], settings: Settings
) -> None:
    from couponflow.allocation import read_current_allocation
    from couponflow.store import get_engine

    plan = read_current_allocation(get_engine(settings.campaign_db_url), CAMPAIGN)
    coupons = lake.read_lake_table(settings, "coupons").drop_duplicates("coupon_id")
    listed = {
        str(c.coupon_id): set(str(c.channels).split(",")) for c in coupons.itertuples()
    }
    offered = plan[plan["policy_arm"] != "control"]
    assert len(offered) > 0
    for row in offered.itertuples():
        assert row.channel in listed[row.policy_arm], row
    first_send = offered["send_at"].min()
    assert (offered["send_at"] < first_send.floor("D") + pd.Timedelta(days=2)).all()
    sms_hours = offered.loc[offered["channel"] == "sms", "send_at"].dt.hour
    assert sms_hours.between(8, 20).all()
    # Send hours follow each user's active hours, so they are not all one hour.
    assert offered["send_at"].dt.hour.nunique() > 3


def test_policy_comparison_judges_the_stored_plan(
    loop: dict[str, object], settings: Settings
) -> None:
    from couponflow.allocation import read_current_allocation
    from couponflow.demo import compare_policies
    from couponflow.store import get_engine

    budget = loop["budget"]
    assert isinstance(budget, int)
    results = {
        r.policy: r for r in compare_policies(settings, CAMPAIGN, budget, LOOP_SEED)
    }
    assert set(results) == {
        "couponflow",
        "couponflow, fixed send",
        "random targeting",
        "likeliest buyers",
        "oracle",
    }
    plan = read_current_allocation(get_engine(settings.campaign_db_url), CAMPAIGN)
    offered = int((plan["policy_arm"] != "control").sum())
    assert results["couponflow"].offers_granted == offered
    # The oracle spends within the budget on the true costs, and earns with them.
    assert results["oracle"].true_cost_cents <= budget
    assert results["oracle"].true_profit_cents > 0


def test_report_and_summary_written(
    loop: dict[str, object], settings: Settings
) -> None:
    assert settings.reports_dir is not None
    report = settings.reports_dir / CAMPAIGN / "report.html"
    assert report.exists()
    summary = json.loads((report.parent / "summary.json").read_text())
    assert CAMPAIGN in summary["title"]
    assert summary["trustworthy"] in (True, False)
    assert summary["allocation_model_uri"] == summary["champion_model_uri"]
    assert summary["champion_model_uri"].startswith("models:/")

    # The randomized past campaign sent every coupon, so its report plots each arm.
    past = settings.reports_dir / PAST_CAMPAIGN / "report.html"
    assert "data:image/png;base64," in past.read_text(), "the report has no plot"
    past_summary = json.loads((past.parent / "summary.json").read_text())
    assert len(past_summary["arms"]) == 6
    assert {arm["decision"] for arm in past_summary["arms"]} <= {"keep", "drop"}


def test_champion_registered(loop: dict[str, object], settings: Settings) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(
        tracking_uri=settings.mlflow_tracking_uri,
        registry_uri=settings.mlflow_tracking_uri,
    )
    champion = client.get_model_version_by_alias(
        settings.response_model_name, "champion"
    )
    assert str(champion.version) == "1"
    assert "champion" in champion.aliases


def test_serving_returns_offer_for_user_zero(
    loop: dict[str, object], settings: Settings
) -> None:
    from fastapi.testclient import TestClient

    from serving.app import create_app

    client = TestClient(create_app(settings))
    response = client.get("/v1/users/0/offers", params={"campaign_id": CAMPAIGN})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user_id"] == "0"
    missing = client.get(
        "/v1/users/no-such-user/offers", params={"campaign_id": CAMPAIGN}
    )
    assert missing.status_code == 404
    assert "no-such-user" in missing.text


def test_zero_budget_allocates_nothing(
    loop: dict[str, object], settings: Settings
) -> None:
    from couponflow.dagrun import run_dag

    dag_run = run_dag(
        settings,
        "allocate_campaign",
        {"campaign_id": "zero-budget", "budget_cents": 0, "seed": 1},
    )
    summary = _xcom(dag_run, "solve_allocation")
    assert summary["offers_granted"] == 0
    assert summary["budget_used_fraction"] is None
    assert summary["explore_fraction"] == 0
    assert summary["sends_by_channel"] == {}
    assert "warnings" not in summary


def test_misspelled_param_is_refused_before_the_run(
    loop: dict[str, object], settings: Settings
) -> None:
    from couponflow.dagrun import run_dag

    with pytest.raises(ValueError, match=r"no params \['budget'\]"):
        run_dag(settings, "allocate_campaign", {"campaign_id": "typo", "budget": 5})


def test_scored_files_move_into_the_campaign_folder(
    loop: dict[str, object], settings: Settings
) -> None:
    from couponflow.pipeline import SCORE_FILES, campaign_dir

    folder = campaign_dir(settings, CAMPAIGN)
    for name in SCORE_FILES:
        assert (folder / name).exists(), name
        assert not (folder / "pending" / name).exists(), name


def test_empty_batch_stops_the_chain(
    loop: dict[str, object], settings: Settings
) -> None:
    from couponflow.dagrun import DagRunFailed, run_dag
    from couponflow.schemas import EVENTS

    batch = "events-2099-empty"
    path = lake.write_raw_batch(settings, "events", batch, EVENTS.empty_frame())
    try:
        with pytest.raises(DagRunFailed) as failure:
            run_dag(settings, "ingest_events")
        assert "ingest_events" in failure.value.failed_tasks
        from couponflow.ingest import BatchRejected, ingest_batch

        with pytest.raises(BatchRejected, match=batch):
            ingest_batch(settings, "events", path)
    finally:
        path.unlink()


def _xcom(dag_run: object, task_id: str) -> dict[str, object]:
    for ti in dag_run.get_task_instances():  # type: ignore[attr-defined]
        if ti.task_id == task_id:
            value = ti.xcom_pull(task_ids=task_id)
            assert isinstance(value, dict)
            return value
    raise AssertionError(f"no task {task_id}")


def test_feature_rows_point_in_time(
    loop: dict[str, object], settings: Settings
) -> None:
    assert settings.feature_dir is not None
    features = pd.read_parquet(settings.feature_dir / "user_features.parquet")
    assert features["event_timestamp"].nunique() > 1
    assert "0" in set(features["user_id"])
