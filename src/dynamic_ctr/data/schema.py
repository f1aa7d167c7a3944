"""The clean table's schema: which column is the label, a key, a feature of which kind.

Every adapter returns a :class:`TableSchema` with its table, and the generic adapter
reads one from ``conf/base/parameters_ingestion.yml``. The ``features`` pipeline only
looks at this schema, never at the adapter, so any tabular click log works downstream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SOURCES = ("user", "item", "context", "domain")


@dataclass(frozen=True)
class TableSchema:
    """Roles of the clean table's columns.

    Args:
        label: 0/1 label column (int8 in the clean table).
        categorical: single-valued categorical features.
        numeric: numeric features (float64, NaN = missing), bucketed by the encoder.
        multi_valued: list-of-string features (multi-hot).
        user_key, item_key: the user and item columns (also categorical features).
        time_key: unix seconds (int64) used by time splits; not a feature.
        item_aggregated: multi-valued features that hold each row's own values in the
            clean table (e.g. the tags a user gave a movie) and are replaced, after
            the split, by their union over the item's *training* rows, so the
            feature never carries a validation or test interaction.
        sources: feature -> ``user`` | ``item`` | ``context`` (default ``context``).
        key_columns: columns written next to each prediction by ``scoring``.
    """

    label: str = "label"
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    multi_valued: tuple[str, ...] = ()
    user_key: str | None = None
    item_key: str | None = None
    time_key: str | None = None
    item_aggregated: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)
    key_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        features = self.features
        if len(set(features)) != len(features):
            raise ValueError(f"a column has two roles in the table schema: {features}")
        for key in ("user_key", "item_key"):
            value = getattr(self, key)
            if value is not None and value not in self.categorical:
                raise ValueError(f"{key}={value!r} must also be a categorical column")
        for name in self.item_aggregated:
            if name not in self.multi_valued:
                raise ValueError(f"item_aggregated column {name!r} must be multi_valued")
        if self.item_aggregated and self.item_key is None:
            raise ValueError("item_aggregated columns need an item_key")
        for name, source in self.sources.items():
            if source not in SOURCES:
                raise ValueError(f"sources[{name!r}]={source!r}; must be one of {SOURCES}")

    @property
    def features(self) -> list[str]:
        return [*self.categorical, *self.numeric, *self.multi_valued]

    def source_of(self, column: str) -> str:
        return self.sources.get(column, "context")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TableSchema:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown table schema key(s) {sorted(unknown)}; known: {sorted(known)}")
        values = dict(d)
        for key in ("categorical", "numeric", "multi_valued", "item_aggregated", "key_columns"):
            values[key] = tuple(values.get(key) or ())
        values["sources"] = dict(values.get("sources") or {})
        return cls(**values)
