"""The Feast store of couponflow: configuration, `feast apply`, materialization, reads.

The definitions live in feature_repo/definitions.py; the store's configuration is
written from the settings to ``<home>/feast/feature_store.yaml``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
import yaml
from feast import FeatureService, FeatureStore, Project
from feast.feature_view import DUMMY_ENTITY
from feast.repo_contents import RepoContents
from feast.repo_operations import apply_total_with_repo_instance
from feast.types import FeastType, Float64, Int64, String

from couponflow.features import INTEREST_FEATURE_COLUMNS
from couponflow.settings import REPO_ROOT, Settings

log = logging.getLogger(__name__)

FEATURE_REPO = REPO_ROOT / "feature_repo"
PROJECT = "couponflow"
FEATURE_SERVICE = "response_model_v1"
ENTITY_COLUMNS = ("user_id", "event_timestamp")
# Serialization of entity keys in the online store; Feast 0.67 defaults to 3 and
# warns on anything lower.
ENTITY_KEY_SERIALIZATION_VERSION = 3
# Columns and pandas dtypes of user_profiles.parquet, the source of `user_profile`.
PROFILE_COLUMNS: dict[str, str] = {
    "user_id": "string",
    "event_timestamp": "datetime64[ns, UTC]",
    "created_timestamp": "datetime64[ns, UTC]",
    "purchasing_power": "float64",
    "segment": "int64",
    "interest_tags": "string",
}

# Nullable pandas dtypes of the Feast types the feature views use, so that a missing
# feature is null and integer cents stay integers.
_PANDAS_DTYPES: dict[FeastType, str] = {
    Int64: "Int64",
    Float64: "float64",
    String: "string",
}

# Stores opened by get_store, by (yaml path, yaml text), and the loaded definitions
# module, both shared by the threads of a process.
_stores: dict[tuple[str, str], FeatureStore] = {}
_loaded_modules: dict[str, ModuleType] = {}
_cache_lock = threading.Lock()


def get_store(settings: Settings, project: str = PROJECT) -> FeatureStore:
    """Write ``<home>/feast/feature_store.yaml`` for ``settings`` and open its store.

    The store's repository is feature_repo/. A store opened earlier in this process
    from the same configuration is returned again, because opening one connects
    to the registry.
    """
    config = store_config(settings, project)
    text = yaml.safe_dump(config, sort_keys=False)
    path = settings.home / "feast" / "feature_store.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        _write_atomically(path, text.encode())

    key = (str(path), text)
    with _cache_lock:
        store = _stores.get(key)
        if store is None:
            store = FeatureStore(repo_path=str(FEATURE_REPO), fs_yaml_file=path)
            _stores[key] = store
    return store


def store_config(settings: Settings, project: str = PROJECT) -> dict[str, Any]:
    """Return the feature_store.yaml content for ``settings`` as a dict."""
    return {
        "project": project,
        "provider": "local",
        "registry": _registry_config(settings.feast_registry),
        "online_store": _online_store_config(settings),
        "offline_store": {"type": "file"},
        "entity_key_serialization_version": ENTITY_KEY_SERIALIZATION_VERSION,
    }


def apply_definitions(settings: Settings, project: str = PROJECT) -> None:
    """Register the definitions of feature_repo/ and create their online tables.

    Does what `feast apply` does: objects of ``project`` that the repository no
    longer defines are deleted. Writes an empty user_profiles.parquet and
    user_interest.parquet first when they do not exist, so that their views can be
    registered before the pipelines that fill them have run.
    """
    started = time.perf_counter()
    ensure_optional_sources(settings)
    store = get_store(settings, project)
    definitions = load_definitions(settings)
    contents = RepoContents(
        projects=[Project(name=project)],
        data_sources=[
            definitions.user_features_source,
            definitions.user_profile_source,
            definitions.user_interest_source,
        ],
        feature_views=[
            definitions.user_features,
            definitions.user_profile,
            definitions.user_interest,
        ],
        on_demand_feature_views=[],
        stream_feature_views=[],
        label_views=[],
        entities=[definitions.user, DUMMY_ENTITY],
        feature_services=[definitions.response_model_v1],
        permissions=[],
    )
    output = io.StringIO()
    # Feast reports the registry and infrastructure changes on standard output.
    with contextlib.redirect_stdout(output):
        apply_total_with_repo_instance(
            store, project, store.registry, contents, skip_source_validation=False
        )
    for line in output.getvalue().splitlines():
        if line.strip():
            log.info("feast apply: %s", line.strip())
    log.info(
        "applied Feast definitions of project %s in %.1f s",
        project,
        time.perf_counter() - started,
    )


def materialize(settings: Settings, end: datetime, project: str = PROJECT) -> None:
    """Load each user's latest feature rows up to ``end`` into the online store.

    Reads, per feature view, the rows with ``end - ttl <= event_timestamp <= end``,
    so a backfill with a past ``end`` works as well as a daily run. Users whose
    latest row is older keep what the online store holds. Raises ``ValueError``
    for a timezone-naive ``end`` and ``FileNotFoundError`` when the user feature
    table has not been written yet.
    """
    end_utc = _aware_utc(end, "end")
    _require_features_file(settings)
    ensure_optional_sources(settings)
    store = get_store(settings, project)
    started = time.perf_counter()
    for view in store.list_feature_views():
        assert view.ttl is not None
        output = io.StringIO()
        # Feast prints progress bars and a summary on standard output.
        with contextlib.redirect_stdout(output):
            store.materialize(
                start_date=end_utc - view.ttl,
                end_date=end_utc,
                feature_views=[view.name],
            )
        log.info(
            "materialized %s from %s to %s",
            view.name,
            (end_utc - view.ttl).isoformat(),
            end_utc.isoformat(),
        )
    log.info(
        "materialized project %s up to %s in %.1f s",
        project,
        end_utc.isoformat(),
        time.perf_counter() - started,
    )


def training_frame(
    settings: Settings, entity_df: pd.DataFrame, project: str = PROJECT
) -> pd.DataFrame:
    """Join the response model's features point-in-time onto ``entity_df``.

    ``entity_df`` has ``user_id``, a tz-aware ``event_timestamp`` and any other
    columns (labels, treatment). Returns one row per entity row, in the same order
    and with the same index, the other columns kept, and null features of a view
    where the user has no row of it within the view's ttl before the timestamp.
    """
    entities = _checked_entity_df(entity_df)
    _require_features_file(settings)
    ensure_optional_sources(settings)
    store = get_store(settings, project)
    service = store.get_feature_service(FEATURE_SERVICE)
    feature_dtypes = _feature_dtypes(service)
    clashes = sorted(set(feature_dtypes) & set(entities.columns))
    if clashes:
        raise ValueError(
            f"entity_df columns {clashes} have the names of features of "
            f"{FEATURE_SERVICE}; rename them before calling training_frame"
        )

    started = time.perf_counter()
    # The Dask offline store of Feast 0.67 keeps one row per (user_id,
    # event_timestamp). It also drops an entity row when none of the user's rows of
    # some view lies within that view's ttl before the timestamp. So distinct pairs
    # are sent, one view at a time, and joined back onto every entity row.
    keys = entities[list(ENTITY_COLUMNS)].drop_duplicates(ignore_index=True)
    row_column = f"__row_{uuid.uuid4().hex}"
    joined = entities.assign(**{row_column: range(len(entities))})
    for projection in service.feature_view_projections:
        references = [
            f"{projection.name_to_use()}:{f.name}" for f in projection.features
        ]
        retrieved = store.get_historical_features(
            entity_df=keys, features=references
        ).to_df()
        view_frame = _checked_view_frame(retrieved, projection.name_to_use(), keys)
        names = [feature.name for feature in projection.features]
        joined = joined.merge(
            view_frame[[*ENTITY_COLUMNS, *names]],
            on=list(ENTITY_COLUMNS),
            how="left",
            validate="many_to_one",
        )

    joined = joined.sort_values(row_column).drop(columns=row_column)
    if len(joined) != len(entity_df):
        raise RuntimeError(
            f"training frame has {len(joined)} rows for {len(entity_df)} entity rows"
        )
    joined = joined.astype(feature_dtypes)
    joined.index = entity_df.index
    log.info(
        "retrieved %d training rows (%d distinct user/time pairs) in %.1f s",
        len(joined),
        len(keys),
        time.perf_counter() - started,
    )
    return joined


def online_features(
    settings: Settings, user_ids: list[str], project: str = PROJECT
) -> pd.DataFrame:
    """Read the response model's features of ``user_ids`` from the online store.

    Returns one row per requested id, in request order, with ``user_id`` and the
    service's features in the service's order. A user the online store does not
    contain gets null features. Integer features come back as nullable ``Int64``.
    """
    store = get_store(settings, project)
    service = store.get_feature_service(FEATURE_SERVICE)
    dtypes = {"user_id": "string", **_feature_dtypes(service)}
    if not user_ids:
        empty = {name: pd.Series(dtype=dtype) for name, dtype in dtypes.items()}
        return pd.DataFrame(empty)
    rows = [{"user_id": str(user_id)} for user_id in user_ids]
    frame = store.get_online_features(features=service, entity_rows=rows).to_df()
    return frame[list(dtypes)].astype(dtypes)


def ensure_optional_sources(settings: Settings) -> None:
    """Write an empty profile and interest table for each that does not exist yet.

    A view whose table is empty returns null features, so training and serving work
    before the profile model or the interest scores have been computed.
    """
    ensure_profile_source(settings)
    ensure_interest_source(settings)


def ensure_profile_source(settings: Settings) -> Path:
    """Write an empty user_profiles.parquet with the profile schema, unless one exists.

    Never replaces an existing file, even one written concurrently by the profile
    pipeline: the empty table is linked into place only if the name is free.
    """
    definitions = load_definitions(settings)
    return _ensure_empty_table(
        Path(definitions.user_profile_source.path), PROFILE_COLUMNS
    )


def ensure_interest_source(settings: Settings) -> Path:
    """Write an empty user_interest.parquet with the interest schema, unless one exists.

    Never replaces an existing file, as :func:`ensure_profile_source`.
    """
    definitions = load_definitions(settings)
    return _ensure_empty_table(
        Path(definitions.user_interest_source.path), INTEREST_FEATURE_COLUMNS
    )


def load_definitions(settings: Settings) -> Any:
    """Return feature_repo/definitions.py's objects built for ``settings``."""
    return _definitions_module().build_definitions(settings)


