from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from dynamic_ctr.training import TensorData, auc, evaluate, gauc, log_loss


def _per_group_reference(y, p, g):
    """Straightforward GAUC: loop over groups, sklearn AUC, weights = group size."""
    num = den = 0.0
    used = 0
    for key in np.unique(g):
        m = g == key
        if len(np.unique(y[m])) < 2:
            continue
        num += m.sum() * roc_auc_score(y[m], p[m])
        den += m.sum()
        used += 1
    return num / den, used


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gauc_matches_per_group_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    g = rng.integers(0, 200, n) * 7 - 300  # sparse, negative keys
    y = (rng.random(n) < 0.3).astype(np.float64)
    p = np.round(rng.random(n) + 0.3 * y, 1)  # coarse rounding -> many ties inside groups
    value, used = gauc(y, p, g)
    ref_value, ref_used = _per_group_reference(y, p, g)
    assert used == ref_used
    assert value == pytest.approx(ref_value, abs=1e-12)


def test_gauc_skips_single_class_groups():
    # group 0: both classes, ranked perfectly (AUC 1); group 1: clicks only; group 2: no clicks
    y = np.array([0, 1, 1, 1, 1, 0, 0])
    p = np.array([0.1, 0.9, 0.2, 0.3, 0.4, 0.8, 0.9])
    g = np.array([0, 0, 1, 1, 1, 2, 2])
    assert gauc(y, p, g) == (1.0, 1)
    # a second two-class group with AUC 0 and 4 rows: weighted mean (2*1 + 4*0) / 6
    y2, p2, g2 = np.r_[y, [1, 0, 0, 0]], np.r_[p, [0.1, 0.5, 0.6, 0.7]], np.r_[g, [3, 3, 3, 3]]
    value, used = gauc(y2, p2, g2)
    assert used == 2 and value == pytest.approx(2 / 6)


def test_gauc_without_two_class_groups_is_nan():
    value, used = gauc(np.array([1, 0]), np.array([0.5, 0.5]), np.array([0, 1]))
    assert np.isnan(value) and used == 0


def test_gauc_accepts_tensors():
    rng = np.random.default_rng(5)
    y, p, g = (rng.random(500) < 0.5).astype(np.float32), rng.random(500), rng.integers(0, 20, 500)
    assert gauc(torch.from_numpy(y), torch.from_numpy(p), torch.from_numpy(g)) == gauc(y, p, g)


def test_auc_and_log_loss_agree_with_closed_forms():
    y = np.array([0, 0, 1, 1])
    assert auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    # clipped: a confident wrong prediction costs -log(eps) instead of inf
    assert log_loss(np.array([1.0]), np.array([0.0]), eps=1e-7) == pytest.approx(-np.log(1e-7))
    assert log_loss(y, np.full(4, 0.5)) == pytest.approx(np.log(2))


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="single class"):
        auc(np.ones(4), np.random.rand(4))
    with pytest.raises(ValueError, match="NaN"):
        auc(np.array([0, 1]), np.array([0.5, np.nan]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        gauc(np.array([0, 2]), np.array([0.1, 0.2]), np.array([0, 0]))


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Embedding(10, 1)
        self.drop = nn.Dropout(0.9)

    def forward(self, x):
        return self.drop(self.w(x).sum(dim=(1, 2)))


def test_evaluate_is_deterministic_in_row_order_and_restores_mode():
    torch.manual_seed(0)
    model = _Linear()
    x = torch.randint(0, 10, (37, 3))
    data = TensorData(x=x, y=torch.zeros(37))
    model.train()
    probs = evaluate(model, data, batch_size=8)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        expected = torch.sigmoid(model(x).double()).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-6)  # no dropout, same row order
    evaluate(model, data, batch_size=8)
    assert not model.training
