"""Train the TensorFlow profile model and the XGBoost uplift response model.

Both are logged to MLflow. The response model is registered and becomes `champion`
only if its Qini beats the current champion's on the same holdout.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param, dag, task
from couponflow_airflow.assets import FEATURES, MODELS
from couponflow_airflow.defaults import DEFAULT_ARGS, START_DATE, TAGS


@task
def train_profiles(params: dict[str, Any] | None = None) -> dict[str, Any]:
    from couponflow import pipeline

    assert params is not None
    return pipeline.train_profiles(epochs=int(params["profile_epochs"]))


@task(outlets=[MODELS])
def train_response(
    profiles: dict[str, Any], params: dict[str, Any] | None = None
) -> dict[str, Any]:
    from couponflow import pipeline

    assert params is not None
    return pipeline.train_response(seed=int(params["seed"]))


@dag(
    schedule=[FEATURES],
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=TAGS,
    doc_md=__doc__,
    params={
        "profile_epochs": Param(3, type="integer", minimum=1),
        "seed": Param(7, type="integer"),
    },
)
def train_models() -> None:
    train_response(train_profiles())


train_models()
