"""docker-compose.yaml validates, and the settings it sets are ones couponflow reads."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from couponflow.settings import Settings

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.yaml"
ENV = {"POSTGRES_PASSWORD": "compose-test", "AIRFLOW_JWT_SECRET": "compose-test"}


def _rendered() -> dict:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose (Debian package) is not installed")
    done = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        check=False,
    )
    assert done.returncode == 0, f"docker-compose config failed:\n{done.stderr}"
    return yaml.safe_load(done.stdout)


def test_compose_file_validates() -> None:
    services = _rendered()["services"]
    expected = {
        "postgres",
        "redis",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "mlflow",
        "dask-scheduler",
        "dask-worker",
        "couponflow-api",
    }
    assert expected <= set(services)


def test_compose_requires_secrets() -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose (Debian package) is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    done = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode != 0
    assert "POSTGRES_PASSWORD" in done.stderr


def test_compose_settings_are_read_by_couponflow() -> None:
    environment = _rendered()["services"]["couponflow-api"]["environment"]
    couponflow_vars = {
        k: v for k, v in environment.items() if k.startswith("COUPONFLOW_")
    }
    assert couponflow_vars, "the API service sets no COUPONFLOW_ variable"
    fields = {f"COUPONFLOW_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(set(couponflow_vars) - fields)
    assert not unknown, f"compose sets variables Settings does not read: {unknown}"

    settings = Settings(
        **{k[len("COUPONFLOW_") :].lower(): v for k, v in couponflow_vars.items()}
    )
    assert settings.campaign_db_url.startswith("postgresql+psycopg://")
    assert settings.feast_online_store == "redis"
    assert settings.dask_scheduler_address == "tcp://dask-scheduler:8786"


def test_settings_read_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("COUPONFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("COUPONFLOW_CAMPAIGN_DB_URL", "postgresql+psycopg://x@h/db")
    settings = Settings()
    assert settings.home == tmp_path
    assert settings.lake_dir == tmp_path / "lake"
    assert settings.campaign_db_url == "postgresql+psycopg://x@h/db"
    assert settings.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
