"""Tests of the uplift metrics against a small example computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from couponflow.uplift import auuc, qini_coefficient, qini_curve, uplift_at_k

# Six rows, four groups of tied scores: {A}, {B, C}, {D, E}, {F}.
#          A    B    C    D    E    F
SCORE = [0.9, 0.7, 0.7, 0.4, 0.4, 0.1]
TREATED = [1, 0, 1, 0, 1, 0]
OUTCOME = [1, 0, 1, 1, 0, 0]

# By hand, with 3 treated rows in total:
# after {A}:    n_t=1 n_c=0 y_t=1 y_c=0 -> no control rows, qini 0, uplift 0
# after {B,C}:  n_t=2 n_c=1 y_t=2 y_c=0 -> qini (2 - 0) / 3 = 2/3, uplift 1 * 3/6
# after {D,E}:  n_t=3 n_c=2 y_t=2 y_c=1 -> qini (2 - 1.5) / 3 = 1/6,
#               uplift (2/3 - 1/2) * 5/6 = 5/36
# after {F}:    n_t=3 n_c=3 y_t=2 y_c=1 -> qini (2 - 1) / 3 = 1/3, uplift 1/3
EXPECTED_FRACTION = [0.0, 1 / 6, 1 / 2, 5 / 6, 1.0]
EXPECTED_QINI = [0.0, 0.0, 2 / 3, 1 / 6, 1 / 3]
# Trapezoids: 0 + 1/9 + 5/36 + 1/24 = 7/24, minus the random line's 1/2 * 1/3.
EXPECTED_QINI_COEFFICIENT = 7 / 24 - 1 / 6
# Trapezoids: 0 + 1/12 + 23/216 + 17/432 = 99/432.
EXPECTED_AUUC = 99 / 432


def test_qini_curve_hand_example() -> None:
    fraction, qini = qini_curve(SCORE, TREATED, OUTCOME)
    np.testing.assert_allclose(fraction, EXPECTED_FRACTION, rtol=0, atol=1e-12)
    np.testing.assert_allclose(qini, EXPECTED_QINI, rtol=0, atol=1e-12)


def test_qini_coefficient_hand_example() -> None:
    value = qini_coefficient(SCORE, TREATED, OUTCOME)
    assert value == pytest.approx(EXPECTED_QINI_COEFFICIENT, abs=1e-12)


def test_auuc_hand_example() -> None:
    assert auuc(SCORE, TREATED, OUTCOME) == pytest.approx(EXPECTED_AUUC, abs=1e-12)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        # Only A: no control rows in the top set.
        (1 / 6, 0.0),
        # A and half of {B, C}: treated rate 1.5 / 1.5, control rate 0 / 0.5.
        (1 / 3, 1.0),
        # A, B, C: treated rate 2/2, control rate 0/1.
        (0.5, 1.0),
        # A, B, C and half of {D, E}: treated 2 / 2.5, control 0.5 / 1.5.
        (2 / 3, 0.8 - 1 / 3),
        (5 / 6, 2 / 3 - 1 / 2),
        (1.0, 2 / 3 - 1 / 3),
    ],
)
def test_uplift_at_k_hand_example(k: float, expected: float) -> None:
    assert uplift_at_k(SCORE, TREATED, OUTCOME, k) == pytest.approx(expected, abs=1e-12)


def test_metrics_ignore_row_order() -> None:
    rng = np.random.default_rng(7)
    n = 500
    # Few distinct scores, so that most rows are tied with others.
    score = rng.integers(0, 12, n) / 10
    treated = rng.integers(0, 2, n)
    outcome = rng.gamma(2.0, 30.0, n) * rng.integers(0, 2, n)
    permutation = rng.permutation(n)
    shuffled = (score[permutation], treated[permutation], outcome[permutation])

    fraction, qini = qini_curve(score, treated, outcome)
    fraction_shuffled, qini_shuffled = qini_curve(*shuffled)
    assert np.array_equal(fraction, fraction_shuffled)
    assert np.array_equal(qini, qini_shuffled)
    assert qini_coefficient(score, treated, outcome) == qini_coefficient(*shuffled)
    assert auuc(score, treated, outcome) == auuc(*shuffled)
    for k in (0.1, 0.25, 0.5):
        assert uplift_at_k(score, treated, outcome, k) == uplift_at_k(*shuffled, k)


def test_all_tied_scores_match_random_line() -> None:
    score = np.zeros(6)
    fraction, qini = qini_curve(score, TREATED, OUTCOME)
    np.testing.assert_allclose(fraction, [0.0, 1.0])
    np.testing.assert_allclose(qini, [0.0, 1 / 3])
    assert qini_coefficient(score, TREATED, OUTCOME) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("arm", [0, 1])
def test_single_arm_sample_gives_zeros(arm: int) -> None:
    treated = [arm] * 6
    fraction, qini = qini_curve(SCORE, treated, OUTCOME)
    assert not np.isnan(qini).any()
    np.testing.assert_array_equal(qini, np.zeros(len(fraction)))
    assert qini_coefficient(SCORE, treated, OUTCOME) == 0.0
    assert auuc(SCORE, treated, OUTCOME) == 0.0
    assert uplift_at_k(SCORE, treated, OUTCOME, 0.5) == 0.0


def test_boolean_treated_equals_integer() -> None:
    as_bool = [bool(t) for t in TREATED]
    integer_value = qini_coefficient(SCORE, TREATED, OUTCOME)
    assert qini_coefficient(SCORE, as_bool, OUTCOME) == integer_value


def test_perfect_score_beats_reversed() -> None:
    rng = np.random.default_rng(3)
    n = 2000
    responds = rng.random(n) < 0.3
    treated = rng.integers(0, 2, n)
    outcome = (responds & (treated == 1)).astype(float)
    score = responds.astype(float) + rng.normal(0, 0.01, n)
    assert qini_coefficient(score, treated, outcome) > 0.05
    assert qini_coefficient(-score, treated, outcome) < -0.05


@pytest.mark.parametrize(
    ("score", "treated", "outcome", "message"),
    [
        ([0.1, np.nan], [0, 1], [0, 1], "uplift_score contains 1 NaN"),
        ([0.1, 0.2], [0, 2], [0, 1], "treated must be boolean or 0/1"),
        ([0.1, 0.2], [0, 1], [0], "same length"),
        ([], [], [], "at least one row"),
        ([[0.1, 0.2]], [[0, 1]], [[0, 1]], "one-dimensional"),
    ],
)
def test_invalid_inputs_raise(
    score: list[float], treated: list[int], outcome: list[float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        qini_curve(score, treated, outcome)


@pytest.mark.parametrize("k", [0.0, -0.1, 1.5])
def test_uplift_at_k_rejects_bad_k(k: float) -> None:
    with pytest.raises(ValueError, match="k must be a fraction"):
        uplift_at_k(SCORE, TREATED, OUTCOME, k)
