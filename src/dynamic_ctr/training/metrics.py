"""Ranking and calibration metrics, and batched inference.

``auc`` and ``log_loss`` delegate to scikit-learn, imported where used so that
``import dynamic_ctr.training`` needs only torch and numpy. ``gauc`` is plain numpy.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dynamic_ctr.training.batching import TensorData, batches
from dynamic_ctr.training.device import flush_denormals

__all__ = ["auc", "evaluate", "gauc", "log_loss"]

_EPS = 1e-7


def _as_binary_labels(y: np.ndarray | torch.Tensor) -> np.ndarray:
    y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y).ravel()
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y must hold only 0 and 1")
    return y.astype(np.float64)


def _as_scores(p: np.ndarray | torch.Tensor, n: int) -> np.ndarray:
    p = np.asarray(p.detach().cpu() if isinstance(p, torch.Tensor) else p, dtype=np.float64).ravel()
    if p.shape != (n,):
        raise ValueError(f"p has {p.shape[0]} entries but y has {n}")
    if not np.isfinite(p).all():
        raise ValueError("p contains NaN or infinite values")
    return p


def auc(y: np.ndarray | torch.Tensor, p: np.ndarray | torch.Tensor) -> float:
    """ROC AUC of scores ``p (N,)`` against 0/1 labels ``y (N,)``.

    Raises:
        ValueError: ``y`` holds a single class, or ``p`` is not finite.
    """
    from sklearn.metrics import roc_auc_score

    y = _as_binary_labels(y)
    p = _as_scores(p, len(y))
    if y.min() == y.max():
        raise ValueError(
            f"AUC is undefined: y holds a single class ({y[0] if len(y) else 'empty'})"
        )
    return float(roc_auc_score(y, p))


def log_loss(
    y: np.ndarray | torch.Tensor, p: np.ndarray | torch.Tensor, *, eps: float = _EPS
) -> float:
    """Mean binary cross-entropy of probabilities ``p (N,)``, clipped to ``[eps, 1-eps]``."""
    from sklearn.metrics import log_loss as sk_log_loss

    if not 0.0 < eps < 0.5:
        raise ValueError(f"{eps=} must be in (0, 0.5)")
    y = _as_binary_labels(y)
    p = np.clip(_as_scores(p, len(y)), eps, 1.0 - eps)
    return float(sk_log_loss(y, p, labels=[0, 1]))


def gauc(
    y: np.ndarray | torch.Tensor,
    p: np.ndarray | torch.Tensor,
    groups: np.ndarray | torch.Tensor,
) -> tuple[float, int]:
    """Group AUC: per-group AUC averaged with weights = group impressions.

    Only groups holding both classes take part (AUC is undefined otherwise). Ties in
    ``p`` within a group count one half, as in ``sklearn.metrics.roc_auc_score``.
    Vectorised Mann-Whitney U: one lexsort by (group, score), average ranks of
    tied runs, per-group sums with ``bincount``.

    Args:
        y: ``(N,)`` 0/1 labels.
        p: ``(N,)`` scores (probabilities or logits: AUC is rank based).
        groups: ``(N,)`` group keys (any sortable dtype, e.g. user ids).

    Returns:
        ``(gauc, n_groups)``: the weighted mean and how many groups it averaged;
        ``(nan, 0)`` when no group holds both classes.
    """
    y = _as_binary_labels(y)
    n = len(y)
    p = _as_scores(p, n)
    g = np.asarray(groups.detach().cpu() if isinstance(groups, torch.Tensor) else groups).ravel()
    if g.shape != (n,):
        raise ValueError(f"groups has {g.shape[0]} entries but y has {n}")
    if n == 0:
        return float("nan"), 0

    _, gid = np.unique(g, return_inverse=True)  # compact group ids 0..G-1
    gid = gid.ravel()
    order = np.lexsort((p, gid))  # by group, then score
    gs, ps, ys = gid[order], p[order], y[order]
    pos = np.arange(n)

    new_group = np.r_[True, gs[1:] != gs[:-1]]
    new_run = new_group | np.r_[True, ps[1:] != ps[:-1]]  # a run = equal scores in one group
    group_start = np.maximum.accumulate(
        np.where(new_group, pos, 0)
    )  # (N,) first position of row's group
    run_start = np.flatnonzero(new_run)
    run_end = np.r_[run_start[1:], n]  # exclusive
    run_rank = (run_start + run_end + 1) / 2.0  # average 1-based global position of each run
    rank = run_rank[np.cumsum(new_run) - 1] - group_start  # (N,) 1-based rank inside the group

    n_groups = int(gs[-1]) + 1
    size = np.bincount(gs, minlength=n_groups).astype(np.float64)
    n_pos = np.bincount(gs, weights=ys, minlength=n_groups)
    pos_rank_sum = np.bincount(gs, weights=rank * ys, minlength=n_groups)
    n_neg = size - n_pos
    both = (n_pos > 0) & (n_neg > 0)
    if not both.any():
        return float("nan"), 0
    u = pos_rank_sum[both] - n_pos[both] * (n_pos[both] + 1) / 2.0  # Mann-Whitney U of positives
    group_auc = u / (n_pos[both] * n_neg[both])
    w = size[both]
    return float(np.sum(w * group_auc) / np.sum(w)), int(both.sum())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: TensorData,
    batch_size: int = 8192,
    *,
    autocast_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Click probabilities of ``model`` on every row of ``data``, in row order.

    Runs in eval mode under ``torch.no_grad()`` and restores the model's previous
    train/eval mode afterwards.

    Args:
        model: maps ``x (B, S)`` to logits ``(B,)``; must sit on ``data.device``.
        data: the split to score.
        batch_size: rows per forward pass.
        autocast_dtype: run forward under ``torch.autocast`` with this dtype.

    Returns:
        ``(N,)`` float64 probabilities.
    """
    flush_denormals()
    was_training = model.training
    model.eval()
    try:
        outs = []
        for xb, _ in batches(data, batch_size, shuffle=False):
            with torch.autocast(
                data.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                logits = model(xb)
            if logits.shape != (xb.shape[0],):
                raise ValueError(
                    f"model returned shape {tuple(logits.shape)}, expected ({xb.shape[0]},)"
                )
            outs.append(logits.float())
        if not outs:
            return np.zeros(0, dtype=np.float64)
        return torch.sigmoid(torch.cat(outs).double()).cpu().numpy()  # one device->host copy
    finally:
        model.train(was_training)
