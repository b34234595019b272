"""Adapter for Kevin Hillstrom's MineThatData e-mail experiment of 2008 (64,000 rows).

Each customer was randomly sent a men's e-mail, a women's e-mail or nothing, and visits,
conversions and spend were tracked for two weeks afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path

import numpy as np
import pandas as pd

from couponflow.schemas import CONTROL_ARM, EXPOSURES, OUTCOMES, USERS, coerce
from couponflow.settings import Settings, get_settings

log = logging.getLogger(__name__)

CAMPAIGN_ID = "hillstrom-2008"
POLICY = "uniform"
CHANNEL = "email"
# The data gives no send date. The challenge was published on 2008-03-20, so a fixed
# date shortly before it is used as the send date.
SEND_AT = pd.Timestamp("2008-03-01T00:00:00Z").as_unit("ns")
OUTCOME_WINDOW_DAYS = 14
ARM_OF_SEGMENT = {
    "Mens E-Mail": "mens_email",
    "Womens E-Mail": "womens_email",
    "No E-Mail": CONTROL_ARM,
}
# The file spells the suburban area "Surburban", and the column names use "suburban".
ZIP_CODE_AREAS = {"Urban": "urban", "Surburban": "suburban", "Rural": "rural"}
PURCHASE_CHANNELS = {"Phone": "phone", "Web": "web", "Multichannel": "multichannel"}
HISTORY_SEGMENTS = {
    "1) $0 - $100": 1,
    "2) $100 - $200": 2,
    "3) $200 - $350": 3,
    "4) $350 - $500": 4,
    "5) $500 - $750": 5,
    "6) $750 - $1,000": 6,
    "7) $1,000 +": 7,
}
COLUMNS = (
    "recency",
    "history_segment",
    "history",
    "mens",
    "womens",
    "zip_code",
    "newbie",
    "channel",
    "segment",
    "visit",
    "conversion",
    "spend",
)
FEATURE_COLUMNS = (
    "recency",
    "history_cents",
    "history_segment",
    "mens",
    "womens",
    "newbie",
    *(f"zip_code_{area}" for area in ZIP_CODE_AREAS.values()),
    *(f"channel_{name}" for name in PURCHASE_CHANNELS.values()),
)


@dataclass(frozen=True)
class HillstromData:
    """The experiment as couponflow tables, plus a numeric feature frame per user."""

    users: pd.DataFrame
    features: pd.DataFrame
    exposures: pd.DataFrame
    outcomes: pd.DataFrame


def hillstrom_path(settings: Settings) -> Path:
    """Return the default path of the data, ``<data_dir>/hillstrom/hillstrom.csv``."""
    return settings.data_dir / "hillstrom" / "hillstrom.csv"


def load_hillstrom(
    path: Path | None = None, *, settings: Settings | None = None
) -> HillstromData:
    """Read the Hillstrom CSV at ``path``, or at the settings' default location.

    User ids are the row numbers as decimal strings, starting at "0". Raises
    FileNotFoundError when the file is missing, and ValueError when a column is
    missing or contains a value outside the published coding.
    """
    if path is None:
        path = hillstrom_path(settings or get_settings())
    if not path.is_file():
        raise FileNotFoundError(
            f"Hillstrom data not found at {path}; put hillstrom.csv there, or set "
            "COUPONFLOW_DATA_DIR to the folder that contains hillstrom/hillstrom.csv"
        )
    # Money columns stay text until they are converted to cents exactly.
    raw = pd.read_csv(path, dtype={"history": str, "spend": str})
    _check_columns(raw, path)
    user_id = pd.Series(np.arange(len(raw)).astype(str), dtype="string")

    data = HillstromData(
        users=_users(raw, user_id),
        features=_features(raw, user_id),
        exposures=_exposures(raw, user_id),
        outcomes=_outcomes(raw, user_id),
    )
    log.info("read %s Hillstrom rows from %s", len(raw), path)
    return data


def _check_columns(raw: pd.DataFrame, path: Path) -> None:
    missing = [c for c in COLUMNS if c not in raw.columns]
    if missing:
        raise ValueError(
            f"{path}: missing columns {missing}; expected the MineThatData columns "
            f"{list(COLUMNS)}"
        )
    empty = [c for c in COLUMNS if raw[c].isna().any()]
    if empty:
        raise ValueError(f"{path}: columns {empty} contain empty values")
    coded: dict[str, Mapping[str, str | int]] = {
        "segment": ARM_OF_SEGMENT,
        "zip_code": ZIP_CODE_AREAS,
        "channel": PURCHASE_CHANNELS,
        "history_segment": HISTORY_SEGMENTS,
    }
    for column, codes in coded.items():
        unknown = sorted(set(raw[column]) - set(codes))
        if unknown:
            raise ValueError(
                f"{path}: column {column} has unknown values {unknown[:5]}; "
                f"expected {sorted(codes)}"
            )
    for column in ("mens", "womens", "newbie", "visit", "conversion"):
        if not raw[column].isin([0, 1]).all():
            raise ValueError(f"{path}: column {column} must contain only 0 and 1")


def _users(raw: pd.DataFrame, user_id: pd.Series) -> pd.DataFrame:
    # The data has no signup dates. A customer signed up no later than their last
    # purchase, recency months before the send date, so that is the signup_ts used.
    months = raw["recency"].astype(np.int64)
    last_purchase = {m: SEND_AT - pd.DateOffset(months=int(m)) for m in months.unique()}
    users = pd.DataFrame(
        {
            "user_id": user_id,
            "signup_ts": months.map(last_purchase),
            "region": raw["zip_code"].map(ZIP_CODE_AREAS),
            # The purchase channel of the past year is the nearest thing to a device.
            "device": raw["channel"].map(PURCHASE_CHANNELS),
        }
    )
    return coerce(users, USERS)


def _features(raw: pd.DataFrame, user_id: pd.Series) -> pd.DataFrame:
    features = pd.DataFrame(
        {
            "user_id": user_id,
            "recency": raw["recency"].astype(np.int64),
            "history_cents": _cents(raw["history"], "history"),
            "history_segment": raw["history_segment"].map(HISTORY_SEGMENTS),
            "mens": raw["mens"].astype(np.int64),
            "womens": raw["womens"].astype(np.int64),
            "newbie": raw["newbie"].astype(np.int64),
        }
    )
    for value, area in ZIP_CODE_AREAS.items():
        features[f"zip_code_{area}"] = (raw["zip_code"] == value).astype(np.int64)
    for value, name in PURCHASE_CHANNELS.items():
        features[f"channel_{name}"] = (raw["channel"] == value).astype(np.int64)
    features["history_segment"] = features["history_segment"].astype(np.int64)
    return features[["user_id", *FEATURE_COLUMNS]]


def _exposures(raw: pd.DataFrame, user_id: pd.Series) -> pd.DataFrame:
    exposures = pd.DataFrame(
        {
            "campaign_id": CAMPAIGN_ID,
            "user_id": user_id,
            "arm": raw["segment"].map(ARM_OF_SEGMENT),
            "channel": CHANNEL,
            "send_at": SEND_AT,
            "propensity": 1.0 / len(ARM_OF_SEGMENT),
            "policy": POLICY,
        }
    )
    return coerce(exposures, EXPOSURES)


def _outcomes(raw: pd.DataFrame, user_id: pd.Series) -> pd.DataFrame:
    n = len(raw)
    # Opens, clicks and redemptions were not recorded, and no coupon was offered.
    not_recorded = np.zeros(n, dtype=bool)
    outcomes = pd.DataFrame(
        {
            "campaign_id": CAMPAIGN_ID,
            "user_id": user_id,
            "observed_at": SEND_AT + pd.Timedelta(days=OUTCOME_WINDOW_DAYS),
            "opened": not_recorded,
            "clicked": not_recorded,
            "visited": raw["visit"].astype(bool),
            "redeemed": not_recorded,
            "converted": raw["conversion"].astype(bool),
            "revenue_cents": _cents(raw["spend"], "spend"),
            "discount_cents": np.zeros(n, dtype=np.int64),
        }
    )
    return coerce(outcomes, OUTCOMES)


def _cents(amounts: pd.Series, column: str) -> pd.Series:
    """Convert decimal dollar strings to int64 cents, rounding half up."""
    cents = np.empty(len(amounts), dtype=np.int64)
    one = Decimal(1)
    for i, text in enumerate(amounts.astype(str)):
        try:
            amount = Decimal(text.strip())
        except InvalidOperation as error:
            raise ValueError(
                f"column {column}, row {i}: {text!r} is not a decimal amount"
            ) from error
        if not amount.is_finite() or amount < 0:
            raise ValueError(
                f"column {column}, row {i}: amount must be >= 0, got {text}"
            )
        cents[i] = int((amount * 100).quantize(one, rounding=ROUND_HALF_UP))
    return pd.Series(cents, index=amounts.index, dtype="int64")
