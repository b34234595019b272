"""Guards of an experiment's design: sample ratio mismatch and minimum sample sizes.

The split-change guard lives in ``stratified`` beside the estimate it switches on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from scipy import stats

log = logging.getLogger(__name__)

# A p-value this small is far below what chance produces in one check, even when many
# campaigns are checked, while a real assignment bug usually gives a far smaller one.
SRM_P_THRESHOLD = 0.001
SRM_WITHHELD = "withheld: sample ratio mismatch"
# Below these sizes the normal approximations behind the intervals are rough and the
# power is low, so the report warns; the verdicts are still computed.
MIN_USERS_PER_GROUP = 100
MIN_CONVERSIONS_PER_GROUP = 10


@dataclass(frozen=True)
class SampleRatioCheck:
    """Chi-square goodness of fit of the treatment/holdout counts to the design."""

    treatment_users: int
    holdout_users: int
    expected_holdout_fraction: float
    observed_holdout_fraction: float
    chi_square: float
    p_value: float
    threshold: float
    flagged: bool
    verdict: str


def check_sample_ratio(
    treatment_users: int, holdout_users: int, expected_holdout_fraction: float
) -> SampleRatioCheck:
    """Test the treatment/holdout counts against the designed holdout fraction.

    Flags a sample-ratio mismatch when the chi-square p-value is below
    ``SRM_P_THRESHOLD``. Raises ValueError when there are no users at all.
    """
    if not 0.0 < expected_holdout_fraction < 1.0:
        raise ValueError(
            "expected_holdout_fraction must be in (0, 1), got "
            f"{expected_holdout_fraction}"
        )
    total = treatment_users + holdout_users
    if total <= 0:
        raise ValueError("no treatment or holdout users: the allocation is empty")
    expected = [
        total * (1.0 - expected_holdout_fraction),
        total * expected_holdout_fraction,
    ]
    chi_square, p_value = stats.chisquare([treatment_users, holdout_users], expected)
    flagged = bool(p_value < SRM_P_THRESHOLD)
    if flagged:
        verdict = (
            f"{SRM_WITHHELD}: {holdout_users} of {total} users are in the holdout, "
            f"designed {expected_holdout_fraction:.1%} (p={p_value:.2g}); find the "
            "assignment or logging bug before reading any result"
        )
        log.warning(
            "sample ratio mismatch: holdout %d of %d, designed %.3f, p=%.3g",
            holdout_users,
            total,
            expected_holdout_fraction,
            p_value,
        )
    else:
        verdict = (
            f"passed: {holdout_users} of {total} users in the holdout, designed "
            f"{expected_holdout_fraction:.1%} (p={p_value:.2g})"
        )
    return SampleRatioCheck(
        treatment_users=treatment_users,
        holdout_users=holdout_users,
        expected_holdout_fraction=expected_holdout_fraction,
        observed_holdout_fraction=holdout_users / total,
        chi_square=float(chi_square),
        p_value=float(p_value),
        threshold=SRM_P_THRESHOLD,
        flagged=flagged,
        verdict=verdict,
    )


def sample_size_warnings(
    treated_users: int,
    treated_conversions: int,
    control_users: int,
    control_conversions: int,
) -> list[str]:
    """Return one warning per group below ``MIN_USERS_PER_GROUP`` users or
    ``MIN_CONVERSIONS_PER_GROUP`` conversions; an empty list when both are large."""
    warnings: list[str] = []
    for group, users, conversions in (
        ("treated", treated_users, treated_conversions),
        ("control", control_users, control_conversions),
    ):
        if users < MIN_USERS_PER_GROUP:
            warnings.append(
                f"{group} group has {users} users, fewer than {MIN_USERS_PER_GROUP}"
            )
        if conversions < MIN_CONVERSIONS_PER_GROUP:
            warnings.append(
                f"{group} group has {conversions} conversions, fewer than "
                f"{MIN_CONVERSIONS_PER_GROUP}"
            )
    return warnings
