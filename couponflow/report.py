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
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from couponflow.analysis import ArmResult, ExperimentResult, Interval
from couponflow.money import format_cents
from couponflow.settings import Settings

log = logging.getLogger(__name__)

EXPERIMENT_NAME = "couponflow-experiments"
SUMMARY_NAME = "summary.json"
# MLflow accepts at most 1000 metrics per log_batch call (mlflow.utils.validation).
METRICS_PER_BATCH = 1000
_METRIC_KEY_INVALID = re.compile(r"[^/\w.\- ]")

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
        "<h2>Arms against the holdout</h2>",
        _arms_table(result.arms),
        _figure_tag(_lift_figure(result.arms), "Conversion lift per arm"),
        _figure_tag(_profit_figure(result.arms), "Incremental profit per arm"),
        "<h2>Uplift model on the randomized comparison</h2>",
        _uplift_section(result),
        "<h2>Users</h2>",
        _users_table(result),
        "<h2>Notes</h2>",
        "<ul>"
        + "".join(f"<li>{html.escape(note)}</li>" for note in result.notes)
        + "</ul>",
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


def build_summary(
    result: ExperimentResult, title: str, report_name: str
) -> dict[str, Any]:
    """Return the machine-readable summary that the next campaign reads.

    ``positive_profit_offers`` lists the arms whose incremental profit CI lower
    bound is above 0, and is empty when the experiment is not trustworthy.
    """
    return {
        "title": title,
        "report": report_name,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "trustworthy": result.trustworthy,
        "sample_ratio_verdict": result.sample_ratio.verdict,
        "positive_profit_offers": result.positive_profit_offers(),
        "arms": [
            {
                "arm": arm.arm,
                "verdict": arm.verdict,
                "incremental_profit_cents": _interval_dict(
                    arm.incremental_profit_cents
                ),
                "roi": arm.roi,
            }
            for arm in result.arms
        ],
        "result": result.to_dict(),
    }


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

    Arms are keyed by arm name (``arms.<arm>.roi``), booleans become 0 or 1, and
    the Qini curve points are left out.
    """
    payload = result.to_dict()
    payload.pop("arms")
    payload["uplift"].pop("curve_fraction")
    payload["uplift"].pop("curve_gain")
    metrics = dict(_flatten("", payload))
    for arm in result.to_dict()["arms"]:
        name = arm.pop("arm")
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


def _interval_dict(interval: Interval | None) -> dict[str, float] | None:
    if interval is None:
        return None
    return {"estimate": interval.estimate, "low": interval.low, "high": interval.high}


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


def _arms_table(arms: list[ArmResult]) -> str:
    if not arms:
        return (
            "<p>No treatment user received a coupon, so there is no arm to report.</p>"
        )
    header = [
        "arm",
        "users",
        "control users",
        "conversion rate",
        "control rate",
        "rate difference, percentage points [CI]",
        "incremental conversions [CI]",
        "revenue/user diff, cents [CI]",
        "profit/user diff, cents [CI]",
        "incremental profit [CI]",
        "discount cost",
        "ROI",
        "redemption rate",
        "control",
        "verdict",
    ]
    rows = [
        [
            arm.arm,
            str(arm.treated.users),
            str(arm.control.users),
            _percent(arm.treated.conversion_rate),
            _percent(arm.control.conversion_rate),
            _interval_text(arm.conversion_rate_difference, _points),
            _interval_text(arm.incremental_conversions, lambda v: f"{v:.1f}"),
            _interval_text(
                arm.incremental_revenue_per_user_cents, lambda v: f"{v:.1f}"
            ),
            _interval_text(arm.incremental_profit_per_user_cents, lambda v: f"{v:.1f}"),
            _interval_text(arm.incremental_profit_cents, _money),
            format_cents(arm.treated.discount_cost_cents),
            "n/a" if arm.roi is None else f"{arm.roi:.2f}",
            _percent(arm.treated.redemption_rate),
            arm.control_source,
            arm.verdict,
        ]
        for arm in arms
    ]
    return _table(header, rows, text_columns={0, 13, 14})


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
    if uplift.curve_fraction:
        parts.append(_figure_tag(_qini_figure(result), "Qini curve"))
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


def _lift_figure(arms: list[ArmResult]) -> Figure | None:
    plotted = [arm for arm in arms if arm.conversion_rate_difference is not None]
    if not plotted:
        return None
    figure, axes = _new_figure(len(plotted))
    for position, arm in enumerate(plotted):
        interval = arm.conversion_rate_difference
        assert interval is not None
        _draw_interval(axes, position, interval, scale=100.0)
    axes.set_yticks(range(len(plotted)), [arm.arm for arm in plotted])
    axes.set_xlabel("conversion rate difference vs holdout (percentage points)")
    axes.set_title("Conversion lift per arm with CI")
    return figure


def _profit_figure(arms: list[ArmResult]) -> Figure | None:
    plotted = [arm for arm in arms if arm.incremental_profit_cents is not None]
    if not plotted:
        return None
    figure, axes = _new_figure(len(plotted))
    for position, arm in enumerate(plotted):
        interval = arm.incremental_profit_cents
        assert interval is not None
        _draw_interval(axes, position, interval, scale=1.0)
    axes.set_yticks(range(len(plotted)), [arm.arm for arm in plotted])
    axes.set_xlabel("incremental profit (cents, total over the arm's users)")
    axes.set_title("Incremental profit per arm with CI")
    return figure


def _qini_figure(result: ExperimentResult) -> Figure:
    uplift = result.uplift
    figure = Figure(figsize=(6.0, 4.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(uplift.curve_fraction, uplift.curve_gain, label="model")
    axes.plot(
        [0.0, uplift.curve_fraction[-1]],
        [0.0, uplift.curve_gain[-1]],
        linestyle="--",
        color="grey",
        label="random targeting",
    )
    axes.set_xlabel("fraction of users targeted, by descending score")
    axes.set_ylabel("incremental conversions per treated user")
    axes.set_title("Qini curve of score_uplift")
    axes.legend()
    return figure


def _new_figure(rows: int) -> tuple[Figure, Any]:
    figure = Figure(figsize=(7.0, 1.2 + 0.5 * rows))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.axvline(0.0, color="grey", linewidth=1)
    # First arm on top, with half a row of margin above and below.
    axes.set_ylim(rows - 0.5, -0.5)
    figure.subplots_adjust(left=0.25)
    return figure, axes


def _draw_interval(axes: Any, position: int, interval: Interval, scale: float) -> None:
    estimate = interval.estimate * scale
    color = "#555555"
    if interval.low > 0:
        color = "#34a853"
    elif interval.high < 0:
        color = "#d93025"
    axes.errorbar(
        [estimate],
        [position],
        xerr=[[estimate - interval.low * scale], [interval.high * scale - estimate]],
        fmt="o",
        color=color,
        capsize=4,
    )


def _figure_tag(figure: Figure | None, alt: str) -> str:
    if figure is None:
        return f"<p>{html.escape(alt)}: no arm has a defined interval to plot.</p>"
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


def _interval_text(interval: Interval | None, formatter: Any) -> str:
    if interval is None:
        return "n/a"
    return (
        f"{formatter(interval.estimate)} "
        f"[{formatter(interval.low)}, {formatter(interval.high)}]"
    )


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.2f}%"


def _points(value: float) -> str:
    return f"{100.0 * value:+.2f} pp"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _money(cents: float) -> str:
    return format_cents(round(cents))
