"""Validation and join of the allocation, outcomes and covariates of one experiment.

The result has one row per allocated user with its outcome, its pre-period
covariate, its stratum and the day its outcome was observed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from couponflow.analysis.cuped import COVARIATE_COLUMN

HOLDOUT = "holdout"
TREATMENT = "treatment"
GROUP_NAMES: tuple[str, ...] = (HOLDOUT, TREATMENT)
ALLOCATION_COLUMNS: tuple[str, ...] = (
    "user_id",
    "group_name",
    "arm",
    "propensity",
    "score_uplift",
    "expected_cost_cents",
)
# The holdout users' policy choice; without it every arm is compared with the whole
# holdout.
POLICY_ARM_COLUMN = "policy_arm"
OUTCOME_REQUIRED_COLUMNS: tuple[str, ...] = ("user_id", "converted", "revenue_cents")
ENGAGEMENT_COLUMNS: tuple[str, ...] = ("opened", "clicked")
# An allocation column that names each user's period; without it the UTC day of
# send_at is the stratum.
STRATUM_COLUMN = "stratum"
SEND_AT_COLUMN = "send_at"
OBSERVED_AT_COLUMN = "observed_at"
UNKNOWN_STRATUM = "unknown"


@dataclass(frozen=True)
class JoinedExperiment:
    """The joined per-user frame and what the inputs contained.

    ``frame`` has the allocation columns, the outcome columns (missing outcomes
    filled as no conversion), ``stratum`` when ``stratum_source`` is set,
    ``pre_spend_cents`` when ``covariate_source`` is set, and ``observed_day``
    (a UTC date string) when ``observation_days`` is not empty.
    """

    frame: pd.DataFrame
    notes: list[str]
    users_without_outcome: int
    outcome_rows_without_allocation: int
    logged_columns: frozenset[str]
    covariate_source: str | None
    stratum_source: str | None
    observation_days: list[str]


def join_experiment(
    allocation: pd.DataFrame,
    outcomes: pd.DataFrame,
    covariates: pd.DataFrame | None = None,
) -> JoinedExperiment:
    """Left-join outcomes and covariates onto the allocation, one row per user.

    Raises KeyError on a missing column and ValueError on duplicated users, unknown
    group names or outcomes of another campaign.
    """
    missing = [c for c in ALLOCATION_COLUMNS if c not in allocation.columns]
    if missing:
        raise KeyError(f"allocation frame: missing columns {missing}")
    missing = [c for c in OUTCOME_REQUIRED_COLUMNS if c not in outcomes.columns]
    if missing:
        raise KeyError(f"outcomes frame: missing columns {missing}")

    optional = [POLICY_ARM_COLUMN, STRATUM_COLUMN, SEND_AT_COLUMN, COVARIATE_COLUMN]
    columns = list(ALLOCATION_COLUMNS) + [
        c for c in optional if c in allocation.columns
    ]
    left = allocation[columns].copy()
    left["user_id"] = left["user_id"].astype(str)
    _validate_allocation(left)

    right = outcomes.copy()
    right["user_id"] = right["user_id"].astype(str)
    _validate_campaigns(allocation, right)
    _reject_duplicates(right, "outcomes frame", "outcome row")

    notes: list[str] = []
    for column in ("redeemed", "discount_cents"):
        if column not in right.columns:
            right[column] = 0
            notes.append(
                f"The outcomes have no {column} column, so it counts as 0 for everyone."
            )
    logged = frozenset(c for c in ENGAGEMENT_COLUMNS if c in right.columns)
    outcome_columns = ["user_id", "converted", "redeemed", "revenue_cents"]
    outcome_columns += ["discount_cents", *sorted(logged)]
    for column in (OBSERVED_AT_COLUMN, COVARIATE_COLUMN):
        if column in right.columns and column not in left.columns:
            outcome_columns.append(column)
    right = right[outcome_columns]

    frame = left.merge(right, on="user_id", how="left", indicator=True)
    without_outcome = int((frame["_merge"] == "left_only").sum())
    orphans = int((~right["user_id"].isin(left["user_id"])).sum())
    frame = frame.drop(columns="_merge")
    _fill_missing_outcomes(frame, logged)
    notes.append(
        f"{without_outcome} of {len(frame)} allocated users have no outcome row, so "
        "they count as not converted, not redeemed, with 0 revenue and 0 discount."
    )
    if orphans:
        notes.append(
            f"{orphans} outcome rows belong to users outside the allocation and are "
            "ignored."
        )

    covariate_source = _attach_covariate(
        frame, covariates, COVARIATE_COLUMN in allocation.columns, notes
    )
    stratum_source = _attach_stratum(frame)
    observation_days = _attach_observed_day(frame)
    frame = frame.drop(columns=[OBSERVED_AT_COLUMN], errors="ignore")
    return JoinedExperiment(
        frame=frame,
        notes=notes,
        users_without_outcome=without_outcome,
        outcome_rows_without_allocation=orphans,
        logged_columns=logged,
        covariate_source=covariate_source,
        stratum_source=stratum_source,
        observation_days=observation_days,
    )


def _fill_missing_outcomes(frame: pd.DataFrame, logged: frozenset[str]) -> None:
    # A missing outcome row means no conversion and no revenue in the window.
    for column in ("converted", "redeemed", *sorted(logged)):
        frame[column] = frame[column].astype("boolean").fillna(False).astype(bool)
    frame["revenue_cents"] = frame["revenue_cents"].fillna(0).astype(np.int64)
    frame["discount_cents"] = frame["discount_cents"].fillna(0).astype(np.int64)
    frame["expected_cost_cents"] = frame["expected_cost_cents"].astype(np.int64)


def _attach_covariate(
    frame: pd.DataFrame,
    covariates: pd.DataFrame | None,
    in_allocation: bool,
    notes: list[str],
) -> str | None:
    """Put the pre-period covariate in ``frame``; return where it came from."""
    if covariates is not None:
        missing = [c for c in ("user_id", COVARIATE_COLUMN) if c not in covariates]
        if missing:
            raise KeyError(f"covariates frame: missing columns {missing}")
        extra = covariates[["user_id", COVARIATE_COLUMN]].copy()
        extra["user_id"] = extra["user_id"].astype(str)
        _reject_duplicates(extra, "covariates frame", "covariate row")
        frame.drop(columns=[COVARIATE_COLUMN], errors="ignore", inplace=True)
        matched = frame[["user_id"]].merge(extra, on="user_id", how="left")
        frame[COVARIATE_COLUMN] = matched[COVARIATE_COLUMN].to_numpy()
        source = "covariates argument"
    elif COVARIATE_COLUMN in frame.columns:
        source = "allocation" if in_allocation else "outcomes"
    else:
        return None

    values = pd.to_numeric(frame[COVARIATE_COLUMN], errors="coerce").astype(np.float64)
    unknown = int((~np.isfinite(values)).sum())
    frame[COVARIATE_COLUMN] = values.where(np.isfinite(values), 0.0)
    notes.append(
        f"CUPED uses {COVARIATE_COLUMN} from the {source}; {unknown} of {len(frame)} "
        "users have no value and count as 0, which keeps the estimate unbiased "
        "because the covariate is fixed before the assignment."
    )
    return source


def _attach_stratum(frame: pd.DataFrame) -> str | None:
    """Put each user's stratum in ``frame``; return where it came from."""
    if STRATUM_COLUMN in frame.columns:
        labels = frame[STRATUM_COLUMN].astype("string").fillna(UNKNOWN_STRATUM)
        frame[STRATUM_COLUMN] = labels.astype(str)
        return f"{STRATUM_COLUMN} column"
    if SEND_AT_COLUMN in frame.columns and frame[SEND_AT_COLUMN].notna().any():
        sent = pd.to_datetime(frame[SEND_AT_COLUMN], utc=True)
        days = sent.dt.strftime("%Y-%m-%d").astype("string").fillna(UNKNOWN_STRATUM)
        frame[STRATUM_COLUMN] = days.astype(str)
        return "UTC day of send_at"
    return None


