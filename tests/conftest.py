"""Test-wide setup: Airflow and couponflow point at a fresh temporary home.

Airflow reads its configuration when first imported, so the variables are set here,
before any test module imports it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="couponflow-tests-"))

os.environ["COUPONFLOW_HOME"] = str(_SESSION_HOME / "home")
os.environ["AIRFLOW_HOME"] = str(_SESSION_HOME / "home" / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO_ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO_ROOT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = (
    f"sqlite:///{_SESSION_HOME / 'home' / 'airflow' / 'airflow.db'}"
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
for folder in (REPO_ROOT / "plugins", REPO_ROOT / "dags"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

POSTGRES_URL = os.environ.get(
    "COUPONFLOW_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_HOST_PORT = os.environ.get("COUPONFLOW_TEST_REDIS", "127.0.0.1:6379")


@pytest.fixture(scope="session")
def session_home() -> Path:
    """The COUPONFLOW_HOME of DAG runs in this test session."""
    return Path(os.environ["COUPONFLOW_HOME"])


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The public data folder; tests that need it skip when it is absent."""
    from couponflow.settings import Settings

    return Path(Settings().data_dir)
