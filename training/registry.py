"""MLflow logging and registration of the response model, with champion promotion.

A new version gets the "champion" alias only when it passes the promotion gate of
training.gate against the current champion, re-scored on the same holdout frame.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import mlflow.xgboost
import numpy as np
import pandas as pd
import xgboost as xgb
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from couponflow.settings import Settings
from training.gate import (
    DEFAULT_ESTIMATOR,
    Estimator,
    decide_promotion,
    log_promotion_decision,
)
from training.response import ResponseModel, metric_key

log = logging.getLogger(__name__)

RESPONSE_EXPERIMENT = "couponflow-response"
CHAMPION_ALIAS = "champion"
RESPONSE_ARTIFACT_NAME = "response_model"
# Key of the MLmodel metadata entry that stores ResponseModel.to_spec().
SPEC_METADATA_KEY = "couponflow_response_spec"
_INPUT_EXAMPLE_ROWS = 5


class ChampionNotFoundError(LookupError):
    """No version of the response model carries the champion alias."""


@dataclass(frozen=True)
class RegistrationResult:
    """Outcome of one log_and_register call."""

    run_id: str
    model_uri: str
    version: int
    promoted: bool
    challenger_qini: float
    # None when there was no champion before this call.
    champion_qini: float | None
    previous_champion_version: int | None
    # The promotion gate's reason for the decision, one sentence.
    promotion_reason: str = ""


def log_and_register(
    model: ResponseModel,
    metrics: Mapping[str, float],
    settings: Settings,
    holdout_frame: pd.DataFrame,
    coupons: pd.DataFrame,
    *,
    gate_estimator: Estimator = DEFAULT_ESTIMATOR,
) -> RegistrationResult:
    """Log the model to MLflow, register a version, and promote it if it wins.

    ``metrics`` are logged as they are. The promotion decision
    (:func:`training.gate.decide_promotion`) re-scores both the new model and the
    current champion on ``holdout_frame``, which must contain the logged ``arm`` and
    ``propensity``, with ``coupons`` and ``settings.margin_rate``. It moves the
    champion alias only when the new model's greedy policy has a higher off-policy
    profit (``gate_estimator``: "dr" or "snips") and its Qini is not lower. Both
    Qini values, the gate's estimates and the decision are logged on the run.
    """
    name = settings.response_model_name
    with mlflow_tracking(settings) as client:
        experiment_id = ensure_experiment(client, RESPONSE_EXPERIMENT, settings)
        champion = _find_champion(client, name)
        champion_model = (
            _load_champion_version(champion) if champion is not None else None
        )
        # --- promotion gate (training.gate) ---
        decision = decide_promotion(
            model,
            champion_model,
            holdout_frame,
            coupons,
            margin_rate=settings.margin_rate,
            estimator=gate_estimator,
        )
        challenger_qini = decision.challenger_qini
        champion_qini = decision.champion_qini
        promoted = decision.promoted

        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.log_params(_run_params(model))
            mlflow.log_metrics({metric_key(k): float(v) for k, v in metrics.items()})
            mlflow.log_dict(model.to_spec(), "response_spec.json")
            model_uri = _log_booster(model, holdout_frame, coupons)
            registered = mlflow.register_model(
                model_uri, name, tags={"holdout_qini": f"{challenger_qini:.6g}"}
            )
            version = int(registered.version)
            if promoted:
                client.set_registered_model_alias(name, CHAMPION_ALIAS, str(version))

            comparison = {"challenger_holdout_qini": challenger_qini}
            if champion_qini is not None:
                comparison["champion_holdout_qini"] = champion_qini
            mlflow.log_metrics(comparison)
            log_promotion_decision(decision)
            mlflow.set_tags(
                {
                    "champion_decision": "promoted" if promoted else "kept_champion",
                    "previous_champion_version": (
                        champion.version if champion is not None else "none"
                    ),
                    "registered_version": str(version),
                    **_holdout_tags(holdout_frame),
                }
            )

    log.info(
        "registered %s version %d (holdout qini %.5f, champion qini %s): %s",
        name,
        version,
        challenger_qini,
        "none" if champion_qini is None else f"{champion_qini:.5f}",
        "promoted to champion" if promoted else "champion kept",
    )
    return RegistrationResult(
        run_id=run.info.run_id,
        model_uri=model_uri,
        version=version,
        promoted=promoted,
        challenger_qini=challenger_qini,
        champion_qini=champion_qini,
        previous_champion_version=int(champion.version) if champion else None,
        promotion_reason=decision.reason,
    )


def load_champion(settings: Settings) -> ResponseModel:
    """Load the response model version that carries the champion alias.

    Raises ChampionNotFoundError when the registered model or its alias is missing.
    """
    name = settings.response_model_name
    with mlflow_tracking(settings) as client:
        champion = _find_champion(client, name)
        if champion is None:
            raise ChampionNotFoundError(
                f"no version of registered model {name!r} has the alias "
                f"{CHAMPION_ALIAS!r} in {settings.mlflow_tracking_uri}; train the "
                "response model and register it with "
                "training.registry.log_and_register first"
            )
        return _load_champion_version(champion)


def load_response_model(model_uri: str) -> ResponseModel:
    """Rebuild a ResponseModel from a logged or registered model URI.

    ``model_uri`` is stored on the result; load_champion passes the version URI
    (models:/<name>/<version>). Reads the tracking and registry URIs that are set, so
    call it inside :func:`mlflow_tracking`.
    """
    booster = mlflow.xgboost.load_model(model_uri)
    if not isinstance(booster, xgb.Booster):
        raise TypeError(
            f"{model_uri} loads as a {type(booster).__name__}, expected an xgboost "
            "Booster logged by log_and_register"
        )
    metadata = mlflow.models.get_model_info(model_uri).metadata or {}
    if SPEC_METADATA_KEY not in metadata:
        raise ValueError(
            f"{model_uri} has no {SPEC_METADATA_KEY!r} entry in its MLmodel metadata, "
            "so its feature encoding is unknown; register it with log_and_register"
        )
    model = ResponseModel.from_spec(booster, metadata[SPEC_METADATA_KEY])
    model.model_uri = model_uri
    return model


@contextmanager
def mlflow_tracking(settings: Settings) -> Iterator[MlflowClient]:
    """Point MLflow's tracking and registry at ``settings`` while the block runs.

    MLflow keeps these URIs in process-wide state, so the previous values are
    restored on exit. NOTE: two threads that use different settings at the same time
    would see each other's URIs.
    """
    uri = settings.mlflow_tracking_uri
    _create_local_parent(uri)
    previous_tracking = mlflow.get_tracking_uri()
    previous_registry = mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        mlflow.set_tracking_uri(previous_tracking)
        mlflow.set_registry_uri(previous_registry)


def ensure_experiment(client: MlflowClient, name: str, settings: Settings) -> str:
    """Return the id of experiment ``name``, creating it under the artifact root."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = experiment_artifact_location(settings, name)
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as error:
            # Another process may have created it between the lookup and the create.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise error
    if experiment.lifecycle_stage != "active":
        raise RuntimeError(
            f"MLflow experiment {name!r} is deleted; restore it with "
            f"MlflowClient().restore_experiment({experiment.experiment_id!r}) or "
            "remove it permanently before training again"
        )
    return str(experiment.experiment_id)


