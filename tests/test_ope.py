"""Tests of the IPS, SNIPS and DR estimators on synthetic logs with a known truth.

Contexts are drawn from a few discrete types, so that the true value of a policy is an
exact sum over types and actions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from couponflow.analysis.ipw import ipw_policy_value, self_normalized_ipw_policy_value
from couponflow.analysis.ope import (
    action_indices,
    deterministic_policy,
    dr_value,
    estimate_policy_value,
    estimate_value_difference,
    ips_value,
    snips_value,
)

# Reward probability of each (context type, action), the logging policy and the
# evaluated policy. Every logging probability is >= 0.1, so the weights stay <= 10.
MEAN_REWARD = np.array(
    [
        [0.10, 0.30, 0.20],
        [0.50, 0.20, 0.40],
        [0.05, 0.05, 0.60],
        [0.30, 0.70, 0.10],
        [0.25, 0.25, 0.25],
    ]
)
LOGGING_POLICY = np.array(
    [
        [0.6, 0.3, 0.1],
        [0.2, 0.4, 0.4],
        [0.5, 0.4, 0.1],
        [1 / 3, 1 / 3, 1 / 3],
        [0.1, 0.1, 0.8],
    ]
)
TARGET_POLICY = np.array(
    [
        [0.1, 0.8, 0.1],
        [0.7, 0.1, 0.2],
        [0.0, 0.1, 0.9],
        [0.2, 0.7, 0.1],
        [0.5, 0.5, 0.0],
    ]
)
N_TYPES, N_ACTIONS = MEAN_REWARD.shape
TRUE_VALUE = float((TARGET_POLICY * MEAN_REWARD).sum(axis=1).mean())
ROWS_PER_LOG = 400
REPEATS = 300
# The mean over repeats must lie within this many of its standard errors of the
# truth; 4 leaves a false-failure rate below 1e-4 per check.
MAX_STANDARD_ERRORS = 4.0
# Share of 95% intervals that contain the truth over REPEATS logs: the binomial
# standard deviation at 0.95 is 0.013, so the band is about 4 of them each side.
MIN_COVERAGE = 0.89
MAX_COVERAGE = 0.995
MAX_DR_VARIANCE_SHARE = 0.75
# A reward model that is wrong by a constant per action: DR stays unbiased.
REWARD_MODEL_ERROR = np.array([0.15, -0.10, 0.05])


@dataclass(frozen=True)
class Log:
    context: np.ndarray
    action: np.ndarray
    propensity: np.ndarray
    reward: np.ndarray

    @property
    def target(self) -> np.ndarray:
        return TARGET_POLICY[self.context]

    @property
    def perfect_model(self) -> np.ndarray:
        return MEAN_REWARD[self.context]


def draw_log(rng: np.random.Generator, n: int = ROWS_PER_LOG) -> Log:
    context = rng.integers(0, N_TYPES, n)
    cumulative = LOGGING_POLICY[context].cumsum(axis=1)
    action = (rng.random((n, 1)) > cumulative).sum(axis=1).astype(np.int64)
    action = np.minimum(action, N_ACTIONS - 1)
    propensity = LOGGING_POLICY[context, action]
    reward = (rng.random(n) < MEAN_REWARD[context, action]).astype(np.float64)
    return Log(context, action, propensity, reward)


@pytest.fixture(scope="module")
def logs() -> list[Log]:
    rng = np.random.default_rng(2024)
    return [draw_log(rng) for _ in range(REPEATS)]


_REPEATED: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def repeated_estimates(logs: list[Log], method: str) -> tuple[np.ndarray, np.ndarray]:
    # The logs fixture is module-scoped, so each method's estimates are computed once.
    if method not in _REPEATED:
        _REPEATED[method] = _estimate_each(logs, method)
    return _REPEATED[method]


def _estimate_each(logs: list[Log], method: str) -> tuple[np.ndarray, np.ndarray]:
    values, stderrs = [], []
    for entry in logs:
        if method == "ips":
            estimate = ips_value(
                entry.target, entry.action, entry.propensity, entry.reward
            )
        elif method == "snips":
            estimate = snips_value(
                entry.target, entry.action, entry.propensity, entry.reward
            )
        elif method == "dr_perfect":
            estimate = dr_value(
                entry.target,
                entry.action,
                entry.propensity,
                entry.reward,
                entry.perfect_model,
            )
        else:
            estimate = dr_value(
                entry.target,
                entry.action,
                entry.propensity,
                entry.reward,
                entry.perfect_model + REWARD_MODEL_ERROR,
            )
        assert estimate.stderr is not None
        values.append(estimate.value)
        stderrs.append(estimate.stderr)
    return np.array(values), np.array(stderrs)


@pytest.mark.parametrize("method", ["ips", "snips", "dr_perfect", "dr_biased_model"])
def test_estimators_are_unbiased(logs: list[Log], method: str) -> None:
    values, _ = repeated_estimates(logs, method)
    standard_error_of_mean = values.std(ddof=1) / np.sqrt(len(values))
    assert (
        abs(values.mean() - TRUE_VALUE) < MAX_STANDARD_ERRORS * standard_error_of_mean
    )


@pytest.mark.parametrize("method", ["ips", "snips", "dr_biased_model"])
def test_interval_coverage(logs: list[Log], method: str) -> None:
    values, stderrs = repeated_estimates(logs, method)
    covered = np.abs(values - TRUE_VALUE) <= 1.959964 * stderrs
    assert MIN_COVERAGE <= covered.mean() <= MAX_COVERAGE


def test_reported_stderr_matches_spread(logs: list[Log]) -> None:
    values, stderrs = repeated_estimates(logs, "ips")
    assert stderrs.mean() == pytest.approx(values.std(ddof=1), rel=0.15)


def test_perfect_model_dr_beats_ips_variance(logs: list[Log]) -> None:
    ips_values, ips_stderrs = repeated_estimates(logs, "ips")
    dr_values, dr_stderrs = repeated_estimates(logs, "dr_perfect")
    # Measured on these logs: the DR variance is 0.52 of the IPS variance.
    assert dr_values.var(ddof=1) < MAX_DR_VARIANCE_SHARE * ips_values.var(ddof=1)
    assert dr_stderrs.mean() < ips_stderrs.mean()


def test_snips_is_weighted_mean_of_matched(logs: list[Log]) -> None:
    entry = logs[0]
    policy_action = np.argmax(MEAN_REWARD[entry.context], axis=1)
    target = deterministic_policy(policy_action, N_ACTIONS)
    matched = policy_action == entry.action
    expected = np.average(
        entry.reward[matched], weights=1.0 / entry.propensity[matched]
    )
    estimate = snips_value(target, entry.action, entry.propensity, entry.reward)
    assert estimate.value == pytest.approx(expected, rel=1e-12)
    assert estimate.matched == int(matched.sum())
    assert estimate.n == ROWS_PER_LOG


def test_stochastic_snips_is_weighted_mean(logs: list[Log]) -> None:
    entry = logs[1]
    weights = entry.target[np.arange(ROWS_PER_LOG), entry.action] / entry.propensity
    estimate = snips_value(entry.target, entry.action, entry.propensity, entry.reward)
    assert estimate.value == pytest.approx(np.average(entry.reward, weights=weights))
    assert estimate.matched == int((weights > 0).sum())


def test_deterministic_case_matches_ipw(logs: list[Log]) -> None:
    entry = logs[2]
    policy_action = (entry.context % N_ACTIONS).astype(np.int64)
    target = deterministic_policy(policy_action, N_ACTIONS)
    arms = np.array(["a", "b", "c"])
    ips = ips_value(target, entry.action, entry.propensity, entry.reward)
    reference = ipw_policy_value(
        arms[policy_action], arms[entry.action], entry.propensity, entry.reward
    )
    assert ips.to_dict() == pytest.approx(reference.to_dict())
    snips = snips_value(target, entry.action, entry.propensity, entry.reward)
    snips_reference = self_normalized_ipw_policy_value(
        arms[policy_action], arms[entry.action], entry.propensity, entry.reward
    )
    assert snips.to_dict() == pytest.approx(snips_reference.to_dict())


def test_interval_is_normal_approximation(logs: list[Log]) -> None:
    entry = logs[3]
    estimate = ips_value(entry.target, entry.action, entry.propensity, entry.reward)
    assert estimate.stderr is not None
    assert estimate.ci_low is not None
    assert estimate.ci_high is not None
    assert estimate.alpha == 0.05
    assert estimate.ci_low < estimate.value < estimate.ci_high
    half_width = 1.959964 * estimate.stderr
    assert estimate.ci_high - estimate.value == pytest.approx(half_width, rel=1e-5)
    assert estimate.value - estimate.ci_low == pytest.approx(half_width, rel=1e-5)


def test_estimate_policy_value_keys(logs: list[Log]) -> None:
    entry = logs[4]
    without_model = estimate_policy_value(
        entry.target, entry.action, entry.propensity, entry.reward
    )
    assert set(without_model) == {"ips", "snips"}
    with_model = estimate_policy_value(
        entry.target,
        entry.action,
        entry.propensity,
        entry.reward,
        reward_model=entry.perfect_model,
    )
    assert set(with_model) == {"ips", "snips", "dr"}
    direct = dr_value(
        entry.target, entry.action, entry.propensity, entry.reward, entry.perfect_model
    )
    assert with_model["dr"] == direct


@pytest.mark.parametrize("method", ["ips", "snips", "dr"])
def test_value_difference_is_paired(logs: list[Log], method: str) -> None:
    entry = logs[5]
    baseline = deterministic_policy(np.zeros(ROWS_PER_LOG, dtype=np.int64), N_ACTIONS)
    model = entry.perfect_model + REWARD_MODEL_ERROR
    difference = estimate_value_difference(
        entry.target,
        baseline,
        entry.action,
        entry.propensity,
        entry.reward,
        method=method,  # type: ignore[arg-type]
        reward_model=model,
    )
    single = {"ips": ips_value, "snips": snips_value}
    if method == "dr":
        target_value = dr_value(
            entry.target, entry.action, entry.propensity, entry.reward, model
        ).value
        baseline_value = dr_value(
            baseline, entry.action, entry.propensity, entry.reward, model
        ).value
    else:
        function = single[method]
        target_value = function(
            entry.target, entry.action, entry.propensity, entry.reward
        ).value
        baseline_value = function(
            baseline, entry.action, entry.propensity, entry.reward
        ).value
    assert difference.value == pytest.approx(target_value - baseline_value)
    assert difference.stderr is not None
    assert difference.stderr > 0

    same = estimate_value_difference(
        entry.target,
        entry.target,
        entry.action,
        entry.propensity,
        entry.reward,
        method=method,  # type: ignore[arg-type]
        reward_model=model,
    )
    assert same.value == pytest.approx(0.0, abs=1e-12)
    assert same.stderr == pytest.approx(0.0, abs=1e-12)


def test_zero_propensity_is_rejected(logs: list[Log]) -> None:
    entry = logs[6]
    for bad in (0.0, -0.2, np.nan, 1.5):
        propensity = entry.propensity.copy()
        propensity[7] = bad
        with pytest.raises(ValueError, match=r"propensity must be in \(0, 1\].*row 7"):
            ips_value(entry.target, entry.action, propensity, entry.reward)


def test_unnormalized_target_is_rejected(logs: list[Log]) -> None:
    entry = logs[7]
    target = entry.target.copy()
    target[3] *= 0.9
    with pytest.raises(ValueError, match="row 3 sums to 0.9"):
        snips_value(target, entry.action, entry.propensity, entry.reward)
    negative = entry.target.copy()
    negative[5] = [1.2, -0.2, 0.0]
    with pytest.raises(ValueError, match="finite and >= 0"):
        ips_value(negative, entry.action, entry.propensity, entry.reward)


def test_bad_shapes_are_rejected(logs: list[Log]) -> None:
    entry = logs[8]
    with pytest.raises(ValueError, match="must have shape"):
        ips_value(entry.target[:-1], entry.action, entry.propensity, entry.reward)
    with pytest.raises(ValueError, match="same length"):
        ips_value(entry.target, entry.action, entry.propensity, entry.reward[:-1])
    with pytest.raises(ValueError, match="reward_model must have the shape"):
        dr_value(
            entry.target,
            entry.action,
            entry.propensity,
            entry.reward,
            entry.perfect_model[:, :2],
        )
    with pytest.raises(ValueError, match="empty"):
        ips_value(np.zeros((0, 3)), [], [], [])


def test_bad_actions_are_rejected(logs: list[Log]) -> None:
    entry = logs[9]
    action = entry.action.copy()
    action[2] = N_ACTIONS
    with pytest.raises(ValueError, match=r"logged_action must be in \[0, 3\)"):
        ips_value(entry.target, action, entry.propensity, entry.reward)
    with pytest.raises(ValueError, match="action_indices"):
        ips_value(
            entry.target, entry.action.astype(float), entry.propensity, entry.reward
        )


def test_snips_without_weight_is_rejected(logs: list[Log]) -> None:
    entry = logs[10]
    never_logged = deterministic_policy((entry.action + 1) % N_ACTIONS, N_ACTIONS)
    with pytest.raises(ValueError, match="probability 0 to every logged action"):
        snips_value(never_logged, entry.action, entry.propensity, entry.reward)
    assert (
        ips_value(never_logged, entry.action, entry.propensity, entry.reward).value
        == 0.0
    )


def test_dr_difference_needs_model(logs: list[Log]) -> None:
    entry = logs[11]
    with pytest.raises(ValueError, match="needs reward_model"):
        estimate_value_difference(
            entry.target,
            entry.target,
            entry.action,
            entry.propensity,
            entry.reward,
            method="dr",
        )
    with pytest.raises(ValueError, match="method must be one of"):
        estimate_value_difference(
            entry.target,
            entry.target,
            entry.action,
            entry.propensity,
            entry.reward,
            method="direct",  # type: ignore[arg-type]
        )


def test_action_indices_maps_labels() -> None:
    indices = action_indices(["b", "a", "c", "b"], ["a", "b", "c"])
    assert indices.tolist() == [1, 0, 2, 1]
    assert indices.dtype == np.int64
    with pytest.raises(ValueError, match=r"labels \['z'\] are not among"):
        action_indices(["a", "z"], ["a", "b"])
    with pytest.raises(ValueError, match="must be unique"):
        action_indices(["a"], ["a", "a"])
