"""Tests for ``dynamic_ctr.significance``: DeLong test, paired seed deltas, verdict."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from dynamic_ctr.significance import (
    VERDICTS,
    DeLongResult,
    PairedDelta,
    delong_test,
    paired_delta,
    verdict,
)

# ---------------------------------------------------------------------------------------
# Fixtures and an independent DeLong reference
# ---------------------------------------------------------------------------------------


def _tied_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A small case with many ties: scores take only 5 (a) or 4 (b) distinct values,
    so there are ties within each class and between positives and negatives."""
    rng = np.random.default_rng(7)
    y = np.array([1] * 11 + [0] * 14)
    rng.shuffle(y)
    a = rng.integers(0, 5, size=y.size) + 1.0 * y  # informative, tied
    b = rng.integers(0, 4, size=y.size).astype(float)  # uninformative, tied
    return y, a, b


def _psi(x: float, yv: float) -> float:
    """DeLong's kernel: 1 if the positive scores higher, 1/2 on a tie, 0 otherwise."""
    if x > yv:
        return 1.0
    if x == yv:
        return 0.5
    return 0.0


def _reference_delong(y, a, b) -> tuple[float, float, float, float, float]:
    """O(m * n) DeLong, DeLong & Clarke-Pearson (1988), written out from the paper with
    plain loops (no ranks, no np.cov), to check the fast midrank implementation."""
    models = [np.asarray(a, float), np.asarray(b, float)]
    pos_idx = [i for i in range(len(y)) if y[i] == 1]
    neg_idx = [j for j in range(len(y)) if y[j] == 0]
    m, n = len(pos_idx), len(neg_idx)
    v10 = []  # v10[k][i] = (1/n) sum_j psi(X_i, Y_j) for model k
    v01 = []  # v01[k][j] = (1/m) sum_i psi(X_i, Y_j) for model k
    aucs = []
    for s in models:
        v10.append([sum(_psi(s[i], s[j]) for j in neg_idx) / n for i in pos_idx])
        v01.append([sum(_psi(s[i], s[j]) for i in pos_idx) / m for j in neg_idx])
        aucs.append(sum(sum(_psi(s[i], s[j]) for j in neg_idx) for i in pos_idx) / (m * n))

    def cov_matrix(v: list[list[float]], theta: list[float], size: int) -> list[list[float]]:
        # S^{rs} = 1/(size-1) * sum_i (V^r_i - theta^r)(V^s_i - theta^s)
        return [
            [
                sum((v[r][i] - theta[r]) * (v[s][i] - theta[s]) for i in range(size))
                / (size - 1)
                for s in range(2)
            ]
            for r in range(2)
        ]

    s10 = cov_matrix(v10, aucs, m)
    s01 = cov_matrix(v01, aucs, n)
    s = [[s10[r][c] / m + s01[r][c] / n for c in range(2)] for r in range(2)]
    var = s[0][0] + s[1][1] - 2.0 * s[0][1]  # L S L' with contrast L = (1, -1)
    se = math.sqrt(var)
    delta = aucs[0] - aucs[1]
    z = delta / se
    p = 2.0 * (1.0 - stats.norm.cdf(abs(z)))
    return aucs[0], aucs[1], se, z, p


# ---------------------------------------------------------------------------------------
# delong_test
# ---------------------------------------------------------------------------------------


def test_delong_matches_direct_computation_with_ties():
    y, a, b = _tied_case()
    # The case really has ties across classes in both models.
    for s in (a, b):
        assert set(s[y == 1]) & set(s[y == 0])
    auc_a, auc_b, se, z, p = _reference_delong(y, a, b)
    result = delong_test(y, a, b)
    assert isinstance(result, DeLongResult)
    assert result.auc_a == pytest.approx(auc_a, abs=1e-10)
    assert result.auc_b == pytest.approx(auc_b, abs=1e-10)
    assert result.delta == pytest.approx(auc_a - auc_b, abs=1e-10)
    assert result.se == pytest.approx(se, abs=1e-10)
    assert result.z == pytest.approx(z, abs=1e-10)
    assert result.p_value == pytest.approx(p, abs=1e-10)
    # Guard against a degenerate reference: the case must give a real, finite test.
    assert se > 0.01 and 0.0 < p < 1.0


