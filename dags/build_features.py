"""Compute per-user features with Dask, point-in-time correct, into the Feast store.

Daily snapshots of the behaviour features and of the collaborative-filtering interest
scores, each from events strictly before its time, go to the Feast offline sources;
`feast apply` registers the definitions and the latest values are materialized into
the online store.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param, dag, task
from couponflow_airflow.assets import FEATURES, LAKE
from couponflow_airflow.defaults import DEFAULT_ARGS, START_DATE, TAGS


@task
def compute_features(params: dict[str, Any] | None = None) -> dict[str, Any]:
    from couponflow import pipeline

    assert params is not None
    return pipeline.compute_features(snapshot_days=int(params["snapshot_days"]))


@task
def apply_feature_repo() -> dict[str, Any]:
    from couponflow import pipeline

    return pipeline.apply_feature_repo()


@task(outlets=[FEATURES])
def materialize_online(features: dict[str, Any]) -> dict[str, Any]:
    from couponflow import pipeline

    return pipeline.materialize_online(features["latest_as_of"])


@dag(
    schedule=[LAKE],
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=TAGS,
    doc_md=__doc__,
    params={
        "snapshot_days": Param(
            21,
            type="integer",
            minimum=1,
            description="Daily feature snapshots, ending after the last event.",
        )
    },
)
def build_features() -> None:
    features = compute_features()
    applied = apply_feature_repo()
    features >> applied
    applied >> materialize_online(features)


build_features()
