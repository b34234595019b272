"""Off-policy evaluation of stochastic or deterministic policies: IPS, SNIPS and DR.

Standard errors and intervals use the normal approximation on per-row influence terms.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from couponflow.analysis.ipw import (
    Estimate,
    _influence_estimate,
    _mean_estimate,
    _self_normalized,
)

log = logging.getLogger(__name__)

FloatMatrix = npt.NDArray[np.float64]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Method = Literal["ips", "snips", "dr"]
METHODS: tuple[Method, ...] = ("ips", "snips", "dr")
# Largest allowed |row sum - 1| of a target probability matrix, which absorbs the
# rounding of a softmax or of probabilities read from a CSV file.
PROBABILITY_SUM_TOLERANCE = 1e-6


def ips_value(
    target_probabilities: npt.ArrayLike,
    logged_action: npt.ArrayLike,
    propensity: npt.ArrayLike,
    reward: npt.ArrayLike,
    alpha: float = 0.05,
) -> Estimate:
    """Estimate a policy's mean reward by inverse propensity scoring (IPS).

    ``target_probabilities[i, a]`` is the probability that the evaluated policy
    takes action ``a`` in round ``i``, ``logged_action[i]`` the column index of the
    action the logging policy took, and ``propensity[i]`` the probability with which
    it took it. The estimate is the mean of ``w_i * reward_i`` with
    ``w_i = target[i, logged_action[i]] / propensity[i]``, which is unbiased when the
    propensities are the true logging probabilities. The standard error is the
    sample standard deviation of those terms over the square root of n.
    """
    target, action, prop, y = _validate(
        target_probabilities, logged_action, propensity, reward
    )
    weights = _importance_weights(target, action, prop)
    return _mean_estimate(weights * y, _matched(weights), alpha)


def snips_value(
    target_probabilities: npt.ArrayLike,
    logged_action: npt.ArrayLike,
    propensity: npt.ArrayLike,
    reward: npt.ArrayLike,
    alpha: float = 0.05,
) -> Estimate:
    """Estimate a policy's mean reward by self-normalized IPS (SNIPS).

    The value is ``sum(w * reward) / sum(w)``, with the IPS weights of
    :func:`ips_value`: consistent and usually of lower variance than IPS, at the
    price of a bias of order 1/n. The standard error is the delta-method
    (linearization) estimate. Raises ValueError when every weight is 0.
    """
    target, action, prop, y = _validate(
        target_probabilities, logged_action, propensity, reward
    )
    weights = _importance_weights(target, action, prop)
    _require_weight(weights, "snips")
    value, influence = _self_normalized(weights, y)
    return _influence_estimate(value, influence, _matched(weights), alpha)


def dr_value(
    target_probabilities: npt.ArrayLike,
    logged_action: npt.ArrayLike,
    propensity: npt.ArrayLike,
    reward: npt.ArrayLike,
    reward_model: npt.ArrayLike,
    alpha: float = 0.05,
) -> Estimate:
    """Estimate a policy's mean reward by the doubly robust (DR) estimator.

    ``reward_model[i, a]`` is a prediction of the expected reward of action ``a`` in
    round ``i`` (same shape as ``target_probabilities``), fitted on other data or
    cross-fitted. Each row's term is the model's value of the policy,
    ``sum_a target[i, a] * reward_model[i, a]``, plus the weighted residual
    ``w_i * (reward_i - reward_model[i, logged_action[i]])``. The estimate is
    unbiased when the propensities are right, whatever the reward model, and its
    variance shrinks as the reward model improves.
    """
    target, action, prop, y = _validate(
        target_probabilities, logged_action, propensity, reward
    )
    q = _validate_reward_model(reward_model, target.shape)
    weights = _importance_weights(target, action, prop)
    terms = _dr_terms(target, q, action, weights, y)
    return _mean_estimate(terms, _matched(weights), alpha)


def estimate_policy_value(
    target_probabilities: npt.ArrayLike,
    logged_action: npt.ArrayLike,
    propensity: npt.ArrayLike,
    reward: npt.ArrayLike,
    reward_model: npt.ArrayLike | None = None,
    alpha: float = 0.05,
) -> dict[str, Estimate]:
    """Return the IPS, SNIPS and (when ``reward_model`` is given) DR estimates.

    The keys are ``"ips"``, ``"snips"`` and ``"dr"``. Arguments are those of
    :func:`ips_value` and :func:`dr_value`.
    """
    estimates = {
        "ips": ips_value(
            target_probabilities, logged_action, propensity, reward, alpha
        ),
        "snips": snips_value(
            target_probabilities, logged_action, propensity, reward, alpha
        ),
    }
    if reward_model is not None:
        estimates["dr"] = dr_value(
            target_probabilities,
            logged_action,
            propensity,
            reward,
            reward_model,
            alpha,
        )
    return estimates


def estimate_value_difference(
    target_probabilities: npt.ArrayLike,
    baseline_probabilities: npt.ArrayLike,
    logged_action: npt.ArrayLike,
    propensity: npt.ArrayLike,
    reward: npt.ArrayLike,
    method: Method = "snips",
    reward_model: npt.ArrayLike | None = None,
    alpha: float = 0.05,
    baseline_reward_model: npt.ArrayLike | None = None,
) -> Estimate:
    """Estimate the value of the target policy minus that of the baseline policy.

    Both values come from the same logged rows, and the standard error comes from
    the per-row difference of their influence terms, so it accounts for the rows
    that both policies share. ``method`` is ``"ips"``, ``"snips"`` or ``"dr"``, and
    ``"dr"`` needs ``reward_model``. The baseline's DR value uses
    ``baseline_reward_model`` when given, else ``reward_model``, so the result
    equals the difference of the two :func:`dr_value` results. ``matched`` counts
    the rows that carry weight under either policy.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    target, action, prop, y = _validate(
        target_probabilities, logged_action, propensity, reward
    )
    baseline = _validate_probabilities(
        baseline_probabilities, target.shape[0], "baseline_probabilities"
    )
    if baseline.shape != target.shape:
        raise ValueError(
            f"baseline_probabilities has shape {baseline.shape} but "
            f"target_probabilities has shape {target.shape}; both policies must "
            "cover the same rows and actions"
        )
    target_weights = _importance_weights(target, action, prop)
    baseline_weights = _importance_weights(baseline, action, prop)
    matched = int(((target_weights > 0) | (baseline_weights > 0)).sum())

    if method == "ips":
        terms = (target_weights - baseline_weights) * y
        return _mean_estimate(terms, matched, alpha)
    if method == "dr":
        if reward_model is None:
            raise ValueError(
                "method 'dr' needs reward_model, an (n_rows, n_actions) array of "
                "predicted rewards; pass one or use method 'snips'"
            )
        q = _validate_reward_model(reward_model, target.shape)
        baseline_q = (
            q
            if baseline_reward_model is None
            else _validate_reward_model(baseline_reward_model, target.shape)
        )
        terms = _dr_terms(target, q, action, target_weights, y) - _dr_terms(
            baseline, baseline_q, action, baseline_weights, y
        )
        return _mean_estimate(terms, matched, alpha)

    _require_weight(target_weights, "snips")
    _require_weight(baseline_weights, "snips")
    target_value, target_influence = _self_normalized(target_weights, y)
    baseline_value, baseline_influence = _self_normalized(baseline_weights, y)
    return _influence_estimate(
        target_value - baseline_value,
        target_influence - baseline_influence,
        matched,
        alpha,
    )


