"""Significance tests for comparing a dynamic model variant with its base model.

The report trains each variant and its base over several seeds and scores them on the
same test rows. Two kinds of noise are in play, and this module has one tool for each:

* :func:`delong_test` compares two models scored on the *same* rows (one seed). It
  measures how much the AUC difference could move if the test set were drawn again,
  taking into account that both AUCs come from the same rows (DeLong, DeLong &
  Clarke-Pearson, 1988, computed with the fast algorithm of Sun & Xu, 2014).
* :func:`paired_delta` summarises the per-seed AUC differences (variant minus base,
  paired by seed) with a paired t-test and a t confidence interval. It measures how
  much the difference moves from one training seed to the next.

:func:`verdict` turns these into one of the words in :data:`VERDICTS`.

It depends on numpy and scipy only, so it can be used without torch, pandas or Kedro.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "VERDICTS",
    "DeLongResult",
    "PairedDelta",
    "delong_test",
    "paired_delta",
    "verdict",
]

#: Every value :func:`verdict` can return.
VERDICTS = (
    "significant gain",
    "no significant difference",
    "significant loss",
    "not enough seeds",
)


@dataclass(frozen=True)
class DeLongResult:
    """Outcome of :func:`delong_test` for models ``a`` and ``b`` on the same rows.

    Attributes:
        auc_a: ROC AUC of model ``a`` (ties between a positive and a negative count 1/2).
        auc_b: ROC AUC of model ``b``.
        delta: ``auc_a - auc_b``.
        se: standard error of ``delta`` from the DeLong (1988) covariance of the two
            AUCs; ``0.0`` when the two models rank every positive/negative pair alike.
        z: ``delta / se``; ``0.0`` when ``se == 0`` and ``delta == 0``, and ``+-inf``
            when ``se == 0`` but ``delta != 0``.
        p_value: two-sided p-value from the normal approximation, ``2 * P(Z > |z|)``;
            ``1.0`` when ``se == 0`` and ``delta == 0``, ``0.0`` when ``se == 0`` and
            ``delta != 0``.
    """

    auc_a: float
    auc_b: float
    delta: float
    se: float
    z: float
    p_value: float


@dataclass(frozen=True)
class PairedDelta:
    """Summary of per-seed differences (variant minus base), from :func:`paired_delta`.

    Attributes:
        n: number of paired seeds.
        mean: mean difference.
        std: sample standard deviation (``ddof=1``); ``nan`` when ``n < 2``.
        ci_low: lower end of the two-sided t interval for the mean at ``confidence``;
            ``nan`` when ``n < 2``.
        ci_high: upper end of that interval; ``nan`` when ``n < 2``.
        p_value: two-sided p-value of the paired t-test (the one-sample t-test of the
            differences against 0); ``nan`` when ``n < 2``.
        confidence: confidence level of the interval, e.g. ``0.95``.
    """

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    p_value: float
    confidence: float


def _as_1d(values: object, name: str) -> np.ndarray:
    """``values`` as a 1-d float array, or a ValueError that names ``name``."""
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric: {exc}") from exc
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-d, got shape {array.shape}")
    return array


def _validate_delong_inputs(
    y_true: object, scores_a: object, scores_b: object
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check and convert the inputs of :func:`delong_test`; see there for the rules."""
    y = _as_1d(y_true, "y_true")
    a = _as_1d(scores_a, "scores_a")
    b = _as_1d(scores_b, "scores_b")
    if not (len(y) == len(a) == len(b)):
        raise ValueError(
            "y_true, scores_a and scores_b must have the same length, got "
            f"{len(y)}, {len(a)} and {len(b)}"
        )
    for name, scores in (("scores_a", a), ("scores_b", b)):
        bad = ~np.isfinite(scores)
        if bad.any():
            raise ValueError(
                f"{name} must be finite, found {int(bad.sum())} NaN/inf value(s), "
                f"first at index {int(np.argmax(bad))}"
            )
    # NaN fails both comparisons, so it is reported here as a label outside {0, 1}.
    not_binary = ~((y == 0) | (y == 1))
    if not_binary.any():
        first = int(np.argmax(not_binary))
        raise ValueError(
            f"y_true labels must be 0 or 1, found {int(not_binary.sum())} other value(s), "
            f"first {y[first]!r} at index {first}"
        )
    n_pos = int((y == 1).sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            "y_true must contain both classes, got "
            f"{n_pos} positive and {n_neg} negative row(s)"
        )
    # The DeLong covariance divides by (n_pos - 1) and (n_neg - 1): with a single row in
    # a class that class's variance term is 0/0, so no standard error exists.
    if n_pos < 2 or n_neg < 2:
        raise ValueError(
            "y_true must contain at least 2 positive and 2 negative rows for the DeLong "
            f"variance, got {n_pos} positive and {n_neg} negative row(s)"
        )
    return y == 1, a, b


