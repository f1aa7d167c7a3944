"""Seeded train/validation/test splits: random with ratios, by time, or by a hash of a key.

``random`` and ``time`` need the whole table (a permutation, a sort). ``hash`` decides
each row alone from a seeded hash of its key columns, so it splits a stream batch by
batch, gives the same parts whatever the batch size, and keeps a row in its part when
rows are added to the log. It is the split of the streaming pipeline, and the in-memory
pipeline offers it too, so both give the same parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class SplitParams:
    """``features.split`` parameters.

    Args:
        method: ``random`` (seeded permutation), ``time`` (oldest rows train, newest
            test) or ``hash`` (seeded hash of ``key``).
        ratios: train, validation, test shares; must sum to 1.
        seed: seed of the random and hash splits.
        key: ``hash`` only: the columns hashed; by default the adapter's key columns
            (``source_line`` for Criteo, ``id`` for Avazu).
    """

    method: str = "random"
    ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 2024
    key: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.method not in ("random", "time", "hash"):
            raise ValueError(f"features.split.method={self.method!r}; use 'random', 'time' or 'hash'")
        if len(self.ratios) != 3 or any(r <= 0 for r in self.ratios) or abs(sum(self.ratios) - 1) > 1e-6:
            raise ValueError(f"features.split.ratios={list(self.ratios)} must be 3 positive shares summing to 1")
        if self.key is not None and self.method != "hash":
            raise ValueError(f"features.split.key is for method 'hash', not {self.method!r}")

    @classmethod
    def from_dict(cls, d: dict) -> SplitParams:
        unknown = set(d) - {"method", "ratios", "seed", "key"}
        if unknown:
            raise ValueError(f"unknown features.split parameter(s) {sorted(unknown)}; known: key, method, ratios, seed")
        values = dict(d)
        if "ratios" in values:
            values["ratios"] = tuple(values["ratios"])
        if values.get("key") is not None:
            values["key"] = (values["key"],) if isinstance(values["key"], str) else tuple(values["key"])
        return cls(**values)

    def key_columns(self, default: tuple[str, ...]) -> tuple[str, ...]:
        key = self.key or default
        if not key:
            raise ValueError("features.split.method='hash' needs features.split.key: this adapter names no key columns")
        return key


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser: a bijective mix of uint64 values (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def hash_parts(keys: pd.DataFrame, params: SplitParams) -> np.ndarray:
    """Part of each row (0 train, 1 validation, 2 test) from a seeded hash of ``keys``.

    Integer keys are mixed with SplitMix64; other keys go through pandas' keyed SipHash
    of their text. The uniform ``[0, 1)`` value of each row is compared with the
    cumulative ratios, so the parts' sizes follow the ratios in expectation.
    """
    h = _splitmix64(np.full(len(keys), np.uint64(params.seed % (1 << 64)), dtype=np.uint64))
    for name in keys.columns:
        col = keys[name]
        if pd.api.types.is_integer_dtype(col.dtype) and not col.isna().any():
            v = col.to_numpy(dtype=np.int64).view(np.uint64)
        else:
            v = pd.util.hash_array(col.astype(object).where(col.notna(), "\x00<NA>").astype(str).to_numpy(object), hash_key=f"{params.seed:016d}"[-16:])
        with np.errstate(over="ignore"):
            h = _splitmix64(h ^ v)
    uniform = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    bounds = np.cumsum(params.ratios)[:2]
    return np.searchsorted(bounds, uniform, side="right").astype(np.int8)


def split_indices(n: int, params: SplitParams, time: np.ndarray | None = None, keys: pd.DataFrame | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row positions of the train, validation and test parts (sorted within each part)."""
    if params.method == "hash":
        if keys is None:
            raise ValueError("features.split.method='hash' needs the key columns")
        part = hash_parts(keys, params)
        parts = tuple(np.flatnonzero(part == i) for i in range(3))
    else:
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


def split_frame(
    table: pd.DataFrame, params: SplitParams, time_key: str | None, key_columns: tuple[str, ...] = ()
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    time = table[time_key].to_numpy() if (params.method == "time" and time_key) else None
    keys = None
    if params.method == "hash":
        columns = params.key_columns(key_columns)
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise ValueError(f"features.split.key: column(s) {missing} not in the table ({list(table.columns)})")
        keys = table[list(columns)]
    parts = split_indices(len(table), params, time, keys)
    return tuple(table.iloc[p].reset_index(drop=True) for p in parts)  # type: ignore[return-value]
