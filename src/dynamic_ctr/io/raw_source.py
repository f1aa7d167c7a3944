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
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset, DatasetError

from dynamic_ctr.data.raw import RawFileConfig, RawTable, read_raw


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
