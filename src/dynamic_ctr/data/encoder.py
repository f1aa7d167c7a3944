"""The feature encoder: vocabularies and buckets fitted on the training split only.

Every field becomes integer indices (see :mod:`dynamic_ctr.spec`: 0 padding, 1 OOV,
values from 2):

- categorical: a vocabulary of the values seen at least ``min_count`` times in the
  training split (missing values are a value of their own);
- numeric: bucketed first (``log``: ``floor(log(v)^2)`` for ``v > 2``, else ``v``
  itself, as in DynInt §4.1 and the Criteo winners (log buckets are shifted by 3 so
  they never share an id with a small value); or ``quantile`` edges fitted on
  the training split), then treated as categorical;
- multi-valued: each item through a vocabulary, written as ``max_len`` padded index
  columns plus a length column.

The fitted encoder is plain JSON (:meth:`FeatureEncoder.to_dict`), so it can be read
back anywhere to re-encode new data identically. Transforming works on chunks of rows,
so intermediate arrays stay a bounded size however long the table is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dynamic_ctr.data.schema import TableSchema
from dynamic_ctr.spec import FIRST_VALUE_INDEX, OOV_INDEX, PAD_INDEX, FeatureSpec, FieldSpec

ENCODER_FORMAT = 1
#: Log buckets start at 3, above every small value's own bucket (floor(v) <= 2).
_LOG_BUCKET_SHIFT = 3


@dataclass(frozen=True)
class EncoderParams:
    """``features.encoder`` parameters.

    Args:
        min_count: values seen fewer times in the training split map to OOV.
        min_count_per_field: overrides of ``min_count`` by field.
        numeric_buckets: ``log`` or ``quantile``.
        quantile_buckets: number of quantile buckets.
        max_len: slots of a multi-valued field by name; fields not listed get the
            99th percentile of training lengths, at most ``max_len_cap``.
        max_len_cap: upper bound of the automatic ``max_len``.
        chunk_rows: rows transformed at a time.
    """

    min_count: int = 1
    min_count_per_field: dict[str, int] = field(default_factory=dict)
    numeric_buckets: str = "log"
    quantile_buckets: int = 32
    max_len: dict[str, int] = field(default_factory=dict)
    max_len_cap: int = 32
    chunk_rows: int = 1_000_000

    def __post_init__(self) -> None:
        if self.numeric_buckets not in ("log", "quantile"):
            raise ValueError(f"features.encoder.numeric_buckets={self.numeric_buckets!r}; use 'log' or 'quantile'")
        if self.min_count < 1:
            raise ValueError(f"features.encoder.min_count={self.min_count} must be >= 1")
        if self.chunk_rows < 1:
            raise ValueError(f"features.encoder.chunk_rows={self.chunk_rows} must be >= 1")


@dataclass
class FieldEncoder:
    """The fitted encoding of one column. ``vocab[i]`` gets index ``i + 2``."""

    name: str
    kind: str  # categorical | numeric | multi_valued
    source: str
    vocab: list[Any]
    max_len: int = 1
    bucketing: str | None = None
    edges: list[float] | None = None

    def __post_init__(self) -> None:
        self._value_set = _value_array(self.vocab)

    # --- numeric buckets -------------------------------------------------------------
    def bucket(self, values: pa.Array) -> pa.Array:
        """Numeric values -> int64 bucket ids (null stays null)."""
        v = values.to_numpy(zero_copy_only=False).astype(np.float64)
        missing = np.isnan(v)
        if self.bucketing == "quantile":
            ids = np.searchsorted(np.asarray(self.edges, dtype=np.float64), v, side="right").astype(np.int64)
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                big = v > 2
                # floor(log(v)^2) for v > 2, shifted past the small values (<= 2) so
                # that, e.g., v = 3 (bucket 1) and v = 1 do not share an index.
                ids = np.where(big, np.floor(np.log(np.where(big, v, 3.0)) ** 2) + _LOG_BUCKET_SHIFT, np.floor(v))
            ids = np.nan_to_num(ids, nan=0).astype(np.int64)
        return pa.array(ids, pa.int64(), mask=missing)

    # --- lookup ---------------------------------------------------------------------
    def indices(self, values: pa.Array) -> np.ndarray:
        """Values (already bucketed) -> int32 indices; unseen values -> OOV."""
        if len(self._value_set) == 0:
            return np.full(len(values), OOV_INDEX, dtype=np.int32)
        values = _comparable(values, self._value_set.type)
        pos = pc.index_in(values, value_set=self._value_set, skip_nulls=False)
        return (pos.fill_null(OOV_INDEX - FIRST_VALUE_INDEX).to_numpy(zero_copy_only=False) + FIRST_VALUE_INDEX).astype(np.int32)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + FIRST_VALUE_INDEX

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "source": self.source, "vocab": self.vocab,
            "max_len": self.max_len, "bucketing": self.bucketing, "edges": self.edges,
        }


def _value_array(vocab: list[Any]) -> pa.Array:
    non_null = [v for v in vocab if v is not None]
    if non_null and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in non_null):
        return pa.array(vocab, pa.int64())
    return pa.array([None if v is None else str(v) for v in vocab], pa.string())


def _comparable(values: pa.Array, target: pa.DataType) -> pa.Array:
    if values.type == target:
        return values
    if pa.types.is_integer(target) and pa.types.is_integer(values.type):
        return values.cast(target)
    return values.cast(pa.string()) if pa.types.is_string(target) else pc.cast(values, target, safe=False)


def _as_array(column: pd.Series | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pd.Series):
        column = pa.array(column, from_pandas=True)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_large_string(column.type):
        column = column.cast(pa.string())
    if pa.types.is_large_list(column.type):
        column = column.cast(pa.list_(column.type.value_type))
    return column


@dataclass
class FieldCounts:
    """What fitting a field needs from the training rows, and nothing more.

    Counts of disjoint row sets add up (:meth:`merge`), so the same encoder is fitted
    from one in-memory table (:meth:`FeatureEncoder.fit`), from batches streamed one at
    a time (:mod:`dynamic_ctr.pipelines.streaming`) or from counts computed elsewhere.

    Attributes:
        values: the distinct values (numeric fields: their raw values; multi-valued
            fields: the items), null included when present.
        counts: ``(len(values),)`` int64, how many times each was seen.
        lengths: multi-valued fields only: ``lengths[k]`` rows held ``k`` items.
    """

    values: pa.Array
    counts: np.ndarray
    lengths: np.ndarray | None = None

    @classmethod
    def of(cls, values: pa.Array, lengths: pa.Array | None = None) -> FieldCounts:
        vc = pc.value_counts(values)
        hist = None
        if lengths is not None:
            hist = np.bincount(lengths.to_numpy(zero_copy_only=False).astype(np.int64), minlength=1)
        return cls(vc.field("values"), vc.field("counts").to_numpy(zero_copy_only=False).astype(np.int64), hist)

    def merge(self, other: FieldCounts) -> FieldCounts:
        """The counts of both row sets (one row per distinct value)."""
        table = pa.concat_tables([
            pa.table({"values": self.values, "counts": pa.array(self.counts, pa.int64())}),
            pa.table({"values": _comparable(other.values, self.values.type), "counts": pa.array(other.counts, pa.int64())}),
        ]).group_by("values").aggregate([("counts", "sum")])
        lengths = None
        if self.lengths is not None and other.lengths is not None:
            size = max(len(self.lengths), len(other.lengths))
            lengths = np.pad(self.lengths, (0, size - len(self.lengths))) + np.pad(other.lengths, (0, size - len(other.lengths)))
        return FieldCounts(table.column("values").combine_chunks(), table.column("counts_sum").to_numpy(), lengths)


def _vocab_from_counts(counts: FieldCounts, min_count: int) -> list[Any]:
    vals = counts.values.to_pylist()
    keep = [(c, v) for v, c in zip(vals, counts.counts) if c >= min_count]
    # Most frequent first; ties broken by the value's text so the order is reproducible.
    keep.sort(key=lambda cv: (-cv[0], "" if cv[1] is None else str(cv[1])))
    return [v.item() if isinstance(v, np.generic) else v for _, v in keep]


def _quantiles_from_counts(values: np.ndarray, counts: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """``np.quantile(np.repeat(values, counts), qs)`` (numpy's default linear method, same
    arithmetic) without expanding the repeats. ``values`` sorted ascending, no NaN."""
    cumulative = np.cumsum(counts)
    virtual = qs * (cumulative[-1] - 1)
    previous = np.floor(virtual)
    gamma = virtual - previous
    a = values[np.searchsorted(cumulative, previous + 1)]  # the previous-th smallest (0-based)
    b = values[np.searchsorted(cumulative, np.minimum(previous + 1, cumulative[-1] - 1) + 1)]
    lerp = a + (b - a) * gamma
    return np.where(gamma >= 0.5, b - (b - a) * (1 - gamma), lerp)


class FeatureEncoder:
    """Fitted encoders of every feature of a :class:`TableSchema`."""

    def __init__(self, fields: list[FieldEncoder], schema: TableSchema, params: EncoderParams) -> None:
        self.fields = fields
        self.schema = schema
        self.params = params

    # --- fit --------------------------------------------------------------------------
    @classmethod
    def fit(cls, train: pd.DataFrame, schema: TableSchema, params: EncoderParams) -> FeatureEncoder:
        """Fit on the training split only."""
        return cls.from_counts(count_fields(train, schema), schema, params)

    @classmethod
    def from_counts(cls, counts: dict[str, FieldCounts], schema: TableSchema, params: EncoderParams) -> FeatureEncoder:
        """Fit from the training split's :class:`FieldCounts` (see :func:`count_fields`)."""
        missing = [c for c in schema.features if c not in counts]
        if missing:
            raise ValueError(f"no training counts for schema column(s) {missing}")
        fields: list[FieldEncoder] = []
        for name in schema.features:
            min_count = params.min_count_per_field.get(name, params.min_count)
            source = schema.source_of(name)
            seen = counts[name]
            if name in schema.numeric:
                # Counted as raw values: bucket the distinct values, then add up per bucket.
                edges = _quantile_edges(seen, params.quantile_buckets) if params.numeric_buckets == "quantile" else None
                proto = FieldEncoder(name, "numeric", source, [], bucketing=params.numeric_buckets, edges=edges)
                buckets = FieldCounts(pa.array([], pa.int64()), np.zeros(0, np.int64)).merge(
                    FieldCounts(proto.bucket(_comparable(seen.values, pa.float64())), seen.counts))
                fields.append(FieldEncoder(**{**proto.to_dict(), "vocab": _vocab_from_counts(buckets, min_count)}))
            elif name in schema.multi_valued:
                hist = seen.lengths if seen.lengths is not None and seen.lengths.sum() else np.ones(1, np.int64)
                p99 = _quantiles_from_counts(np.arange(len(hist), dtype=np.float64), hist, np.array([0.99]))[0]
                auto = int(np.clip(np.ceil(p99), 1, params.max_len_cap))
                fields.append(FieldEncoder(name, "multi_valued", source, _vocab_from_counts(seen, min_count),
                                           max_len=int(params.max_len.get(name, auto))))
            else:
                fields.append(FieldEncoder(name, "categorical", source, _vocab_from_counts(seen, min_count)))
        return cls(fields, schema, params)

    # --- transform ----------------------------------------------------------------------
    def transform(self, table: pd.DataFrame, passthrough: tuple[str, ...] = ()) -> tuple[pd.DataFrame, dict[str, dict[str, int]]]:
        """Encode ``table`` chunk by chunk.

        Returns:
            The encoded frame (``label`` int8, one int32 column per categorical or
            numeric field, ``name__i`` int32 slots and ``name__len`` int16 for
            multi-valued fields, then ``passthrough`` columns as they are), and per
            field the number of rows holding an unseen value (``oov_rows``) and, for
            multi-valued fields, rows cut to ``max_len`` (``truncated_rows``).
        """
        missing = [c for c in [*self.schema.features, self.schema.label] if c not in table.columns]
        if missing:
            raise ValueError(f"table to encode lacks column(s) {missing}")
        stats = {f.name: {"oov_rows": 0, "truncated_rows": 0} for f in self.fields}
        chunks: list[dict[str, np.ndarray]] = []
        for start in range(0, max(len(table), 1), self.params.chunk_rows):
            part = table.iloc[start : start + self.params.chunk_rows]
            chunks.append(self._transform_chunk(part, stats))
        columns = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        encoded = pd.DataFrame(columns)
        for name in passthrough:
            encoded[name] = table[name].to_numpy()
        return encoded, stats

    def _transform_chunk(self, part: pd.DataFrame, stats: dict[str, dict[str, int]]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"label": _as_array(part[self.schema.label]).to_numpy(zero_copy_only=False).astype(np.int8)}
        for enc in self.fields:
            column = _as_array(part[enc.name])
            if enc.kind == "multi_valued":
                slots, lengths, oov_rows, truncated = _encode_lists(enc, column)
                for i in range(enc.max_len):
                    out[f"{enc.name}__{i}"] = slots[:, i]
                out[f"{enc.name}__len"] = lengths
                stats[enc.name]["truncated_rows"] += truncated
            else:
                ids = enc.indices(enc.bucket(column) if enc.kind == "numeric" else column)
                oov_rows = int((ids == OOV_INDEX).sum())
                out[enc.name] = ids
            stats[enc.name]["oov_rows"] += oov_rows
        return out

    # --- spec and serialisation -------------------------------------------------------------
    def feature_spec(self) -> FeatureSpec:
        fields = tuple(
            FieldSpec(
                name=f.name,
                kind="sequence" if f.kind == "multi_valued" else "categorical",
                vocab_size=f.vocab_size,
                max_len=f.max_len if f.kind == "multi_valued" else 1,
                source=f.source,
            )
            for f in self.fields
        )
        return FeatureSpec(fields=fields, label="label", user_field=self.schema.user_key, item_field=self.schema.item_key)

    def field(self, name: str) -> FieldEncoder:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"encoder has no field {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": ENCODER_FORMAT,
            "schema": self.schema.to_dict(),
            "params": {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.params.__dict__.items()},
            "fields": [f.to_dict() for f in self.fields],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureEncoder:
        if d.get("format_version") != ENCODER_FORMAT:
            raise ValueError(f"encoder format_version={d.get('format_version')!r}; this code reads {ENCODER_FORMAT}")
        return cls([FieldEncoder(**f) for f in d["fields"]], TableSchema.from_dict(d["schema"]), EncoderParams(**d["params"]))


