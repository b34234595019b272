"""Tests of the HTML experiment report, its summary.json and the MLflow logging."""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from couponflow.analysis import (
    ExperimentResult,
    analyze_experiment,
    load_campaign_summary,
    offers_to_drop,
    offers_to_keep,
)
from couponflow.report import (
    EXPERIMENT_NAME,
    flatten_metrics,
    log_report_to_mlflow,
    write_report,
)
from couponflow.settings import Settings

SEED = 7
MARGIN_RATE = 0.3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_result(
    users_per_arm: int = 1_000,
    holdout_share: float = 0.5,
    designed: float = 0.5,
    days: int = 1,
    with_covariate: bool = False,
) -> ExperimentResult:
    """Analyze a synthetic experiment where arm C10 lifts conversion from 10% to 30%.

    Outcomes are observed over ``days`` UTC days. With ``with_covariate`` the
    allocation carries a pre-period spend that predicts revenue.
    """
    rng = np.random.default_rng(SEED)
    n = 2 * users_per_arm
    policy_arm = np.where(np.arange(n) % 2 == 0, "C10", "C20")
    holdout = rng.random(n) < holdout_share
    arm = np.where(holdout, "control", policy_arm)
    good = arm == "C10"
    converted = rng.random(n) < np.where(good, 0.3, 0.1)

    user_id = [str(i) for i in range(n)]
    allocation = pd.DataFrame(
        {
            "user_id": user_id,
            "group_name": np.where(holdout, "holdout", "treatment"),
            "arm": arm,
            "policy_arm": policy_arm,
            "propensity": 1.0,
            "score_uplift": np.where(policy_arm == "C10", 0.2, 0.0)
            + rng.normal(0, 0.05, n),
            "expected_cost_cents": np.where(holdout, 0, 100),
        }
    )

    pre_spend = rng.gamma(2.0, 2_000.0, n)
    revenue = np.where(converted, 3_000 + np.round(0.5 * pre_spend), 0)
    if with_covariate:
        allocation["pre_spend_cents"] = np.round(pre_spend).astype(np.int64)
    day = rng.integers(0, days, n)
    outcomes = pd.DataFrame(
        {
            "campaign_id": "spring",
            "user_id": user_id,
            "observed_at": pd.Timestamp("2024-04-01", tz="UTC")
            + pd.to_timedelta(day, unit="D"),
            "converted": converted,
            "redeemed": converted & good,
            "revenue_cents": revenue.astype(np.int64),
            "discount_cents": np.where(converted & good, 500, 0),
        }
    )
    return analyze_experiment(allocation, outcomes, MARGIN_RATE, designed)


def embedded_pngs(document: str) -> list[bytes]:
    encoded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", document)
    return [base64.b64decode(item) for item in encoded]


class TestWriteReport:
    def test_html_is_self_contained(self, tmp_path: Path) -> None:
        result = make_result()
        path = write_report(result, tmp_path / "spring" / "report.html", "Spring")
        document = path.read_text(encoding="utf-8")

        images = embedded_pngs(document)
        assert path == tmp_path / "spring" / "report.html"
        assert len(images) == 3
        assert all(image.startswith(PNG_SIGNATURE) for image in images)
        assert "http://" not in document
        assert "https://" not in document
        assert "<link" not in document

    def test_html_shows_guard_arms_notes(self, tmp_path: Path) -> None:
        result = make_result()
        document = write_report(result, tmp_path / "r.html", "Spring").read_text()

        assert "class='guard passed'" in document
        assert "Sample ratio check passed" in document
        assert "<td class='text'>C10</td>" in document
        assert "<td class='text'>C20</td>" in document
        assert "Qini coefficient" in document
        assert "have no outcome row" in document
        assert "profitable: incremental profit is above 0" in document
        for guard in ("sample ratio mismatch", "split change", "minimum sample"):
            assert f"<td class='text'>{guard}</td>" in document
        assert "<td class='text'>Holm correction</td>" in document
        assert "every outcome was observed on one day" in document
        assert "CUPED was not applied" in document
        assert "Decision rule: keep an arm unless" in document

    def test_summary_lists_profitable_offers(self, tmp_path: Path) -> None:
        result = make_result()
        write_report(result, tmp_path / "r.html", "Spring")
        summary = json.loads((tmp_path / "summary.json").read_text())

        assert summary["trustworthy"] is True
        assert summary["positive_profit_offers"] == ["C10"]
        assert summary["report"] == "r.html"
        arms = {arm["arm"]: arm for arm in summary["arms"]}
        assert arms["C10"]["incremental_profit_cents"]["low"] > 0
        assert arms["C10"]["decision"] == "keep"
        assert arms["C10"]["profit_significance"] == "positive"
        assert arms["C10"]["profit_p_value_holm"] < 0.05
        assert summary["offers_to_keep"] == result.offers_to_keep()
        assert summary["decision_rule"] == result.decision_rule
        assert summary["result"]["sample_ratio"]["flagged"] is False

    def test_mismatch_flags_guard_and_summary(self, tmp_path: Path) -> None:
        # Half the users in the holdout against a designed 10%.
        result = make_result(designed=0.1)
        document = write_report(result, tmp_path / "r.html", "Broken").read_text()
        summary = json.loads((tmp_path / "summary.json").read_text())

        assert "class='guard flagged'" in document
        assert "results withheld" in document
        assert summary["trustworthy"] is False
        assert summary["positive_profit_offers"] == []
        assert {arm["verdict"] for arm in summary["arms"]} == {
            "withheld: sample ratio mismatch"
        }
        assert summary["offers_to_drop"] == []

    def test_title_and_extra_tables_escaped(self, tmp_path: Path) -> None:
        extra = {"Coupons <designed>": pd.DataFrame({"coupon": ["<b>C10</b>"]})}
        document = write_report(
            make_result(users_per_arm=200),
            tmp_path / "r.html",
            "<script>x</script>",
            extra_tables=extra,
        ).read_text()

        assert "<script>" not in document
        assert "&lt;script&gt;x&lt;/script&gt;" in document
        assert "Coupons &lt;designed&gt;" in document
        assert "&lt;b&gt;C10&lt;/b&gt;" in document

    def test_empty_holdout_still_renders(self, tmp_path: Path) -> None:
        result = make_result(users_per_arm=100, holdout_share=0.0)
        document = write_report(result, tmp_path / "r.html", "No holdout").read_text()
        summary = json.loads((tmp_path / "summary.json").read_text())

        assert "no arm has a defined interval" in document
        assert embedded_pngs(document) == []
        assert summary["positive_profit_offers"] == []

    def test_daily_and_cuped_sections(self, tmp_path: Path) -> None:
        result = make_result(days=5, with_covariate=True)
        document = write_report(result, tmp_path / "r.html", "Daily").read_text()

        # Lift, profit, cumulative profit over time and Qini.
        assert len(embedded_pngs(document)) == 4
        assert "alt='Cumulative incremental profit over time'" in document
        assert "<td class='text'>2024-04-05</td>" in document
        assert "confidence sequence" in document
        assert "width reduction" in document
        assert "welch-cuped" in document
        for arm in result.arms:
            for item in arm.cuped:
                assert f"{item.adjusted.width:.1f}" in document


