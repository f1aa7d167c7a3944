"""RowGroupData: a training split read from Parquet row groups through a shuffle buffer,
on the shipped MovieLens latest-small data encoded as the pipeline encodes it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from dynamic_ctr.training import make_generator, train
from dynamic_ctr.training.batching import RowGroupData, tensors_from_columns
from dynamic_ctr.training.loop import TrainConfig

GROUP = 5000


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, small_train_encoded):
    """The encoded training split (70,585 rows), written as 2 files of 5,000-row groups."""
    spec, frame = small_train_encoded
    folder = tmp_path_factory.mktemp("row_groups")
    half = len(frame) // 2
    paths = []
    for i, part in enumerate((frame.iloc[:half], frame.iloc[half:])):
        paths.append(str(folder / f"part-{i}.parquet"))
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), paths[-1], row_group_size=GROUP)
    return spec, frame, tuple(paths)


def _rows(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """The rows as a sorted array (a multiset to compare)."""
    both = np.concatenate([x.numpy(), y.numpy()[:, None].astype(np.int64)], axis=1)
    return both[np.lexsort(both.T[::-1])]


def _epoch(data: RowGroupData, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(data.batches(batch, make_generator(seed)))


@pytest.mark.parametrize("buffer_rows", [7000, 30_000, 10**9])
def test_every_row_once_per_epoch_in_full_batches(encoded, buffer_rows):
    spec, frame, paths = encoded
    data = RowGroupData(paths, spec, buffer_rows=buffer_rows)
    whole = tensors_from_columns({c: frame[c].to_numpy() for c in [*spec.index_columns, spec.label]}, spec, group_columns=[])
    assert len(data) == len(frame) > 70_000
    groups = data.groups
    assert len(groups) > 4 and {p for p, _, _ in groups} == set(paths)
    out = _epoch(data, 1024, seed=1)
    assert len(out) == -(-len(frame) // 1024) and all(len(y) == 1024 for _, y in out[:-1])
    x, y = torch.cat([b[0] for b in out]), torch.cat([b[1] for b in out])
    np.testing.assert_array_equal(_rows(x, y), _rows(whole.x, whole.y))


def test_the_order_is_seeded_and_mixes_row_groups(encoded):
    spec, frame, paths = encoded
    data = RowGroupData(paths, spec, buffer_rows=20_000)
    first, again, other = (_epoch(data, 1024, s) for s in (5, 5, 6))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], other[0][0])
    # The first batch holds rows of several row groups (a buffer spans four of them).
    row_of = {tuple(r): i for i, r in enumerate(frame[list(spec.index_columns)].to_numpy().tolist())}
    groups_hit = {row_of[tuple(r)] // GROUP for r in first[0][0].tolist()}
    assert len(groups_hit) >= 3


def test_a_limit_reads_the_first_rows_only(encoded):
    spec, frame, paths = encoded
    data = RowGroupData(paths, spec, buffer_rows=10_000, limit=12_345)
    assert len(data) == 12_345
    out = _epoch(data, 1000, seed=0)
    head = frame.iloc[:12_345]
    expected = tensors_from_columns({c: head[c].to_numpy() for c in [*spec.index_columns, spec.label]}, spec, group_columns=[])
    np.testing.assert_array_equal(_rows(torch.cat([b[0] for b in out]), torch.cat([b[1] for b in out])), _rows(expected.x, expected.y))


class _Logistic(nn.Module):
    """Logistic regression: one weight per (slot, index), zero at the start."""

    def __init__(self, spec) -> None:
        super().__init__()
        sizes = [f.vocab_size for f in spec.categorical] + [f.vocab_size for f in spec.sequences for _ in range(f.max_len)]
        self.register_buffer("offsets", torch.tensor(np.r_[0, np.cumsum(sizes)[:-1]], dtype=torch.int64))
        self.table = nn.Embedding(int(sum(sizes)), 1)
        nn.init.zeros_(self.table.weight)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table(x + self.offsets).sum(dim=(1, 2)) + self.bias


def test_train_reads_row_groups_and_learns(encoded):
    """train() on the row groups: the same number of steps as from memory, and a model
    that ranks the validation rows better than chance."""
    spec, frame, paths = encoded
    head, tail = frame.iloc[: len(frame) * 4 // 5], frame.iloc[len(frame) * 4 // 5 :]
    columns = [*spec.index_columns, spec.label]
    valid = tensors_from_columns({c: tail[c].to_numpy() for c in columns}, spec, group_columns=[])
    data = RowGroupData(paths, spec, buffer_rows=20_000, limit=len(head))
    cfg = TrainConfig(batch_size=1024, max_epochs=2, lr=0.01, seed=3, progress=False)
    streamed = train(_Logistic(spec), data, valid, cfg)
    assert len(streamed.history) == 2 and streamed.history[-1]["val_auc"] > 0.65  # chance: 0.5
    in_memory = tensors_from_columns({c: head[c].to_numpy() for c in columns}, spec, group_columns=[])
    baseline = train(_Logistic(spec), in_memory, valid, cfg)
    assert abs(streamed.history[-1]["val_auc"] - baseline.history[-1]["val_auc"]) < 0.01


def test_models_that_adapt_on_the_whole_split_are_refused(encoded):
    spec, frame, paths = encoded

    class Adapting(_Logistic):
        def adapt(self, data) -> None:  # MAML's per-domain adaptation reads the whole split
            pass

    valid = tensors_from_columns({c: frame[c].to_numpy()[:300] for c in [*spec.index_columns, spec.label]}, spec, group_columns=[])
    with pytest.raises(ValueError, match=r"read by row group .* \(Adapting defines adapt\(\)\): load it into memory"):
        train(Adapting(spec), RowGroupData(paths, spec), valid, TrainConfig(max_epochs=1, progress=False))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_disjoint_shards_in_equal_steps(encoded, world_size):
    """Data-parallel reading: each rank reads only its own row groups (disjoint, together
    the split), all ranks take the same number of full micro-batches, and the rows left
    out are fewer than the shards' imbalance plus one micro-batch per rank."""
    spec, _, paths = encoded
    data = RowGroupData(paths, spec, buffer_rows=12_000)
    micro = 512
    order = torch.randperm(len(data.groups), generator=make_generator(11)).tolist()
    shards = [data.shard_groups(order, r, world_size) for r in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(len(data.groups)))
    epochs = [_rank_epoch(data, micro, 11, r, world_size) for r in range(world_size)]
    steps = data.sharded_steps(micro, world_size, order)
    assert [len(e) for e in epochs] == [steps] * world_size
    assert all(x.shape[0] == micro for e in epochs for x, _ in e)
    sizes = [sum(data.groups[i][2] for i in shard) for shard in shards]
    seen = [_rows(torch.cat([x for x, _ in e]), torch.cat([y for _, y in e])) for e in epochs]
    for rank, rows in enumerate(seen):  # a rank's rows come from its own row groups only
        assert len(rows) == steps * micro and _is_sub_multiset(rows, _rows_of(data, shards[rank]))
    left_out = len(data) - sum(len(r) for r in seen)
    assert 0 <= left_out < (max(sizes) - min(sizes)) * world_size + micro * world_size
    assert _rank_epoch(data, micro, 11, 0, world_size)[0][0].equal(epochs[0][0][0])  # seeded


def test_a_shard_smaller_than_a_micro_batch_is_refused(encoded):
    spec, _, paths = encoded
    data = RowGroupData(paths, spec, limit=3 * GROUP)
    with pytest.raises(ValueError, match="fewer than 8000 rows .* for 2 ranks"):
        _rank_epoch(data, 8000, 1, 0, 2)


def _rank_epoch(data: RowGroupData, micro: int, seed: int, rank: int, world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(data.batches(micro, make_generator(seed), rank=rank, world_size=world_size))


def _rows_of(data: RowGroupData, indices: list[int]) -> np.ndarray:
    parts = [data.read(*data.groups[i]) for i in indices]
    return _rows(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))


def _is_sub_multiset(rows: np.ndarray, whole: np.ndarray) -> bool:
    from collections import Counter

    have, want = Counter(map(bytes, rows)), Counter(map(bytes, whole))
    return all(want[k] >= n for k, n in have.items())