def _structural_components(
    scores: np.ndarray, positive: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's structural components of one model, via midranks (Sun & Xu).

    Returns ``(auc, v10, v01)``: ``v10[i]`` is the fraction of negatives ranked below
    positive ``i`` (ties count 1/2), ``v01[j]`` the fraction of positives ranked above
    negative ``j``. Midranks make each a rank difference instead of an
    ``n_pos x n_neg`` comparison, so the cost is O(N log N).
    """
    pos = scores[positive]
    neg = scores[~positive]
    m, n = len(pos), len(neg)
    # Midranks (scipy's "average" method) give tied scores the mean of their ranks, which
    # is exactly what makes a tied positive/negative pair count 1/2.
    rank_all = stats.rankdata(np.concatenate([pos, neg]))
    rank_pos = stats.rankdata(pos)
    rank_neg = stats.rankdata(neg)
    # A positive's rank among all rows minus its rank among positives counts the
    # negatives below it (ties 1/2); likewise for negatives and positives below them.
    v10 = (rank_all[:m] - rank_pos) / n
    v01 = 1.0 - (rank_all[m:] - rank_neg) / m
    auc = float(v10.mean())
    return auc, v10, v01


def delong_test(y_true: object, scores_a: object, scores_b: object) -> DeLongResult:
    """DeLong test of ``AUC(a) == AUC(b)`` for two models scored on the same rows.

    Because both models are scored on the same rows their AUCs are correlated, and the
    test uses the covariance of DeLong, DeLong & Clarke-Pearson (1988): with the
    structural components ``V10`` (one per positive) and ``V01`` (one per negative) of
    each model, ``Var(auc_a - auc_b) = S10 / m + S01 / n``, where ``S10`` and ``S01``
    are the sample variances (``ddof=1``) of the per-row differences ``V10_a - V10_b``
    and ``V01_a - V01_b`` and ``m``, ``n`` count the positives and negatives; this is
    ``w' (S10/m + S01/n) w`` for the contrast ``w = (1, -1)`` of the 2x2 covariance
    matrices, computed directly so that identical models get exactly ``se == 0``. The
    components come from midranks, as in Sun & Xu (2014), "Fast implementation of
    DeLong's algorithm for comparing the areas under correlated receiver operating
    characteristic curves", IEEE Signal Processing Letters 21(11), in O(N log N).

    Ties, within a model or between a positive and a negative, count 1/2, so the AUCs
    equal ``sklearn.metrics.roc_auc_score``.

    Args:
        y_true: 1-d labels, each 0 or 1 (bools and floats 0.0/1.0 are accepted).
        scores_a: 1-d finite scores of model ``a``, higher meaning more likely positive.
        scores_b: 1-d finite scores of model ``b`` for the same rows, in the same order.

    Returns:
        The two AUCs, their difference, its standard error, ``z`` and the two-sided
        p-value from the normal approximation. When ``se == 0`` there is no spread to
        compare against: ``delta == 0`` gives ``z = 0`` and ``p = 1``, any other delta
        gives ``z = +-inf`` and ``p = 0`` (e.g. a perfect model against a constant one).

    Raises:
        ValueError: if an input is not 1-d or not numeric, the lengths differ, a score
            is NaN or infinite, a label is not 0 or 1, or there are fewer than 2
            positive or 2 negative rows (the variance needs two of each).
    """
    positive, a, b = _validate_delong_inputs(y_true, scores_a, scores_b)
    auc_a, v10_a, v01_a = _structural_components(a, positive)
    auc_b, v10_b, v01_b = _structural_components(b, positive)
    m, n = len(v10_a), len(v01_a)
    var = float(np.var(v10_a - v10_b, ddof=1) / m + np.var(v01_a - v01_b, ddof=1) / n)
    se = math.sqrt(max(var, 0.0))
    delta = auc_a - auc_b
    if se > 0.0:
        z = delta / se
        # sf keeps precision for large |z|, where 1 - cdf would round to 0.
        p_value = float(2.0 * stats.norm.sf(abs(z)))
    elif delta == 0.0:
        z, p_value = 0.0, 1.0
    else:
        z, p_value = math.copysign(math.inf, delta), 0.0
    return DeLongResult(auc_a=auc_a, auc_b=auc_b, delta=delta, se=se, z=z, p_value=p_value)


def paired_delta(deltas: object, confidence: float = 0.95) -> PairedDelta:
    """Paired t summary of per-seed differences (variant minus base).

    Each entry of ``deltas`` is one seed's metric difference, e.g. ``auc_variant -
    auc_base`` with both trained on that seed. The paired t-test of the two metric lists
    is the one-sample t-test of these differences against 0, and the interval is
    ``mean +- t_{(1 + confidence) / 2, n - 1} * std / sqrt(n)``.

    With one seed there is no spread, so ``std``, the interval and the p-value are
    ``nan``. When every difference is the same the spread is exactly 0 and the t
    statistic is undefined; the result is then made well-defined without warnings:
    the interval is ``[mean, mean]`` and ``p_value`` is ``0.0`` if ``mean != 0``
    (a perfectly consistent difference) and ``1.0`` if ``mean == 0``.

    Args:
        deltas: 1-d finite per-seed differences, at least one.
        confidence: level of the two-sided interval, strictly between 0 and 1.

    Returns:
        The :class:`PairedDelta` summary.

    Raises:
        ValueError: if ``deltas`` is empty, not 1-d, not numeric or not finite, or if
            ``confidence`` is not strictly between 0 and 1.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")
    d = _as_1d(deltas, "deltas")
    n = len(d)
    if n == 0:
        raise ValueError("deltas is empty: need the difference of at least one seed")
    if not np.isfinite(d).all():
        raise ValueError(f"deltas must be finite, got {d.tolist()}")
    if n == 1:
        nan = math.nan
        return PairedDelta(1, float(d[0]), nan, nan, nan, nan, confidence)
    if (d == d[0]).all():
        # Compared exactly (not via std), because the mean of identical floats can differ
        # from them in the last bit and give a tiny non-zero std and a huge t.
        mean = float(d[0])
        p_value = 0.0 if mean != 0.0 else 1.0
        return PairedDelta(n, mean, 0.0, mean, mean, p_value, confidence)
    mean = float(d.mean())
    std = float(d.std(ddof=1))
    p_value = float(stats.ttest_1samp(d, 0.0).pvalue)
    ci_low, ci_high = stats.t.interval(confidence, n - 1, loc=mean, scale=std / math.sqrt(n))
    return PairedDelta(n, mean, std, float(ci_low), float(ci_high), p_value, confidence)


def verdict(paired: PairedDelta, delong_p_values: Sequence[float], alpha: float = 0.05) -> str:
    """One word on whether the variant beats its base, from the paired seeds.

    Rules:

    * ``n >= 2`` seeds: the verdict follows the paired t-test over seeds. If
      ``paired.p_value < alpha`` it is ``"significant gain"`` when ``paired.mean > 0``
      and ``"significant loss"`` when ``paired.mean < 0``; otherwise (including a
      ``nan`` p-value) it is ``"no significant difference"``.
    * ``n == 1`` seed: ``"not enough seeds"``. A single seed's DeLong test measures only
      the test-set noise, not how much the difference moves from seed to seed, so it
      cannot carry a verdict on its own.
    * ``n == 0``: ValueError, there is nothing to judge.

    ``delong_p_values`` (one per seed) do not change the verdict; they are only checked
    to have one entry per seed, since the report prints them next to it.

    Args:
        paired: the per-seed summary from :func:`paired_delta`.
        delong_p_values: the DeLong p-value of each seed, ``paired.n`` of them.
        alpha: significance level, strictly between 0 and 1.

    Returns:
        One of :data:`VERDICTS`.

    Raises:
        ValueError: if ``paired.n == 0``, ``len(delong_p_values) != paired.n``, or
            ``alpha`` is not strictly between 0 and 1.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be strictly between 0 and 1, got {alpha!r}")
    if paired.n == 0:
        raise ValueError("paired.n is 0: no seeds to judge")
    if len(delong_p_values) != paired.n:
        raise ValueError(
            f"got {len(delong_p_values)} DeLong p-value(s) for {paired.n} seed(s); "
            "need one per seed"
        )
    if paired.n == 1:
        return VERDICTS[3]
    if paired.p_value < alpha:
        if paired.mean > 0:
            return VERDICTS[0]
        if paired.mean < 0:
            return VERDICTS[2]
    return VERDICTS[1]
