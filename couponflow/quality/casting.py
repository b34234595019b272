"""Lenient casts of raw batch columns to the contract dtypes of couponflow.schemas.

A value that cannot be cast becomes missing, so that a Great Expectations check can
tell "missing in the batch" (null before the cast) from "not castable" (null after).
"""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd

from couponflow.schemas import UTC_TS

# Largest magnitude that an int64 holds; float values beyond it are not castable.
_INT64_LIMIT = float(2**63)
_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False}
_UTC_DTYPE = pd.DatetimeTZDtype(unit="ns", tz="UTC")


def cast_column(values: pd.Series, dtype: str) -> pd.Series:
    """Cast ``values`` to the nullable form of a contract dtype; failures become NA.

    Returns ``string``, ``Int64``, ``float64``, ``boolean`` or ``datetime64[ns, UTC]``
    for the contract dtypes ``string``, ``int64``, ``float64``, ``bool`` and UTC
    timestamps. Booleans are never read as numbers, floats never as ids, and numbers
    never as timestamps. Timezone-naive timestamps are read as UTC.
    """
    if dtype == "string":
        return _to_string(values)
    if dtype == "int64":
        return _to_int(values)
    if dtype == "float64":
        return _to_float(values)
    if dtype == "bool":
        return _to_bool(values)
    if dtype == UTC_TS:
        return _to_utc(values)
    raise ValueError(
        f"no cast is defined for contract dtype {dtype!r}; "
        f"use one of string, int64, float64, bool, {UTC_TS}"
    )


def _is_bool_scalar(value: object) -> bool:
    return isinstance(value, bool | np.bool_)


def _is_int_scalar(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not _is_bool_scalar(value)


def _to_string(values: pd.Series) -> pd.Series:
    if isinstance(values.dtype, pd.StringDtype):
        return values.astype("string")
    if pd.api.types.is_bool_dtype(values.dtype):
        return pd.Series(pd.NA, index=values.index, dtype="string")
    if pd.api.types.is_integer_dtype(values.dtype):
        return values.astype("string")
    if values.dtype != object:
        # Floats, timestamps and other typed columns are not ids or labels.
        return pd.Series(pd.NA, index=values.index, dtype="string")

    def convert(value: object) -> object:
        if isinstance(value, str):
            return value
        if _is_int_scalar(value):
            return str(value)
        return pd.NA

    return values.map(convert).astype("string")


def _to_number(values: pd.Series) -> pd.Series:
    """Return a numeric series, with booleans and non-numbers as missing."""
    if pd.api.types.is_bool_dtype(values.dtype):
        return pd.Series(np.nan, index=values.index, dtype="float64")
    if pd.api.types.is_numeric_dtype(values.dtype):
        return values
    if values.dtype == object:
        values = values.mask(values.map(_is_bool_scalar))
    try:
        return pd.to_numeric(values, errors="coerce")
    except (TypeError, ValueError):
        # Containers and other objects make pandas fail on the whole column, so
        # convert one value at a time.
        return pd.to_numeric(values.map(_scalar_number), errors="coerce")


def _scalar_number(value: object) -> object:
    if isinstance(value, numbers.Number | str) and not _is_bool_scalar(value):
        return value
    return np.nan


def _to_int(values: pd.Series) -> pd.Series:
    numeric = _to_number(values)
    if pd.api.types.is_integer_dtype(numeric.dtype):
        return numeric.astype("Int64")
    floats = numeric.astype("float64")
    whole = np.isfinite(floats) & (floats == np.floor(floats))
    whole &= floats.abs() < _INT64_LIMIT
    return floats.where(whole).astype("Int64")


def _to_float(values: pd.Series) -> pd.Series:
    return _to_number(values).astype("float64")


def _to_bool(values: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(values.dtype):
        return values.astype("boolean")

    def convert(value: object) -> object:
        if _is_bool_scalar(value):
            return bool(value)  # type: ignore[arg-type]
        if isinstance(value, numbers.Real) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            return _BOOL_WORDS.get(value.strip().lower(), pd.NA)
        return pd.NA

    return values.map(convert).astype("boolean")


def _to_utc(values: pd.Series) -> pd.Series:
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        return values.dt.tz_convert("UTC").astype(_UTC_DTYPE)
    if pd.api.types.is_datetime64_dtype(values.dtype):
        return values.dt.tz_localize("UTC").astype(_UTC_DTYPE)
    if values.dtype != object and not isinstance(values.dtype, pd.StringDtype):
        # Epoch numbers are ambiguous (seconds or milliseconds), so they are rejected.
        return pd.Series(pd.NaT, index=values.index, dtype=_UTC_DTYPE)
    if values.dtype == object:
        values = values.mask(values.map(lambda v: isinstance(v, numbers.Number)))
    parsed = pd.to_datetime(values, errors="coerce", utc=True, format="ISO8601")
    return parsed.astype(_UTC_DTYPE)
