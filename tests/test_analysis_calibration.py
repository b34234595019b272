"""Small, fast versions of the calibration benchmark, with wide tolerances.

The full-size figures come from ``benchmarks/calibration.py``.
"""

from __future__ import annotations

import numpy as np

from couponflow.analysis import calibration

SEED = 23
ALPHA = 0.05


def test_true_effects_match_simulation() -> None:
    rng = np.random.default_rng(SEED)
    users = calibration.draw_users(
        rng, calibration.fixed_split(1, 400_000), lift=calibration.LIFT
    )
    truth = calibration.true_effects()
    treated, control = slice(0, 400_000), slice(400_000, None)
    for values, expected in (
        (users.converted, truth.conversion_rate_difference),
        (users.revenue, truth.revenue_per_user_cents),
        (users.profit, truth.profit_per_user_cents),
    ):
        difference = values[0, treated].mean() - values[0, control].mean()
        standard_error = np.sqrt(
            values[0, treated].var() / 400_000 + values[0, control].var() / 400_000
        )
        assert abs(difference - expected) < 4 * standard_error


def test_aa_false_positive_rates() -> None:
    rates = calibration.aa_false_positive_rates(200, 500, ALPHA, seed=SEED)
    assert set(rates) == {
        "conversion_z_test",
        "revenue_welch",
        "profit_welch",
        "profit_cuped",
    }
    for name, rate in rates.items():
        assert 0.01 <= rate <= 0.10, name


def test_coverage_rates() -> None:
    rates = calibration.coverage_rates(200, 500, ALPHA, seed=SEED)
    assert rates.pop("cuped_width_ratio") < 1.0
    assert abs(rates.pop("cuped_bias_in_se")) < 3.0
    for name, rate in rates.items():
        assert 0.90 <= rate <= 0.99, name


def test_stratified_covers_after_split_change() -> None:
    rates = calibration.split_change_coverage(60, 500, ALPHA, seed=SEED)
    assert rates["stratified"] >= 0.85


def test_exact_interval_is_conservative() -> None:
    rates = calibration.exact_small_count_coverage(2_000, alpha=ALPHA, seed=SEED)
    assert rates["exact"] >= 0.95


def test_end_to_end_runs() -> None:
    rates = calibration.end_to_end_aa_rates(20, 200, ALPHA, seed=SEED)
    assert set(rates) == {"arm_profit_welch", "family_profit_holm", "any_arm_dropped"}
    assert rates["family_profit_holm"] <= 0.25
    assert rates["any_arm_dropped"] <= rates["family_profit_holm"]
