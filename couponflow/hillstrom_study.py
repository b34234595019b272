"""Targeting study on the Hillstrom e-mail experiment (MineThatData, 2008).

Trains per-arm XGBoost response models on a 70% split, targets e-mails to a share of
customers, and estimates on the untouched 30% what the policy caused, by inverse
propensity weighting against random targeting of the same number of customers.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from couponflow.schemas import CONTROL_ARM
from couponflow.settings import Settings

log = logging.getLogger(__name__)

OUTCOMES = ("visited", "converted", "revenue_cents")
TEST_FRACTION = 0.3
UPLIFT_AT = 0.1
XGB_PARAMS: dict[str, Any] = {
    "n_estimators": 200,
    "max_depth": 3,
    "learning_rate": 0.05,
    "subsample": 0.8,
    "min_child_weight": 20,
    "n_jobs": 2,
}


@dataclass(frozen=True)
class HillstromStudy:
    """The study's measured summary and the path of its report."""

    summary: dict[str, Any]
    report: Path

    def format(self) -> str:
        s = self.summary
        lines = [
            f"Hillstrom: trained on {s['train_rows']} customers, evaluated on "
            f"{s['test_rows']}; the policy e-mails {s['target_fraction']:.0%}, "
            f"ranked by predicted uplift in {s['objective']}.",
            f"{'outcome':<14}{'policy lift':>14}{'95% CI':>24}{'random lift':>14}",
        ]
        for outcome in OUTCOMES:
            p = s["policy"][outcome]
            r = s["random"][outcome]
            ci = f"[{p['ci_low']:.4f}, {p['ci_high']:.4f}]"
            lines.append(f"{outcome:<14}{p['value']:>14.4f}{ci:>24}{r['value']:>14.4f}")
        lines.append("Per e-mail on the test split (visits):")
        for arm, m in s["per_arm"].items():
            lines.append(
                f"  {arm:<14} Qini {m['qini_visited']:.4f}  "
                f"uplift@10% {m['uplift_at_10_visited']:.4f}"
            )
        lines.append(f"Report: {self.report}")
        return "\n".join(lines)


def run_hillstrom_study(
    settings: Settings,
    path: str | Path | None = None,
    target_fraction: float = 0.3,
    seed: int = 7,
    objective: str = "visited",
) -> HillstromStudy:
    """Run the study end to end; log it to MLflow and write an HTML report."""
    from couponflow.sources.hillstrom import load_hillstrom

    if objective not in OUTCOMES:
        raise ValueError(f"objective must be one of {OUTCOMES}, got {objective!r}")
    if not 0 < target_fraction <= 1:
        raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction}")
    csv = Path(path) if path else settings.data_dir / "hillstrom" / "hillstrom.csv"
    data = load_hillstrom(csv)
    frame = _study_frame(data)
    rng = np.random.default_rng(seed)
    is_test = rng.random(len(frame)) < TEST_FRACTION
    train, test = frame[~is_test], frame[is_test]
    feature_columns = [c for c in data.features.columns if c != "user_id"]
    arms = [a for a in sorted(frame["arm"].unique()) if a != CONTROL_ARM]
    log.info("Hillstrom: %d train, %d test rows, arms %s", len(train), len(test), arms)

    predictions = {
        outcome: _predict_uplift(train, test, feature_columns, arms, outcome, seed)
        for outcome in OUTCOMES
    }
    policy = _target(predictions[objective], arms, target_fraction)
    random_policy = _random_policy(len(test), arms, target_fraction, rng)
    summary = _evaluate(test, predictions, arms, policy, random_policy)
    summary.update(
        train_rows=int(len(train)),
        test_rows=int(len(test)),
        target_fraction=target_fraction,
        objective=objective,
        seed=seed,
        source=str(csv),
    )
    assert settings.reports_dir is not None
    report = _write_report(
        settings.reports_dir / "hillstrom" / "report.html", summary, test, predictions
    )
    _log_to_mlflow(settings, summary, report)
    return HillstromStudy(summary=summary, report=report)


def _study_frame(data: Any) -> pd.DataFrame:
    frame = data.exposures[["user_id", "arm", "propensity"]].merge(
        data.outcomes[["user_id", *OUTCOMES]], on="user_id", validate="one_to_one"
    )
    frame = frame.merge(data.features, on="user_id", validate="one_to_one")
    for outcome in OUTCOMES:
        frame[outcome] = frame[outcome].astype("float64")
    return frame.reset_index(drop=True)


def _predict_uplift(
    train: pd.DataFrame,
    test: pd.DataFrame,
    features: list[str],
    arms: list[str],
    outcome: str,
    seed: int,
) -> np.ndarray:
    """Return test-set predicted uplift of each arm over control, (n_test, n_arms).

    A T-learner: one model per arm, each fitted on that arm's training rows only,
    which the randomized design makes unbiased for the arm's response.
    """
    import xgboost as xgb

    def fit_predict(arm: str) -> np.ndarray:
        rows = train[train["arm"] == arm]
        y = rows[outcome].to_numpy()
        if outcome == "revenue_cents":
            model = xgb.XGBRegressor(random_state=seed, **XGB_PARAMS)
            model.fit(rows[features], y)
            return np.asarray(model.predict(test[features]), dtype="float64")
        model = xgb.XGBClassifier(random_state=seed, **XGB_PARAMS)
        model.fit(rows[features], y.astype(int))
        return np.asarray(model.predict_proba(test[features])[:, 1], dtype="float64")

    control = fit_predict(CONTROL_ARM)
    return np.column_stack([fit_predict(arm) - control for arm in arms])


