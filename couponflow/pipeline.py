"""Task bodies of the DAGs: each reads its inputs from the stores, writes its outputs
back, and returns a small JSON-safe summary (the XCom).

Every function reads the settings from the environment, so that an Airflow worker
configured with ``COUPONFLOW_*`` variables finds the same stores as the command line.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from couponflow import lake
from couponflow.schemas import CONTROL_ARM
from couponflow.settings import Settings, get_settings
from couponflow.store import get_engine

log = logging.getLogger(__name__)

INGEST_ORDER = ("users", "coupons", "events", "exposures", "outcomes")
# Campaigns whose exposures were assigned uniformly at random; the response model
# trains on these only, because their arms are independent of the user.
RANDOMIZED_POLICY = "uniform"


def campaign_dir(settings: Settings, campaign_id: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", campaign_id):
        raise ValueError(
            f"invalid campaign_id {campaign_id!r}: use 1-100 letters, digits, '.', '_'"
            " or '-', starting with a letter or digit"
        )
    return settings.home / "campaigns" / campaign_id


def campaign_id_or_default(campaign_id: str, run_id: str | None) -> str:
    """Return ``campaign_id``, or one derived from the Airflow run id when it is empty."""
    if campaign_id:
        return campaign_id
    stamp = re.sub(r"[^0-9]", "", run_id or "")[:12] or datetime.now(UTC).strftime(
        "%Y%m%d%H%M"
    )
    return f"cmp-{stamp}"


# --- ingest_events --------------------------------------------------------------


def ingest_table(table: str) -> dict[str, Any]:
    """Check and ingest every pending raw batch of ``table``; return the counts."""
    from couponflow.ingest import ingest_pending

    settings = get_settings()
    reports = ingest_pending(settings, tables=[table])
    fresh = [r for r in reports if not r.skipped]
    summary = {
        "table": table,
        "batches": len(reports),
        "batches_skipped": len(reports) - len(fresh),
        "rows_in": sum(r.rows_in for r in fresh),
        "rows_accepted": sum(r.rows_accepted for r in fresh),
        "rows_quarantined": sum(r.rows_quarantined for r in fresh),
    }
    log.info(
        "ingested %s: %d batches (%d already done), rows in %d, accepted %d, "
        "quarantined %d",
        table,
        summary["batches"],
        summary["batches_skipped"],
        summary["rows_in"],
        summary["rows_accepted"],
        summary["rows_quarantined"],
    )
    return summary