def test_delong_matches_direct_computation_on_continuous_scores():
    rng = np.random.default_rng(3)
    y = (rng.random(40) < 0.4).astype(int)
    a = y + rng.normal(size=40)
    b = 0.5 * a + rng.normal(size=40)  # correlated with a, as two models on one test set
    auc_a, auc_b, se, z, p = _reference_delong(y, a, b)
    result = delong_test(y, a, b)
    assert (result.auc_a, result.auc_b, result.se, result.z, result.p_value) == pytest.approx(
        (auc_a, auc_b, se, z, p), abs=1e-10
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_aucs_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(500) < 0.2).astype(int)
    a = np.round(y + rng.normal(size=500), 1)  # rounding makes ties
    b = rng.integers(0, 10, size=500)
    result = delong_test(y, a, b)
    assert result.auc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert result.auc_b == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert result.delta == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)


def test_delong_identical_scores_give_p_one_without_warnings():
    y, a, _ = _tied_case()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = delong_test(y, a, a.copy())
    assert result.delta == 0.0
    assert result.se == 0.0
    assert result.z == 0.0
    assert result.p_value == 1.0


def test_delong_zero_se_with_nonzero_delta_is_infinite_z_without_warnings():
    # A perfect model against a constant one: every per-row difference is exactly 1/2,
    # so the difference has no spread at all but is clearly not 0.
    y = np.array([0, 0, 0, 1, 1, 1])
    perfect = y.astype(float)
    constant = np.zeros(6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = delong_test(y, perfect, constant)
    assert result.delta == 0.5
    assert result.se == 0.0
    assert result.z == math.inf
    assert result.p_value == 0.0
    assert delong_test(y, constant, perfect).z == -math.inf


def test_delong_strongly_better_model_is_significant():
    rng = np.random.default_rng(1)
    n = 3000
    y = (rng.random(n) < 0.3).astype(int)
    strong = 1.5 * y + rng.normal(size=n)
    weak = 0.3 * y + rng.normal(size=n)
    result = delong_test(y, strong, weak)
    assert result.delta > 0.2
    assert result.p_value < 1e-6


def test_delong_same_distribution_is_not_significant():
    # Both models have the same signal and independent noise, so the null holds and p is
    # uniform over seeds; seed 0 gives p ~ 0.83 (seeds 0-4 all give p > 0.15). Fixed seed,
    # so the test is deterministic.
    rng = np.random.default_rng(0)
    n = 3000
    y = (rng.random(n) < 0.3).astype(int)
    a = 0.5 * y + rng.normal(size=n)
    b = 0.5 * y + rng.normal(size=n)
    result = delong_test(y, a, b)
    assert result.p_value > 0.05
    assert abs(result.delta) < 0.05


def test_delong_is_antisymmetric_in_the_models():
    y, a, b = _tied_case()
    ab = delong_test(y, a, b)
    ba = delong_test(y, b, a)
    assert ab.delta != 0.0
    assert ba.delta == pytest.approx(-ab.delta, abs=1e-15)
    assert ba.z == pytest.approx(-ab.z, abs=1e-12)
    assert ba.se == pytest.approx(ab.se, abs=1e-15)
    assert ba.p_value == pytest.approx(ab.p_value, abs=1e-12)
    assert (ba.auc_a, ba.auc_b) == (ab.auc_b, ab.auc_a)


def test_delong_accepts_bool_and_float_labels():
    y, a, b = _tied_case()
    expected = delong_test(y, a, b)
    assert delong_test(y.astype(bool), a, b) == expected
    assert delong_test(y.astype(float), list(a), tuple(b)) == expected


def test_delong_result_is_frozen():
    y, a, b = _tied_case()
    result = delong_test(y, a, b)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.p_value = 0.0  # type: ignore[misc]


_Y = [0, 1, 0, 1, 0, 1]
_A = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7]
_B = [0.5, 0.4, 0.3, 0.6, 0.1, 0.2]


