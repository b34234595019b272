"""Custom Great Expectations map expectations used by the ingestion suites.

Each is a real GX column map expectation backed by a pandas metric, so that GX reports
the failing rows in ``unexpected_index_list`` like for its built-in expectations.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from great_expectations.core.suite_parameters import SuiteParameterDict
from great_expectations.execution_engine import PandasExecutionEngine
from great_expectations.expectations.expectation import ColumnMapExpectation
from great_expectations.expectations.metrics.map_metric_provider import (
    ColumnMapMetricProvider,
    column_condition_partial,
)

from couponflow.quality.casting import cast_column

log = logging.getLogger(__name__)

# Joins the parts of a compound table key into one string. NOTE: two keys collide
# only if an id contains this ASCII unit separator, which no check rejects.
KEY_SEPARATOR = "\x1f"


def key_strings(frame: pd.DataFrame, key_columns: list[str]) -> pd.Series:
    """Return one string per row that identifies its table key; NA if a part is NA."""
    parts = [frame[c].astype("string") for c in key_columns]
    joined = parts[0]
    for part in parts[1:]:
        # Missing parts propagate, so a key with a missing part is missing as a whole.
        joined = joined + KEY_SEPARATOR + part
    return joined


class ColumnValuesCastableToDtype(ColumnMapMetricProvider):
    """Map metric: true where the value casts to the contract dtype without loss."""

    condition_metric_name = "column_values.castable_to_dtype"
    condition_value_keys = ("dtype",)

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column: pd.Series, dtype: str, **kwargs: Any) -> pd.Series:
        return cast_column(column, dtype).notna()


class ExpectColumnValuesToBeCastableToDtype(ColumnMapExpectation):
    """Expect each non-null value to be castable to a couponflow contract dtype."""

    dtype: str

    map_metric = "column_values.castable_to_dtype"
    success_keys = ("dtype", "mostly")
    args_keys = ("column", "dtype")


class ColumnValuesFirstOccurrence(ColumnMapMetricProvider):
    """Map metric: true where no earlier row of the batch has the same value."""

    condition_metric_name = "column_values.first_occurrence"

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column: pd.Series, **kwargs: Any) -> pd.Series:
        return ~column.duplicated(keep="first")


class ExpectColumnValuesToBeFirstOccurrence(ColumnMapExpectation):
    """Expect each value not to repeat a value of an earlier row.

    Unlike ``expect_column_values_to_be_unique``, the first row of a repeated value
    passes, so that a row delivered twice keeps one copy.
    """

    map_metric = "column_values.first_occurrence"
    success_keys = ("mostly",)


class ColumnValuesAbsentFromLake(ColumnMapMetricProvider):
    """Map metric: true where no offline-store file of another batch has the key."""

    condition_metric_name = "column_values.absent_from_lake"
    condition_value_keys = ("table_dir", "key_columns", "exclude_batch_id")

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(
        cls,
        column: pd.Series,
        table_dir: str,
        key_columns: list[str],
        exclude_batch_id: str,
        **kwargs: Any,
    ) -> pd.Series:
        batch_keys = pd.Index(column.unique())
        seen = _keys_in_lake(table_dir, key_columns, exclude_batch_id, batch_keys)
        return ~column.isin(seen)


class ExpectColumnValuesToBeAbsentFromLake(ColumnMapExpectation):
    """Expect each key not to have been accepted already from another batch.

    ``table_dir`` is the table's folder in the offline store (empty: no check), and
    the files of ``exclude_batch_id`` there are ignored, so a re-ingested batch is
    not compared with its own earlier rows.
    """

    table_dir: str | SuiteParameterDict
    key_columns: list[str]
    exclude_batch_id: str | SuiteParameterDict

    map_metric = "column_values.absent_from_lake"
    success_keys = ("table_dir", "key_columns", "exclude_batch_id", "mostly")
    args_keys = ("column", "table_dir", "key_columns", "exclude_batch_id")


def _keys_in_lake(
    table_dir: str, key_columns: list[str], exclude_batch_id: str, batch_keys: pd.Index
) -> list[str]:
    """Return the keys of ``batch_keys`` that some other batch's lake file contains."""
    if not table_dir:
        return []
    files = [
        path
        for path in sorted(Path(table_dir).glob("date=*/*.parquet"))
        if path.stem != exclude_batch_id
    ]
    found: set[str] = set()
    for path in files:
        stored = pd.read_parquet(path, columns=key_columns)
        keys = key_strings(stored, key_columns)
        # isin hashes the batch's keys rather than the history, because the history
        # grows with every batch.
        found.update(keys[keys.isin(batch_keys)].dropna().tolist())
    # NOTE: every call reads the key columns of every earlier file of the table, so the
    # cost grows linearly with the table's history.
    log.debug("read keys of %d lake files under %s", len(files), table_dir)
    return sorted(found)
