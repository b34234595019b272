"""Off-policy evaluation benchmark: IPS, SNIPS and DR estimates against the true value.

Each seed simulates a world, evaluates a few targeting policies off-policy on its
randomized past campaign, and checks each estimate against the simulator's truth.
Run: ``python benchmarks/ope.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from couponflow.analysis.ope import (
    METHODS,
    action_indices,
    deterministic_policy,
    estimate_value_difference,
)
from couponflow.schemas import CONTROL_ARM
from couponflow.simulate import World, simulate_world, true_incremental_profit_cents

log = logging.getLogger(__name__)

DEFAULT_USERS = 20_000
DEFAULT_DAYS = 14
DEFAULT_SEEDS = 10
MARGIN_RATE = 0.30
# An estimate counts as close when it is within this many of its own standard
# errors of the truth. A normal estimate is that close 95.4% of the time.
CLOSE_STANDARD_ERRORS = 2.0
# Noise (cents) added to the true profits before the greedy policy takes the argmax,
# and the softmax temperature (cents) of the stochastic policy.
GREEDY_NOISE_CENTS = 10.0
SOFTMAX_TEMPERATURE_CENTS = 10.0
# The DR reward model: the mean reward of each arm within quantile bins of the
# user's observed purchase spend, shrunk toward the arm's mean by this many rows.
SPEND_BINS = 10
REWARD_MODEL_PRIOR_ROWS = 20.0
FloatMatrix = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Trial:
    """One policy's off-policy estimate of incremental profit on one seed, in cents."""

    seed: int
    policy: str
    method: str
    truth: float
    estimate: float
    stderr: float

    @property
    def close(self) -> bool:
        return abs(self.estimate - self.truth) <= CLOSE_STANDARD_ERRORS * self.stderr


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=DEFAULT_USERS)
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS)
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="count")
    parser.add_argument(
        "--json", type=Path, default=None, help="path of a JSON file of every trial"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")

    started = time.perf_counter()
    trials: list[Trial] = []
    for seed in range(args.seeds):
        world = simulate_world(args.users, args.days, seed)
        trials.extend(evaluate_world(world, seed))
    print(format_table(trials, args.users))
    if args.json is not None:
        rows = [asdict(t) | {"close": t.close} for t in trials]
        args.json.write_text(json.dumps(rows, indent=2))
        print(f"trials: {args.json}")
    print(f"total: {time.perf_counter() - started:.1f} s")
    return 0


def evaluate_world(world: World, seed: int) -> list[Trial]:
    """Estimate each policy's incremental profit over control and pair it with truth.

    The estimand is the mean over users of the policy's expected profit minus that of
    sending no coupon, where the truth comes from true_incremental_profit_cents.
    """
    logged = world.exposures.merge(
        world.outcomes[["user_id", "revenue_cents", "discount_cents"]],
        on="user_id",
        how="left",
        validate="one_to_one",
    )
    true_profit = true_incremental_profit_cents(world.truth, MARGIN_RATE)
    true_profit = true_profit.reindex(logged["user_id"].astype(str))
    actions = [CONTROL_ARM, *true_profit.columns.astype(str)]
    # Control's incremental profit is 0 by definition.
    truth_matrix = np.column_stack(
        [np.zeros(len(true_profit)), true_profit.to_numpy(np.float64)]
    )

    action = action_indices(logged["arm"].astype(str), actions)
    propensity = logged["propensity"].to_numpy(np.float64)
    reward = MARGIN_RATE * logged["revenue_cents"].to_numpy(np.float64) - logged[
        "discount_cents"
    ].to_numpy(np.float64)
    spend_bin = _spend_bins(world, logged["user_id"])
    reward_model = _cross_fitted_reward_model(spend_bin, action, reward, len(actions))
    control = deterministic_policy(np.zeros(len(logged), np.int64), len(actions))

    rng = np.random.default_rng([seed, 1])
    trials = []
    for policy, target in _policies(truth_matrix, rng).items():
        truth = float((target * truth_matrix).sum(axis=1).mean())
        for method in METHODS:
            estimate = estimate_value_difference(
                target,
                control,
                action,
                propensity,
                reward,
                method=method,
                reward_model=reward_model,
            )
            assert estimate.stderr is not None
            trials.append(
                Trial(seed, policy, method, truth, estimate.value, estimate.stderr)
            )
    return trials


def format_table(trials: list[Trial], n_users: int) -> str:
    """Return a Markdown table: share of seeds within 2 SE, mean error and SE."""
    frame = pd.DataFrame(
        [asdict(t) | {"close": t.close, "error": t.estimate - t.truth} for t in trials]
    )
    seeds = frame["seed"].nunique()
    lines = [
        f"{seeds} seeds, {n_users} users each; incremental profit over control in "
        "cents per user",
        "",
        "| policy | method | mean truth | mean error | RMSE | mean SE | within 2 SE |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (policy, method), rows in frame.groupby(["policy", "method"], sort=False):
        rmse = float(np.sqrt((rows["error"] ** 2).mean()))
        lines.append(
            f"| {policy} | {method} | {rows['truth'].mean():.2f} | "
            f"{rows['error'].mean():+.2f} | {rmse:.2f} | {rows['stderr'].mean():.2f} | "
            f"{int(rows['close'].sum())}/{len(rows)} |"
        )
    overall = frame["close"].mean()
    lines += ["", f"all trials within 2 SE: {overall:.0%} of {len(frame)}"]
    return "\n".join(lines)


def _policies(truth: FloatMatrix, rng: np.random.Generator) -> dict[str, FloatMatrix]:
    n_users, n_actions = truth.shape
    noisy = truth + rng.normal(0.0, GREEDY_NOISE_CENTS, truth.shape)
    noisy[:, 0] = 0.0
    greedy = deterministic_policy(np.argmax(noisy, axis=1), n_actions)

    logits = truth / SOFTMAX_TEMPERATURE_CENTS
    logits -= logits.max(axis=1, keepdims=True)
    softmax = np.exp(logits)
    softmax /= softmax.sum(axis=1, keepdims=True)

    every_coupon = np.full((n_users, n_actions), 1.0 / (n_actions - 1))
    every_coupon[:, 0] = 0.0
    return {
        "greedy on noisy truth": greedy,
        "softmax on truth": softmax,
        "random coupon to all": every_coupon,
    }


def _spend_bins(world: World, user_ids: pd.Series) -> npt.NDArray[np.int64]:
    # Observed spend before the campaign, so that the outcome does not leak into it.
    events = world.events
    before = events["event_ts"] < pd.Timestamp(world.meta["send_at"])
    purchases = events[before & (events["event_type"] == "purchase")]
    spend = (
        (purchases["price_cents"] * purchases["quantity"])
        .groupby(purchases["user_id"].astype(str))
        .sum()
        .reindex(user_ids.astype(str), fill_value=0)
        .to_numpy(np.float64)
    )
    ranks = pd.Series(spend).rank(method="first", pct=True).to_numpy()
    return np.minimum((ranks * SPEND_BINS).astype(np.int64), SPEND_BINS - 1)


def _cross_fitted_reward_model(
    spend_bin: npt.NDArray[np.int64],
    action: npt.NDArray[np.int64],
    reward: npt.NDArray[np.float64],
    n_actions: int,
) -> FloatMatrix:
    folds = np.arange(len(reward)) % 2
    model = np.empty((len(reward), n_actions))
    for fold in (0, 1):
        fit = folds != fold
        table = _smoothed_means(spend_bin[fit], action[fit], reward[fit], n_actions)
        model[folds == fold] = table[spend_bin[folds == fold]]
    return model


def _smoothed_means(
    spend_bin: npt.NDArray[np.int64],
    action: npt.NDArray[np.int64],
    reward: npt.NDArray[np.float64],
    n_actions: int,
) -> FloatMatrix:
    cells = spend_bin * n_actions + action
    size = SPEND_BINS * n_actions
    counts = np.bincount(cells, minlength=size).reshape(SPEND_BINS, n_actions)
    sums = np.bincount(cells, weights=reward, minlength=size).reshape(
        SPEND_BINS, n_actions
    )
    arm_mean = sums.sum(axis=0) / np.maximum(counts.sum(axis=0), 1)
    prior = REWARD_MODEL_PRIOR_ROWS
    return np.asarray((sums + prior * arm_mean) / (counts + prior), dtype=np.float64)


if __name__ == "__main__":
    raise SystemExit(main())
