"""The machine-readable campaign summary: per-arm keep/drop, read by the next campaign.

``report.write_report`` writes it as ``summary.json`` beside the HTML report. This
module has no plotting dependency, so the allocation can import it cheaply.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from couponflow.analysis.arms import DECISION_RULE, DROP, KEEP
from couponflow.analysis.experiment import ExperimentResult
from couponflow.analysis.stats import Interval, json_safe

SUMMARY_NAME = "summary.json"
SUMMARY_VERSION = 2
DECISIONS: tuple[str, ...] = (KEEP, DROP)


def build_summary(
    result: ExperimentResult, title: str, report_name: str
) -> dict[str, Any]:
    """Return the summary of ``result`` as JSON-safe dicts and lists.

    Each arm has a ``decision`` (keep or drop) by ``decision_rule``.
    ``positive_profit_offers`` lists the arms whose Holm-adjusted incremental profit
    is significantly positive, and is empty when the experiment is not trustworthy.
    """
    payload = result.to_dict()
    split = result.split_check
    summary = {
        "summary_version": SUMMARY_VERSION,
        "title": title,
        "report": report_name,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "trustworthy": result.trustworthy,
        "alpha": result.alpha,
        "sample_ratio_verdict": result.sample_ratio.verdict,
        "split_verdict": split.verdict if split else "not checked: no strata",
        "decision_rule": DECISION_RULE,
        "positive_profit_offers": result.positive_profit_offers(),
        "offers_to_keep": result.offers_to_keep(),
        "offers_to_drop": result.offers_to_drop(),
        "warnings": list(result.warnings),
        "arms": [
            {
                "arm": arm.arm,
                "decision": arm.decision,
                "verdict": arm.verdict,
                "profit_significance": arm.profit_significance,
                "profit_method": arm.profit_method,
                "incremental_profit_cents": _interval_dict(
                    arm.incremental_profit_cents
                ),
                "profit_p_value": arm.profit_p_value,
                "profit_p_value_holm": arm.profit_p_value_holm,
                "conversion_rate_difference": _interval_dict(
                    arm.conversion_rate_difference
                ),
                "conversion_p_value_holm": arm.conversion_p_value_holm,
                "roi": arm.roi,
                "roi_interval": _interval_dict(arm.roi_interval),
                "warnings": list(arm.warnings),
            }
            for arm in result.arms
        ],
        "result": payload,
    }
    return dict(json_safe(summary))


def load_campaign_summary(path: Path | str) -> dict[str, Any]:
    """Read and validate a campaign summary.

    ``path`` is the ``summary.json`` file or the report folder that contains it.
    Raises FileNotFoundError when it is missing and ValueError when it is not a
    summary this module wrote.
    """
    file = Path(path)
    if file.is_dir():
        file = file / SUMMARY_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"campaign summary {file} not found; run analyze_experiment for the "
            "campaign first"
        )
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"campaign summary {file} is not valid JSON: {error}"
        ) from None
    validate_summary(summary, str(file))
    return dict(summary)


def offers_to_keep(summary: dict[str, Any]) -> list[str]:
    """Return the arms of ``summary`` whose decision is keep, in summary order.

    Arms the experiment did not test are not listed; the caller decides on them.
    """
    validate_summary(summary)
    return [arm["arm"] for arm in summary["arms"] if arm["decision"] == KEEP]


def offers_to_drop(summary: dict[str, Any]) -> list[str]:
    """Return the arms of ``summary`` whose decision is drop, in summary order."""
    validate_summary(summary)
    return [arm["arm"] for arm in summary["arms"] if arm["decision"] == DROP]


def validate_summary(summary: Any, source: str = "summary") -> None:
    """Raise ValueError unless ``summary`` has the fields the next campaign reads."""
    if not isinstance(summary, dict):
        raise ValueError(
            f"{source}: expected a JSON object, got {type(summary).__name__}"
        )
    version = summary.get("summary_version")
    if version != SUMMARY_VERSION:
        raise ValueError(
            f"{source}: summary_version must be {SUMMARY_VERSION}, got {version!r}; "
            "rerun analyze_experiment to rewrite it"
        )
    if not isinstance(summary.get("trustworthy"), bool):
        raise ValueError(f"{source}: trustworthy must be true or false")
    arms = summary.get("arms")
    if not isinstance(arms, list):
        raise ValueError(f"{source}: arms must be a list")
    for position, arm in enumerate(arms):
        if not isinstance(arm, dict) or not isinstance(arm.get("arm"), str):
            raise ValueError(f"{source}: arms[{position}] has no arm name")
        if arm.get("decision") not in DECISIONS:
            raise ValueError(
                f"{source}: arms[{position}] ({arm['arm']}) has decision "
                f"{arm.get('decision')!r}, expected one of {list(DECISIONS)}"
            )


def _interval_dict(interval: Interval | None) -> dict[str, float] | None:
    if interval is None:
        return None
    return {"estimate": interval.estimate, "low": interval.low, "high": interval.high}
