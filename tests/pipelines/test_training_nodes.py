"""The training node's choice of how to hold a lazily loaded training split: in memory
when its tensors fit under ``training.in_memory_limit_mb``, else by row group; on the
shipped MovieLens latest-small data, written as the streaming pipeline writes it."""

from __future__ import annotations

import pytest
import torch
from kedro.io import Version

from dynamic_ctr.io.parquet_parts import END, ParquetPartsDataset, Part
from dynamic_ctr.pipelines.training.nodes import (
    available_memory_bytes,
    frame_to_tensors,
    in_memory_limit_bytes,
    tensor_bytes,
    variant_train_data,
)
from dynamic_ctr.training.batching import RowGroupData, TensorData


@pytest.fixture(scope="module")
def lazy_split(tmp_path_factory, small_train_encoded):
    """``(spec, frame, ParquetParts)``: the encoded training split in 4 parts, loaded lazily."""
    spec, frame = small_train_encoded
    root = tmp_path_factory.mktemp("lazy") / "train"
    written = ParquetPartsDataset(filepath=str(root), version=Version(None, "2026-01-01T00.00.00.000Z"))
    quarter = -(-len(frame) // 4)
    for start in range(0, len(frame), quarter):
        written.save(Part(frame.iloc[start : start + quarter]))
    written.save(END)
    lazy = ParquetPartsDataset(filepath=str(root), lazy=True, shuffle_buffer_rows=5000, version=Version(None, None))
    return spec, frame, lazy.load()


def test_a_split_under_the_limit_is_read_into_memory_as_from_a_frame(lazy_split, caplog) -> None:
    spec, frame, parts = lazy_split
    need_mb = tensor_bytes(len(frame), spec) / 2**20
    with caplog.at_level("INFO"):
        data = variant_train_data(parts, {"in_memory_limit_mb": need_mb * 1.01}, spec, "cpu")
    assert isinstance(data, TensorData) and "read into memory: 70585 rows" in caplog.text
    expected = frame_to_tensors(frame, spec, "cpu")
    assert torch.equal(data.x, expected.x) and torch.equal(data.y, expected.y)
    capped = variant_train_data(parts, {"in_memory_limit_mb": need_mb, "train_rows": 1000}, spec, "cpu")
    assert isinstance(capped, TensorData) and torch.equal(capped.x, expected.x[:1000])


def test_a_split_over_the_limit_is_read_by_row_group(lazy_split, caplog) -> None:
    spec, frame, parts = lazy_split
    need_mb = tensor_bytes(len(frame), spec) / 2**20
    with caplog.at_level("INFO"):
        data = variant_train_data(parts, {"in_memory_limit_mb": need_mb * 0.99}, spec, "cpu")
    assert isinstance(data, RowGroupData) and len(data) == len(frame) and data.buffer_rows == 5000
    assert "read by row group: 70585 rows" in caplog.text and "over the" in caplog.text
    assert isinstance(variant_train_data(parts, {"in_memory_limit_mb": 0}, spec, "cpu"), RowGroupData)


def test_the_automatic_limit_is_a_quarter_of_the_available_memory() -> None:
    available = available_memory_bytes()
    assert available is not None and available > 0  # Linux CI
    assert abs(in_memory_limit_bytes("auto") - available // 4) < 2**28  # memory moves a little between reads
    assert in_memory_limit_bytes(1.5) == 3 * 2**19
