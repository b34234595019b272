"""Great Expectations suites of the raw tables, built from their TableSchema.

The GX context, its pandas data source and one suite per table are created once per
process and reused, because creating them costs far more than one validation.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
from great_expectations.core.batch_definition import BatchDefinition
from great_expectations.data_context import AbstractDataContext
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)
from great_expectations.expectations.expectation import Expectation

from couponflow.quality.expectations import (
    ExpectColumnValuesToBeAbsentFromLake,
    ExpectColumnValuesToBeCastableToDtype,
    ExpectColumnValuesToBeFirstOccurrence,
)
from couponflow.schemas import CHANNELS, COUPON_KINDS, EVENT_TYPES, UTC_TS, TableSchema

DATASOURCE_NAME = "couponflow_raw"
# Column of the validated frame that contains the table key as one string.
KEY_COLUMN = "__key__"

# Suite parameters, filled in by each validation.
NOW_PARAMETER = "now"
LAKE_DIR_PARAMETER = "lake_table_dir"
BATCH_ID_PARAMETER = "batch_id"

# Values that can never be negative, by column name in any table.
NON_NEGATIVE_COLUMNS = (
    "price_cents",
    "quantity",
    "dwell_seconds",
    "value",
    "min_spend_cents",
    "valid_days",
    "stock",
    "revenue_cents",
    "discount_cents",
)
ALLOWED_VALUES: dict[str, tuple[str, ...]] = {
    "event_type": EVENT_TYPES,
    "kind": COUPON_KINDS,
    "channel": CHANNELS,
}
# Timestamps of things that already happened. Coupon starts_at and ends_at are left
# out on purpose, because a coupon may be scheduled ahead.
PAST_TIMESTAMP_COLUMNS = ("signup_ts", "event_ts", "send_at", "observed_at")
# Comma-separated subset of CHANNELS, as in coupons.channels.
_CHANNEL_LIST_REGEX = "^(?:{0})(?:,(?:{0}))*$".format("|".join(CHANNELS))

_lock = threading.Lock()
_context: AbstractDataContext | None = None
_validations: dict[str, TableValidation] = {}


@dataclass(frozen=True)
class TableValidation:
    """The registered suite of one table and the batch definition it validates."""

    schema: TableSchema
    suite: gx.ExpectationSuite
    batch_definition: BatchDefinition


def cast_column_name(column: str) -> str:
    """Return the name of the validated frame's column with ``column`` cast."""
    return f"{column}__cast"


def gx_context() -> AbstractDataContext:
    """Return the process-wide ephemeral GX context, with analytics disabled."""
    global _context
    with _lock:
        if _context is None:
            # GX 1.24.1 ships no analytics sender, but the flag keeps analytics off
            # if a later release adds one back.
            config = DataContextConfig(
                analytics_enabled=False,
                progress_bars=ProgressBarsConfig(globally=False),
                store_backend_defaults=InMemoryStoreBackendDefaults(),
            )
            context = gx.get_context(mode="ephemeral", project_config=config)
            context.data_sources.add_pandas(DATASOURCE_NAME)
            _context = context
        return _context


def table_validation(schema: TableSchema) -> TableValidation:
    """Return the suite and batch definition of ``schema``, registering them once."""
    context = gx_context()
    with _lock:
        cached = _validations.get(schema.name)
        if cached is not None and cached.schema == schema:
            return cached
        suite = build_suite(schema)
        if cached is None:
            source = context.data_sources.get(DATASOURCE_NAME)
            asset = source.add_dataframe_asset(schema.name)  # type: ignore[attr-defined]
            batch_definition = asset.add_batch_definition_whole_dataframe(
                f"{schema.name}_whole_batch"
            )
        else:
            # Same table name, different contract: replace the suite.
            context.suites.delete(suite.name)
            batch_definition = cached.batch_definition
        registered = context.suites.add(suite)
        validation = TableValidation(schema, registered, batch_definition)
        _validations[schema.name] = validation
        return validation


def build_suite(schema: TableSchema) -> gx.ExpectationSuite:
    """Build the expectation suite of one raw table from its contract.

    Each expectation's ``meta`` names the contract columns it checks and the rule in
    words, for the quarantine reason. Expectations on ``<column>__cast`` run on the
    cast values, the others on the values as the batch delivered them.
    """
    suite = gx.ExpectationSuite(name=f"couponflow_{schema.name}")
    for expectation in _batch_expectations(schema):
        suite.add_expectation(expectation)
    for expectation in _column_expectations(schema):
        suite.add_expectation(expectation)
    for expectation in _key_expectations(schema):
        suite.add_expectation(expectation)
    return suite


