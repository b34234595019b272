"""Ingestion of raw batches into the offline store, with quarantine and a ledger.

Each batch is validated by its table's Great Expectations suite. Accepted rows go to
the lake's date partitions, and failed rows to the campaign store's quarantine table.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from couponflow import lake, store
from couponflow.quality import BatchRejected, ValidationResult, validate_batch
from couponflow.schemas import TABLES, TableSchema
from couponflow.settings import Settings

log = logging.getLogger(__name__)

# Later tables refer to ids of earlier ones.
INGEST_ORDER: tuple[str, ...] = ("users", "coupons", "events", "exposures", "outcomes")

__all__ = [
    "INGEST_ORDER",
    "BatchRejected",
    "IngestReport",
    "file_sha256",
    "ingest_batch",
    "ingest_pending",
]


@dataclass(frozen=True)
class IngestReport:
    """Counts of one batch; ``skipped`` when an identical file was already ingested."""

    batch_id: str
    table: str
    rows_in: int
    rows_accepted: int
    rows_quarantined: int
    skipped: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ingest_batch(
    settings: Settings, table: str, path: Path, now: datetime | None = None
) -> IngestReport:
    """Validate the raw batch at ``path`` and store its accepted and quarantined rows.

    The batch id is the file name without ``.parquet``. A file whose sha256 matches
    the ledger is skipped. A changed file replaces the batch's earlier lake files,
    then its quarantine rows and ledger row in one transaction. Raises
    :class:`BatchRejected`, having written nothing, when the file cannot be read or
    the batch fails as a whole.
    """
    schema = _schema(table)
    batch_id = path.stem
    # The SQLite campaign store lives under home, which must exist before connecting.
    settings.ensure_dirs()
    engine = store.get_engine(settings.campaign_db_url)
    try:
        sha256 = file_sha256(path)
    except OSError as error:
        raise BatchRejected(batch_id, f"cannot read {path}: {error}") from error

    previous = _ledger_row(engine, batch_id)
    if previous is not None and previous["table_name"] != table:
        raise ValueError(
            f"batch id {batch_id!r} of table {table!r} is already in the ingest ledger "
            f"for table {previous['table_name']!r}; batch ids must be unique across "
            "tables, so rename the file (for example with the table as a prefix)"
        )
    if previous is not None and previous["sha256"] == sha256:
        log.info(
            "skipped batch %s of %s: already ingested, same sha256", batch_id, table
        )
        return IngestReport(
            batch_id=batch_id,
            table=table,
            rows_in=previous["rows_in"],
            rows_accepted=previous["rows_accepted"],
            rows_quarantined=previous["rows_quarantined"],
            skipped=True,
        )

    frame = _read_batch(path, batch_id)
    result = validate_batch(
        frame,
        schema,
        batch_id,
        now,
        lake_table_dir=lake.lake_table_dir(settings, table),
    )
    # Lake files first: if the transaction below fails, the ledger still lacks this
    # sha256 and a retry writes the same files again instead of doubling them.
    lake.write_lake_partitions(settings, schema, batch_id, result.accepted)
    with engine.begin() as connection:
        _replace_quarantine(connection, result)
        _replace_ledger_row(connection, result, sha256)

    if previous is not None:
        log.info("re-ingested changed batch %s of %s", batch_id, table)
    log.info(
        "ingested batch %s of %s: %d rows in, %d accepted, %d quarantined",
        batch_id,
        table,
        result.rows_in,
        result.rows_accepted,
        result.rows_quarantined,
    )
    return IngestReport(
        batch_id=batch_id,
        table=table,
        rows_in=result.rows_in,
        rows_accepted=result.rows_accepted,
        rows_quarantined=result.rows_quarantined,
        skipped=False,
    )


def ingest_pending(
    settings: Settings,
    tables: Iterable[str] | None = None,
    now: datetime | None = None,
) -> list[IngestReport]:
    """Ingest every raw batch of ``tables`` (default all), in :data:`INGEST_ORDER`.

    Batches of a table go in file-name order. The first :class:`BatchRejected`
    stops the run and propagates, so that nothing downstream runs on partial input.
    """
    requested = INGEST_ORDER if tables is None else tuple(tables)
    unknown = sorted(set(requested) - set(INGEST_ORDER))
    if unknown:
        raise ValueError(
            f"unknown tables {unknown}; choose from {', '.join(INGEST_ORDER)}"
        )
    reports: list[IngestReport] = []
    for table in INGEST_ORDER:
        if table not in requested:
            continue
        for path in lake.list_raw_batches(settings, table):
            reports.append(ingest_batch(settings, table, path, now))
    ingested = [r for r in reports if not r.skipped]
    log.info(
        "ingestion run: %d batches ingested, %d skipped; %d rows accepted, "
        "%d quarantined",
        len(ingested),
        len(reports) - len(ingested),
        sum(r.rows_accepted for r in ingested),
        sum(r.rows_quarantined for r in ingested),
    )
    return reports


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _schema(table: str) -> TableSchema:
    try:
        return TABLES[table]
    except KeyError:
        raise ValueError(
            f"unknown table {table!r}; choose from {', '.join(INGEST_ORDER)}"
        ) from None


def _read_batch(path: Path, batch_id: str) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as error:
        raise BatchRejected(
            batch_id, f"cannot read {path} as parquet: {error}"
        ) from error


def _ledger_row(engine: Engine, batch_id: str) -> dict[str, Any] | None:
    ledger = store.ingest_ledger
    with engine.connect() as connection:
        row = (
            connection.execute(sa.select(ledger).where(ledger.c.batch_id == batch_id))
            .mappings()
            .first()
        )
    return dict(row) if row is not None else None


def _replace_quarantine(connection: Connection, result: ValidationResult) -> None:
    quarantine = store.quarantine
    connection.execute(
        sa.delete(quarantine).where(
            quarantine.c.batch_id == result.batch_id,
            quarantine.c.table_name == result.table,
        )
    )
    if result.quarantine:
        connection.execute(
            sa.insert(quarantine), [asdict(record) for record in result.quarantine]
        )


def _replace_ledger_row(
    connection: Connection, result: ValidationResult, sha256: str
) -> None:
    ledger = store.ingest_ledger
    connection.execute(sa.delete(ledger).where(ledger.c.batch_id == result.batch_id))
    connection.execute(
        sa.insert(ledger).values(
            batch_id=result.batch_id,
            table_name=result.table,
            sha256=sha256,
            rows_in=result.rows_in,
            rows_accepted=result.rows_accepted,
            rows_quarantined=result.rows_quarantined,
            ingested_at=datetime.now(UTC),
        )
    )
