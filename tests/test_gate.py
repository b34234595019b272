"""Tests of the promotion gate, with a real MLflow SQLite store in tmp_path.

The synthetic campaign assigns arms at random. Only users with a high cart rate
respond to offers, and for them the percent-off coupon is profitable at a 30% margin,
so a model that learned this has a greedy policy worth more than never sending one.
Measured over data seeds 21 to 23: the good model's DR profit exceeds the shuffled
model's by 5.2 to 6.5 standard errors of the paired difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from couponflow.analysis.ipw import Estimate
from couponflow.schemas import CATEGORIES, CONTROL_ARM
from couponflow.settings import Settings
from training.gate import (
    GATE_ARTIFACT,
    PolicyEvaluation,
    PromotionDecision,
    decide_promotion,
    greedy_policy_arms,
    promotion_rule,
    realized_profit_cents,
)
from training.registry import CHAMPION_ALIAS, RegistrationResult, log_and_register
from training.response import (
    USER_FEATURES,
    ResponseModel,
    split_holdout,
    train_response_model,
)

N_USERS = 6000
DATA_SEED = 21
MARGIN_RATE = 0.30
TEST_PARAMS = {"nthread": 1, "num_boost_round": 100}
ARMS = (CONTROL_ARM, "PCT10", "AMT5")
ARM_PROBABILITIES = (0.4, 0.3, 0.3)
BASE_RATE = 0.10
# Conversion uplift of each coupon for responsive users; the others get none.
RESPONSIVE_UPLIFT = {CONTROL_ARM: 0.0, "PCT10": 0.30, "AMT5": 0.12}
RESPONSIVE_CART_RATE = 0.3


def make_coupons() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "coupon_id": pd.array(["PCT10", "AMT5"], dtype="string"),
            "kind": pd.array(["percent_off", "amount_off"], dtype="string"),
            "value": np.array([1000, 500], dtype=np.int64),
            "min_spend_cents": np.array([0, 3000], dtype=np.int64),
            "category": pd.array(["all", "all"], dtype="string"),
            "valid_days": np.array([7, 14], dtype=np.int64),
            "stock": np.array([10_000, 10_000], dtype=np.int64),
            "channels": pd.array(["email", "email"], dtype="string"),
            "starts_at": pd.Timestamp("2026-01-01", tz="UTC"),
            "ends_at": pd.Timestamp("2026-02-01", tz="UTC"),
        }
    )


def make_campaign(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {name: rng.random(n) for name in USER_FEATURES},
    )
    frame["user_id"] = pd.array([f"g{seed}-{i}" for i in range(n)], dtype="string")
    frame["cart_rate"] = rng.beta(2, 5, n)
    frame["aov_cents"] = rng.gamma(6, 1000, n).round().astype(np.int64)
    affinity = rng.dirichlet(np.ones(len(CATEGORIES)), n)
    for i, category in enumerate(CATEGORIES):
        frame[f"affinity_{category}"] = affinity[:, i]
    frame["top_category"] = pd.array(
        np.array(CATEGORIES)[affinity.argmax(axis=1)], dtype="string"
    )

    arm = rng.choice(ARMS, n, p=ARM_PROBABILITIES)
    responsive = frame["cart_rate"].to_numpy() > RESPONSIVE_CART_RATE
    uplift = np.array([RESPONSIVE_UPLIFT[a] for a in arm]) * responsive
    propensity = np.array(ARM_PROBABILITIES)[[ARMS.index(a) for a in arm]]
    frame["arm"] = pd.array(arm, dtype="string")
    frame["propensity"] = propensity
    frame["converted"] = rng.random(n) < BASE_RATE + uplift
    frame["revenue_cents"] = np.where(frame["converted"], frame["aov_cents"], 0)
    return frame


@pytest.fixture(scope="module")
def campaign() -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = make_campaign(N_USERS, DATA_SEED)
    in_holdout = split_holdout(frame["user_id"])
    return frame[~in_holdout], frame[in_holdout]


@pytest.fixture(scope="module")
def good_model(campaign: tuple[pd.DataFrame, pd.DataFrame]) -> ResponseModel:
    train, _ = campaign
    return train_response_model(train, make_coupons(), seed=0, params=TEST_PARAMS)


@pytest.fixture(scope="module")
def shuffled_model(campaign: tuple[pd.DataFrame, pd.DataFrame]) -> ResponseModel:
    train, _ = campaign
    shuffled = train.copy()
    outcomes = shuffled["converted"].to_numpy()
    shuffled["converted"] = np.random.default_rng(5).permutation(outcomes)
    return train_response_model(shuffled, make_coupons(), seed=0, params=TEST_PARAMS)


def make_settings(home: Path, model_name: str) -> Settings:
    return Settings(
        home=home,
        mlflow_tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
        mlflow_artifact_root=str(home / "mlartifacts"),
        response_model_name=model_name,
        margin_rate=MARGIN_RATE,
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gate")


@pytest.fixture(scope="module")
def kept(
    home: Path,
    good_model: ResponseModel,
    shuffled_model: ResponseModel,
    campaign: tuple[pd.DataFrame, pd.DataFrame],
) -> tuple[Settings, RegistrationResult, RegistrationResult]:
    """The good model registered first, then the shuffled challenger."""
    _, holdout = campaign
    settings = make_settings(home, "gate-kept")
    first = log_and_register(good_model, {}, settings, holdout, make_coupons())
    second = log_and_register(shuffled_model, {}, settings, holdout, make_coupons())
    return settings, first, second


def read_gate_artifact(settings: Settings, run_id: str, folder: Path) -> dict:
    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    path = client.download_artifacts(run_id, GATE_ARTIFACT, str(folder))
    return dict(json.loads(Path(path).read_text()))


def test_first_model_becomes_champion(
    kept: tuple[Settings, RegistrationResult, RegistrationResult], tmp_path: Path
) -> None:
    settings, first, _ = kept
    assert first.version == 1
    assert first.promoted
    assert "no champion" in first.promotion_reason
    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    run = client.get_run(first.run_id)
    assert run.data.tags["gate_decision"] == "promoted"
    assert run.data.tags["gate_estimator"] == "dr"
    assert "gate_challenger_dr" in run.data.metrics
    assert "gate_champion_dr" not in run.data.metrics
    artifact = read_gate_artifact(settings, first.run_id, tmp_path)
    assert artifact["promoted"] is True
    assert artifact["champion"] is None
    assert artifact["challenger"]["dr"]["stderr"] > 0


def test_shuffled_challenger_is_not_promoted(
    kept: tuple[Settings, RegistrationResult, RegistrationResult], tmp_path: Path
) -> None:
    settings, first, second = kept
    assert second.version == 2
    assert not second.promoted
    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    champion = client.get_model_version_by_alias("gate-kept", CHAMPION_ALIAS)
    assert int(champion.version) == first.version
    assert client.get_model_version("gate-kept", "2") is not None

    run = client.get_run(second.run_id)
    assert run.data.tags["gate_decision"] == "kept_champion"
    assert run.data.tags["champion_decision"] == "kept_champion"
    reason = run.data.tags["gate_reason"]
    assert reason.startswith("kept champion: DR profit")
    assert "is not above the champion's" in reason
    metrics = run.data.metrics
    assert metrics["gate_challenger_dr"] < metrics["gate_champion_dr"]
    assert metrics["gate_difference"] < 0
    assert metrics["gate_difference_ci_low"] < metrics["gate_difference_ci_high"]

    artifact = read_gate_artifact(settings, second.run_id, tmp_path)
    assert artifact["promoted"] is False
    assert artifact["reason"] == reason
    assert artifact["margin_rate"] == MARGIN_RATE
    for side in ("challenger", "champion"):
        for estimator in ("snips", "dr"):
            estimate = artifact[side][estimator]
            assert estimate["ci_low"] < estimate["value"] < estimate["ci_high"]
    assert artifact["difference"]["value"] == pytest.approx(
        artifact["challenger"]["dr"]["value"] - artifact["champion"]["dr"]["value"]
    )


def test_better_challenger_is_promoted(
    home: Path,
    good_model: ResponseModel,
    shuffled_model: ResponseModel,
    campaign: tuple[pd.DataFrame, pd.DataFrame],
    tmp_path: Path,
) -> None:
    _, holdout = campaign
    settings = make_settings(home, "gate-promoted")
    weak = log_and_register(shuffled_model, {}, settings, holdout, make_coupons())
    strong = log_and_register(good_model, {}, settings, holdout, make_coupons())
    assert weak.promoted
    assert strong.promoted
    assert strong.previous_champion_version == weak.version
    assert strong.promotion_reason.startswith("promoted: DR profit")

    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    champion = client.get_model_version_by_alias("gate-promoted", CHAMPION_ALIAS)
    assert int(champion.version) == strong.version
    artifact = read_gate_artifact(settings, strong.run_id, tmp_path)
    assert artifact["promoted"] is True
    assert artifact["difference"]["value"] > 0
    assert artifact["challenger_qini"] >= artifact["champion_qini"]


def test_snips_estimator_decides(
    good_model: ResponseModel,
    shuffled_model: ResponseModel,
    campaign: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    _, holdout = campaign
    decision = decide_promotion(
        good_model,
        shuffled_model,
        holdout,
        make_coupons(),
        MARGIN_RATE,
        estimator="snips",
    )
    assert decision.promoted
    assert decision.reason.startswith("promoted: SNIPS profit")
    assert decision.champion is not None
    assert decision.difference is not None
    assert decision.difference.value == pytest.approx(
        decision.challenger.snips.value - decision.champion.snips.value
    )
    with pytest.raises(ValueError, match="estimator must be one of"):
        decide_promotion(
            good_model,
            None,
            holdout,
            make_coupons(),
            MARGIN_RATE,
            estimator="ips",  # type: ignore[arg-type]
        )


def test_promotion_rule_needs_both_conditions() -> None:
    promoted, reason = promotion_rule(120.0, 100.0, 0.02, 0.01, "dr")
    assert promoted
    assert reason.startswith("promoted: DR profit 120.00")

    promoted, reason = promotion_rule(90.0, 100.0, 0.02, 0.01, "dr")
    assert not promoted
    assert "is not above the champion's 100.00" in reason
    assert "Qini" not in reason

    promoted, reason = promotion_rule(120.0, 100.0, 0.005, 0.01, "snips")
    assert not promoted
    assert "Qini 0.00500 is below the champion's 0.01000" in reason
    assert "SNIPS" not in reason

    promoted, _ = promotion_rule(100.0, 100.0, 0.01, 0.01, "dr")
    assert not promoted
    promoted, _ = promotion_rule(float("nan"), 100.0, 0.02, 0.01, "dr")
    assert not promoted
    promoted, _ = promotion_rule(120.0, 100.0, 0.01, 0.01, "dr")
    assert promoted


def test_greedy_policy_targets_responsive_users(
    good_model: ResponseModel,
    shuffled_model: ResponseModel,
    campaign: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    _, holdout = campaign
    arms, reward_model = greedy_policy_arms(
        good_model, holdout, make_coupons(), MARGIN_RATE
    )
    assert arms.shape == (len(holdout),)
    assert reward_model.shape == (len(holdout), len(ARMS))
    responsive = holdout["cart_rate"].to_numpy() > RESPONSIVE_CART_RATE
    treated = arms != CONTROL_ARM
    assert treated.any()
    # About 42% of users are responsive (Beta(2, 5) above 0.3); the greedy policy
    # must target them far above that base rate.
    assert responsive[treated].mean() > 1.5 * responsive.mean()
    assert (arms[treated] == "PCT10").mean() > 0.5

    shuffled_arms, _ = greedy_policy_arms(
        shuffled_model, holdout, make_coupons(), MARGIN_RATE
    )
    assert (shuffled_arms != CONTROL_ARM).mean() < treated.mean()


def test_realized_profit_estimates_discount() -> None:
    frame = pd.DataFrame(
        {
            "arm": [CONTROL_ARM, "PCT10", "AMT5", "AMT5", "PCT10"],
            "converted": [True, True, True, True, False],
            "revenue_cents": [4000, 5000, 6000, 2000, 0],
        }
    )
    profit = realized_profit_cents(frame, make_coupons(), MARGIN_RATE)
    # PCT10 takes 10% of 5000; AMT5 takes 500 only at or above its 3000 minimum.
    expected = [1200.0, 1500.0 - 500.0, 1800.0 - 500.0, 600.0, 0.0]
    np.testing.assert_allclose(profit, expected)

    logged = frame.assign(discount_cents=[0, 100, 0, 0, 0])
    profit = realized_profit_cents(logged, make_coupons(), MARGIN_RATE)
    np.testing.assert_allclose(profit, [1200.0, 1400.0, 1800.0, 600.0, 0.0])


def test_holdout_without_propensity_is_rejected(
    good_model: ResponseModel, campaign: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    _, holdout = campaign
    with pytest.raises(ValueError, match=r"missing columns \['propensity'\]"):
        decide_promotion(
            good_model,
            None,
            holdout.drop(columns="propensity"),
            make_coupons(),
            MARGIN_RATE,
        )
    with pytest.raises(ValueError, match=r"propensity must be in \(0, 1\]"):
        decide_promotion(
            good_model,
            None,
            holdout.assign(propensity=0.0),
            make_coupons(),
            MARGIN_RATE,
        )


def test_decision_to_dict_writes_nan_as_none() -> None:
    estimate = Estimate(float("nan"), None, None, None, 1, 0, 0.05)
    decision = PromotionDecision(
        promoted=False,
        reason="kept champion",
        estimator="dr",
        margin_rate=MARGIN_RATE,
        holdout_rows=1,
        challenger=PolicyEvaluation(estimate, estimate, {CONTROL_ARM: 1}),
        challenger_qini=float("nan"),
        champion=None,
        champion_qini=None,
        difference=None,
    )
    payload = decision.to_dict()
    assert payload["challenger"]["dr"]["value"] is None
    assert payload["challenger_qini"] is None
    json.dumps(payload, allow_nan=False)
