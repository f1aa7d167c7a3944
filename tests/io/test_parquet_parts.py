"""ParquetPartsDataset: parts written one by one, published whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from kedro.io import DatasetError, Version

from dynamic_ctr.io.parquet_parts import END, ParquetParts, ParquetPartsDataset, Part


def _frame(start: int, n: int) -> pd.DataFrame:
    return pd.DataFrame({"id": range(start, start + n), "x": [float(i) / 3 for i in range(start, start + n)]})


def _dataset(root: Path, save: str | None = None, lazy: bool = False) -> ParquetPartsDataset:
    return ParquetPartsDataset(filepath=str(root / "table"), lazy=lazy, version=Version(None, save))


def test_parts_are_published_by_end_in_order(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, "2026-01-01T00.00.00.000Z")
    for start in (0, 5, 10):
        ds.save(Part(_frame(start, 5)))
    assert not ds.exists()  # nothing loadable before END
    ds.save(END)
    pd.testing.assert_frame_equal(_dataset(tmp_path).load(), _frame(0, 15))
    parts = _dataset(tmp_path, lazy=True).load()
    assert isinstance(parts, ParquetParts) and len(parts) == 15 and [len(p) for p in parts] == [5, 5, 5]
    assert parts.to_pandas(columns=["id"])["id"].tolist() == list(range(15))


def test_a_run_killed_before_end_leaves_the_last_published_version(tmp_path: Path) -> None:
    first = _dataset(tmp_path, "2026-01-01T00.00.00.000Z")
    first.save(_frame(0, 4))  # a plain DataFrame: published at once
    killed = _dataset(tmp_path, "2026-01-02T00.00.00.000Z")
    killed.save(Part(_frame(100, 4)))  # ... and the process dies here
    pd.testing.assert_frame_equal(_dataset(tmp_path).load(), _frame(0, 4))
    # The killed run's parts sit in a hidden folder of its version, which no load sees.
    assert [p.name for p in (tmp_path / "table/2026-01-02T00.00.00.000Z").iterdir()] == [".table.partial"]


def test_a_published_version_is_never_written_again(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, "2026-01-01T00.00.00.000Z")
    ds.save(_frame(0, 2))
    with pytest.raises(DatasetError, match="already published"):
        ds.save(Part(_frame(2, 2)))
    streaming = _dataset(tmp_path, "2026-01-03T00.00.00.000Z")
    streaming.save(Part(_frame(0, 2)))
    with pytest.raises(DatasetError, match="a whole DataFrame saved while parts of this version are being streamed"):
        streaming.save(_frame(0, 2))
    with pytest.raises(DatasetError, match="expected a DataFrame, a Part or END, got list"):
        streaming.save([1, 2])  # type: ignore[arg-type]


def test_saving_a_part_takes_its_rows_out_of_it(tmp_path: Path) -> None:
    """Kedro's tee may keep a generator's chunks referenced; a saved Part holds no rows."""
    part = Part(_frame(0, 3))
    _dataset(tmp_path, "2026-01-01T00.00.00.000Z").save(part)
    assert part.frame is None and part.rows == 3 and repr(part) == "Part(3 rows)"
    with pytest.raises(DatasetError, match=r"Part\(3 rows\) was saved already"):
        _dataset(tmp_path, "2026-01-02T00.00.00.000Z").save(part)


def test_a_stream_with_no_rows_publishes_an_empty_table(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, "2026-01-01T00.00.00.000Z")
    ds.save(Part(_frame(0, 0)))
    ds.save(END)
    loaded = _dataset(tmp_path).load()
    assert len(loaded) == 0 and list(loaded.columns) == ["id", "x"]
