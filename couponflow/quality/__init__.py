"""Data quality of raw batches: Great Expectations suites, row quarantine, casts."""

from couponflow.quality.suites import build_suite, gx_context
from couponflow.quality.validate import (
    BatchRejected,
    QuarantineRecord,
    ValidationResult,
    validate_batch,
)

__all__ = [
    "BatchRejected",
    "QuarantineRecord",
    "ValidationResult",
    "build_suite",
    "gx_context",
    "validate_batch",
]