def experiment_artifact_location(settings: Settings, experiment: str) -> str:
    """Return the artifact URI of ``experiment``, a folder under the artifact root."""
    root = settings.mlflow_artifact_root
    if "://" in root:
        return f"{root.rstrip('/')}/{experiment}"
    folder = Path(root).expanduser().resolve() / experiment
    folder.mkdir(parents=True, exist_ok=True)
    return folder.as_uri()


def _log_booster(
    model: ResponseModel, holdout_frame: pd.DataFrame, coupons: pd.DataFrame
) -> str:
    # The input example pairs a few holdout users with the arm each of them got.
    frame = holdout_frame.head(_INPUT_EXAMPLE_ROWS)
    example = model.assigned_design_matrix(frame, coupons)
    predictions = model.booster.predict(
        xgb.DMatrix(example.to_numpy(dtype=np.float64), feature_names=list(example))
    )
    info = mlflow.xgboost.log_model(
        model.booster,
        name=RESPONSE_ARTIFACT_NAME,
        signature=infer_signature(example, predictions),
        input_example=example,
        metadata={SPEC_METADATA_KEY: model.to_spec()},
        model_format="json",
        # Listing the requirements skips MLflow's inference, which reloads the model
        # in a subprocess and costs several seconds.
        pip_requirements=[f"xgboost=={xgb.__version__}", f"pandas=={pd.__version__}"],
    )
    return str(info.model_uri)


def _find_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        registered = client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = registered.aliases.get(CHAMPION_ALIAS)
    if version is None:
        return None
    return client.get_model_version(name, str(version))


def _load_champion_version(champion: ModelVersion) -> ResponseModel:
    uri = f"models:/{champion.name}/{champion.version}"
    try:
        return load_response_model(uri)
    except (MlflowException, OSError, ValueError, TypeError) as error:
        raise RuntimeError(
            f"failed to load the current champion {uri}: {error}. Fix its artifacts, "
            f"or remove the alias with MlflowClient().delete_registered_model_alias("
            f"{champion.name!r}, {CHAMPION_ALIAS!r}) so that the next version becomes "
            "champion"
        ) from error


def _run_params(model: ResponseModel) -> dict[str, Any]:
    params: dict[str, Any] = {f"xgb_{k}": v for k, v in model.params.items()}
    params["num_boost_round"] = model.num_boost_round
    params["n_features"] = len(model.feature_names)
    params["trained_arms"] = ",".join(model.trained_arms)
    return params


def _holdout_tags(holdout_frame: pd.DataFrame) -> dict[str, str]:
    # A fingerprint of the holdout users, so that two runs can be checked to have
    # been compared on the same holdout.
    ids = sorted(holdout_frame["user_id"].astype(str).unique())
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()
    return {"holdout_users_sha256": digest, "holdout_rows": str(len(holdout_frame))}


def _create_local_parent(tracking_uri: str) -> None:
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
    elif urlparse(tracking_uri).scheme in ("", "file"):
        Path(urlparse(tracking_uri).path).mkdir(parents=True, exist_ok=True)