class TestSummary:
    def test_load_and_offers(self, tmp_path: Path) -> None:
        result = make_result()
        write_report(result, tmp_path / "spring" / "report.html", "Spring")

        from_folder = load_campaign_summary(tmp_path / "spring")
        from_file = load_campaign_summary(tmp_path / "spring" / "summary.json")
        assert from_folder["arms"] == from_file["arms"]
        assert offers_to_keep(from_file) == ["C10", "C20"]
        assert offers_to_drop(from_file) == []

    def test_dropped_arm_in_summary(self, tmp_path: Path) -> None:
        result = make_result()
        arms = [
            replace(arm, decision="drop") if arm.arm == "C20" else arm
            for arm in result.arms
        ]
        write_report(replace(result, arms=arms), tmp_path / "r.html", "Spring")
        summary = load_campaign_summary(tmp_path)
        assert offers_to_keep(summary) == ["C10"]
        assert offers_to_drop(summary) == ["C20"]

    def test_missing_summary_raises(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="run analyze_experiment"):
            load_campaign_summary(tmp_path)

    @pytest.mark.parametrize(
        ("content", "message"),
        [
            ("not json", "not valid JSON"),
            ("[]", "expected a JSON object"),
            ('{"summary_version": 1}', "summary_version must be 2"),
            (
                '{"summary_version": 2, "trustworthy": true, '
                '"arms": [{"arm": "C1", "decision": "maybe"}]}',
                "has decision 'maybe'",
            ),
        ],
    )
    def test_invalid_summary_raises(
        self, tmp_path: Path, content: str, message: str
    ) -> None:
        path = tmp_path / "summary.json"
        path.write_text(content)
        with pytest.raises(ValueError, match=message):
            load_campaign_summary(path)


class TestMlflow:
    def test_flatten_keeps_finite_numbers(self) -> None:
        metrics = flatten_metrics(make_result(users_per_arm=200))

        assert metrics["trustworthy"] == 1.0
        assert "arms.C10.incremental_profit_cents.low" in metrics
        assert "arms.C10.treated.users" in metrics
        assert "uplift.qini_coefficient" in metrics
        assert "arms.C10.profit_p_value_holm" in metrics
        assert not any("curve" in key for key in metrics)
        assert all(math.isfinite(value) for value in metrics.values())

    def test_flatten_keys_cuped_by_metric(self) -> None:
        metrics = flatten_metrics(make_result(users_per_arm=300, with_covariate=True))
        assert "arms.C10.cuped.profit.width_reduction" in metrics
        assert "arms.C10.cuped.revenue.theta" in metrics

    def test_logs_metrics_and_artifacts(self, tmp_path: Path) -> None:
        from mlflow import MlflowClient

        settings = Settings(home=tmp_path)
        result = make_result()
        html_path = write_report(result, tmp_path / "reports" / "r.html", "Spring")

        run_id = log_report_to_mlflow(result, html_path, settings, "spring")
        second = log_report_to_mlflow(result, html_path, settings, "spring")

        client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
        run = client.get_run(run_id)
        experiment = client.get_experiment(run.info.experiment_id)
        artifacts = {item.path for item in client.list_artifacts(run_id)}
        profit = result.arms[0].incremental_profit_cents
        assert profit is not None
        assert settings.mlflow_tracking_uri.startswith("sqlite:///")
        assert experiment.name == EXPERIMENT_NAME
        assert client.get_run(second).info.experiment_id == experiment.experiment_id
        assert run.info.status == "FINISHED"
        assert run.data.params["campaign_id"] == "spring"
        assert run.data.tags["trustworthy"] == "True"
        assert run.data.metrics["arms.C10.incremental_profit_cents.estimate"] == (
            pytest.approx(profit.estimate)
        )
        assert run.data.metrics["sample_ratio.p_value"] == pytest.approx(
            result.sample_ratio.p_value
        )
        assert artifacts == {"r.html", "summary.json"}

    def test_missing_html_raises(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="write_report"):
            log_report_to_mlflow(
                make_result(users_per_arm=50),
                tmp_path / "absent.html",
                Settings(home=tmp_path),
                "spring",
            )
