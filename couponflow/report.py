"""Experiment report: one self-contained HTML file, a summary.json, and MLflow logging.

The plots are PNG images embedded as base64, drawn with matplotlib's Agg canvas, so
the HTML file opens anywhere without its neighbours.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from couponflow.analysis import ArmResult, ExperimentResult, Interval, figures
from couponflow.analysis.decisions import SUMMARY_NAME, build_summary
from couponflow.analysis.guards import MIN_CONVERSIONS_PER_GROUP, MIN_USERS_PER_GROUP
from couponflow.analysis.stats import EXACT_EXPECTED_CELL_MIN, PROPORTION_METHODS
from couponflow.analysis.stratified import SPLIT_P_THRESHOLD
from couponflow.money import format_cents
from couponflow.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "EXPERIMENT_NAME",
    "SUMMARY_NAME",
    "build_summary",
    "flatten_metrics",
    "log_report_to_mlflow",
    "write_report",
]

EXPERIMENT_NAME = "couponflow-experiments"
# MLflow accepts at most 1000 metrics per log_batch call (mlflow.utils.validation).
METRICS_PER_BATCH = 1000
_METRIC_KEY_INVALID = re.compile(r"[^/\w.\- ]")
Formatter = Callable[[float], str]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; }
th { background: #f3f3f3; }
td.text, th.text { text-align: left; }
.guard { padding: 0.75rem 1rem; border-radius: 4px; margin: 1rem 0; }
.guard.passed { background: #e6f4ea; border: 1px solid #34a853; }
.guard.flagged { background: #fce8e6; border: 1px solid #d93025; }
img { max-width: 100%; }
"""


def write_report(
    result: ExperimentResult,
    path: Path | str,
    title: str,
    extra_tables: Mapping[str, pd.DataFrame] | None = None,
) -> Path:
    """Write the HTML report to ``path`` and ``summary.json`` beside it.

    ``extra_tables`` maps a section heading to a frame shown after the metrics.
    Returns the path of the HTML file.
    """
    html_path = Path(path)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Generated {datetime.now(UTC).isoformat(timespec='seconds')}.</p>",
        _guard_box(result),
        "<h2>Guards</h2>",
        _guards_table(result),
        "<h2>Arms against the holdout: conversion</h2>",
        _conversion_table(result.arms),
        _figure_tag(figures.lift_figure(result.arms), "Conversion lift per arm"),
        "<h2>Arms against the holdout: revenue, cost and profit</h2>",
        _money_table(result.arms),
        _paragraph(f"Decision rule: {result.decision_rule}"),
        _figure_tag(figures.profit_figure(result.arms), "Incremental profit per arm"),
        "<h2>Variance reduction (CUPED)</h2>",
        _cuped_section(result),
        "<h2>Stratified estimates</h2>",
        _stratified_section(result),
        "<h2>Daily monitoring</h2>",
        _sequential_section(result),
        "<h2>Uplift model on the randomized comparison</h2>",
        _uplift_section(result),
        "<h2>Users</h2>",
        _users_table(result),
        "<h2>Methods</h2>",
        _list(_methods(result)),
        "<h2>Notes</h2>",
        _list(result.notes),
    ]
    for heading, frame in (extra_tables or {}).items():
        sections.append(f"<h2>{html.escape(heading)}</h2>")
        sections.append(frame.to_html(index=False, border=0, na_rep=""))

    document = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    html_path.write_text(document, encoding="utf-8")

    summary_path = html_path.with_name(SUMMARY_NAME)
    summary_path.write_text(
        json.dumps(
            build_summary(result, title, html_path.name), indent=2, allow_nan=False
        )
        + "\n",
        encoding="utf-8",
    )
    log.info("wrote report %s and %s", html_path, summary_path)
    return html_path