@pytest.mark.parametrize(
    ("y", "a", "b", "match"),
    [
        (_Y, _A[:-1], _B, "same length"),
        (_Y, _A, _B + [0.3], "same length"),
        ([_Y], [_A], [_B], "y_true must be 1-d"),
        (_Y, [_A], _B, "scores_a must be 1-d"),
        (_Y, _A, np.array(_B).reshape(2, 3), "scores_b must be 1-d"),
        (_Y, [0.1, np.nan, 0.2, 0.8, 0.3, 0.7], _B, "scores_a must be finite"),
        (_Y, _A, [0.5, 0.4, np.inf, 0.6, 0.1, 0.2], "scores_b must be finite"),
        (_Y, ["a", "b", "c", "d", "e", "f"], _B, "scores_a must be numeric"),
        ([0, 1, 2, 1, 0, 1], _A, _B, "labels must be 0 or 1"),
        ([0, 1, -1, 1, 0, 1], _A, _B, "labels must be 0 or 1"),
        ([0, 1, np.nan, 1, 0, 1], _A, _B, "labels must be 0 or 1"),
        ([1] * 6, _A, _B, "both classes"),
        ([0] * 6, _A, _B, "both classes"),
        ([], [], [], "both classes"),
        ([0, 1, 0, 0, 0, 0], _A, _B, "at least 2 positive and 2 negative"),
    ],
)
def test_delong_rejects_invalid_inputs(y, a, b, match):
    with pytest.raises(ValueError, match=match):
        delong_test(y, a, b)


# ---------------------------------------------------------------------------------------
# paired_delta
# ---------------------------------------------------------------------------------------


def test_paired_delta_matches_ttest_rel_and_hand_interval():
    variant = np.array([0.7712, 0.7735, 0.7698, 0.7751, 0.7720])
    base = np.array([0.7690, 0.7701, 0.7702, 0.7719, 0.7688])
    deltas = variant - base
    result = paired_delta(deltas)
    assert isinstance(result, PairedDelta)
    n = len(deltas)
    assert result.n == n
    assert result.confidence == 0.95
    assert result.mean == pytest.approx(np.mean(variant) - np.mean(base), abs=1e-14)
    # Sample std by hand: sqrt(sum (d - mean)^2 / (n - 1)).
    std = math.sqrt(sum((d - deltas.mean()) ** 2 for d in deltas) / (n - 1))
    assert result.std == pytest.approx(std, rel=1e-12)
    half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)
    assert result.ci_low == pytest.approx(deltas.mean() - half, rel=1e-10)
    assert result.ci_high == pytest.approx(deltas.mean() + half, rel=1e-10)
    assert result.p_value == pytest.approx(stats.ttest_rel(variant, base).pvalue, rel=1e-10)
    # The example is meant to be significant, so the interval excludes 0.
    assert result.p_value < 0.05 and result.ci_low > 0


def test_paired_delta_respects_confidence():
    deltas = [0.003, -0.001, 0.002, 0.0005]
    narrow = paired_delta(deltas, confidence=0.8)
    wide = paired_delta(deltas, confidence=0.99)
    half = stats.t.ppf(0.9, 3) * np.std(deltas, ddof=1) / 2.0
    assert narrow.ci_high - narrow.mean == pytest.approx(half, rel=1e-10)
    assert wide.ci_low < narrow.ci_low < narrow.ci_high < wide.ci_high
    assert narrow.p_value == wide.p_value
    assert narrow.confidence == 0.8