def _definitions_module() -> ModuleType:
    # Loaded from its file: feature_repo/ is a Feast repository, not a package.
    name = "couponflow_feature_repo_definitions"
    with _cache_lock:
        module = _loaded_modules.get(name)
        if module is None:
            path = FEATURE_REPO / "definitions.py"
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load the Feast definitions from {path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _loaded_modules[name] = module
    return module


def _feature_dtypes(service: FeatureService) -> dict[str, str]:
    """Return the service's feature names, in order, with nullable pandas dtypes."""
    dtypes: dict[str, str] = {}
    for projection in service.feature_view_projections:
        for feature in projection.features:
            if feature.dtype not in _PANDAS_DTYPES:
                raise TypeError(
                    f"feature {projection.name}.{feature.name} has Feast type "
                    f"{feature.dtype}, which couponflow.feature_store cannot convert; "
                    "add it to _PANDAS_DTYPES"
                )
            dtypes[feature.name] = _PANDAS_DTYPES[feature.dtype]
    return dtypes


def _registry_config(registry: str) -> dict[str, Any]:
    """Return the registry section: a SQL registry on SQLite or PostgreSQL."""
    if registry.startswith(("postgresql", "sqlite:")):
        url = registry
    elif "://" in registry:
        raise ValueError(
            f"unsupported Feast registry {registry!r}: set COUPONFLOW_FEAST_REGISTRY "
            "to a file path (SQLite), a sqlite:/// URL or a postgresql+psycopg:// URL"
        )
    else:
        path = Path(registry).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
    # A short cache, so that a long-lived reader such as the serving API picks up a
    # `feast apply` of another process within a minute.
    return {"registry_type": "sql", "path": url, "cache_ttl_seconds": 60}


def _online_store_config(settings: Settings) -> dict[str, Any]:
    kind = settings.feast_online_store
    if kind == "sqlite":
        settings.feast_online_path.parent.mkdir(parents=True, exist_ok=True)
        return {"type": "sqlite", "path": str(settings.feast_online_path.resolve())}
    if kind == "redis":
        if "://" in settings.feast_redis_url:
            raise ValueError(
                f"invalid COUPONFLOW_FEAST_REDIS_URL {settings.feast_redis_url!r}: "
                "Feast expects host:port with optional ,key=value options, for "
                "example 127.0.0.1:6379,db=0"
            )
        return {"type": "redis", "connection_string": settings.feast_redis_url}
    raise ValueError(
        f"invalid COUPONFLOW_FEAST_ONLINE_STORE {kind!r}: use 'sqlite' or 'redis'"
    )


def _ensure_empty_table(path: Path, columns: dict[str, str]) -> Path:
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    empty = pd.DataFrame(
        {name: pd.Series(dtype=dtype) for name, dtype in columns.items()}
    )
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        empty.to_parquet(temporary, index=False)
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
            log.info("wrote an empty table to %s", path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _require_features_file(settings: Settings) -> None:
    path = Path(load_definitions(settings).user_features_source.path)
    if not path.exists():
        raise FileNotFoundError(
            f"user feature table {path} not found: compute it with "
            "couponflow.features.compute_user_features and write_user_features first"
        )


def _checked_entity_df(entity_df: pd.DataFrame) -> pd.DataFrame:
    missing = [column for column in ENTITY_COLUMNS if column not in entity_df.columns]
    if missing:
        raise ValueError(
            f"entity_df is missing columns {missing}; it needs user_id and a "
            "tz-aware event_timestamp"
        )
    if entity_df["user_id"].isna().any() or entity_df["event_timestamp"].isna().any():
        raise ValueError(
            "entity_df has null user_id or event_timestamp values; drop those rows"
        )
    timestamps = pd.to_datetime(entity_df["event_timestamp"])
    if getattr(timestamps.dtype, "tz", None) is None:
        raise ValueError(
            "entity_df.event_timestamp is timezone-naive; localize it to UTC, for "
            "example with .dt.tz_localize('UTC')"
        )
    out = entity_df.reset_index(drop=True)
    out["user_id"] = out["user_id"].astype("string")
    out["event_timestamp"] = _utc_nanoseconds(timestamps.reset_index(drop=True))
    return out


def _checked_view_frame(
    retrieved: pd.DataFrame, view: str, keys: pd.DataFrame
) -> pd.DataFrame:
    """Return one view's retrieved rows, after checking they are keyed like ``keys``."""
    frame = retrieved.copy()
    frame["user_id"] = frame["user_id"].astype("string")
    frame["event_timestamp"] = _utc_nanoseconds(frame["event_timestamp"])
    duplicated = int(frame.duplicated(list(ENTITY_COLUMNS)).sum())
    matched = frame[list(ENTITY_COLUMNS)].merge(keys, how="left", indicator=True)
    unknown = int((matched["_merge"] == "left_only").sum())
    if duplicated or unknown:
        raise RuntimeError(
            f"Feast returned {duplicated} repeated and {unknown} unrequested "
            f"(user_id, event_timestamp) pairs for view {view}; expected at most "
            "one row per requested pair"
        )
    missing = len(keys) - len(frame)
    if missing:
        log.info("%d of %d pairs have no %s row in the ttl", missing, len(keys), view)
    return frame


def _utc_nanoseconds(values: pd.Series) -> pd.Series:
    return pd.to_datetime(values, utc=True).dt.as_unit("ns")


def _aware_utc(value: datetime, name: str) -> datetime:
    if value.tzinfo is None:
        raise ValueError(
            f"{name} = {value!r} is timezone-naive; pass an aware UTC datetime"
        )
    return pd.Timestamp(value).tz_convert("UTC").to_pydatetime()
