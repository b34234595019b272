"""Every DAG file imports fast, defines the DAG named after its file, wires Assets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parent.parent / "dags"
DAG_FILES = sorted(p for p in DAGS.glob("*.py") if not p.name.startswith("_"))
# Parsing a DAG file must cost the scheduler far less than a second; heavy
# libraries are imported inside the tasks.
MAX_IMPORT_SECONDS = 0.5


def test_dag_folder_lists_pipelines() -> None:
    stems = {p.stem for p in DAG_FILES}
    assert {
        "ingest_events",
        "build_features",
        "train_models",
        "allocate_campaign",
        "analyze_experiment",
    } <= stems


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_loads(path: Path) -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(path), include_examples=False)
    assert not bag.import_errors, f"{path.name} failed to import: {bag.import_errors}"
    assert bag.dag_ids, f"{path.name} defines no DAG"
    assert bag.dag_ids == [path.stem], (
        f"{path.name} defines {bag.dag_ids}; the DAG id must equal the file stem"
    )


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_imports_fast(path: Path) -> None:
    # A fresh interpreter, so that earlier tests' imports do not hide the cost;
    # airflow.sdk itself is imported first and not counted.
    code = (
        "import sys, time, importlib; import airflow.sdk; "
        f"sys.path[:0] = [{str(DAGS)!r}, {str(DAGS.parent / 'plugins')!r}]; "
        "t = time.perf_counter(); "
        f"importlib.import_module({path.stem!r}); "
        "print(time.perf_counter() - t)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"{path.name} failed to import:\n{done.stderr[-2000:]}"
    seconds = float(done.stdout.strip().splitlines()[-1])
    assert seconds < MAX_IMPORT_SECONDS, f"{path.name} took {seconds:.2f} s to import"


def test_dag_integrity_names_broken_file(tmp_path: Path) -> None:
    from airflow.dag_processing.dagbag import DagBag

    broken = tmp_path / "broken_pipeline.py"
    broken.write_text("from airflow.sdk import dag\nimport not_a_module_anywhere\n")
    empty = tmp_path / "no_dag_here.py"
    empty.write_text("from airflow.sdk import dag  # a DAG file that defines none\n")
    bag = DagBag(str(tmp_path), include_examples=False)
    assert any("broken_pipeline.py" in name for name in bag.import_errors)
    assert bag.dag_ids == []


def test_assets_chain_the_pipelines() -> None:
    from airflow.dag_processing.dagbag import DagBag
    from couponflow_airflow import assets

    bag = DagBag(str(DAGS), include_examples=False)

    def outlets(dag_id: str) -> set[str]:
        return {o.name for t in bag.dags[dag_id].tasks for o in t.outlets}

    def schedule_assets(dag_id: str) -> set[str]:
        condition = bag.dags[dag_id].timetable.asset_condition
        return {asset.name for asset in condition.objects}

    assert assets.LAKE.name in outlets("ingest_events")
    assert assets.OUTCOMES.name in outlets("ingest_events")
    assert schedule_assets("build_features") == {assets.LAKE.name}
    assert assets.FEATURES.name in outlets("build_features")
    assert schedule_assets("train_models") == {assets.FEATURES.name}
    assert assets.MODELS.name in outlets("train_models")
    assert schedule_assets("allocate_campaign") == {assets.MODELS.name}
    assert assets.ALLOCATIONS.name in outlets("allocate_campaign")
    assert schedule_assets("analyze_experiment") == {assets.OUTCOMES.name}


def test_allocation_params_name_every_channel() -> None:
    from airflow.dag_processing.dagbag import DagBag

    from couponflow.schemas import CHANNELS

    bag = DagBag(str(DAGS / "allocate_campaign.py"), include_examples=False)
    params = bag.dags["allocate_campaign"].params
    for name in ("message_cost_cents", "channel_capacity"):
        schema = params.get_param(name).schema
        assert set(schema["properties"]) == set(CHANNELS), name
        assert schema["additionalProperties"] is False, name


def test_task_ids_are_verb_noun() -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(DAGS), include_examples=False)
    for dag_id in bag.dag_ids:
        for task in bag.dags[dag_id].tasks:
            assert "_" in task.task_id, f"{dag_id}.{task.task_id} is not verb_noun"


def test_dag_files_import_without_heavy_libraries() -> None:
    heavy = ("tensorflow", "xgboost", "feast", "mlflow", "great_expectations", "dask")
    code = (
        "import sys, importlib; "
        f"sys.path[:0] = [{str(DAGS)!r}, {str(DAGS.parent / 'plugins')!r}]; "
        + "; ".join(f"importlib.import_module({p.stem!r})" for p in DAG_FILES)
        + f"; print([m for m in {heavy!r} if m in sys.modules])"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", (
        f"DAG files imported heavy libraries: {done.stdout.strip()} "
        f"({time.perf_counter() - start:.1f} s)"
    )


def test_airflow_cli_parses_every_dag(tmp_path: Path) -> None:
    # Airflow's own parser, with the variables `couponflow airflow-env` prints: the
    # plugins folder must be importable without the test's sys.path.
    from couponflow.airflow_env import airflow_environ
    from couponflow.settings import Settings

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
        **airflow_environ(Settings(home=tmp_path)),
    }
    env.pop("PYTHONPATH", None)
    airflow = str(Path(sys.executable).with_name("airflow"))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [airflow, *args], env=env, capture_output=True, text=True, check=False
        )

    assert run("db", "migrate").returncode == 0
    reserialize = run("dags", "reserialize")
    assert reserialize.returncode == 0, reserialize.stderr[-2000:]
    errors = run("dags", "list-import-errors", "--output", "json")
    assert errors.returncode == 0, errors.stderr[-2000:]
    # Airflow logs to stdout too; the table is the last line.
    assert _last_line(errors.stdout) in ("[]", "No data found"), errors.stdout[-2000:]
    listed = run("dags", "list", "--output", "json")
    assert listed.returncode == 0, listed.stderr[-2000:]
    dag_ids = {row["dag_id"] for row in json.loads(_last_line(listed.stdout))}
    assert {p.stem for p in DAG_FILES} <= dag_ids


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