def _target(uplift: np.ndarray, arms: list[str], target_fraction: float) -> np.ndarray:
    """Send each customer's best e-mail to the top share by predicted uplift.

    The budget is a number of e-mails, so the budgeted choice is the budget solver
    with a cost of 1 per e-mail.
    """
    from couponflow.allocation import solve_budget

    budget = int(np.floor(target_fraction * len(uplift)))
    solution = solve_budget(uplift, np.ones_like(uplift), budget)
    choice = np.asarray(solution.choice)
    labels = np.array(arms + [CONTROL_ARM], dtype=object)
    return labels[np.where(choice >= 0, choice, len(arms))]


def _random_policy(
    n: int, arms: list[str], target_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    policy = np.full(n, CONTROL_ARM, dtype=object)
    chosen = rng.permutation(n)[: int(np.floor(target_fraction * n))]
    policy[chosen] = rng.choice(np.array(arms, dtype=object), size=len(chosen))
    return policy


def _evaluate(
    test: pd.DataFrame,
    predictions: dict[str, np.ndarray],
    arms: list[str],
    policy: np.ndarray,
    random_policy: np.ndarray,
) -> dict[str, Any]:
    from couponflow.analysis.ipw import ipw_policy_lift
    from couponflow.uplift import qini_coefficient, uplift_at_k

    logged = test["arm"].to_numpy(dtype=object)
    propensity = test["propensity"].to_numpy("float64")
    summary: dict[str, Any] = {"policy": {}, "random": {}, "per_arm": {}}
    for outcome in OUTCOMES:
        y = test[outcome].to_numpy("float64")
        summary["policy"][outcome] = ipw_policy_lift(
            policy, logged, propensity, y
        ).to_dict()
        summary["random"][outcome] = ipw_policy_lift(
            random_policy, logged, propensity, y
        ).to_dict()
    summary["policy_emails"] = {
        arm: int((policy == arm).sum()) for arm in [*arms, CONTROL_ARM]
    }
    for j, arm in enumerate(arms):
        rows = np.isin(logged, [arm, CONTROL_ARM])
        treated = logged[rows] == arm
        metrics: dict[str, float] = {}
        for outcome in OUTCOMES:
            score = predictions[outcome][rows, j]
            y = test[outcome].to_numpy("float64")[rows]
            metrics[f"qini_{outcome}"] = qini_coefficient(score, treated, y)
            metrics[f"uplift_at_10_{outcome}"] = uplift_at_k(
                score, treated, y, UPLIFT_AT
            )
        summary["per_arm"][arm] = metrics
    return summary


def _write_report(
    path: Path,
    summary: dict[str, Any],
    test: pd.DataFrame,
    predictions: dict[str, np.ndarray],
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from couponflow.uplift import qini_curve

    arms = list(summary["per_arm"])
    logged = test["arm"].to_numpy(dtype=object)
    figure, axes = plt.subplots(1, len(arms), figsize=(5 * len(arms), 4))
    for j, (arm, axis) in enumerate(zip(arms, np.atleast_1d(axes), strict=True)):
        rows = np.isin(logged, [arm, CONTROL_ARM])
        fraction, qini = qini_curve(
            predictions["visited"][rows, j],
            logged[rows] == arm,
            test["visited"].to_numpy("float64")[rows],
        )
        axis.plot(fraction, qini, label="model")
        axis.plot([0, 1], [0, qini[-1]], linestyle="--", label="random")
        axis.set_title(f"Qini, visits: {arm}")
        axis.set_xlabel("share of customers targeted")
        axis.legend()
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    image = base64.b64encode(buffer.getvalue()).decode()

    rows_html = "".join(
        f"<tr><td>{outcome}</td><td>{summary['policy'][outcome]['value']:.4f}</td>"
        f"<td>[{summary['policy'][outcome]['ci_low']:.4f}, "
        f"{summary['policy'][outcome]['ci_high']:.4f}]</td>"
        f"<td>{summary['random'][outcome]['value']:.4f}</td></tr>"
        for outcome in OUTCOMES
    )
    html = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<title>Hillstrom targeting study</title></head><body>"
        "<h1>Hillstrom targeting study</h1>"
        f"<p>Trained on {summary['train_rows']} customers; IPW estimates on the "
        f"untouched {summary['test_rows']}. The policy e-mails "
        f"{summary['target_fraction']:.0%} of customers. Lift is per customer, "
        "against e-mailing nobody; revenue in cents.</p>"
        "<table border='1'><tr><th>outcome</th><th>policy lift</th><th>95% CI</th>"
        f"<th>random targeting lift</th></tr>{rows_html}</table>"
        f"<img src='data:image/png;base64,{image}'/>"
        f"<pre>{json.dumps(summary, indent=2, default=str)}</pre></body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html)
    (path.parent / "summary.json").write_text(json.dumps(summary, indent=2))
    return path


def _log_to_mlflow(settings: Settings, summary: dict[str, Any], report: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    experiment = "couponflow-hillstrom"
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(
            experiment, artifact_location=f"{settings.mlflow_artifact_root}/hillstrom"
        )
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="hillstrom-targeting"):
        mlflow.log_params(
            {"target_fraction": summary["target_fraction"], "seed": summary["seed"]}
        )
        for group in ("policy", "random"):
            for outcome, estimate in summary[group].items():
                mlflow.log_metric(f"{group}_lift_{outcome}", estimate["value"])
        for arm, metrics in summary["per_arm"].items():
            for name, value in metrics.items():
                mlflow.log_metric(f"{arm}_{name}", value)
        mlflow.log_artifact(str(report))
        mlflow.log_artifact(str(report.parent / "summary.json"))
