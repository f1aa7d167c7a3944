"""Domains (AdaSparse §2) and activity groups (APG §5, Figure 8).

A domain is the combination of a few *domain-aware* features of a row, e.g. gender x
age group x occupation for MovieLens-100K, or the first genre for MovieLens latest.
Domains with less training support than ``min_support`` are merged into one
``__other__`` domain, which also receives domains never seen in training.

Domain ids follow the index convention of every field (:mod:`dynamic_ctr.spec`):
``1`` is ``__other__`` (the OOV slot), real domains count from ``2`` in order of
training support. A model that wants a 0-based id uses ``index - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from dynamic_ctr.spec import OOV_INDEX

OTHER = "__other__"
NONE = "(none)"
DOMAIN_FORMAT = 1


@dataclass(frozen=True)
class DomainFeature:
    """One part of the domain key.

    Args:
        column: a column of the clean table.
        bins: for numeric columns, right-open bin edges (``[18, 25, 35]`` gives
            ``<18``, ``18-24``, ``25-34``, ``35+``).
        first: for multi-valued columns, use the first value (e.g. the first genre).
    """

    column: str
    bins: tuple[float, ...] | None = None
    first: bool = False

    @classmethod
    def from_value(cls, v: str | dict[str, Any]) -> DomainFeature:
        if isinstance(v, str):
            return cls(column=v)
        unknown = set(v) - {"column", "bins", "first"}
        if unknown:
            raise ValueError(f"domains.features entry has unknown key(s) {sorted(unknown)}")
        bins = tuple(float(b) for b in v["bins"]) if v.get("bins") else None
        return cls(column=v["column"], bins=bins, first=bool(v.get("first", False)))


@dataclass(frozen=True)
class DomainParams:
    """``domains`` parameters: ``features`` (see :class:`DomainFeature`),
    ``min_support`` (training rows a domain needs to stand alone), ``frequency_key``
    (column grouped by activity; ``null`` for none) and ``frequency_groups``."""

    features: tuple[DomainFeature, ...]
    min_support: int = 1000
    frequency_key: str | None = None
    frequency_groups: int = 10

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DomainParams:
        unknown = set(d) - {"features", "min_support", "frequency_key", "frequency_groups"}
        if unknown:
            raise ValueError(f"unknown domains parameter(s) {sorted(unknown)}")
        features = tuple(DomainFeature.from_value(v) for v in d.get("features") or [])
        if not features:
            raise ValueError("parameter domains.features must list at least one column")
        params = cls(features, int(d.get("min_support", 1000)), d.get("frequency_key"), int(d.get("frequency_groups", 10)))
        if params.min_support < 1 or params.frequency_groups < 1:
            raise ValueError(f"domains.min_support and domains.frequency_groups must be >= 1, got {params}")
        return params


def domain_keys(table: pd.DataFrame, features: tuple[DomainFeature, ...]) -> pd.Series:
    """The domain key of each row: its parts joined with ``' | '``."""
    parts = []
    for feat in features:
        if feat.column not in table.columns:
            raise ValueError(f"domains.features: column {feat.column!r} is not in the table ({list(table.columns)})")
        col = table[feat.column]
        if feat.first:
            values = pd.Series([v[0] if v is not None and len(v) else NONE for v in col.tolist()], index=table.index)
        elif feat.bins is not None:
            values = _bin_labels(pd.to_numeric(col, errors="coerce").astype("float64"), feat.bins)
        else:
            values = col.astype(object).where(col.notna(), NONE).astype(str)
        parts.append(values.astype(str))
    key = parts[0]
    for p in parts[1:]:
        key = key + " | " + p
    return key


def _bin_labels(values: pd.Series, bins: tuple[float, ...]) -> pd.Series:
    edges = [-np.inf, *bins, np.inf]
    labels = [f"<{_fmt(bins[0])}"] + [f"{_fmt(a)}-{_fmt(b - 1)}" for a, b in zip(bins[:-1], bins[1:])] + [f"{_fmt(bins[-1])}+"]
    binned = pd.cut(values, edges, right=False, labels=labels)
    return binned.astype(object).where(binned.notna(), NONE).astype(str)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass
class DomainEncoder:
    """Domain names in id order (``names[0]`` is ``__other__``, index 1) and the
    parameters that made them; JSON via :meth:`to_dict`."""

    names: list[str]
    params: DomainParams
    support: dict[str, int] = field(default_factory=dict)

    @classmethod
    def fit(cls, train: pd.DataFrame, params: DomainParams) -> DomainEncoder:
        return cls.from_support(domain_keys(train, params.features).value_counts(), params)

    @classmethod
    def from_support(cls, counts: pd.Series, params: DomainParams) -> DomainEncoder:
        """From the training rows per domain key (counts of batches add up)."""
        kept = counts[counts >= params.min_support]
        kept = kept.sort_values(ascending=False, kind="stable")
        kept = kept.loc[sorted(kept.index, key=lambda k: (-kept[k], k))]
        support = {OTHER: int(counts[counts < params.min_support].sum()), **{k: int(v) for k, v in kept.items()}}
        return cls([OTHER, *kept.index.tolist()], params, support)

    def transform(self, table: pd.DataFrame) -> np.ndarray:
        """Domain index of each row (int32; ``1`` = ``__other__``)."""
        lookup = {name: i + OOV_INDEX for i, name in enumerate(self.names)}
        keys = domain_keys(table, self.params.features)
        return keys.map(lookup).fillna(OOV_INDEX).to_numpy(dtype=np.int32)

    @property
    def vocab_size(self) -> int:
        return len(self.names) + OOV_INDEX

    def to_dict(self) -> dict[str, Any]:
        p = self.params
        return {
            "format_version": DOMAIN_FORMAT,
            "names": self.names,
            "support": self.support,
            "first_index": OOV_INDEX,
            "params": {
                "features": [{"column": f.column, "bins": list(f.bins) if f.bins else None, "first": f.first} for f in p.features],
                "min_support": p.min_support, "frequency_key": p.frequency_key, "frequency_groups": p.frequency_groups,
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DomainEncoder:
        if d.get("format_version") != DOMAIN_FORMAT:
            raise ValueError(f"domain encoder format_version={d.get('format_version')!r}; expected {DOMAIN_FORMAT}")
        return cls(list(d["names"]), DomainParams.from_dict(d["params"]), dict(d.get("support") or {}))


def frequency_groups(train: pd.DataFrame, key: str, groups: int) -> pd.DataFrame:
    """Keys in ``groups`` equal-size groups by training activity (0 = least active).

    Returns one row per key: ``key``, ``interactions`` and ``group``. Ties are broken by
    the key's value, so the assignment is reproducible.
    """
    return frequency_groups_from_counts(train.groupby(key, sort=True).size(), key, groups)


def frequency_groups_from_counts(interactions: pd.Series, key: str, groups: int) -> pd.DataFrame:
    """:func:`frequency_groups` from the training rows per key (indexed by the key)."""
    counts = interactions.rename_axis(key).sort_index().rename("interactions").reset_index()
    counts = counts.sort_values(["interactions", key], kind="stable").reset_index(drop=True)
    n = len(counts)
    counts["group"] = (np.arange(n) * groups // max(n, 1)).astype(np.int8)
    return counts.rename(columns={key: "key"})


def domain_table(splits: dict[str, tuple[np.ndarray, np.ndarray]], names: list[str]) -> pd.DataFrame:
    """Samples, clicks and CTR per domain and split, from ``{split: (domain_ids, labels)}``."""
    per_split = {}
    for split, (ids, labels) in splits.items():
        frame = pd.DataFrame({"domain": ids, "label": labels.astype(np.int64)})
        per_split[split] = frame.groupby("domain").agg(samples=("label", "size"), clicks=("label", "sum"))
    return domain_table_from_counts(per_split, names)


def domain_table_from_counts(per_split: dict[str, pd.DataFrame], names: list[str]) -> pd.DataFrame:
    """:func:`domain_table` from per split ``samples`` and ``clicks`` indexed by domain id."""
    rows = []
    for split, agg in per_split.items():
        for domain, r in agg.iterrows():
            rows.append({"split": split, "domain": int(domain), "name": names[int(domain) - OOV_INDEX],
                         "samples": int(r["samples"]), "clicks": int(r["clicks"]), "ctr": r["clicks"] / r["samples"]})
    out = pd.DataFrame(rows, columns=["split", "domain", "name", "samples", "clicks", "ctr"])
    return out.sort_values(["split", "domain"]).reset_index(drop=True)

