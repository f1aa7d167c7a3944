"""Typing raw text columns, row by row accountable: bad rows go to a quarantine.

A value that cannot be typed, a label outside {0, 1}, a missing required value, a
duplicate key or a dangling foreign key sends its row to the quarantine with the file,
line and reason. Nothing is dropped without being counted: :class:`Quarantine` keeps
the rows and the ingestion report is built from its counts.

The fast path casts whole Arrow columns at once; only when a cast fails are the
offending rows looked for one column at a time.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dynamic_ctr.data.raw import RawInputError, RawTable

ColumnType = Literal["int", "float", "str", "label", "list"]
QUARANTINE_COLUMNS = ("file", "line", "reason", "row")


@dataclass(frozen=True)
class Column:
    """How to type one raw column.

    Args:
        name: column in the raw file.
        type: ``int``, ``float``, ``str``, ``label`` (integer 0 or 1) or ``list``
            (text split on ``sep``; missing = empty list).
        required: a missing value sends the row to quarantine.
        sep: separator of a ``list`` column.
        rename: name in the clean table (default: ``name``).
        invalid: what an unparsable value does: ``quarantine`` its row, or become
            ``missing`` (counted in the report) when the column is optional metadata.
    """

    name: str
    type: ColumnType = "str"
    required: bool = False
    sep: str = "|"
    rename: str | None = None
    invalid: Literal["quarantine", "missing"] = "quarantine"

    @property
    def out(self) -> str:
        return self.rename or self.name


class Quarantine:
    """Rows set aside during ingestion, with file, line and reason."""

    def __init__(self) -> None:
        self._parts: list[pd.DataFrame] = []
        #: ``{path: {column: n}}``: unparsable values of optional columns set to missing.
        self.set_missing: dict[str, dict[str, int]] = {}

    def add(self, path: str, lines: np.ndarray, reasons: list[str] | np.ndarray, rows: list[str]) -> None:
        if len(lines) == 0:
            return
        self._parts.append(
            pd.DataFrame(
                {
                    "file": path,
                    "line": np.asarray(lines, dtype=np.int64),
                    "reason": list(reasons),
                    "row": list(rows),
                }
            )
        )

    def add_table_rows(self, raw_path: str, table: pa.Table, lines: np.ndarray, mask: np.ndarray, reasons: np.ndarray) -> None:
        """Quarantine the rows of ``table`` where ``mask`` is true (reasons aligned with rows)."""
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            return
        subset = table.take(pa.array(idx)).to_pylist()
        rows = [json.dumps(r, default=str, ensure_ascii=False) for r in subset]
        self.add(raw_path, lines[idx], reasons[idx], rows)

    def frame(self) -> pd.DataFrame:
        if not self._parts:
            return pd.DataFrame(
                {"file": pd.Series(dtype="str"), "line": pd.Series(dtype="int64"),
                 "reason": pd.Series(dtype="str"), "row": pd.Series(dtype="str")}
            )
        return pd.concat(self._parts, ignore_index=True)

    def counts(self, path: str) -> dict[str, int]:
        """Quarantined rows of ``path`` by reason kind (the text before the first ':')."""
        counter: Counter[str] = Counter()
        for part in self._parts:
            rows = part[part["file"] == path]
            counter.update(r.split(":", 1)[0] for r in rows["reason"])
        return dict(sorted(counter.items()))

    def total(self, path: str) -> int:
        return sum(int((part["file"] == path).sum()) for part in self._parts)


def type_columns(raw: RawTable, columns: list[Column], quarantine: Quarantine) -> pd.DataFrame:
    """Type ``columns`` of ``raw``; rows with any bad value go to ``quarantine``.

    Returns the kept rows as a DataFrame with Arrow-backed dtypes, the output names of
    ``columns`` plus ``source_line`` (the row's line in ``raw.path``).

    Raises:
        RawInputError: a configured column is missing from the file.
    """
    missing = [c.name for c in columns if c.name not in raw.table.column_names]
    if missing:
        raise RawInputError(
            f"{raw.path}: missing column(s) {missing}; the file has {raw.table.column_names}"
        )
    quarantine.add(
        raw.path,
        np.array([m.line for m in raw.malformed], dtype=np.int64),
        [f"malformed row: {m.reason}" for m in raw.malformed],
        [m.text for m in raw.malformed],
    )
    n = raw.table.num_rows
    reasons = np.full(n, "", dtype=object)
    typed: dict[str, pa.ChunkedArray | pa.Array] = {}
    all_null = np.ones(n, dtype=bool)
    for col in columns:
        values = raw.table.column(col.name)
        is_null = values.is_null().to_numpy(zero_copy_only=False)
        all_null &= is_null
        typed[col.out], bad = _type_one(values, col)
        if col.invalid == "missing" and bad.any():
            quarantine.set_missing.setdefault(raw.path, {})[col.name] = int(bad.sum())
            typed[col.out] = pc.if_else(pa.array(bad), pa.scalar(None, typed[col.out].type), typed[col.out])
            bad = np.zeros(n, dtype=bool)
        if col.required:
            bad = bad | is_null
            _note(reasons, is_null, f"missing value: {col.name} is empty")
        _note(reasons, bad & ~is_null, None, values, col)
    # A blank line reads as a row of nulls: say so rather than listing every column.
    reasons[all_null] = "empty line: no fields"
    bad_rows = reasons != ""
    quarantine.add_table_rows(raw.path, raw.table, raw.lines, bad_rows, reasons)

    out = pa.table({name: arr for name, arr in typed.items()})
    out = out.append_column("source_line", pa.array(raw.lines, pa.int64()))
    if bad_rows.any():  # filtering copies every column: only when a row must go
        out = out.filter(pa.array(~bad_rows))
    return out.to_pandas(types_mapper=pd.ArrowDtype)


def _note(reasons: np.ndarray, mask: np.ndarray, text: str | None, values: pa.ChunkedArray | None = None, col: Column | None = None) -> None:
    """Record a reason for the rows in ``mask`` that have none yet."""
    todo = mask & (reasons == "")
    if not todo.any():
        return
    if text is not None:
        reasons[todo] = text
        return
    assert values is not None and col is not None
    idx = np.flatnonzero(todo)
    raw_values = values.take(pa.array(idx)).to_pylist()
    if col.type == "label":
        reasons[idx] = [f"bad label: {col.name}={v!r} is not 0 or 1" for v in raw_values]
    else:
        reasons[idx] = [f"unparsable value: {col.name}={v!r} is not {col.type}" for v in raw_values]


def _type_one(values: pa.ChunkedArray, col: Column) -> tuple[pa.Array, np.ndarray]:
    """Typed column and a mask of the rows whose value could not be typed."""
    n = len(values)
    no_bad = np.zeros(n, dtype=bool)
    if col.type == "str":
        return values.cast(pa.string()), no_bad  # no copy: the raw chunks are reused
    if col.type == "list":
        combined = values.combine_chunks()
        if pa.types.is_list(combined.type) or pa.types.is_large_list(combined.type):
            split = combined.cast(pa.list_(pa.string()))  # a Parquet list column: already split
        else:
            split = pc.split_pattern(combined.cast(pa.string()), col.sep)
        # Missing -> empty list; drop empty items ("a||b").
        split = pc.if_else(split.is_null(), pa.scalar([], pa.list_(pa.string())), split)
        split = _drop_empty_items(split)
        return split, no_bad
    target = pa.float64() if col.type == "float" else pa.int64()
    typed, bad = _cast_numeric(values, target)
    if col.type == "label":
        valid = pc.is_in(typed, value_set=pa.array([0, 1], pa.int64())).to_numpy(zero_copy_only=False)
        bad = bad | (~valid & ~typed.is_null().to_numpy(zero_copy_only=False))
        typed = typed.cast(pa.int64())
        typed = pc.if_else(pa.array(bad), pa.scalar(None, pa.int64()), typed)
        return typed.cast(pa.int8()), bad
    return typed, bad


def _cast_numeric(values: pa.ChunkedArray, target: pa.DataType) -> tuple[pa.ChunkedArray | pa.Array, np.ndarray]:
    # Fast paths cast chunk by chunk, with no combined copy of the column: as read, then
    # with surrounding spaces trimmed.
    no_bad = np.zeros(len(values), dtype=bool)
    try:
        return values.cast(target), no_bad
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    text = pc.utf8_trim_whitespace(values.cast(pa.string()))
    try:
        return text.cast(target), no_bad
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        text = text.combine_chunks()
    # Slow path: find the rows that do not parse (pandas' coerce), keep the rest.
    series = pd.Series(text.to_numpy(zero_copy_only=False), dtype=object)
    parsed = pd.to_numeric(series, errors="coerce")
    bad = (parsed.isna() & series.notna()).to_numpy()
    if target == pa.int64():
        fractional = parsed.notna() & (parsed != np.floor(parsed.fillna(0)))
        bad = bad | fractional.to_numpy()
        parsed = parsed.where(~pd.Series(bad))
        arr = pa.array(parsed.to_numpy(dtype="float64", na_value=np.nan), pa.float64(), from_pandas=True)
        return arr.cast(pa.int64()), bad
    return pa.array(parsed.to_numpy(dtype="float64", na_value=np.nan), pa.float64(), from_pandas=True), bad


def _drop_empty_items(lists: pa.Array) -> pa.Array:
    flat = pc.list_flatten(lists)
    if len(flat) == 0 or pc.all(pc.not_equal(flat, "")).as_py():
        return lists
    parents = pc.list_parent_indices(lists).to_numpy()
    keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    counts = np.bincount(parents[keep], minlength=len(lists))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), flat.filter(pa.array(keep)))


def quarantine_duplicates(frame: pd.DataFrame, keys: list[str], path: str, quarantine: Quarantine) -> pd.DataFrame:
    """Keep the first row of each key, quarantine the later ones (naming the first line)."""
    dup = frame.duplicated(subset=keys, keep="first").to_numpy()
    if not dup.any():
        return frame
    first_line = frame.groupby(keys, sort=False)["source_line"].transform("first").to_numpy()
    rows = frame[dup]
    quarantine.add(path, rows["source_line"].to_numpy(), *duplicate_records(rows, keys, first_line[dup]))
    return frame[~dup].reset_index(drop=True)


def duplicate_records(rows: pd.DataFrame, keys: list[str], first_lines: Sequence[int]) -> tuple[list[str], list[str]]:
    """The quarantine reasons and row texts of duplicate ``rows`` whose ``keys`` first
    appeared on ``first_lines`` (the adapters' check, and the streaming pipeline's
    across batches)."""
    key_text = rows[keys].astype(str).agg(",".join, axis=1).to_numpy()
    reasons = [f"duplicate key: ({','.join(keys)})=({k}) already on line {f}" for k, f in zip(key_text, first_lines)]
    return reasons, [json.dumps(r, default=str) for r in rows.drop(columns="source_line").astype(str).to_dict("records")]


def quarantine_dangling(frame: pd.DataFrame, column: str, known: pd.Series, path: str, target: str, quarantine: Quarantine) -> pd.DataFrame:
    """Quarantine rows whose ``column`` value is not among ``known`` (a foreign key)."""
    ok = frame[column].isin(known).to_numpy()
    if ok.all():
        return frame
    rows = frame[~ok]
    reasons = [f"dangling key: {column}={v} not in {target}" for v in rows[column].tolist()]
    quarantine.add(path, rows["source_line"].to_numpy(), reasons, [json.dumps(r, default=str) for r in rows.drop(columns="source_line").astype(str).to_dict("records")])
    return frame[ok].reset_index(drop=True)
