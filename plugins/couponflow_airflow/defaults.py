"""Arguments shared by every couponflow DAG."""

from __future__ import annotations

from datetime import timedelta

import pendulum

START_DATE = pendulum.datetime(2026, 1, 1, tz="UTC")

DEFAULT_ARGS = {
    "owner": "couponflow",
    "retries": 1,
    "retry_delay": timedelta(minutes=1),
}

TAGS = ["couponflow"]
