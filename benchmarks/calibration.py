"""Calibration benchmark of the experiment analysis: error rates and coverage.

Run: .venv/bin/python benchmarks/calibration.py
Prints each figure with its required range and exits with status 1 if one is out.
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from couponflow.analysis import calibration

ALPHA = 0.05


@dataclass(frozen=True)
class Check:
    """One printed figure and the range it must lie in (None: printed only)."""

    name: str
    value: float
    low: float | None
    high: float | None

    @property
    def passed(self) -> bool:
        above = self.low is None or self.value >= self.low
        below = self.high is None or self.value <= self.high
        return above and below


def main(argv: list[str] | None = None) -> int:
    """Run every check, print the table, return 0 when every range holds."""
    args = _parse(argv)
    # A/A runs flag a sample ratio mismatch by chance about once per thousand; the
    # warnings would drown the table.
    logging.basicConfig(level=logging.ERROR)
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"{platform.machine()}, seed offset {args.seed}"
    )
    sections: list[tuple[str, Callable[[argparse.Namespace], list[Check]]]] = [
        (
            f"A/A false-positive rate, {args.experiments} experiments, "
            f"{args.users_per_group} users per group",
            _aa_checks,
        ),
        (
            f"95% interval coverage with a true effect, {args.experiments} experiments",
            _coverage_checks,
        ),
        (
            f"daily peeking, {args.looks} looks, {args.experiments} A/A experiments "
            f"of {2 * args.users_per_group} users",
            _peeking_checks,
        ),
        (
            "holdout share 20% then 50% with a drifting baseline, "
            f"{args.split_experiments} experiments",
            _split_checks,
        ),
        (
            "small counts (300 users per group, 0.5% vs 1.5%), "
            f"{args.experiments} experiments",
            _exact_checks,
        ),
        (
            f"analyze_experiment end to end, {args.end_to_end} A/A experiments with "
            f"2 arms of {args.end_to_end_users} users per group",
            _end_to_end_checks,
        ),
    ]
    checks: list[Check] = []
    for title, run in sections:
        checks += _timed(title, run, args)

    failed = [check for check in checks if not check.passed]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} figures in range")
    for check in failed:
        print(f"OUT OF RANGE: {check.name} = {check.value:.4f}")
    return 1 if failed else 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--experiments", type=int, default=4000, help="simulated experiments per check"
    )
    parser.add_argument(
        "--users-per-group", type=int, default=2000, help="users per group"
    )
    parser.add_argument("--looks", type=int, default=14, help="daily looks to peek")
    parser.add_argument(
        "--split-experiments",
        type=int,
        default=1000,
        help="experiments of the split-change check (run one by one)",
    )
    parser.add_argument(
        "--end-to-end",
        type=int,
        default=1000,
        help="A/A experiments run through analyze_experiment",
    )
    parser.add_argument(
        "--end-to-end-users",
        type=int,
        default=1000,
        help="users per group of each arm in the end-to-end check",
    )
    parser.add_argument("--seed", type=int, default=0, help="added to every seed")
    return parser.parse_args(argv)


def _timed(
    title: str,
    run: Callable[[argparse.Namespace], list[Check]],
    args: argparse.Namespace,
) -> list[Check]:
    """Run one section of checks and print its figures with the time taken."""
    start = time.perf_counter()
    checks = run(args)
    print(f"\n{title} ({time.perf_counter() - start:.1f} s)")
    for check in checks:
        bounds = (
            "printed only"
            if check.low is None and check.high is None
            else f"required [{_bound(check.low)}, {_bound(check.high)}]"
        )
        status = "ok " if check.passed else "OUT"
        print(f"  {status} {check.name:<40} {check.value:8.4f}   {bounds}")
    return checks


def _bound(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _aa_checks(args: argparse.Namespace) -> list[Check]:
    rates = calibration.aa_false_positive_rates(
        args.experiments, args.users_per_group, ALPHA, seed=1 + args.seed
    )
    return [Check(name, value, 0.04, 0.06) for name, value in rates.items()]


def _coverage_checks(args: argparse.Namespace) -> list[Check]:
    rates = calibration.coverage_rates(
        args.experiments, args.users_per_group, ALPHA, seed=2 + args.seed
    )
    width = rates.pop("cuped_width_ratio")
    bias = rates.pop("cuped_bias_in_se")
    checks = [Check(name, value, 0.93, 0.97) for name, value in rates.items()]
    checks.append(Check("profit CUPED / Welch mean CI width", width, None, 1.0))
    checks.append(Check("profit CUPED bias (standard errors)", bias, -3.0, 3.0))
    return checks


def _peeking_checks(args: argparse.Namespace) -> list[Check]:
    rates = calibration.peeking_false_positive_rates(
        args.experiments,
        2 * args.users_per_group,
        args.looks,
        ALPHA,
        seed=3 + args.seed,
    )
    return [
        Check(name, value, None, ALPHA)
        if name.startswith("sequence")
        else Check(name, value, ALPHA, None)
        for name, value in rates.items()
    ]


def _split_checks(args: argparse.Namespace) -> list[Check]:
    rates = calibration.split_change_coverage(
        args.split_experiments, 1000, ALPHA, seed=4 + args.seed
    )
    return [
        Check("pooled profit coverage", rates["pooled"], None, None),
        Check("stratified profit coverage", rates["stratified"], 0.93, 0.97),
    ]


def _exact_checks(args: argparse.Namespace) -> list[Check]:
    rates = calibration.exact_small_count_coverage(
        args.experiments, alpha=ALPHA, seed=5 + args.seed
    )
    return [
        Check("exact (Clopper-Pearson) coverage", rates["exact"], 1.0 - ALPHA, None),
        Check("Newcombe coverage", rates["newcombe"], None, None),
    ]


def _end_to_end_checks(args: argparse.Namespace) -> list[Check]:
    rates = calibration.end_to_end_aa_rates(
        args.end_to_end, args.end_to_end_users, ALPHA, seed=6 + args.seed
    )
    # The rates are Monte Carlo estimates, so "at most alpha" allows two of their
    # standard errors above it.
    ceiling = ALPHA + 2.0 * math.sqrt(ALPHA * (1.0 - ALPHA) / args.end_to_end)
    return [
        Check("per-arm profit Welch rejections", rates["arm_profit_welch"], 0.04, 0.06),
        Check(
            "family-wise Holm rejections", rates["family_profit_holm"], None, ceiling
        ),
        Check(
            "experiments with an arm dropped", rates["any_arm_dropped"], None, ceiling
        ),
    ]


if __name__ == "__main__":
    sys.exit(main())
