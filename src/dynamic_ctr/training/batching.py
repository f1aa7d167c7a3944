"""Whole-table tensors on the device and minibatches sliced from them.

CTR tables are narrow (S int64 slots per row), so a split fits on the accelerator:
it is stacked and moved once, and every minibatch is an ``index_select`` on tensors
already there. There is no ``DataLoader``, no worker process and no per-row Python.

Symbols: N rows, S slots (``len(spec.index_columns)``), B batch size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dynamic_ctr.spec import FeatureSpec

__all__ = ["RowGroupData", "TensorData", "batches", "num_batches", "tensors_from_columns"]


@dataclass(frozen=True, eq=False)
class TensorData:
    """One split as device tensors.

    Args:
        x: ``(N, S)`` int64 indices, columns in ``spec.index_columns`` order.
        y: ``(N,)`` float32 labels in {0, 1}.
        groups: named ``(N,)`` int64 group keys (e.g. ``"user"`` for GAUC); empty
            when none were requested.
    """

    x: Tensor
    y: Tensor
    groups: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.x.dtype != torch.int64:
            raise ValueError(
                f"x must be an (N, S) int64 tensor, got {tuple(self.x.shape)} {self.x.dtype}"
            )
        n = self.x.shape[0]
        if self.y.shape != (n,) or not self.y.is_floating_point():
            raise ValueError(
                f"y must be a float ({n},) tensor, got {tuple(self.y.shape)} {self.y.dtype}"
            )
        if self.y.device != self.x.device:
            raise ValueError(f"y is on {self.y.device} but x is on {self.x.device}")
        for name, g in self.groups.items():
            if g.shape != (n,) or g.device != self.x.device:
                raise ValueError(
                    f"groups[{name!r}] must be a ({n},) tensor on {self.x.device}, "
                    f"got {tuple(g.shape)} on {g.device}"
                )

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device: torch.device | str) -> TensorData:
        """A copy on ``device`` (the same object when it is already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return TensorData(
            x=self.x.to(device),
            y=self.y.to(device),
            groups={k: v.to(device) for k, v in self.groups.items()},
        )


def tensors_from_columns(
    columns: Mapping[str, np.ndarray],
    spec: FeatureSpec,
    device: torch.device | str = "cpu",
    *,
    group_columns: Sequence[str] | None = None,
) -> TensorData:
    """Stack the encoded columns of one split into a :class:`TensorData` on ``device``.

    Args:
        columns: column name -> ``(N,)`` array; must hold every ``spec.index_columns``
            entry and ``spec.label``. Extra columns are ignored.
        spec: the feature spec that fixes the slot order and the label column.
        device: where the tensors live; they are copied there exactly once.
        group_columns: columns to keep as group keys (``groups[name]``). ``None``
            means ``[spec.user_field]`` when the spec names a user field, else none.
            Note that a user *index* column maps every unseen user to the OOV index;
            pass a raw id column for GAUC over cold users.

    Returns:
        ``x (N, S)`` int64, ``y (N,)`` float32, ``groups`` int64 ``(N,)`` each.

    Raises:
        ValueError: a column is missing, lengths differ, an index is negative or not
            below its field's ``vocab_size``, or a label is not 0/1.
    """
    index_columns = spec.index_columns
    missing = [c for c in [*index_columns, spec.label] if c not in columns]
    if missing:
        raise ValueError(f"columns is missing {missing}; it has {sorted(columns)}")
    if group_columns is None:
        group_columns = [spec.user_field] if spec.user_field is not None else []
    missing_groups = [c for c in group_columns if c not in columns]
    if missing_groups:
        raise ValueError(f"group_columns {missing_groups} are not in columns")

    n = len(columns[spec.label])
    lengths = {c: len(columns[c]) for c in [*index_columns, *group_columns]}
    bad = {c: m for c, m in lengths.items() if m != n}
    if bad:
        raise ValueError(f"column lengths {bad} differ from the label's length {n}")

    x = np.stack([np.asarray(columns[c], dtype=np.int64) for c in index_columns], axis=1)  # (N, S)
    x = x.reshape(n, len(index_columns))
    if n:
        # one vocab bound per slot: categorical fields first, then sequence slots
        vocab = np.array(
            [f.vocab_size for f in spec.categorical]
            + [f.vocab_size for f in spec.sequences for _ in range(f.max_len)]
        )
        lo, hi = x.min(axis=0), x.max(axis=0)  # (S,)
        bad_slots = np.flatnonzero((lo < 0) | (hi >= vocab))
        if bad_slots.size:
            s = int(bad_slots[0])
            raise ValueError(
                f"column {index_columns[s]!r} holds indices in [{lo[s]}, {hi[s]}], "
                f"outside [0, vocab_size={vocab[s]})"
            )
    y = np.asarray(columns[spec.label], dtype=np.float32)
    if n and not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"label column {spec.label!r} must hold only 0 and 1")

    device = torch.device(device)
    return TensorData(
        x=_owned_tensor(np.ascontiguousarray(x)).to(device),
        y=_owned_tensor(y).to(device),
        groups={c: _owned_tensor(np.asarray(columns[c], dtype=np.int64)).to(device) for c in group_columns},
    )


