"""Dated partitions of a raw click log, and which of them one retraining cycle reads.

A partition is one raw file in the adapter's own format (e.g. MovieLens' ``ratings.csv``
columns), named by the Monday (ISO date) of the last week it holds, so partition names
sort in time. :func:`weekly_partitions` cuts a log into such files;
:func:`plan_cycle` picks a cycle's holdout (the newest partition, or ``as_of``) and the
partitions it trains on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dynamic_ctr.data.raw import RawTable

__all__ = ["PARTITION_NAME", "CyclePlan", "plan_cycle", "weekly_partitions"]

#: A partition's name: the Monday of the last week it holds.
PARTITION_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def weekly_partitions(raw: RawTable, time_column: str, unit: str = "s", min_rows: int = 1) -> dict[str, pd.DataFrame]:
    """Cut a raw log into weekly partitions (Monday to Sunday, UTC).

    A week with fewer than ``min_rows`` rows is carried into the next one, so every
    partition is one or more whole, consecutive weeks with at least ``min_rows`` rows
    (a quiet last stretch joins the last partition). Every row lands in exactly one
    partition, with its text as read.

    Args:
        raw: the log as read (text columns); it must hold no malformed row.
        time_column: the column of event times.
        unit: their unit (``s``, ``ms``: ``pandas.to_datetime``'s).
        min_rows: the fewest rows a partition may hold.

    Returns:
        ``{name: rows}`` in time order, rows in file order.

    Raises:
        ValueError: a malformed row, a missing time column or a time that does not parse
            (naming the file and line).
    """
    if raw.malformed:
        first = raw.malformed[0]
        raise ValueError(f"{raw.path}: {len(raw.malformed)} malformed row(s), first at line {first.line}; fix the file before partitioning it")
    if time_column not in raw.table.column_names:
        raise ValueError(f"{raw.path}: no column {time_column!r} to partition by; columns: {raw.table.column_names}")
    if min_rows < 1:
        raise ValueError(f"min_rows={min_rows} must be >= 1")
    frame = raw.table.to_pandas()
    times = pd.to_datetime(pd.to_numeric(frame[time_column], errors="coerce"), unit=unit, utc=True)
    bad = np.flatnonzero(times.isna().to_numpy())
    if bad.size:
        raise ValueError(f"{raw.path}: line {int(raw.lines[bad[0]])}: {time_column}={frame[time_column].iloc[bad[0]]!r} is not a time in {unit!r} ({bad.size} such row(s))")
    week = (times.dt.tz_localize(None).dt.normalize() - pd.to_timedelta(times.dt.day_of_week, unit="D")).dt.strftime("%Y-%m-%d")
    sizes = week.value_counts().sort_index()
    names: dict[str, str] = {}  # week -> partition
    pending: list[str] = []
    rows = 0
    for name, count in sizes.items():
        pending.append(name)
        rows += int(count)
        if rows >= min_rows:
            names.update(dict.fromkeys(pending, name))
            pending, rows = [], 0
    if pending:  # a quiet last stretch: into the last partition (or alone if it is the only one)
        last = max(names.values()) if names else pending[-1]
        final = pending[-1]
        names = {w: (final if p == last else p) for w, p in names.items()}
        names.update(dict.fromkeys(pending, final))
    partition = week.map(names)
    return {name: frame[partition.to_numpy() == name].reset_index(drop=True) for name in sorted(set(names.values()))}


@dataclass(frozen=True)
class CyclePlan:
    """The partitions one retraining cycle reads.

    Attributes:
        holdout: the newest partition (or ``as_of``): scored, never trained on.
        train: the partitions the challengers train on (oldest first).
        valid: the partition after them, for early stopping.
        bootstrap: no champion exists yet; the first one trains on ``bootstrap_window``.
    """

    holdout: str
    train: tuple[str, ...]
    valid: str
    bootstrap: bool

    @property
    def partitions(self) -> tuple[str, ...]:
        return (*self.train, self.valid, self.holdout)

    def to_dict(self) -> dict[str, Any]:
        return {"holdout": self.holdout, "train": list(self.train), "valid": self.valid, "bootstrap": self.bootstrap}


def plan_cycle(names: list[str], as_of: str | None, window: int, bootstrap: bool, bootstrap_window: int | None = None) -> CyclePlan:
    """The holdout and training partitions of one cycle.

    The holdout is ``as_of`` (default: the newest partition); the ``window`` partitions
    before it are the training window, its newest one validating (``bootstrap_window``
    of them, default every earlier one, when there is no champion yet).

    Raises:
        ValueError: an unknown ``as_of``, a name that is not a date, a window under 2,
            or too few partitions before the holdout.
    """
    bad = [n for n in names if not PARTITION_NAME.match(n)]
    if bad:
        raise ValueError(f"partition name(s) {bad[:5]} are not dates (YYYY-MM-DD, the Monday of their last week)")
    ordered = sorted(names)
    if not ordered:
        raise ValueError("there are no partitions to retrain on")
    holdout = ordered[-1] if as_of is None else str(as_of)
    if holdout not in ordered:
        raise ValueError(f"retrain.as_of={as_of!r} is not a partition; the newest are {ordered[-5:]}")
    earlier = ordered[: ordered.index(holdout)]
    size = (bootstrap_window or len(earlier)) if bootstrap else window
    if size < 2:
        raise ValueError(f"a training window of {size} partition(s): it needs >= 2 (the newest one validates)")
    if len(earlier) < size:
        raise ValueError(f"holdout {holdout} has {len(earlier)} partition(s) before it; the window needs {size}")
    chosen = earlier[-size:]
    return CyclePlan(holdout=holdout, train=tuple(chosen[:-1]), valid=chosen[-1], bootstrap=bootstrap)