def _quantile_edges(counts: FieldCounts, buckets: int) -> list[float]:
    v = _comparable(counts.values, pa.float64()).to_numpy(zero_copy_only=False)
    present = ~np.isnan(v)
    if not present.any():
        return []
    order = np.argsort(v[present], kind="stable")
    values, n = v[present][order], counts.counts[present][order]
    return np.unique(_quantiles_from_counts(values, n, np.linspace(0, 1, buckets + 1)[1:-1])).tolist()


def count_fields(table: pd.DataFrame, schema: TableSchema) -> dict[str, FieldCounts]:
    """The :class:`FieldCounts` of every feature of ``table`` (numeric fields: raw values)."""
    missing = [c for c in schema.features if c not in table.columns]
    if missing:
        raise ValueError(f"training table lacks schema column(s) {missing}")
    counts: dict[str, FieldCounts] = {}
    for name in schema.features:
        column = _as_array(table[name])
        if name in schema.numeric:
            counts[name] = FieldCounts.of(_comparable(column, pa.float64()))
        elif name in schema.multi_valued:
            counts[name] = FieldCounts.of(pc.list_flatten(column), pc.list_value_length(column.fill_null(pa.scalar([], column.type))))
        else:
            counts[name] = FieldCounts.of(column)
    return counts


