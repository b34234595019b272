"""Tests of coupon design: the genetic search, its constraints, MLflow and ingestion.

Most tests search against a closed-form response: conversion rises with the discount
share of the basket, scaled by price sensitivity and by the user's affinity for the
coupon's category, and falls when the minimum spend is above the basket.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy.special import expit, logit

from couponflow import lake
from couponflow.design import (
    CATALOGUE_ARTIFACT,
    DESIGN_EXPERIMENT,
    DesignResult,
    DesignSpace,
    constraint_violations,
    design_catalogue,
    design_id_from_run,
    latest_feature_snapshot,
    log_design,
    score_catalogue,
    write_designed_batch,
)
from couponflow.ingest import ingest_pending
from couponflow.schemas import ALL_CATEGORIES, CATEGORIES, COUPON_KINDS, COUPONS
from couponflow.settings import Settings
from couponflow.simulate import (
    coupon_catalogue,
    simulate_world,
    true_incremental_profit_cents,
    true_response,
)
from training.response import USER_FEATURES, train_response_model

N_USERS = 400
BUDGET_CENTS = 150_000
MARGIN_RATE = 0.3
N_COUPONS = 4
GENERATIONS = 8
POPULATION = 12
SEED = 5
START = pd.Timestamp("2026-03-01T00:00:00Z")
# The search must beat its initial population's best by at least this share.
MIN_IMPROVEMENT = 0.10


class ClosedFormModel:
    """A response model with a known formula, recording every offer it scores."""

    def __init__(self) -> None:
        self.scored: list[pd.DataFrame] = []

    def predict_conversion(
        self, users: pd.DataFrame, offers: pd.DataFrame
    ) -> npt.NDArray[np.float64]:
        self.scored.append(offers.copy())
        basket = users["aov_cents"].to_numpy(np.float64)
        base = users["base_rate"].to_numpy()
        sensitivity = users["sensitivity"].to_numpy()
        columns = [base]
        for kind, value, min_spend, category in zip(
            offers["kind"].tolist(),
            offers["value"].to_numpy(np.float64),
            offers["min_spend_cents"].to_numpy(np.float64),
            offers["category"].tolist(),
            strict=True,
        ):
            if kind == "percent_off":
                share = np.full(len(users), value / 10_000)
            else:
                share = value / basket
            if category == ALL_CATEGORIES:
                match = np.ones(len(users))
            else:
                match = np.minimum(1.0, 3.0 * users[f"affinity_{category}"].to_numpy())
            reach = np.exp(-np.maximum(0.0, min_spend - basket) / basket)
            gain = 6.0 * sensitivity * share * match * reach
            columns.append(expit(logit(base) + gain))
        return np.column_stack(columns)


def make_users(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    affinity = rng.dirichlet(np.full(len(CATEGORIES), 0.6), n)
    users = pd.DataFrame(
        {
            "user_id": pd.array([f"u{i}" for i in range(n)], dtype="string"),
            "aov_cents": np.round(rng.lognormal(np.log(4_500), 0.5, n)).astype(
                np.int64
            ),
            "base_rate": rng.beta(2, 20, n),
            "sensitivity": rng.beta(2, 2.5, n),
        }
    )
    for i, category in enumerate(CATEGORIES):
        users[f"affinity_{category}"] = affinity[:, i]
    return users


def run_search(
    model: ClosedFormModel, seed: int = SEED, space: DesignSpace | None = None
) -> DesignResult:
    return design_catalogue(
        model,
        make_users(N_USERS, 1),
        BUDGET_CENTS,
        MARGIN_RATE,
        N_COUPONS,
        seed,
        GENERATIONS,
        space=space,
        population_size=POPULATION,
        starts_at=START,
    )


@pytest.fixture(scope="module")
def searched() -> tuple[DesignResult, ClosedFormModel]:
    model = ClosedFormModel()
    return run_search(model), model


def test_search_improves_initial_population(
    searched: tuple[DesignResult, ClosedFormModel],
) -> None:
    result, _ = searched
    assert len(result.history) == GENERATIONS + 1
    assert result.history[0].generation == 0
    assert result.initial_objective_cents > 0
    assert result.objective_cents > result.initial_objective_cents * (
        1 + MIN_IMPROVEMENT
    )
    best = [stats.best_objective_cents for stats in result.history]
    # Elitism keeps the best catalogue, so the best objective never falls.
    assert all(later >= earlier for earlier, later in zip(best, best[1:], strict=False))
    assert best[-1] == result.objective_cents


def test_objective_equals_score_catalogue(
    searched: tuple[DesignResult, ClosedFormModel],
) -> None:
    result, _ = searched
    again = score_catalogue(
        ClosedFormModel(),
        make_users(N_USERS, 1),
        result.catalogue,
        BUDGET_CENTS,
        MARGIN_RATE,
    )
    assert again == pytest.approx(result.objective_cents, rel=1e-12)
    assert result.solution.total_cost_cents <= BUDGET_CENTS
    assert result.solution.n_granted > 0


def test_catalogue_follows_coupons_contract(
    searched: tuple[DesignResult, ClosedFormModel],
) -> None:
    result, _ = searched
    catalogue = result.catalogue
    assert list(catalogue.columns) == list(COUPONS.columns)
    assert len(catalogue) == N_COUPONS
    assert catalogue["coupon_id"].is_unique
    assert (catalogue["starts_at"] == START).all()
    assert (catalogue["ends_at"] > catalogue["starts_at"]).all()
    assert (catalogue["stock"] == N_USERS).all()
    assert catalogue["coupon_id"].str.startswith("designed-").all()


def test_constraints_hold_for_every_scored_coupon() -> None:
    space = DesignSpace(
        max_face_value_cents=1_500, margin_floor=0.6, max_percent_bp=2_000
    )
    for seed in range(3):
        model = ClosedFormModel()
        result = run_search(model, seed=seed, space=space)
        scored = pd.concat(model.scored, ignore_index=True)
        scored["coupon_id"] = [f"scored-{i}" for i in range(len(scored))]

        assert constraint_violations(result.catalogue, space) == []
        assert constraint_violations(scored, space) == []
        for frame in (result.catalogue, scored):
            assert set(frame["kind"]) <= set(COUPON_KINDS)
            assert set(frame["category"]) <= {ALL_CATEGORIES, *CATEGORIES}
            cents = frame[frame["kind"] != "percent_off"]
            assert (cents["value"] <= 1_500).all()
            assert (cents["value"] <= 0.4 * cents["min_spend_cents"]).all()
            percent = frame[frame["kind"] == "percent_off"]
            assert (percent["value"] <= 2_000).all()
            shipping = frame[frame["kind"] == "free_shipping"]
            assert (shipping["value"] == space.shipping_fee_cents).all()


def test_same_seed_same_design() -> None:
    first = run_search(ClosedFormModel(), seed=9)
    second = run_search(ClosedFormModel(), seed=9)
    other = run_search(ClosedFormModel(), seed=10)

    pd.testing.assert_frame_equal(first.catalogue, second.catalogue)
    assert [s.best_objective_cents for s in first.history] == [
        s.best_objective_cents for s in second.history
    ]
    assert [s.mean_objective_cents for s in first.history] == [
        s.mean_objective_cents for s in second.history
    ]
    assert not first.catalogue[["kind", "value", "min_spend_cents"]].equals(
        other.catalogue[["kind", "value", "min_spend_cents"]]
    )


def test_user_sample_scales_budget() -> None:
    result = design_catalogue(
        ClosedFormModel(),
        make_users(N_USERS, 1),
        BUDGET_CENTS,
        MARGIN_RATE,
        2,
        SEED,
        1,
        population_size=4,
        max_users=100,
        starts_at=START,
    )
    assert result.n_users_searched == 100
    assert result.search_budget_cents == BUDGET_CENTS // 4
    assert result.solution.choice.shape == (100,)
    assert (result.catalogue["stock"] == N_USERS).all()


def test_hand_made_free_shipping_breaks_margin_floor() -> None:
    hand_made = coupon_catalogue(START, START, 100)
    problems = constraint_violations(hand_made, DesignSpace())
    # Free shipping with no minimum spend gives away more than half of a small
    # basket; the other hand-made coupons keep half of their smallest basket.
    assert len(problems) == 1
    assert problems[0].startswith("ship-free: ")
    assert "margin_floor" in problems[0]

    coupon = hand_made.iloc[[0]].assign(value=5_000, min_spend_cents=20_000)
    problems = constraint_violations(coupon, DesignSpace())
    assert any("max_face_value_cents" in p for p in problems)


def test_design_space_rejects_bad_limits() -> None:
    with pytest.raises(ValueError, match="margin_floor must be in"):
        DesignSpace(margin_floor=1.0)
    with pytest.raises(ValueError, match="no value of kind"):
        DesignSpace(max_face_value_cents=50)
    with pytest.raises(ValueError, match="no value of kind"):
        DesignSpace(margin_floor=0.999, kinds=("amount_off",))
    with pytest.raises(ValueError, match="kinds must be"):
        DesignSpace(kinds=("bogus",))
    with pytest.raises(ValueError, match="n_coupons=5 exceeds"):
        design_catalogue(
            ClosedFormModel(),
            make_users(10, 1),
            BUDGET_CENTS,
            MARGIN_RATE,
            5,
            SEED,
            1,
            space=DesignSpace(
                kinds=("free_shipping",),
                categories=(ALL_CATEGORIES,),
                valid_days=(7,),
                max_min_spend_cents=3_000,
                min_spend_step_cents=1_000,
            ),
            starts_at=START,
        )
    with pytest.raises(ValueError, match="timezone-aware"):
        design_catalogue(
            ClosedFormModel(),
            make_users(10, 1),
            BUDGET_CENTS,
            MARGIN_RATE,
            2,
            SEED,
            1,
            starts_at=START.tz_localize(None).to_pydatetime(),
        )


def test_log_design_records_run(
    tmp_path: Path, searched: tuple[DesignResult, ClosedFormModel]
) -> None:
    result, _ = searched
    settings = Settings(home=tmp_path)

    run_id = log_design(result, settings)

    client = MlflowClient(settings.mlflow_tracking_uri)
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == DESIGN_EXPERIMENT
    assert run.data.params["n_coupons"] == str(N_COUPONS)
    assert run.data.params["space_margin_floor"] == "0.5"
    history = client.get_metric_history(run_id, "best_objective_cents")
    assert [m.step for m in history] == list(range(GENERATIONS + 1))
    assert [m.value for m in history] == pytest.approx(
        [s.best_objective_cents for s in result.history]
    )
    assert run.data.metrics["objective_cents"] == pytest.approx(result.objective_cents)
    artifact = Path(
        client.download_artifacts(run_id, CATALOGUE_ARTIFACT, str(tmp_path))
    )
    logged = pd.read_csv(artifact)
    assert logged["coupon_id"].tolist() == result.catalogue["coupon_id"].tolist()
    assert logged["value"].tolist() == result.catalogue["value"].tolist()


def test_designed_batch_passes_ingestion(
    tmp_path: Path, searched: tuple[DesignResult, ClosedFormModel]
) -> None:
    result, _ = searched
    settings = Settings(home=tmp_path)
    path = tmp_path / "catalogue.parquet"
    result.catalogue.to_parquet(path, index=False)

    written = write_designed_batch(
        {"design_id": "20260301120000", "catalogue_path": str(path)}, settings
    )

    assert written["batch_id"] == "coupons-designed-20260301120000"
    assert written["rows"] == N_COUPONS
    reports = ingest_pending(settings, tables=["coupons"])
    assert [r.batch_id for r in reports] == ["coupons-designed-20260301120000"]
    assert reports[0].rows_accepted == N_COUPONS
    assert reports[0].rows_quarantined == 0
    stored = lake.read_lake_table(settings, "coupons")
    assert sorted(stored["coupon_id"]) == sorted(result.catalogue["coupon_id"])


def test_design_ids_are_checked(tmp_path: Path) -> None:
    assert design_id_from_run("manual__2026-03-01T12:30:05.123+00:00") == (
        "20260301123005"
    )
    with pytest.raises(ValueError, match="invalid design_id"):
        write_designed_batch(
            {"design_id": "../escape", "catalogue_path": "unused"},
            Settings(home=tmp_path),
        )


def test_latest_feature_snapshot_keeps_last_as_of(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    assert settings.feature_dir is not None
    with pytest.raises(FileNotFoundError, match="build_features"):
        latest_feature_snapshot(settings)
    settings.feature_dir.mkdir(parents=True)
    frame = pd.DataFrame(
        {
            "user_id": ["a", "b", "a"],
            "event_timestamp": [START, START, START + pd.Timedelta(days=1)],
            "aov_cents": [1, 2, 3],
        }
    )
    frame.to_parquet(settings.feature_dir / "user_features.parquet", index=False)

    latest = latest_feature_snapshot(settings)

    assert latest["user_id"].tolist() == ["a"]
    assert latest["aov_cents"].tolist() == [3]


def test_real_model_design_scores_on_truth() -> None:
    """A trained XGBoost response model drives the search, and the simulator's truth
    scores the designed coupons it never drew."""
    world = simulate_world(300, 10, seed=2)
    rng = np.random.default_rng(0)
    users = pd.DataFrame({"user_id": world.latent["user_id"]})
    for name in USER_FEATURES:
        users[name] = rng.random(len(users))
    users["aov_cents"] = world.latent["basket_cents"].to_numpy()
    users["top_category"] = pd.array(["sports"] * len(users), dtype="string")
    train = users.merge(world.outcomes[["user_id", "converted"]], on="user_id")
    train = train.merge(world.exposures[["user_id", "arm", "propensity"]], on="user_id")
    model = train_response_model(
        train, world.coupons, seed=0, params={"nthread": 1, "num_boost_round": 20}
    )

    result = design_catalogue(
        model,
        users,
        50_000,
        MARGIN_RATE,
        3,
        SEED,
        2,
        population_size=4,
        starts_at=START,
    )

    assert constraint_violations(result.catalogue, DesignSpace()) == []
    truth = true_response(world.latent, result.catalogue)
    assert len(truth) == len(world.latent) * (1 + len(result.catalogue))
    profit = true_incremental_profit_cents(truth, MARGIN_RATE)
    assert list(profit.columns) == result.catalogue["coupon_id"].tolist()
    assert np.isfinite(profit.to_numpy()).all()
    # On the world's own catalogue the wrapper reproduces the world's truth.
    pd.testing.assert_frame_equal(
        true_response(world.latent, world.coupons), world.truth
    )