def on_policy_value(reward: npt.ArrayLike, alpha: float = 0.05) -> Estimate:
    """Estimate a policy's mean reward from rows it logged itself: the sample mean.

    The interval is the normal approximation, like those of the off-policy
    estimates, so that both can be compared on the same footing.
    """
    y = np.asarray(reward, dtype=np.float64)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"reward must be a non-empty 1-D array, got shape {y.shape}")
    if not np.isfinite(y).all():
        row = int(np.flatnonzero(~np.isfinite(y))[0])
        raise ValueError(f"reward must be finite, got {y[row]} at row {row}")
    return _mean_estimate(y, y.size, alpha)


def deterministic_policy(action: npt.ArrayLike, n_actions: int) -> FloatMatrix:
    """Return the (n_rows, n_actions) probabilities of a policy that takes ``action``.

    ``action[i]`` is the column index of the action chosen in round ``i``, so row i
    is 1 in that column and 0 elsewhere.
    """
    chosen = _validate_actions(action, n_actions, "action")
    probabilities = np.zeros((chosen.size, n_actions), dtype=np.float64)
    probabilities[np.arange(chosen.size), chosen] = 1.0
    return probabilities


def action_indices(labels: npt.ArrayLike, actions: Sequence[str]) -> IntArray:
    """Map action labels (arm names, item ids) to their column index in ``actions``.

    Raises ValueError naming the labels that are not in ``actions``.
    """
    column_of = {str(name): j for j, name in enumerate(actions)}
    if len(column_of) != len(actions):
        raise ValueError(f"actions must be unique, got {list(actions)}")
    names = np.asarray(labels).astype(str)
    unknown = sorted(set(names.tolist()) - set(column_of))
    if unknown:
        raise ValueError(
            f"labels {unknown[:5]} are not among the {len(actions)} actions "
            f"{list(actions)[:10]}; pass the full action list of the logging policy"
        )
    return np.fromiter(
        (column_of[name] for name in names), dtype=np.int64, count=names.size
    )