def merge_counts(total: dict[str, FieldCounts] | None, batch: dict[str, FieldCounts]) -> dict[str, FieldCounts]:
    """Counts of the rows behind ``total`` and ``batch`` together."""
    if total is None:
        return batch
    return {name: total[name].merge(c) for name, c in batch.items()}


def _encode_lists(enc: FieldEncoder, column: pa.Array) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``list<string>`` -> ``(N, max_len)`` int32 slots, ``(N,)`` int16 lengths, OOV rows, cut rows."""
    n = len(column)
    column = column.fill_null(pa.scalar([], column.type))
    flat = pc.list_flatten(column)
    parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
    ids = enc.indices(flat)
    offsets = column.offsets.to_numpy()
    offsets = offsets - offsets[0]
    position = np.arange(len(ids)) - offsets[parents]
    keep = position < enc.max_len
    slots = np.full((n, enc.max_len), PAD_INDEX, dtype=np.int32)
    slots[parents[keep], position[keep]] = ids[keep]
    counts = np.diff(offsets)
    oov_rows = int(np.unique(parents[ids == OOV_INDEX]).size)
    return slots, np.minimum(counts, enc.max_len).astype(np.int16), oov_rows, int((counts > enc.max_len).sum())


ItemLists = dict[str, dict[Any, list[str]]]


def item_list_lookup(train: pd.DataFrame, schema: TableSchema) -> ItemLists:
    """Per ``item_aggregated`` column, each training item's values, ordered by how often
    they were given in training (ties by value). Only ``train`` is read."""
    lookups: ItemLists = {}
    for name in schema.item_aggregated:
        exploded = train[[schema.item_key, name]].explode(name).dropna()
        freq = exploded.groupby([schema.item_key, name], sort=False).size().rename("n").reset_index()
        freq = freq.sort_values([schema.item_key, "n", name], ascending=[True, False, True])
        lookups[name] = freq.groupby(schema.item_key, sort=False)[name].agg(list).to_dict()
    return lookups


def apply_item_lists(frame: pd.DataFrame, lookups: ItemLists, schema: TableSchema) -> pd.DataFrame:
    """``frame`` with each ``item_aggregated`` column replaced by its item's list from
    ``lookups`` (an empty list for an item not in it)."""
    if not lookups:  # no item-level lists (and possibly no item key: Criteo, Avazu)
        return frame
    list_type = pd.ArrowDtype(pa.list_(pa.string()))
    items = frame[schema.item_key].tolist()
    return frame.assign(**{name: pd.array([lookup.get(i, []) for i in items], dtype=list_type) for name, lookup in lookups.items()})


def aggregate_item_lists(
    train: pd.DataFrame, others: list[pd.DataFrame], schema: TableSchema
) -> tuple[pd.DataFrame, list[pd.DataFrame], dict[str, int]]:
    """Replace each ``item_aggregated`` list by its union over the item's training rows.

    Items keep their values ordered by how often they were given in training. Rows of
    items that never appear in training get an empty list. Only training rows are read,
    so no validation or test interaction leaks into a feature.
    """
    lookups = item_list_lookup(train, schema)
    counts = {f"{name}_items_with_values": len(lookup) for name, lookup in lookups.items()}
    return apply_item_lists(train, lookups, schema), [apply_item_lists(o, lookups, schema) for o in others], counts
