"""Open Bandit Dataset (ZOZOTOWN fashion recommendations): loading and a check of OPE.

The Bernoulli Thompson sampling (bts) policy's click rate is estimated off-policy from
the uniform-random policy's logs and compared with the rate bts reached in its own logs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from couponflow.analysis.ipw import Estimate
from couponflow.analysis.ope import estimate_policy_value, on_policy_value
from couponflow.settings import Settings

log = logging.getLogger(__name__)

OPEN_BANDIT_FOLDER = "open_bandit_dataset_obd"
POLICIES: tuple[str, ...] = ("random", "bts")
CAMPAIGNS: tuple[str, ...] = ("all", "men", "women")
# Each impression shows three items, at positions 1 to 3.
N_POSITIONS = 3
LOG_COLUMNS: tuple[str, ...] = (
    "timestamp",
    "item_id",
    "position",
    "click",
    "propensity_score",
)
# Pseudo-impressions of the position's mean click rate added to each (position, item)
# cell of the DR reward model. Clicks are rare (about 4 per 1000), so most cells have
# no click at all and would otherwise predict 0.
REWARD_MODEL_PRIOR_IMPRESSIONS = 200.0
REWARD_MODEL_FOLDS = 2


@dataclass(frozen=True)
class OpenBanditComparison:
    """Off-policy estimates of the bts click rate next to its on-policy rate.

    ``estimates`` contains the IPS, SNIPS and DR estimates from the random logs, and
    ``on_policy`` the mean click of the bts logs with its normal-approximation CI.
    """

    campaign: str
    random_rows: int
    bts_rows: int
    n_items: int
    estimates: dict[str, Estimate]
    on_policy: Estimate

    def standard_errors_apart(self, method: str) -> float:
        """Return |estimate - on-policy rate| over the SE of that difference.

        The SE combines both estimates' SEs as independent, because the two logs
        hold different rounds.
        """
        estimate = self.estimates[method]
        if estimate.stderr is None or self.on_policy.stderr is None:
            raise ValueError(f"{method}: a standard error is missing, too few rows")
        combined = math.hypot(estimate.stderr, self.on_policy.stderr)
        return abs(estimate.value - self.on_policy.value) / combined

    def intervals_overlap(self, method: str) -> bool:
        """Return whether the estimate's CI and the on-policy CI overlap."""
        estimate = self.estimates[method]
        bounds = (
            estimate.ci_low,
            estimate.ci_high,
            self.on_policy.ci_low,
            self.on_policy.ci_high,
        )
        if any(bound is None for bound in bounds):
            raise ValueError(f"{method}: an interval is missing, too few rows")
        low, high, on_low, on_high = (float(b) for b in bounds)  # type: ignore[arg-type]
        return low <= on_high and on_low <= high

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-safe dict."""
        data = asdict(self)
        data["estimates"] = {k: v.to_dict() for k, v in self.estimates.items()}
        data["on_policy"] = self.on_policy.to_dict()
        return data


def open_bandit_dir(settings: Settings) -> Path:
    """Return the folder of the Open Bandit Dataset under ``settings.data_dir``."""
    return Path(settings.data_dir) / OPEN_BANDIT_FOLDER


def load_open_bandit_logs(
    settings: Settings, policy: str, campaign: str = "all"
) -> pd.DataFrame:
    """Read one policy's logs of one campaign, one row per (impression, position).

    Returns the file's columns: ``timestamp`` as UTC, ``item_id``, ``position``
    (1 to 3), ``click`` (0 or 1), ``propensity_score`` (the logging policy's
    probability of this item at this position), hashed ``user_feature_*`` and
    ``user-item_affinity_*``. Raises FileNotFoundError when the file is missing and
    ValueError when a column is missing or out of range.
    """
    path = _log_path(settings, policy, campaign)
    frame = pd.read_csv(path, index_col=0)
    missing = [c for c in LOG_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} is missing columns {missing}")
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)

    n_items = len(load_item_context(settings, policy, campaign))
    _check_range(frame, "item_id", 0, n_items - 1, path)
    _check_range(frame, "position", 1, N_POSITIONS, path)
    _check_range(frame, "click", 0, 1, path)
    propensity = frame["propensity_score"].to_numpy(dtype=np.float64)
    if not ((propensity > 0) & (propensity <= 1)).all():
        raise ValueError(f"{path}: propensity_score has values outside (0, 1]")
    log.info("read %d %s/%s rows from %s", len(frame), policy, campaign, path)
    return frame.reset_index(drop=True)


def load_item_context(
    settings: Settings, policy: str, campaign: str = "all"
) -> pd.DataFrame:
    """Read the item features of a campaign: one row per item_id, 0 to n_items - 1."""
    path = _log_path(settings, policy, campaign).with_name("item_context.csv")
    items = pd.read_csv(path, index_col=0)
    ids = items["item_id"].to_numpy()
    if not np.array_equal(np.sort(ids), np.arange(len(items))):
        raise ValueError(
            f"{path}: item_id must be 0 to {len(items) - 1}, each once; the file is "
            "not an Open Bandit item_context.csv"
        )
    return items.sort_values("item_id").reset_index(drop=True)


def estimate_position_probabilities(
    logs: pd.DataFrame, n_items: int
) -> npt.NDArray[np.float64]:
    """Estimate a policy's item probabilities per position from its own logs.

    Returns an ``(N_POSITIONS, n_items)`` array whose row ``k`` is the share of the
    rows at position ``k + 1`` that show each item. For a policy that ignores the
    user, as Bernoulli Thompson sampling does, this is the policy's probability
    averaged over the logged period. NOTE: bts updated its parameters during the
    week, so the estimate describes the time-averaged policy, and its own sampling
    error is not part of the OPE standard errors.
    """
    probabilities = np.zeros((N_POSITIONS, n_items), dtype=np.float64)
    for k in range(N_POSITIONS):
        items = logs.loc[logs["position"] == k + 1, "item_id"].to_numpy(np.int64)
        if items.size == 0:
            raise ValueError(
                f"no logged row at position {k + 1}, so the policy's probabilities "
                "there are unknown; pass the logs of every position"
            )
        probabilities[k] = np.bincount(items, minlength=n_items) / items.size
    return probabilities


def position_reward_model(
    logs: pd.DataFrame, n_items: int, seed: int = 0
) -> npt.NDArray[np.float64]:
    """Predict each row's click rate for every item, cross-fitted over two folds.

    Returns an ``(len(logs), n_items)`` array. Row i uses the other fold's click
    rate of (row i's position, item), shrunk toward that position's rate by
    REWARD_MODEL_PRIOR_IMPRESSIONS. The user features are not used.
    """
    positions = logs["position"].to_numpy(np.int64) - 1
    items = logs["item_id"].to_numpy(np.int64)
    clicks = logs["click"].to_numpy(np.float64)
    fold = np.random.default_rng(seed).integers(0, REWARD_MODEL_FOLDS, len(logs))
    predictions = np.empty((len(logs), n_items), dtype=np.float64)
    for k in range(REWARD_MODEL_FOLDS):
        fit = fold != k
        table = _smoothed_click_table(positions[fit], items[fit], clicks[fit], n_items)
        predictions[fold == k] = table[positions[fold == k]]
    return predictions


def evaluate_bts_from_random(
    settings: Settings, campaign: str = "all", alpha: float = 0.05, seed: int = 0
) -> OpenBanditComparison:
    """Estimate the bts click rate from the random logs and compare it with bts's own.

    The target probabilities come from :func:`estimate_position_probabilities` on
    the bts logs, because the files store only the propensity of the logged item.
    Each random-log row gets the probabilities of its position. DR uses
    :func:`position_reward_model`.
    """
    random_logs = load_open_bandit_logs(settings, "random", campaign)
    bts_logs = load_open_bandit_logs(settings, "bts", campaign)
    n_items = len(load_item_context(settings, "random", campaign))

    by_position = estimate_position_probabilities(bts_logs, n_items)
    target = by_position[random_logs["position"].to_numpy(np.int64) - 1]
    estimates = estimate_policy_value(
        target,
        random_logs["item_id"].to_numpy(np.int64),
        random_logs["propensity_score"].to_numpy(np.float64),
        random_logs["click"].to_numpy(np.float64),
        reward_model=position_reward_model(random_logs, n_items, seed),
        alpha=alpha,
    )
    bts_clicks = bts_logs["click"].to_numpy(np.float64)
    on_policy = on_policy_value(bts_clicks, alpha)

    comparison = OpenBanditComparison(
        campaign=campaign,
        random_rows=len(random_logs),
        bts_rows=len(bts_logs),
        n_items=n_items,
        estimates=estimates,
        on_policy=on_policy,
    )
    log.info(
        "bts click rate on %s: on-policy %.5f, IPS %.5f, SNIPS %.5f, DR %.5f",
        campaign,
        on_policy.value,
        estimates["ips"].value,
        estimates["snips"].value,
        estimates["dr"].value,
    )
    return comparison


def _log_path(settings: Settings, policy: str, campaign: str) -> Path:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if campaign not in CAMPAIGNS:
        raise ValueError(f"campaign must be one of {CAMPAIGNS}, got {campaign!r}")
    path = open_bandit_dir(settings) / policy / campaign / f"{campaign}.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"Open Bandit log {path} not found; put the dataset's {policy}/{campaign}/ "
            f"folder under {open_bandit_dir(settings)} or set COUPONFLOW_DATA_DIR"
        )
    return path


def _check_range(
    frame: pd.DataFrame, column: str, low: int, high: int, path: Path
) -> None:
    values = frame[column].to_numpy()
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{path}: {column} must be integers, got dtype {values.dtype}")
    outside = (values < low) | (values > high)
    if outside.any():
        raise ValueError(
            f"{path}: {column} must be in [{low}, {high}], got {values[outside][0]} "
            f"in {int(outside.sum())} rows"
        )


def _smoothed_click_table(
    positions: npt.NDArray[np.int64],
    items: npt.NDArray[np.int64],
    clicks: npt.NDArray[np.float64],
    n_items: int,
) -> npt.NDArray[np.float64]:
    cells = positions * n_items + items
    size = N_POSITIONS * n_items
    shown = np.bincount(cells, minlength=size).reshape(N_POSITIONS, n_items)
    clicked = np.bincount(cells, weights=clicks, minlength=size).reshape(
        N_POSITIONS, n_items
    )
    position_rate = clicked.sum(axis=1) / np.maximum(shown.sum(axis=1), 1)
    prior = REWARD_MODEL_PRIOR_IMPRESSIONS
    return np.asarray(
        (clicked + prior * position_rate[:, None]) / (shown + prior), dtype=np.float64
    )