def _validate(
    target_probabilities: npt.ArrayLike,
    logged_action: npt.ArrayLike,
    propensity: npt.ArrayLike,
    reward: npt.ArrayLike,
) -> tuple[FloatMatrix, IntArray, FloatArray, FloatArray]:
    prop = np.asarray(propensity, dtype=np.float64)
    y = np.asarray(reward, dtype=np.float64)
    n_rows = prop.size
    if n_rows == 0:
        raise ValueError("no logged rows: the inputs are empty")
    if prop.ndim != 1 or y.shape != prop.shape:
        raise ValueError(
            "propensity and reward must be 1-D arrays of the same length, got "
            f"shapes {prop.shape} and {y.shape}"
        )
    target = _validate_probabilities(
        target_probabilities, n_rows, "target_probabilities"
    )
    action = _validate_actions(logged_action, target.shape[1], "logged_action")
    if action.size != n_rows:
        raise ValueError(
            f"logged_action has {action.size} rows but propensity has {n_rows}"
        )
    invalid = ~np.isfinite(prop) | (prop <= 0.0) | (prop > 1.0)
    if invalid.any():
        row = int(np.flatnonzero(invalid)[0])
        raise ValueError(
            f"propensity must be in (0, 1], got {prop[row]} at row {row} "
            f"({int(invalid.sum())} invalid rows); a logged action needs the "
            "probability with which the logging policy chose it, so drop rows whose "
            "propensity is unknown"
        )
    if not np.isfinite(y).all():
        row = int(np.flatnonzero(~np.isfinite(y))[0])
        raise ValueError(f"reward must be finite, got {y[row]} at row {row}")
    return target, action, prop, y


def _validate_probabilities(
    probabilities: npt.ArrayLike, n_rows: int, name: str
) -> FloatMatrix:
    matrix = np.asarray(probabilities, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != n_rows or matrix.shape[1] < 1:
        raise ValueError(
            f"{name} must have shape (n_rows, n_actions) = ({n_rows}, n_actions), got "
            f"{matrix.shape}; for a deterministic policy use deterministic_policy()"
        )
    if not np.isfinite(matrix).all() or (matrix < 0.0).any():
        row = int(np.flatnonzero(~(np.isfinite(matrix) & (matrix >= 0.0)).all(1))[0])
        raise ValueError(
            f"{name} must be finite and >= 0, got {matrix[row].tolist()[:10]} at "
            f"row {row}"
        )
    sums = matrix.sum(axis=1)
    off = np.abs(sums - 1.0) > PROBABILITY_SUM_TOLERANCE
    if off.any():
        row = int(np.flatnonzero(off)[0])
        raise ValueError(
            f"{name} row {row} sums to {sums[row]:.9g}, expected 1 within "
            f"{PROBABILITY_SUM_TOLERANCE} ({int(off.sum())} rows are off); each row "
            "must be the policy's probability distribution over all n_actions "
            "actions, so normalize it"
        )
    return matrix


def _validate_actions(action: npt.ArrayLike, n_actions: int, name: str) -> IntArray:
    values = np.asarray(action)
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(
            f"{name} must hold integer column indices, got dtype {values.dtype}; "
            "map labels to indices with action_indices()"
        )
    outside = (values < 0) | (values >= n_actions)
    if outside.any():
        row = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"{name} must be in [0, {n_actions}), got {values[row]} at row {row}"
        )
    return values.astype(np.int64)


def _validate_reward_model(
    reward_model: npt.ArrayLike, shape: tuple[int, ...]
) -> FloatMatrix:
    q = np.asarray(reward_model, dtype=np.float64)
    if q.shape != shape:
        raise ValueError(
            f"reward_model must have the shape of target_probabilities {shape}, got "
            f"{q.shape}; column a is the predicted reward of action a"
        )
    if not np.isfinite(q).all():
        raise ValueError("reward_model contains NaN or infinite predictions")
    return q


def _importance_weights(
    target: FloatMatrix, action: IntArray, prop: FloatArray
) -> FloatArray:
    return target[np.arange(action.size), action] / prop


def _dr_terms(
    target: FloatMatrix,
    q: FloatMatrix,
    action: IntArray,
    weights: FloatArray,
    y: FloatArray,
) -> FloatArray:
    direct = (target * q).sum(axis=1)
    residual = y - q[np.arange(action.size), action]
    return np.asarray(direct + weights * residual, dtype=np.float64)


def _matched(weights: FloatArray) -> int:
    return int((weights > 0).sum())


def _require_weight(weights: FloatArray, method: str) -> None:
    if not (weights > 0).any():
        raise ValueError(
            f"{method}: the policy gives probability 0 to every logged action, so "
            "the self-normalized estimate is undefined; evaluate on more rows or use "
            "ips_value"
        )
