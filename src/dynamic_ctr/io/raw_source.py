"""``RawSourceDataset``: the raw files of one click log, read as text tables.

Catalog entry::

    raw_source:
      type: dynamic_ctr.io.raw_source.RawSourceDataset
      files:
        ratings: {filepath: data/01_raw/ml-latest-small/ratings.csv}
        movies:  {filepath: data/01_raw/ml-latest-small/movies.csv}
        tags:    {filepath: data/01_raw/ml-latest-small/tags.csv, optional: true}

Each ``files`` entry takes the options of :class:`~dynamic_ctr.data.raw.RawFileConfig`.
Loading returns ``{name: RawTable | None}``; the ingestion adapter types and checks it.
The dataset is read-only: raw data is never written by the pipeline.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset, DatasetError

from dynamic_ctr.data.raw import RawFileConfig, RawTable, iter_raw_batches, read_raw


class RawSourceDataset(AbstractDataset[None, dict[str, RawTable | None]]):
    def __init__(self, *, files: dict[str, dict[str, Any]], metadata: dict[str, Any] | None = None) -> None:
        if not files:
            raise DatasetError("RawSourceDataset needs at least one entry under 'files'")
        self._files = {name: RawFileConfig.from_dict(cfg) for name, cfg in files.items()}
        self.metadata = metadata

    def load(self) -> dict[str, RawTable | None]:
        return {name: read_raw(cfg) for name, cfg in self._files.items()}

    def save(self, data: None) -> None:
        raise DatasetError("RawSourceDataset is read-only: the pipeline never writes raw data")

    def _exists(self) -> bool:
        return all(Path(c.filepath).is_file() or c.optional for c in self._files.values())

    def _describe(self) -> dict[str, Any]:
        return {name: cfg.filepath for name, cfg in self._files.items()}


class RawFileDataset(AbstractDataset[pd.DataFrame, RawTable]):
    """One raw file, read as :func:`~dynamic_ctr.data.raw.read_raw` reads it; the
    dataset of a ``partitions.PartitionedDataset`` of dated raw files (a click log that
    grows by one file a week). Saving writes the rows as CSV (atomically: a temporary
    file renamed into place), which only ``kedro run --pipeline partition_log`` does, to
    cut the shipped log into partitions.

    Args:
        filepath: the file.
        **options: the other :class:`~dynamic_ctr.data.raw.RawFileConfig` options.
    """

    def __init__(self, *, filepath: str, metadata: dict[str, Any] | None = None, **options: Any) -> None:
        self._config = RawFileConfig.from_dict({"filepath": filepath, **options})
        self.metadata = metadata

    def load(self) -> RawTable:
        return read_raw(self._config)

    def save(self, data: pd.DataFrame) -> None:
        path = Path(self._config.filepath)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
                data.to_csv(handle, index=False, sep=self._config.sep)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _exists(self) -> bool:
        return Path(self._config.filepath).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._config.filepath}


class RawStream:
    """Raw files opened lazily: the streamed one batch by batch, the others whole."""

    def __init__(self, files: dict[str, RawFileConfig], batch_bytes: int) -> None:
        self.files = files
        self.batch_bytes = batch_bytes

    def batches(self, name: str) -> Iterator[RawTable]:
        """``name``'s rows, about ``batch_bytes`` of text at a time (see :func:`iter_raw_batches`)."""
        if name not in self.files:
            raise DatasetError(f"raw_stream has no file {name!r}; files: {sorted(self.files)}")
        return iter_raw_batches(self.files[name], self.batch_bytes)

    def read(self, name: str) -> RawTable | None:
        """A side file (small, e.g. a lookup table), read whole."""
        return read_raw(self.files[name])


class RawStreamDataset(RawSourceDataset):
    """The raw files of :class:`RawSourceDataset`, for the streaming pipeline: loading
    opens nothing and returns a :class:`RawStream`, which reads a file batch by batch.

    Catalog entry (a YAML anchor shares the files with ``raw_source``)::

        raw_stream:
          <<: *raw_files
          type: dynamic_ctr.io.raw_source.RawStreamDataset
          batch_mb: 64

    Args:
        batch_mb: text per batch, in MiB: the memory the stream holds at a time scales
            with it, not with the file.
    """

    def __init__(self, *, files: dict[str, dict[str, Any]], batch_mb: float = 64, metadata: dict[str, Any] | None = None) -> None:
        super().__init__(files=files, metadata=metadata)
        if batch_mb <= 0:
            raise DatasetError(f"raw_stream: batch_mb={batch_mb} must be > 0")
        self._batch_bytes = int(batch_mb * (1 << 20))

    def load(self) -> RawStream:  # type: ignore[override]
        return RawStream(self._files, self._batch_bytes)
