"""The Hillstrom study end to end, on the real e-mail experiment where it is present."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from couponflow.hillstrom_study import OUTCOMES, run_hillstrom_study
from couponflow.settings import Settings

pytestmark = pytest.mark.realdata


def test_hillstrom_study_writes_report(tmp_path: Path, data_dir: Path) -> None:
    csv = data_dir / "hillstrom" / "hillstrom.csv"
    if not csv.exists():
        pytest.skip(f"Hillstrom data not found at {csv}; set COUPONFLOW_DATA_DIR")
    settings = Settings(home=tmp_path, data_dir=data_dir)
    study = run_hillstrom_study(settings, target_fraction=0.3, seed=7)
    summary = study.summary

    assert summary["train_rows"] + summary["test_rows"] == 64_000
    assert 0.28 < summary["test_rows"] / 64_000 < 0.32
    emailed = sum(n for arm, n in summary["policy_emails"].items() if arm != "control")
    assert emailed == int(0.3 * summary["test_rows"])
    for outcome in OUTCOMES:
        estimate = summary["policy"][outcome]
        assert math.isfinite(estimate["value"])
        assert estimate["ci_low"] <= estimate["value"] <= estimate["ci_high"]
    # Both e-mails raised visits in the experiment, so targeting 30% of customers
    # by predicted visit uplift must show a positive incremental visit rate.
    assert summary["policy"]["visited"]["ci_low"] > 0
    assert set(summary["per_arm"]) == {"mens_email", "womens_email"}
    for metrics in summary["per_arm"].values():
        assert metrics["uplift_at_10_visited"] > 0

    assert study.report.exists()
    assert "data:image/png;base64," in study.report.read_text()
    saved = json.loads((study.report.parent / "summary.json").read_text())
    assert saved["policy"]["visited"]["value"] == summary["policy"]["visited"]["value"]


def test_hillstrom_study_rejects_bad_fraction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="target_fraction"):
        run_hillstrom_study(Settings(home=tmp_path), target_fraction=0.0)
