"""Post-stratified estimates, for experiments whose holdout share changed over time.

When the share of users sent to the holdout differs between periods and the outcome
rate drifts between periods too, the pooled difference mixes the drift into the
effect (Simpson's paradox). Comparing treated and control users within each period
and then averaging the differences removes that bias.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import stats

from couponflow.analysis.stats import MeanComparison, normal_comparison

log = logging.getLogger(__name__)

# The split is designed to stay the same, so, like the sample-ratio check, only a
# p-value far below chance counts as a change.
SPLIT_P_THRESHOLD = 0.001
# A stratum needs this many users in each group to estimate both variances.
MIN_USERS_PER_STRATUM_GROUP = 2


@dataclass(frozen=True)
class SplitCheck:
    """Chi-square test of homogeneity of the holdout share across strata.

    ``holdout_share_by_stratum`` and ``users_by_stratum`` are keyed by stratum
    label. The test statistic fields are None when there is only one stratum or
    no user in one of the groups.
    """

    stratum_source: str
    strata: int
    holdout_share_by_stratum: dict[str, float]
    users_by_stratum: dict[str, int]
    chi_square: float | None
    degrees_of_freedom: int | None
    p_value: float | None
    threshold: float
    flagged: bool
    verdict: str


@dataclass(frozen=True)
class StratifiedEstimate:
    """A difference in means post-stratified with Mantel-Haenszel weights.

    ``users_left_out`` counts the users of strata with fewer than
    ``MIN_USERS_PER_STRATUM_GROUP`` users in a group, which carry no weight.
    """

    comparison: MeanComparison
    strata_used: int
    users_left_out: int


def check_split_change(
    strata: npt.ArrayLike, is_holdout: npt.ArrayLike, stratum_source: str
) -> SplitCheck:
    """Test whether the holdout share differs between strata.

    ``strata`` labels each user's period and ``is_holdout`` marks holdout users.
    Flags a change when the chi-square p-value is below ``SPLIT_P_THRESHOLD``.
    """
    labels = pd.Series(np.asarray(strata)).astype(str)
    holdout = pd.Series(np.asarray(is_holdout, dtype=bool))
    table = pd.crosstab(labels, holdout).reindex(columns=[False, True], fill_value=0)
    users = table.sum(axis=1)
    shares = table[True] / users
    by_stratum = {str(key): float(value) for key, value in shares.items()}
    counts = {str(key): int(value) for key, value in users.items()}

    def build(
        chi_square: float | None,
        dof: int | None,
        p_value: float | None,
        flagged: bool,
        verdict: str,
    ) -> SplitCheck:
        return SplitCheck(
            stratum_source=stratum_source,
            strata=len(table),
            holdout_share_by_stratum=by_stratum,
            users_by_stratum=counts,
            chi_square=chi_square,
            degrees_of_freedom=dof,
            p_value=p_value,
            threshold=SPLIT_P_THRESHOLD,
            flagged=flagged,
            verdict=verdict,
        )

    if len(table) < 2:
        return build(
            None, None, None, False, f"not tested: one stratum ({stratum_source})"
        )
    if (table.sum(axis=0) == 0).any():
        return build(None, None, None, False, "not tested: one group has no users")

    result = stats.chi2_contingency(table.to_numpy(), correction=False)
    p_value = float(result.pvalue)
    flagged = p_value < SPLIT_P_THRESHOLD
    low, high = min(by_stratum.values()), max(by_stratum.values())
    if flagged:
        verdict = (
            f"changed: the holdout share ranged from {low:.1%} to {high:.1%} across "
            f"{len(table)} strata ({stratum_source}, p={p_value:.2g}), so the "
            "stratified estimates are the primary ones"
        )
        log.warning(
            "holdout share changed across %d strata: %.3f to %.3f, p=%.3g",
            len(table),
            low,
            high,
            p_value,
        )
    else:
        verdict = (
            f"stable: the holdout share ranged from {low:.1%} to {high:.1%} across "
            f"{len(table)} strata ({stratum_source}, p={p_value:.2g})"
        )
    return build(float(result.statistic), int(result.dof), p_value, flagged, verdict)


def stratified_difference(
    treated_values: npt.ArrayLike,
    treated_strata: npt.ArrayLike,
    control_values: npt.ArrayLike,
    control_strata: npt.ArrayLike,
    alpha: float = 0.05,
    method: str = "stratified",
) -> tuple[StratifiedEstimate | None, str | None]:
    """Return the post-stratified treated-minus-control difference in means.

    Stratum ``s`` gets the Mantel-Haenszel weight ``n_t n_c / (n_t + n_c)``. The
    estimate is the weighted mean of the per-stratum differences ``d_s``, and its
    variance is ``sum w_s^2 (v_ts / n_ts + v_cs / n_cs) / (sum w_s)^2`` with sample
    variances ``v``. The interval is normal. Returns None and the reason when no
    stratum has enough users in both groups.
    """
    treated = _stratum_moments(treated_values, treated_strata)
    control = _stratum_moments(control_values, control_strata)
    joined = treated.join(control, how="outer", lsuffix="_t", rsuffix="_c").fillna(0)
    usable = (joined["n_t"] >= MIN_USERS_PER_STRATUM_GROUP) & (
        joined["n_c"] >= MIN_USERS_PER_STRATUM_GROUP
    )
    left_out = int(joined.loc[~usable, ["n_t", "n_c"]].to_numpy().sum())
    used = joined[usable]
    if used.empty:
        return None, (
            "no stratum has at least "
            f"{MIN_USERS_PER_STRATUM_GROUP} treated and control users"
        )

    n_t = used["n_t"].to_numpy(dtype=np.float64)
    n_c = used["n_c"].to_numpy(dtype=np.float64)
    weights = n_t * n_c / (n_t + n_c)
    differences = (used["mean_t"] - used["mean_c"]).to_numpy(dtype=np.float64)
    variances = (used["var_t"] / used["n_t"] + used["var_c"] / used["n_c"]).to_numpy(
        dtype=np.float64
    )
    total = float(weights.sum())
    estimate = float((weights * differences).sum()) / total
    variance = float((weights**2 * variances).sum()) / (total * total)
    comparison = normal_comparison(estimate, math.sqrt(variance), alpha, method)
    return (
        StratifiedEstimate(
            comparison=comparison, strata_used=len(used), users_left_out=left_out
        ),
        None,
    )


def _stratum_moments(values: npt.ArrayLike, strata: npt.ArrayLike) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "value": np.asarray(values, dtype=np.float64),
            "stratum": pd.Series(np.asarray(strata)).astype(str).to_numpy(),
        }
    )
    grouped = frame.groupby("stratum")["value"]
    return pd.DataFrame(
        {"n": grouped.size(), "mean": grouped.mean(), "var": grouped.var(ddof=1)}
    )
