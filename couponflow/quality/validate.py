"""Validation of one raw batch: GX finds the failing rows, this module sorts them out.

Rows that fail any expectation become quarantine records, the others are cast to the
contract dtypes. A batch that fails as a whole raises :class:`BatchRejected`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from great_expectations.core.expectation_validation_result import (
    ExpectationSuiteValidationResult,
    ExpectationValidationResult,
)

from couponflow.quality.casting import cast_column
from couponflow.quality.expectations import key_strings
from couponflow.quality.suites import (
    BATCH_ID_PARAMETER,
    KEY_COLUMN,
    LAKE_DIR_PARAMETER,
    NOW_PARAMETER,
    cast_column_name,
    table_validation,
)
from couponflow.schemas import TableSchema

log = logging.getLogger(__name__)

RESULT_FORMAT: dict[str, Any] = {
    "result_format": "COMPLETE",
    # The pandas filter expression GX would build repeats every failing index.
    "return_unexpected_index_query": False,
}
# Final dtypes of accepted rows, from the nullable dtypes that cast_column returns.
_FINAL_DTYPES: dict[str, Any] = {"int64": "int64", "bool": "bool"}


class BatchRejected(ValueError):
    """Rejection of a whole batch that failed validation or could not be read."""

    def __init__(self, batch_id: str, reason: str) -> None:
        self.batch_id = batch_id
        self.reason = reason
        super().__init__(f"batch {batch_id!r} rejected: {reason}")


@dataclass(frozen=True)
class QuarantineRecord:
    """One failed expectation of one row, as stored in the quarantine table.

    ``row_json`` contains the row's contract columns as the batch delivered them.
    """

    batch_id: str
    table_name: str
    row_number: int
    expectation: str
    reason: str
    row_json: str
    quarantined_at: datetime


@dataclass
class ValidationResult:
    """Outcome of validating one batch.

    ``quarantine`` contains one record per failed expectation of a row, so a row
    may have several. ``rows_quarantined`` counts rows, not records.
    """

    batch_id: str
    table: str
    accepted: pd.DataFrame
    quarantine: list[QuarantineRecord]
    rows_in: int
    rows_accepted: int
    rows_quarantined: int
    summary: dict[str, Any] = field(default_factory=dict)


def validate_batch(
    frame: pd.DataFrame,
    schema: TableSchema,
    batch_id: str,
    now: datetime | None = None,
    *,
    lake_table_dir: Path | None = None,
) -> ValidationResult:
    """Validate a raw batch of ``schema``'s table with its GX suite.

    ``now`` (tz-aware, default the current UTC time) bounds the timestamps of past
    events. With ``lake_table_dir``, a key already stored there by another batch
    fails too; without it, keys are only compared within the batch. Raises
    :class:`BatchRejected` for a missing column, an empty batch, or an expectation
    that GX could not evaluate.
    """
    now = _utc_now(now)
    started = time.perf_counter()
    raw = frame.reset_index(drop=True)
    extra = [c for c in raw.columns if c not in schema.columns]
    if extra:
        # Columns outside the contract may carry personal data, so none is kept.
        log.warning(
            "batch %s of %s: dropping columns not in the contract: %s",
            batch_id,
            schema.name,
            extra,
        )
    casts = _cast_columns(raw, schema)
    checked = _validated_frame(raw, casts, schema)

    validation = table_validation(schema)
    batch = validation.batch_definition.get_batch(
        batch_parameters={"dataframe": checked}
    )
    result = batch.validate(
        validation.suite,
        result_format=RESULT_FORMAT,
        expectation_parameters={
            NOW_PARAMETER: now,
            LAKE_DIR_PARAMETER: str(lake_table_dir) if lake_table_dir else "",
            BATCH_ID_PARAMETER: batch_id,
        },
    )
    _raise_for_batch_failures(result, batch_id)

    failures = _row_failures(result, raw, now)
    quarantine = _quarantine_records(raw, schema, batch_id, failures)
    accepted = _accepted_rows(casts, schema, sorted(failures))
    log.debug(
        "validated batch %s of %s in %.2f s: %d rows, %d quarantined",
        batch_id,
        schema.name,
        time.perf_counter() - started,
        len(raw),
        len(failures),
    )
    return ValidationResult(
        batch_id=batch_id,
        table=schema.name,
        accepted=accepted,
        quarantine=quarantine,
        rows_in=len(raw),
        rows_accepted=len(accepted),
        rows_quarantined=len(failures),
        summary=_summary(result),
    )


def _utc_now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError(
            f"now must be timezone-aware, got naive {now.isoformat()}; "
            "pass for example datetime.now(UTC)"
        )
    return now.astimezone(UTC)


def _cast_columns(raw: pd.DataFrame, schema: TableSchema) -> dict[str, pd.Series]:
    return {
        column: cast_column(raw[column], dtype)
        for column, dtype in schema.columns.items()
        if column in raw.columns
    }


def _validated_frame(
    raw: pd.DataFrame, casts: dict[str, pd.Series], schema: TableSchema
) -> pd.DataFrame:
    """Build the frame GX validates: raw contract columns, their casts, the key."""
    data: dict[str, pd.Series] = {}
    for column in schema.columns:
        if column in raw.columns:
            data[column] = raw[column]
    for column, values in casts.items():
        if pd.api.types.is_integer_dtype(values.dtype):
            # GX compares numpy float columns vectorized; nullable Int64 one by one.
            values = values.astype("float64")
        data[cast_column_name(column)] = values
    if all(column in casts for column in schema.key):
        cast_frame = pd.DataFrame({c: casts[c] for c in schema.key})
        data[KEY_COLUMN] = key_strings(cast_frame, list(schema.key))
    return pd.DataFrame(data, index=raw.index)


def _raise_for_batch_failures(
    result: ExpectationSuiteValidationResult, batch_id: str
) -> None:
    for item in result.results:
        config = item.expectation_config
        if config is None or config.type != "expect_table_columns_to_match_set":
            continue
        missing = item.result.get("details", {}).get("mismatched", {}).get("missing")
        if not item.success and missing:
            raise BatchRejected(
                batch_id,
                f"missing columns {sorted(missing)}; the contract of this table needs "
                "every one of them, so fix the producer and land the batch again",
            )
    for item in result.results:
        config = item.expectation_config
        if config is None or config.type != "expect_table_row_count_to_be_between":
            continue
        if not item.success:
            raise BatchRejected(
                batch_id, "the batch has no rows; remove the file or land a full batch"
            )
    for item in result.results:
        message = _exception_message(item)
        if message is not None:
            raise BatchRejected(
                batch_id,
                f"expectation {_label(item)} could not be evaluated: {message}",
            )


def _exception_message(item: ExpectationValidationResult) -> str | None:
    info = item.exception_info or {}
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    # Some failures are reported per metric, keyed by the metric's id.
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message"))
    return None


def _label(item: ExpectationValidationResult) -> str:
    config = item.expectation_config
    assert config is not None
    columns = (config.meta or {}).get("columns") or []
    return f"{config.type}({', '.join(columns)})"


def _row_failures(
    result: ExpectationSuiteValidationResult, raw: pd.DataFrame, now: datetime
) -> dict[int, list[tuple[str, str]]]:
    """Map each failing row number to its (expectation label, reason) pairs."""
    failures: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for item in result.results:
        config = item.expectation_config
        if config is None or item.success:
            continue
        meta = config.meta or {}
        if meta.get("scope") != "row":
            continue
        label = _label(item)
        rule = str(meta["rule"]).format(now=now.isoformat())
        columns = list(meta["columns"])
        for row_number in item.result.get("unexpected_index_list") or []:
            values = ", ".join(
                f"{c}={_display(raw.at[row_number, c])}" for c in columns
            )
            failures[int(row_number)].append((label, f"{values}: {rule}"))
    return dict(failures)


def _display(value: Any) -> str:
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return "missing"
    if isinstance(value, pd.Timestamp | datetime):
        return value.isoformat()
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)


def _quarantine_records(
    raw: pd.DataFrame,
    schema: TableSchema,
    batch_id: str,
    failures: dict[int, list[tuple[str, str]]],
) -> list[QuarantineRecord]:
    if not failures:
        return []
    rows = sorted(failures)
    columns = [c for c in schema.columns if c in raw.columns]
    as_json = raw.loc[rows, columns].to_json(
        orient="records", date_format="iso", default_handler=str
    )
    quarantined_at = datetime.now(UTC)
    records: list[QuarantineRecord] = []
    for row_number, row in zip(rows, json.loads(as_json), strict=True):
        row_json = json.dumps(row, sort_keys=True)
        for label, reason in failures[row_number]:
            records.append(
                QuarantineRecord(
                    batch_id=batch_id,
                    table_name=schema.name,
                    row_number=row_number,
                    expectation=label,
                    reason=reason,
                    row_json=row_json,
                    quarantined_at=quarantined_at,
                )
            )
    return records


def _accepted_rows(
    casts: dict[str, pd.Series], schema: TableSchema, failed_rows: list[int]
) -> pd.DataFrame:
    frame = pd.DataFrame({c: casts[c] for c in schema.columns})
    frame = frame.drop(index=failed_rows).reset_index(drop=True)
    for column, dtype in schema.columns.items():
        final = _FINAL_DTYPES.get(dtype)
        if final is not None:
            frame[column] = frame[column].astype(final)
    return frame


def _summary(result: ExpectationSuiteValidationResult) -> dict[str, Any]:
    return {
        "success": bool(result.success),
        "statistics": dict(result.statistics),
        "expectations": [
            {
                "expectation": _label(item),
                "success": bool(item.success),
                "unexpected_count": item.result.get("unexpected_count"),
            }
            for item in result.results
        ],
    }
