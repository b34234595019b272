"""Matplotlib figures of an experiment result, drawn on the Agg canvas (no display).

Each function returns None when the result has nothing to plot.
"""

from __future__ import annotations

from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from couponflow.analysis.arms import ArmResult
from couponflow.analysis.experiment import ExperimentResult
from couponflow.analysis.stats import Interval

POSITIVE_COLOR = "#34a853"
NEGATIVE_COLOR = "#d93025"
NEUTRAL_COLOR = "#555555"
PROFIT_METRIC = "incremental_profit_per_user_cents"


def lift_figure(arms: list[ArmResult]) -> Figure | None:
    """Plot each arm's conversion rate difference with its CI, in percentage points."""
    plotted = [arm for arm in arms if arm.conversion_rate_difference is not None]
    if not plotted:
        return None
    figure, axes = _interval_axes(len(plotted))
    for position, arm in enumerate(plotted):
        interval = arm.conversion_rate_difference
        assert interval is not None
        _draw_interval(axes, position, interval, scale=100.0)
    axes.set_yticks(range(len(plotted)), [arm.arm for arm in plotted])
    axes.set_xlabel("conversion rate difference vs holdout (percentage points)")
    axes.set_title("Conversion lift per arm with CI")
    return figure


def profit_figure(arms: list[ArmResult]) -> Figure | None:
    """Plot each arm's total incremental profit with its CI, in cents."""
    plotted = [arm for arm in arms if arm.incremental_profit_cents is not None]
    if not plotted:
        return None
    figure, axes = _interval_axes(len(plotted))
    for position, arm in enumerate(plotted):
        interval = arm.incremental_profit_cents
        assert interval is not None
        _draw_interval(axes, position, interval, scale=1.0)
    axes.set_yticks(range(len(plotted)), [arm.arm for arm in plotted])
    axes.set_xlabel("incremental profit (cents, total over the arm's users)")
    axes.set_title("Incremental profit per arm with CI")
    return figure


def qini_figure(result: ExperimentResult) -> Figure | None:
    """Plot the Qini curve of ``score_uplift`` against random targeting."""
    uplift = result.uplift
    if not uplift.curve_fraction:
        return None
    figure = _new_figure(6.0, 4.0)
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


def cumulative_profit_figure(result: ExperimentResult) -> Figure | None:
    """Plot each arm's cumulative incremental profit by observation day.

    The line is the estimate and the band the confidence sequence, both scaled
    from per user to the arm's treated users observed so far.
    """
    sequences = [item for item in result.sequential if item.metric == PROFIT_METRIC]
    if not sequences:
        return None
    figure = _new_figure(7.0, 4.0)
    axes = figure.add_subplot()
    axes.axhline(0.0, color="grey", linewidth=1)
    for sequence in sequences:
        days, estimate, low, high = [], [], [], []
        for look in sequence.looks:
            if (
                look.estimate is None
                or look.sequence_low is None
                or look.sequence_high is None
            ):
                continue
            days.append(look.look)
            estimate.append(look.estimate * look.treated_users)
            low.append(look.sequence_low * look.treated_users)
            high.append(look.sequence_high * look.treated_users)
        if not days:
            continue
        (line,) = axes.plot(days, estimate, marker="o", label=sequence.arm)
        axes.fill_between(days, low, high, alpha=0.2, color=line.get_color())
    axes.set_xlabel("UTC day the outcomes were observed (cumulative)")
    axes.set_ylabel("incremental profit (cents)")
    axes.set_title("Cumulative incremental profit with confidence sequence")
    axes.tick_params(axis="x", labelrotation=45)
    axes.legend()
    return figure


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _interval_axes(rows: int) -> tuple[Figure, Any]:
    figure = _new_figure(7.0, 1.2 + 0.5 * rows)
    axes = figure.add_subplot()
    axes.axvline(0.0, color="grey", linewidth=1)
    # First arm on top, with half a row of margin above and below.
    axes.set_ylim(rows - 0.5, -0.5)
    figure.subplots_adjust(left=0.25)
    return figure, axes


def _draw_interval(axes: Any, position: int, interval: Interval, scale: float) -> None:
    estimate = interval.estimate * scale
    color = NEUTRAL_COLOR
    if interval.low > 0:
        color = POSITIVE_COLOR
    elif interval.high < 0:
        color = NEGATIVE_COLOR
    axes.errorbar(
        [estimate],
        [position],
        xerr=[[estimate - interval.low * scale], [interval.high * scale - estimate]],
        fmt="o",
        color=color,
        capsize=4,
    )
