"""The services docker-compose.yaml runs, tested natively: Airflow's metadata and MLflow
on the machine's PostgreSQL, and a Dask scheduler reached by its address.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from couponflow.dask_cluster import dask_client
from couponflow.settings import Settings

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """Create an empty PostgreSQL database; yield its SQLAlchemy URL; drop it."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as error:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {error}")
    name = f"couponflow_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_airflow_metadata_on_postgres(fresh_database: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": fresh_database,
        # Airflow 3 also opens an async engine; psycopg 3 serves both.
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": fresh_database.replace(
            "+psycopg:", "+psycopg_async:"
        ),
    }
    airflow = str(Path(sys.executable).with_name("airflow"))
    migrate = subprocess.run(
        [airflow, "db", "migrate"], env=env, capture_output=True, text=True, check=False
    )
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    check = subprocess.run(
        [airflow, "db", "check"], env=env, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stderr[-3000:]


def test_mlflow_tracking_on_postgres(fresh_database: str, tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=fresh_database)
    experiment = client.create_experiment(
        "couponflow-services", artifact_location=str(tmp_path / "artifacts")
    )
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "qini", 0.125)
    stored = client.get_run(run.info.run_id).data.metrics
    assert stored == {"qini": 0.125}
    assert mlflow.__version__.split(".")[0] == "3"


def test_dask_scheduler_address_is_used(tmp_path: Path) -> None:
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        settings = Settings(
            home=tmp_path, dask_scheduler_address=cluster.scheduler_address
        )
        with dask_client(settings) as client:
            assert client.scheduler.address == cluster.scheduler_address
            assert client.submit(sum, [1, 2, 3]).result() == 6