def _attach_observed_day(frame: pd.DataFrame) -> list[str]:
    """Put the UTC day each outcome was observed in ``frame``; return the days.

    Users without an outcome row get the last day, when their window has closed.
    """
    if OBSERVED_AT_COLUMN not in frame.columns:
        return []
    observed = pd.to_datetime(frame[OBSERVED_AT_COLUMN], utc=True)
    if observed.isna().all():
        return []
    days = observed.dt.strftime("%Y-%m-%d")
    last = str(days.dropna().max())
    frame["observed_day"] = days.fillna(last).astype(str)
    return sorted(frame["observed_day"].unique())


def _validate_campaigns(allocation: pd.DataFrame, outcomes: pd.DataFrame) -> None:
    if "campaign_id" not in outcomes.columns:
        return
    campaigns = sorted(outcomes["campaign_id"].astype(str).unique())
    if len(campaigns) > 1:
        raise ValueError(
            f"outcomes frame contains several campaigns {campaigns[:5]}; pass the "
            "outcomes of one campaign"
        )
    if "campaign_id" in allocation.columns and campaigns:
        allocated = sorted(allocation["campaign_id"].astype(str).unique())
        if allocated != campaigns:
            raise ValueError(
                f"outcomes of campaign {campaigns[0]!r} do not match the allocation "
                f"of campaign(s) {allocated[:5]}; pass both frames of one campaign"
            )


def _validate_allocation(allocation: pd.DataFrame) -> None:
    duplicated = allocation["user_id"][allocation["user_id"].duplicated()]
    if not duplicated.empty:
        raise ValueError(
            f"allocation frame: user_id {duplicated.iloc[0]!r} appears more than "
            "once; pass one allocation version"
        )
    unknown = sorted(set(allocation["group_name"].astype(str)) - set(GROUP_NAMES))
    if unknown:
        raise ValueError(
            f"allocation frame: group_name must be one of {list(GROUP_NAMES)}, got "
            f"{unknown[:5]}"
        )


def _reject_duplicates(frame: pd.DataFrame, name: str, row: str) -> None:
    duplicated = frame["user_id"][frame["user_id"].duplicated()]
    if not duplicated.empty:
        raise ValueError(
            f"{name}: user_id {duplicated.iloc[0]!r} has more than one {row}; "
            "deduplicate per user before the analysis"
        )
