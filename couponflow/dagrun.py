"""Run a couponflow DAG in this process with ``dag.test()``: a real run, no scheduler.

Used by the demo and the end-to-end tests. Airflow reads its configuration at import,
so :func:`couponflow.airflow_env.prepare_airflow` must run before the first import of
``airflow`` in the process; :func:`run_dag` does that on its first call.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from couponflow.airflow_env import DAGS_FOLDER, prepare_airflow
from couponflow.settings import Settings

log = logging.getLogger(__name__)

_prepared_home: str | None = None


class DagRunFailed(RuntimeError):
    """A DAG run ended in a state other than success."""

    def __init__(
        self,
        dag_id: str,
        state: str,
        failed_tasks: list[str],
        not_run: list[str] | None = None,
    ) -> None:
        self.dag_id = dag_id
        self.state = state
        self.failed_tasks = failed_tasks
        self.not_run = not_run or []
        after = (
            f"; not run because of them: {', '.join(self.not_run)}"
            if self.not_run
            else ""
        )
        super().__init__(
            f"DAG run of {dag_id} ended {state}; failed tasks: "
            f"{', '.join(failed_tasks) or 'none recorded'}{after}. "
            "The task logs above give the reason."
        )


def run_dag(settings: Settings, dag_id: str, conf: dict[str, Any] | None = None) -> Any:
    """Run ``dag_id`` once with ``conf`` as its params and return the DagRun.

    Raises ``ValueError`` naming any key of ``conf`` that is not a param of the
    DAG, before the run starts, and :class:`DagRunFailed` naming the failed tasks
    when the run does not succeed.
    """
    global _prepared_home
    os.environ.setdefault("COUPONFLOW_TASK_RETRIES", "0")
    if _prepared_home != str(settings.home):
        prepare_airflow(settings)
        _prepared_home = str(settings.home)

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(DAGS_FOLDER), include_examples=False)
    if bag.import_errors:
        raise RuntimeError(f"DAG files failed to import: {bag.import_errors}")
    dag = bag.get_dag(dag_id)
    if dag is None:
        raise KeyError(f"no DAG with id {dag_id!r} in {DAGS_FOLDER}")

    unknown = sorted(set(conf or {}) - set(dag.params))
    if unknown:
        raise ValueError(
            f"{dag_id} has no params {unknown}; its params are {sorted(dag.params)}"
        )
    log.info("running DAG %s with conf %s", dag_id, conf or {})
    dag_run = dag.test(run_conf=conf or {})
    state = str(getattr(dag_run.state, "value", dag_run.state))
    if state != "success":
        states = task_states(dag_run)
        failed = [task for task, s in states.items() if s == "failed"]
        not_run = [task for task, s in states.items() if s == "upstream_failed"]
        raise DagRunFailed(dag_id, state, failed, not_run)
    log.info("DAG %s finished: %s", dag_id, state)
    return dag_run


def task_results(dag_run: Any) -> dict[str, dict[str, Any]]:
    """Return ``{task_id: {"state": ..., "result": ...}}`` of a finished DagRun.

    ``result`` is the task's return value (its XCom), None when it returned none.
    """
    results = {}
    for ti in dag_run.get_task_instances():
        state = str(getattr(ti.state, "value", ti.state))
        value = ti.xcom_pull(task_ids=ti.task_id) if state == "success" else None
        results[ti.task_id] = {"state": state, "result": value}
    return results


def task_states(dag_run: Any) -> dict[str, str]:
    """Return ``{task_id: state}`` of a finished DagRun."""
    return {
        ti.task_id: str(getattr(ti.state, "value", ti.state))
        for ti in dag_run.get_task_instances()
    }