def _owned_tensor(array: np.ndarray) -> Tensor:
    """``torch.from_numpy``, copying a read-only array first (an Arrow-backed column): a
    CPU tensor sharing read-only memory would make any in-place write undefined."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def num_batches(n: int, batch_size: int, *, drop_last: bool = False) -> int:
    """How many batches :func:`batches` yields for ``n`` rows."""
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(
    data: TensorData,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Minibatches ``(x (B, S), y (B,))`` of ``data``, each row exactly once.

    Args:
        data: the split, already on its device.
        batch_size: rows per batch; the last batch is smaller unless ``drop_last``.
        shuffle: draw a fresh permutation (``torch.randperm`` on the data's device).
        generator: seeded generator for the permutation, on the data's device
            (see :func:`dynamic_ctr.training.device.make_generator`); ``None`` uses
            torch's global generator.
        drop_last: skip a final batch smaller than ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"{batch_size=} must be >= 1")
    n = len(data)
    stop = n - n % batch_size if drop_last else n
    if not shuffle:
        for start in range(0, stop, batch_size):
            end = min(start + batch_size, n)
            yield data.x[start:end], data.y[start:end]
        return
    if generator is not None and generator.device.type != data.device.type:
        raise ValueError(f"generator is on {generator.device} but data is on {data.device}")
    perm = torch.randperm(n, device=data.device, generator=generator)  # (N,)
    for start in range(0, stop, batch_size):
        idx = perm[start : start + batch_size]  # (B,)
        yield data.x.index_select(0, idx), data.y.index_select(0, idx)


@dataclass(frozen=True, eq=False)
class RowGroupData:
    """A training split read from Parquet row groups: never whole in memory.

    For a split larger than memory (``model_input_train`` loaded lazily, see
    :class:`dynamic_ctr.io.parquet_parts.ParquetPartsDataset`). Every epoch
    (:meth:`batches`):

    1. visits the row groups of all files in an order drawn from the epoch's generator;
    2. pours their rows into a buffer; once it holds ``buffer_rows`` rows, shuffles the
       buffer (``randperm`` from the same generator), yields as many whole batches as it
       holds and keeps the rest for the next fill;
    3. at the end shuffles what is left and yields it (one last, smaller batch).

    Each row is seen exactly once per epoch and the order is a function of the seed. A
    batch mixes rows of the row groups in the buffer only, so ``buffer_rows`` should
    span many row groups (a buffer holding the whole split is a full shuffle). Memory:
    the buffer, as ``int64`` tensors of ``S`` slots.

    Args:
        files: Parquet files, in order.
        spec: the feature spec (slot order, label, vocabulary bounds).
        device: where batches are built.
        buffer_rows: rows held and shuffled together.
        limit: read only the first ``limit`` rows (``training.limits.train_rows``).
    """

    files: tuple[str, ...]
    spec: FeatureSpec
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    buffer_rows: int = 1_000_000
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.buffer_rows < 1:
            raise ValueError(f"buffer_rows={self.buffer_rows} must be >= 1")
        if not self.files:
            raise ValueError("RowGroupData needs at least one Parquet file")

    @cached_property
    def groups(self) -> tuple[tuple[str, int, int], ...]:
        """``(file, row group, rows to read)`` in file order, up to ``limit`` rows (read
        once from the files' footers)."""
        import pyarrow.parquet as pq

        groups, left = [], self.limit
        for path in self.files:
            meta = pq.ParquetFile(path).metadata
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if left is not None:
                    n = min(n, left)
                    left -= n
                if n:
                    groups.append((path, g, n))
        return tuple(groups)

    def __len__(self) -> int:
        return sum(n for _, _, n in self.groups)

    def read(self, path: str, group: int, rows: int) -> TensorData:
        """One row group (its first ``rows`` rows) as tensors on the device."""
        import pyarrow.parquet as pq

        columns = [*self.spec.index_columns, self.spec.label]
        table = pq.ParquetFile(path).read_row_group(group, columns=columns).slice(0, rows)
        return tensors_from_columns({c: table.column(c).to_numpy() for c in columns}, self.spec, self.device, group_columns=[])

    def summary(self) -> dict[str, object]:
        """What a resume state records of the split: its files' sizes and row groups."""
        return {"files": [[str(p), Path(p).stat().st_size] for p in self.files], "groups": [[g, n] for _, g, n in self.groups],
                "buffer_rows": self.buffer_rows}

    def shard_groups(self, order: list[int], rank: int, world_size: int) -> list[int]:
        """Rank ``rank``'s row groups of an epoch's group ``order``: every ``world_size``-th
        one from position ``rank``, so the ranks' shards are disjoint and cover the split."""
        if not 0 <= rank < world_size:
            raise ValueError(f"{rank=} must be in [0, {world_size=})")
        return order[rank::world_size]

    def sharded_steps(self, rank_batch: int, world_size: int, order: list[int]) -> int:
        """Steps of an epoch whose group order is ``order`` when each of ``world_size``
        ranks reads its own shard (:meth:`shard_groups`) in micro-batches of
        ``rank_batch`` rows: the smallest shard's whole micro-batches, the same on
        every rank (each knows every group's size from the footers)."""
        groups = self.groups
        return min(sum(groups[i][2] for i in self.shard_groups(order, r, world_size)) // rank_batch for r in range(world_size))

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None, *, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of shuffled minibatches ``(x (B, S), y (B,))``, each row exactly once.

        With ``world_size > 1`` (data-parallel training, one call per rank) the rank
        reads only its shard of the row groups and yields micro-batches of ``batch_size``
        rows (the global batch divided by the ranks), exactly :meth:`sharded_steps` of
        them, so every rank takes the same number of steps: rows beyond them (at most
        the shards' imbalance plus one micro-batch per rank) are left out that epoch,
        and the next epoch's order puts other groups last. ``generator`` must be in the
        same state on every rank: the group order and the seed of the rank's own buffer
        shuffles are drawn from it, two draws whatever the rank.
        """
        if batch_size < 1:
            raise ValueError(f"{batch_size=} must be >= 1")
        groups = self.groups
        order = torch.randperm(len(groups), generator=generator, device=self.device).tolist()
        if world_size > 1:
            steps = self.sharded_steps(batch_size, world_size, order)
            if steps == 0:
                raise ValueError(
                    f"a rank's shard of the {len(groups)} row groups holds fewer than {batch_size} rows (one "
                    f"micro-batch) for {world_size} ranks: write smaller row groups or use fewer ranks"
                )
            seed = int(torch.randint(2**62, (1,), generator=generator, device=self.device))
            own = torch.Generator(device=self.device).manual_seed(seed + rank)
            shard = [groups[i] for i in self.shard_groups(order, rank, world_size)]
            yield from itertools.islice(self._epoch(batch_size, own, shard), steps)
            return
        yield from self._epoch(batch_size, generator, [groups[i] for i in order])

    def _epoch(
        self, batch_size: int, generator: torch.Generator | None, groups: list[tuple[str, int, int]]
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of ``groups``, read in that order, through the shuffle buffer."""
        xs: list[Tensor] = []
        ys: list[Tensor] = []
        held = 0

        def drain(final: bool) -> Iterator[tuple[Tensor, Tensor]]:
            nonlocal xs, ys, held
            x, y = torch.cat(xs), torch.cat(ys)
            perm = torch.randperm(held, generator=generator, device=self.device)
            x, y = x.index_select(0, perm), y.index_select(0, perm)
            stop = held if final else held - held % batch_size
            for start in range(0, stop, batch_size):
                yield x[start : start + batch_size], y[start : start + batch_size]
            xs, ys, held = [x[stop:]], [y[stop:]], held - stop

        for group in groups:
            part = self.read(*group)
            xs.append(part.x)
            ys.append(part.y)
            held += len(part)
            if held >= self.buffer_rows:
                yield from drain(final=False)
        if held:
            yield from drain(final=True)