def log_report_to_mlflow(
    result: ExperimentResult,
    html_path: Path | str,
    settings: Settings,
    campaign_id: str,
) -> str:
    """Log the result's finite metrics and the report files to one new MLflow run.

    The run goes to experiment ``couponflow-experiments`` at
    ``settings.mlflow_tracking_uri``, created on first use. Returns the run id.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunStatus

    html_file = Path(html_path)
    if not html_file.is_file():
        raise FileNotFoundError(
            f"report {html_file} not found; write it with write_report first"
        )
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    experiment_id = _experiment_id(client, settings)
    run = client.create_run(
        experiment_id,
        run_name=f"analysis-{campaign_id}",
        tags={"campaign_id": campaign_id, "trustworthy": str(result.trustworthy)},
    )
    run_id = run.info.run_id

    now_ms = int(time.time() * 1000)
    metrics = [
        Metric(key, value, now_ms, 0) for key, value in flatten_metrics(result).items()
    ]
    params = [
        Param("campaign_id", campaign_id),
        Param("margin_rate", str(result.margin_rate)),
        Param("alpha", str(result.alpha)),
        Param(
            "expected_holdout_fraction",
            str(result.sample_ratio.expected_holdout_fraction),
        ),
    ]
    client.log_batch(run_id, metrics=metrics[:METRICS_PER_BATCH], params=params)
    for start in range(METRICS_PER_BATCH, len(metrics), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + METRICS_PER_BATCH])

    client.log_artifact(run_id, str(html_file))
    summary_path = html_file.with_name(SUMMARY_NAME)
    if summary_path.is_file():
        client.log_artifact(run_id, str(summary_path))
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    log.info(
        "logged %d metrics of campaign %s to MLflow run %s",
        len(metrics),
        campaign_id,
        run_id,
    )
    return run_id


def flatten_metrics(result: ExperimentResult) -> dict[str, float]:
    """Return every finite number of the result under a dotted MLflow metric key.

    Arms are keyed by arm name (``arms.<arm>.roi``) and CUPED comparisons by
    metric (``arms.<arm>.cuped.profit.width_reduction``); booleans become 0 or 1.
    The Qini curve points and the daily sequences (lists) are left out.
    """
    payload = result.to_dict()
    arms = payload.pop("arms")
    payload["uplift"].pop("curve_fraction")
    payload["uplift"].pop("curve_gain")
    metrics = dict(_flatten("", payload))
    for arm in arms:
        name = arm.pop("arm")
        arm["cuped"] = {item["metric"]: item for item in arm["cuped"]}
        metrics.update(_flatten(f"arms.{name}", arm))
    return {_metric_key(key): value for key, value in metrics.items()}


def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _flatten(f"{prefix}.{key}" if prefix else str(key), item)
    elif isinstance(value, bool):
        yield prefix, float(value)
    elif isinstance(value, int | float) and math.isfinite(value):
        yield prefix, float(value)


def _metric_key(key: str) -> str:
    return _METRIC_KEY_INVALID.sub("_", key)


def _experiment_id(client: Any, settings: Settings) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(
            client.create_experiment(
                EXPERIMENT_NAME, artifact_location=settings.mlflow_artifact_root
            )
        )
    except MlflowException:
        # Another process created it between the lookup and the create.
        experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def _guard_box(result: ExperimentResult) -> str:
    check = result.sample_ratio
    status = "flagged" if check.flagged else "passed"
    heading = (
        "Sample ratio mismatch: results withheld"
        if check.flagged
        else "Sample ratio check passed"
    )
    trustworthy = "yes" if result.trustworthy else "no"
    return (
        f"<div class='guard {status}'><strong>{heading}</strong><br>"
        f"{html.escape(check.verdict)}<br>"
        f"chi-square {check.chi_square:.2f}, p-value {check.p_value:.3g}, flagged "
        f"below {check.threshold:g}. Trustworthy: {trustworthy}."
        "</div>"
    )


def _guards_table(result: ExperimentResult) -> str:
    srm = result.sample_ratio
    rows = [
        [
            "sample ratio mismatch",
            "flagged" if srm.flagged else "passed",
            f"{srm.verdict}; chi-square {srm.chi_square:.2f}, flagged below "
            f"p={srm.threshold:g}",
        ]
    ]
    split = result.split_check
    if split is None:
        rows.append(["split change", "not checked", "no stratum column or send_at"])
    else:
        status = "flagged" if split.flagged else "passed"
        if split.p_value is None:
            status = "not checked"
        rows.append(
            [
                "split change",
                status,
                f"{split.verdict}; flagged below p={SPLIT_P_THRESHOLD:g}",
            ]
        )
    minimum = (
        f"at least {MIN_USERS_PER_GROUP} users and {MIN_CONVERSIONS_PER_GROUP} "
        "conversions"
    )
    if result.warnings:
        rows.append(
            [
                "minimum sample",
                "warning",
                f"each group should have {minimum}: " + "; ".join(result.warnings),
            ]
        )
    else:
        rows.append(["minimum sample", "passed", f"every group has {minimum}"])
    rows.append(
        [
            "Holm correction",
            "applied",
            f"across {result.holm_family_size} arms with a profit p-value; the "
            "verdicts and decisions use the Holm-adjusted p-values",
        ]
    )
    return _table(["guard", "status", "detail"], rows, text_columns={0, 1, 2})


def _conversion_table(arms: list[ArmResult]) -> str:
    if not arms:
        return _paragraph(
            "No treatment user received a coupon, so there is no arm to report."
        )
    header = [
        "arm",
        "exposures (users)",
        "control users",
        "open rate",
        "click rate",
        "redemption rate",
        "conversion rate",
        "control rate",
        "rate difference [CI]",
        "relative lift [CI]",
        "method",
        "p-value",
        "Holm p-value",
        "incremental conversions [CI]",
    ]
    rows = [
        [
            arm.arm,
            str(arm.treated.users),
            str(arm.control.users),
            _percent(arm.treated.open_rate),
            _percent(arm.treated.click_rate),
            _percent(arm.treated.redemption_rate),
            _percent(arm.treated.conversion_rate),
            _percent(arm.control.conversion_rate),
            _interval_text(arm.conversion_rate_difference, _points),
            _interval_text(arm.conversion_relative_lift, _signed_percent),
            arm.conversion_method or "n/a",
            _p_value(arm.conversion_p_value),
            _p_value(arm.conversion_p_value_holm),
            _interval_text(arm.incremental_conversions, _one_decimal),
        ]
        for arm in arms
    ]
    parts = [_table(header, rows, text_columns={0, 10})]
    reasons = sorted(
        {
            f"{name.replace('_', ' ')} is n/a: {reason}"
            for arm in arms
            for group in (arm.treated, arm.control)
            for name, reason in group.reasons.items()
        }
    )
    if reasons:
        parts.append(_list(reasons))
    return "\n".join(parts)


def _money_table(arms: list[ArmResult]) -> str:
    if not arms:
        return ""
    header = [
        "arm",
        "revenue/user (cents)",
        "control revenue/user (cents)",
        "revenue/user diff, cents [CI]",
        "incremental revenue [CI]",
        "revenue relative lift [CI]",
        "discount cost",
        "profit/user diff, cents [CI]",
        "incremental profit [CI]",
        "method",
        "p-value",
        "Holm p-value",
        "ROI [CI]",
        "decision",
        "verdict",
        "control",
    ]
    rows = [
        [
            arm.arm,
            _optional(arm.treated.revenue_per_user_cents, _one_decimal),
            _optional(arm.control.revenue_per_user_cents, _one_decimal),
            _interval_text(arm.incremental_revenue_per_user_cents, _one_decimal),
            _interval_text(arm.incremental_revenue_cents, _money),
            _interval_text(arm.revenue_relative_lift, _signed_percent),
            format_cents(arm.treated.discount_cost_cents),
            _interval_text(arm.incremental_profit_per_user_cents, _one_decimal),
            _interval_text(arm.incremental_profit_cents, _money),
            arm.profit_method or "n/a",
            _p_value(arm.profit_p_value),
            _p_value(arm.profit_p_value_holm),
            _interval_text(arm.roi_interval, _two_decimals),
            arm.decision,
            arm.verdict,
            arm.control_source,
        ]
        for arm in arms
    ]
    return _table(header, rows, text_columns={0, 9, 13, 14, 15})


def _cuped_section(result: ExperimentResult) -> str:
    if result.covariate_source is None:
        return _paragraph(
            "No pre-period covariate (pre_spend_cents) was given, so CUPED was not "
            "applied and the intervals are plain Welch intervals."
        )
    header = [
        "arm",
        "metric",
        "theta",
        "CI without CUPED (cents/user)",
        "width without",
        "CI with CUPED (cents/user)",
        "width with",
        "width reduction",
    ]
    rows = [
        [
            arm.arm,
            item.metric,
            f"{item.theta:.4g}",
            _interval_text(item.unadjusted, _one_decimal),
            f"{item.unadjusted.width:.1f}",
            _interval_text(item.adjusted, _one_decimal),
            f"{item.adjusted.width:.1f}",
            f"{100.0 * item.width_reduction:.1f}%",
        ]
        for arm in result.arms
        for item in arm.cuped
    ]
    intro = _paragraph(
        f"Covariate: pre_spend_cents from the {result.covariate_source}; theta is "
        "estimated on the treated and control users of each arm pooled."
    )
    return intro + "\n" + _table(header, rows, text_columns={0, 1})


def _stratified_section(result: ExperimentResult) -> str:
    split = result.split_check
    if split is None:
        return _paragraph(
            "No stratum column and no send_at in the allocation, so no stratified "
            "estimate was made."
        )
    strata_rows = [
        [stratum, str(split.users_by_stratum[stratum]), _percent(share)]
        for stratum, share in split.holdout_share_by_stratum.items()
    ]
    parts = [
        _paragraph(f"Strata: {split.stratum_source}. Split check: {split.verdict}."),
        _table(["stratum", "users", "holdout share"], strata_rows, text_columns={0}),
    ]
    arm_rows = []
    for arm in result.arms:
        if arm.stratified_profit is None and arm.stratified_conversion is None:
            continue
        conversion = arm.stratified_conversion
        profit = arm.stratified_profit
        arm_rows.append(
            [
                arm.arm,
                _interval_text(
                    arm.conversion_test.interval if arm.conversion_test else None,
                    _points,
                ),
                _interval_text(conversion.comparison.interval, _points)
                if conversion
                else "n/a",
                _interval_text(profit.comparison.interval, _one_decimal)
                if profit
                else "n/a",
                str(profit.strata_used) if profit else "n/a",
                str(profit.users_left_out) if profit else "n/a",
                "stratified" if split.flagged else "pooled",
            ]
        )
    if arm_rows:
        header = [
            "arm",
            "pooled rate difference [CI]",
            "stratified rate difference [CI]",
            "stratified profit/user diff, cents [CI]",
            "strata used",
            "users left out",
            "primary",
        ]
        parts.append(_table(header, arm_rows, text_columns={0, 6}))
    return "\n".join(parts)


def _sequential_section(result: ExperimentResult) -> str:
    if not result.sequential:
        reason = result.sequential_reason or "no arm to follow"
        return _paragraph(
            f"No daily table and no cumulative incremental profit over time: {reason}."
        )
    parts = [
        _paragraph(
            "Cumulative by UTC day of observed_at. The confidence sequence covers the "
            "true effect at every day at once with probability "
            f"{1.0 - result.alpha:.0%}, so it may be read daily; the fixed interval "
            "is valid for one pre-planned look only."
        ),
        _figure_tag(
            figures.cumulative_profit_figure(result),
            "Cumulative incremental profit over time",
        ),
    ]
    header = [
        "arm",
        "metric",
        "day",
        "treated users",
        "control users",
        "estimate",
        "fixed CI",
        "confidence sequence",
        "anytime p-value",
    ]
    rows = []
    for sequence in result.sequential:
        formatter = (
            _points if sequence.metric.startswith("conversion") else _one_decimal
        )
        for look in sequence.looks:
            rows.append(
                [
                    sequence.arm,
                    sequence.metric.replace("_", " "),
                    look.look,
                    str(look.treated_users),
                    str(look.control_users),
                    _optional(look.estimate, formatter),
                    _bounds_text(look.fixed_low, look.fixed_high, formatter),
                    _bounds_text(look.sequence_low, look.sequence_high, formatter),
                    _p_value(look.anytime_p_value),
                ]
            )
    parts.append(_table(header, rows, text_columns={0, 1, 2}))
    return "\n".join(parts)


def _uplift_section(result: ExperimentResult) -> str:
    uplift = result.uplift
    rows = [
        ["population", uplift.population],
        ["treated users", str(uplift.treated_users)],
        ["control users", str(uplift.control_users)],
        ["Qini coefficient", _number(uplift.qini_coefficient)],
        ["AUUC", _number(uplift.auuc)],
    ]
    rows += [
        [f"uplift at {key.replace('_', ' ')}", _points(value)]
        for key, value in uplift.uplift_at_k.items()
    ]
    rows += [[f"{name} missing", reason] for name, reason in uplift.reasons.items()]
    parts = [_table(["metric", "value"], rows, text_columns={0, 1})]
    figure = figures.qini_figure(result)
    if figure is not None:
        parts.append(_figure_tag(figure, "Qini curve"))
    return "\n".join(parts)


def _users_table(result: ExperimentResult) -> str:
    rows = [
        ["allocated users", str(result.users)],
        ["treatment users", str(result.treatment_users)],
        ["holdout users", str(result.holdout_users)],
        ["treatment users without an offer", str(result.treatment_users_without_offer)],
        ["users without an outcome row", str(result.users_without_outcome)],
        [
            "outcome rows outside the allocation",
            str(result.outcome_rows_without_allocation),
        ],
    ]
    return _table(["group", "users"], rows, text_columns={0})


def _methods(result: ExperimentResult) -> list[str]:
    level = f"{1.0 - result.alpha:.0%}"
    return [
        f"Intervals are {level} and p-values two-sided.",
        "Conversion rate differences: when every expected cell count of the 2x2 "
        f"table is at least {EXACT_EXPECTED_CELL_MIN:g}, the "
        f"{PROPORTION_METHODS['newcombe-wilson']}; otherwise "
        f"{PROPORTION_METHODS['exact']}, whose coverage is at least {level}.",
        "Revenue and profit per user: Welch's t interval, on CUPED-adjusted values "
        "when pre_spend_cents is given. Totals are per-user values times the arm's "
        "treated users.",
        "ROI (incremental profit / discount cost) and relative lifts: delta method "
        "(first-order Taylor expansion of the ratio), normal interval.",
        "Stratified estimates: differences within each stratum, averaged with "
        "Mantel-Haenszel weights n_t n_c / (n_t + n_c); they are the primary "
        "estimates when the holdout share changed across strata (chi-square test "
        f"of homogeneity, p < {SPLIT_P_THRESHOLD:g}).",
        "Holm's step-down correction across arms, separately for conversion and "
        "profit p-values.",
        "Daily monitoring: asymptotic confidence sequence with the normal-mixture "
        "boundary (Waudby-Smith et al., Time-uniform central limit theory and "
        "asymptotic confidence sequences), tuned to be tightest at the final "
        "number of users.",
        f"Decision rule: {result.decision_rule}",
    ]


def _figure_tag(figure: Figure | None, alt: str) -> str:
    if figure is None:
        return _paragraph(f"{alt}: no arm has a defined interval to plot.")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{encoded}'>"


def _table(header: list[str], rows: list[list[str]], text_columns: set[int]) -> str:
    def cell(tag: str, index: int, text: str) -> str:
        css = " class='text'" if index in text_columns else ""
        return f"<{tag}{css}>{html.escape(text)}</{tag}>"

    head = "".join(cell("th", i, text) for i, text in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, text) for i, text in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def _list(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in items) + "</ul>"


def _interval_text(interval: Interval | None, formatter: Formatter) -> str:
    if interval is None:
        return "n/a"
    return (
        f"{formatter(interval.estimate)} "
        f"[{formatter(interval.low)}, {formatter(interval.high)}]"
    )


def _bounds_text(low: float | None, high: float | None, formatter: Formatter) -> str:
    if low is None or high is None:
        return "n/a"
    return f"[{formatter(low)}, {formatter(high)}]"


def _optional(value: float | None, formatter: Formatter) -> str:
    return "n/a" if value is None else formatter(value)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.2f}%"


def _signed_percent(value: float) -> str:
    return f"{100.0 * value:+.1f}%"


def _points(value: float) -> str:
    return f"{100.0 * value:+.2f} pp"


def _p_value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _one_decimal(value: float) -> str:
    return f"{value:.1f}"


def _two_decimals(value: float) -> str:
    return f"{value:.2f}"


def _money(cents: float) -> str:
    return format_cents(round(cents)) if math.isfinite(cents) else "n/a"