def test_paired_delta_single_seed_is_nan_spread():
    result = paired_delta([0.004])
    assert result.n == 1
    assert result.mean == 0.004
    for value in (result.std, result.ci_low, result.ci_high, result.p_value):
        assert math.isnan(value)


@pytest.mark.parametrize(
    ("value", "expected_p"),
    [(0.01, 0.0), (-0.002, 0.0), (0.0, 1.0), (0.1, 0.0)],  # 0.1 * 3 does not sum to 0.3
)
def test_paired_delta_zero_variance_is_well_defined(value, expected_p):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = paired_delta([value] * 3)
    assert result.n == 3
    assert result.mean == value
    assert result.std == 0.0
    assert (result.ci_low, result.ci_high) == (value, value)
    assert result.p_value == expected_p


@pytest.mark.parametrize(
    ("deltas", "confidence", "match"),
    [
        ([], 0.95, "empty"),
        ([[0.1, 0.2]], 0.95, "1-d"),
        ([0.1, np.nan], 0.95, "finite"),
        ([0.1, 0.2], 1.0, "confidence"),
        ([0.1, 0.2], 0.0, "confidence"),
    ],
)
def test_paired_delta_rejects_invalid_inputs(deltas, confidence, match):
    with pytest.raises(ValueError, match=match):
        paired_delta(deltas, confidence=confidence)


# ---------------------------------------------------------------------------------------
# verdict
# ---------------------------------------------------------------------------------------


def test_verdict_significant_gain():
    paired = paired_delta([0.002, 0.003, 0.0025, 0.0031, 0.0022])
    assert paired.p_value < 0.05
    assert verdict(paired, [0.2, 0.1, 0.3, 0.04, 0.5]) == "significant gain"


def test_verdict_significant_loss():
    paired = paired_delta([-0.002, -0.003, -0.0025, -0.0031, -0.0022])
    assert verdict(paired, [0.2] * 5) == "significant loss"


def test_verdict_no_significant_difference():
    paired = paired_delta([0.002, -0.003, 0.001, -0.0005])
    assert paired.p_value > 0.05
    # The DeLong p-values do not override the seed test, however small.
    assert verdict(paired, [1e-9] * 4) == "no significant difference"


def test_verdict_follows_alpha():
    paired = paired_delta([0.002, 0.001, 0.003, 0.0005])
    assert 0.01 < paired.p_value < 0.1
    assert verdict(paired, [0.5] * 4, alpha=0.1) == "significant gain"
    assert verdict(paired, [0.5] * 4, alpha=0.01) == "no significant difference"


def test_verdict_single_seed_is_not_enough_even_with_tiny_delong_p():
    assert verdict(paired_delta([0.01]), [1e-12]) == "not enough seeds"


def test_verdict_zero_variance_gain():
    assert verdict(paired_delta([0.001] * 3), [0.5] * 3) == "significant gain"
    assert verdict(paired_delta([0.0] * 3), [0.5] * 3) == "no significant difference"


def test_verdict_outcomes_are_the_published_tuple():
    assert VERDICTS == (
        "significant gain",
        "no significant difference",
        "significant loss",
        "not enough seeds",
    )


def test_verdict_rejects_zero_seeds():
    nan = math.nan
    empty = PairedDelta(n=0, mean=nan, std=nan, ci_low=nan, ci_high=nan, p_value=nan,
                        confidence=0.95)
    with pytest.raises(ValueError, match="no seeds"):
        verdict(empty, [])


@pytest.mark.parametrize("p_values", [[0.1], [0.1, 0.2, 0.3, 0.4]])
def test_verdict_rejects_length_mismatch(p_values):
    paired = paired_delta([0.001, 0.002, 0.003])
    with pytest.raises(ValueError, match="one per seed"):
        verdict(paired, p_values)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1])
def test_verdict_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        verdict(paired_delta([0.001, 0.002]), [0.5, 0.5], alpha=alpha)
