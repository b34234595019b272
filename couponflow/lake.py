"""Layout of raw batches and of the offline store (parquet partitioned by UTC date).

Raw batches land as ``<raw_dir>/<table>/<batch_id>.parquet``. Accepted rows go to
``<lake_dir>/<table>/date=YYYY-MM-DD/<batch_id>.parquet``, so that re-ingesting a batch
replaces its own files and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from couponflow.schemas import TABLES, TableSchema
from couponflow.settings import Settings


def raw_table_dir(settings: Settings, table: str) -> Path:
    assert settings.raw_dir is not None
    return settings.raw_dir / table


def raw_batch_path(settings: Settings, table: str, batch_id: str) -> Path:
    return raw_table_dir(settings, table) / f"{batch_id}.parquet"


def list_raw_batches(settings: Settings, table: str) -> list[Path]:
    """Return the raw batch files of ``table``, sorted by name."""
    folder = raw_table_dir(settings, table)
    return sorted(folder.glob("*.parquet")) if folder.exists() else []


def write_raw_batch(
    settings: Settings, table: str, batch_id: str, frame: pd.DataFrame
) -> Path:
    path = raw_batch_path(settings, table, batch_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


def lake_table_dir(settings: Settings, table: str) -> Path:
    assert settings.lake_dir is not None
    return settings.lake_dir / table


def write_lake_partitions(
    settings: Settings, schema: TableSchema, batch_id: str, frame: pd.DataFrame
) -> list[Path]:
    """Write accepted rows of one batch, one parquet file per UTC date partition."""
    root = lake_table_dir(settings, schema.name)
    written: list[Path] = []
    # Drop this batch's earlier files first, so that a retried batch is not doubled.
    for old in root.glob(f"date=*/{batch_id}.parquet"):
        old.unlink()
    if frame.empty:
        return written
    dates = pd.to_datetime(frame[schema.partition_ts], utc=True).dt.strftime("%Y-%m-%d")
    for date, part in frame.groupby(dates, sort=True):
        path = root / f"date={date}" / f"{batch_id}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        part.to_parquet(path, index=False)
        written.append(path)
    return written


def lake_files(settings: Settings, table: str) -> list[Path]:
    root = lake_table_dir(settings, table)
    return sorted(root.glob("date=*/*.parquet")) if root.exists() else []


def read_lake_table(settings: Settings, table: str) -> pd.DataFrame:
    """Read every accepted row of ``table`` into pandas, in the contract's dtypes."""
    schema = TABLES[table]
    files = lake_files(settings, table)
    if not files:
        return schema.empty_frame()
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    for column, dtype in schema.columns.items():
        if dtype.startswith("datetime64"):
            frame[column] = pd.to_datetime(frame[column], utc=True)
    return frame
