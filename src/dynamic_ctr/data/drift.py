"""Drift of a new partition against the training window, on encoded features.

* the share of rows holding a value unseen by the encoder (OOV) per field;
* the label rate;
* the population stability index (PSI) per field,
  ``PSI = sum_b (a_b - e_b) ln(a_b / e_b)`` over bins ``b`` with ``e`` the training
  window's share and ``a`` the new partition's. The bins of a field are its
  ``max_bins - 2`` most frequent training values, OOV, and "everything else"; a
  multi-valued field counts each of its values. Shares are floored at ``1e-4`` so an
  empty bin adds a finite term. The usual reading: < 0.1 stable, 0.1-0.25 moderate,
  > 0.25 a shift worth a look (Siddiqi, *Credit Risk Scorecards*, 2006).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from dynamic_ctr.spec import OOV_INDEX, PAD_INDEX, FeatureSpec

__all__ = ["PSI_FLOOR", "drift_table", "population_stability_index"]

PSI_FLOOR = 1e-4


def population_stability_index(expected: np.ndarray, actual: np.ndarray) -> float:
    """PSI of two count (or share) vectors over the same bins (module docstring)."""
    expected, actual = np.asarray(expected, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if expected.shape != actual.shape or expected.ndim != 1:
        raise ValueError(f"expected {expected.shape} and actual {actual.shape} must be 1-d and alike")
    if expected.sum() <= 0 or actual.sum() <= 0:
        raise ValueError("both distributions need at least one count")
    e = np.maximum(expected / expected.sum(), PSI_FLOOR)
    a = np.maximum(actual / actual.sum(), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def _values(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    values = frame[columns].to_numpy().ravel()
    return values[values != PAD_INDEX] if len(columns) > 1 else values


def _binned(values: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Counts of ``values`` in the bins ``top``..., OOV, everything else."""
    other = ~np.isin(values, top) & (values != OOV_INDEX)
    return np.r_[[(values == t).sum() for t in top], (values == OOV_INDEX).sum(), other.sum()]


def drift_table(window: pd.DataFrame, new: pd.DataFrame, spec: FeatureSpec, max_bins: int = 20) -> pd.DataFrame:
    """Per field of ``spec``: OOV share of the window and the new rows, and the PSI.

    Args:
        window: the training window, encoded.
        new: the new partition, encoded by the same encoder.
        spec: their feature spec.
        max_bins: bins per field (>= 3).

    Returns:
        One row per field: ``field``, ``oov_share_window``, ``oov_share_new``, ``psi``,
        ``bins``; then a ``label`` row with the two label rates (its ``psi`` over the two
        classes).
    """
    if max_bins < 3:
        raise ValueError(f"max_bins={max_bins} must be >= 3")
    rows: list[dict[str, Any]] = []
    for f in (*spec.categorical, *spec.sequences):
        columns = [f.name] if f.kind == "categorical" else [f"{f.name}__{i}" for i in range(f.max_len)]
        before, after = _values(window, columns), _values(new, columns)
        ids, counts = np.unique(before[before != OOV_INDEX], return_counts=True)
        top = ids[np.argsort(-counts, kind="stable")[: max_bins - 2]]
        oov = {name: float(np.mean((frame[columns].to_numpy() == OOV_INDEX).any(axis=1))) if len(frame) else float("nan")
               for name, frame in (("window", window), ("new", new))}
        psi = population_stability_index(_binned(before, top), _binned(after, top)) if len(before) and len(after) else float("nan")
        rows.append({"field": f.name, "oov_share_window": oov["window"], "oov_share_new": oov["new"], "psi": psi, "bins": len(top) + 2})
    label = spec.label
    rate = {name: float(frame[label].mean()) for name, frame in (("window", window), ("new", new))}
    rows.append({
        "field": label, "label_rate_window": rate["window"], "label_rate_new": rate["new"],
        "psi": population_stability_index(np.bincount(window[label], minlength=2), np.bincount(new[label], minlength=2)), "bins": 2,
    })
    return pd.DataFrame(rows)
