"""Anytime-valid confidence sequences for a difference in means, for daily looks.

A confidence sequence covers the true effect at every look at once with probability
at least ``1 - alpha``, so reading the report every day does not inflate the false
positive rate the way repeated fixed-horizon intervals do.

Formula: the two-sided normal-mixture (conjugate mixture) boundary of Robbins, tuned
as in Howard, Ramdas, McAuliffe and Sekhon, "Time-uniform, nonparametric,
nonasymptotic confidence sequences" (Annals of Statistics, 2021). With an estimated
variance it is the asymptotic confidence sequence of Waudby-Smith, Arbour, Sinha,
Kennedy and Ramdas, "Time-uniform central limit theory and asymptotic confidence
sequences" (arXiv:2103.06476). Both papers are cited from memory. The margin and the
choice of rho were checked against ``std_conjmix_margin`` and ``best_rho2_exact`` in
the second paper's R code (github.com/WannabeSmith/drconfseq,
R/asymptotic_confseq.R). With ``t`` users at a look and ``rho2`` the mixture
variance, the unit-variance margin is

    m(t) = sqrt(2 (t rho2 + 1) / (t^2 rho2) * log(sqrt(t rho2 + 1) / alpha))

and ``rho2 = (-W_{-1}(-alpha^2 exp(alpha^2 - 1)) - 1) / t_opt`` makes the sequence
tightest at ``t_opt`` users (``W_{-1}`` is the lower branch of Lambert's W). For two
groups the per-user variance is ``t * (s_t^2 / n_t + s_c^2 / n_c)``. Asymptotically
this is the sequence of the augmented inverse-propensity pseudo-outcome whose outcome
models are the two group means. Validity is asymptotic, so it needs enough users per
group for the central limit theorem, as a fixed-horizon Welch interval does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import special, stats

from couponflow.analysis.stats import FloatArray, validate_alpha, z_critical

# A look needs this many users in each group to estimate both variances.
MIN_USERS_PER_LOOK_GROUP = 2


@dataclass(frozen=True)
class SequentialLook:
    """The cumulative comparison at one look (all users observed up to it).

    ``fixed_*`` is the usual normal interval, valid for one pre-planned look only.
    ``sequence_*`` is the confidence sequence, valid at every look at once.
    ``anytime_p_value`` is the smallest ``1 / M`` of the mixture martingale ``M``
    so far, which stays below alpha at some look with probability at most alpha
    under the null. The numbers are None when a group has fewer than
    ``MIN_USERS_PER_LOOK_GROUP`` users.
    """

    look: str
    treated_users: int
    control_users: int
    estimate: float | None
    fixed_low: float | None
    fixed_high: float | None
    fixed_p_value: float | None
    sequence_low: float | None
    sequence_high: float | None
    anytime_p_value: float | None


def optimal_rho_squared(t_opt: float, alpha: float = 0.05) -> float:
    """Return the mixture variance that makes the margin smallest at ``t_opt`` users.

    Raises ValueError unless ``t_opt`` >= 1 and ``alpha`` is below sqrt(W0(1)),
    about 0.75, where the formula has a solution.
    """
    validate_alpha(alpha)
    if t_opt < 1:
        raise ValueError(f"t_opt must be >= 1 user, got {t_opt}")
    if alpha >= math.sqrt(float(special.lambertw(1.0).real)):
        raise ValueError(f"alpha must be below about 0.75 for rho tuning, got {alpha}")
    branch = special.lambertw(-(alpha**2) * math.exp(alpha**2 - 1.0), k=-1).real
    return float((-branch - 1.0) / t_opt)


def normal_mixture_margin(
    t: npt.ArrayLike, rho_squared: float, alpha: float = 0.05
) -> FloatArray:
    """Return the unit-variance two-sided margin ``m(t)`` element-wise (see module)."""
    validate_alpha(alpha)
    users = np.asarray(t, dtype=np.float64)
    scaled = users * rho_squared + 1.0
    return np.sqrt(
        2.0 * scaled * np.log(np.sqrt(scaled) / alpha) / (users * users * rho_squared)
    )


def mixture_p_values(
    z: npt.ArrayLike, t: npt.ArrayLike, rho_squared: float
) -> FloatArray:
    """Return ``min(1, 1 / M)`` element-wise, for the z-statistic at ``t`` users.

    ``M = (1 + a)^(-1/2) exp(a z^2 / (2 (1 + a)))`` with ``a = t rho2`` is the
    normal-mixture martingale. ``1 / M < alpha`` exactly when the sequence at level
    ``alpha`` excludes 0. The running minimum over looks is the anytime p-value.
    """
    statistic = np.asarray(z, dtype=np.float64)
    a = np.asarray(t, dtype=np.float64) * rho_squared
    log_m = -0.5 * np.log1p(a) + a * statistic * statistic / (2.0 * (1.0 + a))
    return np.minimum(1.0, np.exp(-log_m))


def confidence_sequence(
    treated_values: npt.ArrayLike,
    treated_looks: npt.ArrayLike,
    control_values: npt.ArrayLike,
    control_looks: npt.ArrayLike,
    alpha: float = 0.05,
    t_opt: float | None = None,
) -> list[SequentialLook]:
    """Return the confidence sequence of ``mean(treated) - mean(control)`` per look.

    Each user has a value and the look (any sortable label, such as a date) from
    which its value is known. Look ``k`` uses every user whose look is at most
    ``k``. ``t_opt`` is the number of users (both groups) at which the sequence is
    tightest; by default all users, the planned size of the experiment.
    """
    validate_alpha(alpha)
    treated = _cumulative_moments(treated_values, treated_looks)
    control = _cumulative_moments(control_values, control_looks)
    looks = treated.index.union(control.index).sort_values()
    treated = treated.reindex(looks).ffill().fillna(0.0)
    control = control.reindex(looks).ffill().fillna(0.0)
    final_users = float(treated["n"].iloc[-1] + control["n"].iloc[-1])
    planned = final_users if t_opt is None else t_opt
    rho_squared = optimal_rho_squared(max(planned, 1.0), alpha)
    z = z_critical(alpha)

    rows: list[SequentialLook] = []
    running_p = 1.0
    for look in looks:
        t_row, c_row = treated.loc[look], control.loc[look]
        n_t, n_c = int(t_row["n"]), int(c_row["n"])
        if min(n_t, n_c) < MIN_USERS_PER_LOOK_GROUP:
            rows.append(
                SequentialLook(
                    str(look), n_t, n_c, None, None, None, None, None, None, None
                )
            )
            continue
        estimate = float(t_row["mean"] - c_row["mean"])
        variance = float(t_row["var"] / n_t + c_row["var"] / n_c)
        users = n_t + n_c
        standard_error = math.sqrt(max(variance, 0.0))
        half_width = (
            standard_error
            * math.sqrt(users)
            * float(normal_mixture_margin([users], rho_squared, alpha)[0])
        )
        if standard_error > 0.0:
            statistic = estimate / standard_error
            fixed_p = float(2.0 * stats.norm.sf(abs(statistic)))
            look_p = float(mixture_p_values([statistic], [users], rho_squared)[0])
        else:
            fixed_p = look_p = 1.0 if estimate == 0.0 else 0.0
        running_p = min(running_p, look_p)
        rows.append(
            SequentialLook(
                look=str(look),
                treated_users=n_t,
                control_users=n_c,
                estimate=estimate,
                fixed_low=estimate - z * standard_error,
                fixed_high=estimate + z * standard_error,
                fixed_p_value=fixed_p,
                sequence_low=estimate - half_width,
                sequence_high=estimate + half_width,
                anytime_p_value=running_p,
            )
        )
    return rows


def _cumulative_moments(values: npt.ArrayLike, looks: npt.ArrayLike) -> pd.DataFrame:
    """Return the count, mean and sample variance of all values up to each look."""
    frame = pd.DataFrame(
        {
            "value": np.asarray(values, dtype=np.float64),
            "look": np.asarray(looks),
        }
    )
    frame["square"] = frame["value"] ** 2
    grouped = frame.groupby("look").agg(
        n=("value", "size"), total=("value", "sum"), squares=("square", "sum")
    )
    cumulative = grouped.sort_index().cumsum()
    n = cumulative["n"].astype(np.float64)
    mean = cumulative["total"] / n
    # Sum-of-squares form; cents stay far below the range where it loses precision.
    spread = (cumulative["squares"] - n * mean * mean).clip(lower=0.0)
    variance = spread / (n - 1.0).where(n > 1.0)
    return pd.DataFrame({"n": n, "mean": mean, "var": variance.fillna(0.0)})
