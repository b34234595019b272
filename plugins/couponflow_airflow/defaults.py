"""Arguments shared by every couponflow DAG."""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum

START_DATE = pendulum.datetime(2026, 1, 1, tz="UTC")

DEFAULT_ARGS = {
    "owner": "couponflow",
    # The demo and the tests set COUPONFLOW_TASK_RETRIES=0, so that a failure
    # surfaces at once instead of after the retry delay.
    "retries": int(os.environ.get("COUPONFLOW_TASK_RETRIES", "1")),
    "retry_delay": timedelta(minutes=1),
}

TAGS = ["couponflow"]
