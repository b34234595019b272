"""Airflow configuration derived from couponflow settings, SQLite by default."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from couponflow.settings import REPO_ROOT, Settings

log = logging.getLogger(__name__)

DAGS_FOLDER = REPO_ROOT / "dags"
PLUGINS_FOLDER = REPO_ROOT / "plugins"


def airflow_environ(settings: Settings) -> dict[str, str]:
    """Return the AIRFLOW_* variables that point Airflow at this couponflow home.

    A variable already set in the process environment wins, so production can point
    ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` at PostgreSQL.
    """
    home = settings.airflow_home
    defaults = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "COUPONFLOW_HOME": str(settings.home),
    }
    return {key: os.environ.get(key, value) for key, value in defaults.items()}


def prepare_airflow(settings: Settings) -> dict[str, str]:
    """Export the Airflow variables into this process and migrate its metadata database.

    Must run before the first ``import airflow`` of the process, because Airflow reads
    its configuration at import time.
    """
    environ = airflow_environ(settings)
    os.environ.update(environ)
    Path(environ["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    for folder in (DAGS_FOLDER, PLUGINS_FOLDER):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    log.info(
        "migrating the Airflow metadata database under %s", environ["AIRFLOW_HOME"]
    )
    airflow_bin = Path(sys.executable).with_name("airflow")
    completed = subprocess.run(
        [str(airflow_bin), "db", "migrate"],
        env={**os.environ, **environ},
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            "airflow db migrate failed with exit code "
            f"{completed.returncode}:\n{completed.stderr[-4000:]}"
        )
    return environ
