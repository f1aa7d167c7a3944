"""Seeded train/validation/test splits: random with ratios, or by time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class SplitParams:
    """``features.split`` parameters.

    Args:
        method: ``random`` (seeded permutation) or ``time`` (oldest rows train, newest test).
        ratios: train, validation, test shares; must sum to 1.
        seed: seed of the random split.
    """

    method: str = "random"
    ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 2024

    def __post_init__(self) -> None:
        if self.method not in ("random", "time"):
            raise ValueError(f"features.split.method={self.method!r}; use 'random' or 'time'")
        if len(self.ratios) != 3 or any(r <= 0 for r in self.ratios) or abs(sum(self.ratios) - 1) > 1e-6:
            raise ValueError(f"features.split.ratios={list(self.ratios)} must be 3 positive shares summing to 1")


def split_indices(n: int, params: SplitParams, time: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row positions of the train, validation and test parts (sorted within each part)."""
    if params.method == "time":
        if time is None:
            raise ValueError("features.split.method='time' needs a time_key in the table schema")
        order = np.argsort(time, kind="stable")
    else:
        order = np.random.default_rng(params.seed).permutation(n)
    n_train = int(round(n * params.ratios[0]))
    n_valid = int(round(n * params.ratios[1]))
    parts = order[:n_train], order[n_train : n_train + n_valid], order[n_train + n_valid :]
    if min(len(p) for p in parts) == 0:
        raise ValueError(f"features.split.ratios={list(params.ratios)} leave an empty part for {n} rows")
    return tuple(np.sort(p) for p in parts)  # type: ignore[return-value]


def split_frame(table: pd.DataFrame, params: SplitParams, time_key: str | None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    time = table[time_key].to_numpy() if (params.method == "time" and time_key) else None
    parts = split_indices(len(table), params, time)
    return tuple(table.iloc[p].reset_index(drop=True) for p in parts)  # type: ignore[return-value]