def _meta(columns: list[str], rule: str, scope: str = "row") -> dict[str, Any]:
    return {"columns": columns, "rule": rule, "scope": scope}


def _batch_expectations(schema: TableSchema) -> list[Expectation]:
    columns = list(schema.columns)
    return [
        gxe.ExpectTableColumnsToMatchSet(
            column_set=columns,
            exact_match=False,
            meta=_meta(columns, "every contract column must be present", "batch"),
        ),
        gxe.ExpectTableRowCountToBeBetween(
            min_value=1, meta=_meta([], "the batch must have rows", "batch")
        ),
    ]


def _column_expectations(schema: TableSchema) -> list[Expectation]:
    expectations: list[Expectation] = []
    for column, dtype in schema.columns.items():
        cast = cast_column_name(column)
        if column in schema.required:
            expectations.append(
                gxe.ExpectColumnValuesToNotBeNull(
                    column=column, meta=_meta([column], "a required value is missing")
                )
            )
        elif dtype in ("int64", "bool"):
            expectations.append(
                gxe.ExpectColumnValuesToNotBeNull(
                    column=column,
                    meta=_meta(
                        [column], f"a {dtype} column cannot hold a missing value"
                    ),
                )
            )
        expectations.append(
            ExpectColumnValuesToBeCastableToDtype(
                column=column,
                dtype=dtype,
                meta=_meta([column], f"the value cannot be cast to {dtype}"),
            )
        )
        if column in NON_NEGATIVE_COLUMNS:
            expectations.append(
                gxe.ExpectColumnValuesToBeBetween(
                    column=cast, min_value=0, meta=_meta([column], "must be >= 0")
                )
            )
        if column in ALLOWED_VALUES:
            allowed = ALLOWED_VALUES[column]
            expectations.append(
                gxe.ExpectColumnValuesToBeInSet(
                    column=cast,
                    value_set=list(allowed),
                    meta=_meta([column], f"must be one of {', '.join(allowed)}"),
                )
            )
        if column in PAST_TIMESTAMP_COLUMNS and dtype == UTC_TS:
            expectations.append(
                gxe.ExpectColumnValuesToBeBetween(
                    column=cast,
                    max_value={"$PARAMETER": NOW_PARAMETER},
                    meta=_meta([column], "is in the future (after {now})"),
                )
            )
    expectations.extend(_table_specific_expectations(schema))
    return expectations


def _table_specific_expectations(schema: TableSchema) -> list[Expectation]:
    expectations: list[Expectation] = []
    if "propensity" in schema.columns:
        expectations.append(
            gxe.ExpectColumnValuesToBeBetween(
                column=cast_column_name("propensity"),
                min_value=0,
                max_value=1,
                strict_min=True,
                meta=_meta(["propensity"], "must be in (0, 1]"),
            )
        )
    if "channels" in schema.columns:
        expectations.append(
            gxe.ExpectColumnValuesToMatchRegex(
                column=cast_column_name("channels"),
                regex=_CHANNEL_LIST_REGEX,
                meta=_meta(
                    ["channels"],
                    f"must be a comma-separated list of {', '.join(CHANNELS)}",
                ),
            )
        )
    if "starts_at" in schema.columns and "ends_at" in schema.columns:
        expectations.append(
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A=cast_column_name("ends_at"),
                column_B=cast_column_name("starts_at"),
                or_equal=True,
                ignore_row_if="either_value_is_missing",
                meta=_meta(["ends_at", "starts_at"], "ends_at is before starts_at"),
            )
        )
    return expectations


def _key_expectations(schema: TableSchema) -> list[Expectation]:
    key = list(schema.key)
    return [
        ExpectColumnValuesToBeFirstOccurrence(
            column=KEY_COLUMN,
            meta=_meta(key, "an earlier row of this batch has the same key"),
        ),
        ExpectColumnValuesToBeAbsentFromLake(
            column=KEY_COLUMN,
            table_dir={"$PARAMETER": LAKE_DIR_PARAMETER},
            key_columns=key,
            exclude_batch_id={"$PARAMETER": BATCH_ID_PARAMETER},
            meta=_meta(key, "the key was already accepted from an earlier batch"),
        ),
    ]
