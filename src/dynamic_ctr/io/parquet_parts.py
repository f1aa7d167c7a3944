"""``ParquetPartsDataset``: a table written part by part, versioned, never half-visible.

A streaming node (a generator node: Kedro saves each chunk it yields as it comes)
yields one :class:`Part` per batch; each becomes a Parquet file ``part-00000.parquet``,
``part-00001.parquet`` ... in a hidden folder of the run's version. The node's last
chunk is :data:`END`: it writes ``_manifest.json`` (parts, rows, schema) and renames the
folder into place, so a version either holds every part or does not exist, and a run
killed half-way leaves nothing a later run could load. An ordinary node saves a plain
DataFrame: one part, published at once. The same entry can therefore be written by the
in-memory pipeline and by the streaming one.

Loading gives the whole table as one DataFrame (what in-memory nodes want), or, with
``lazy: true``, a :class:`ParquetParts` that streaming nodes read one part at a time, and
that training reads by row group through a shuffle buffer of ``shuffle_buffer_rows``
(``model_input_train`` larger than memory; README, "Scaling out").

Catalog entry::

    "stream_primary_{split}@parts":
      type: dynamic_ctr.io.parquet_parts.ParquetPartsDataset
      filepath: data/03_primary/${globals:dataset}/stream_{split}
      versioned: true
      lazy: true
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from kedro.io import AbstractDataset, AbstractVersionedDataset, DatasetError, Version

from dynamic_ctr.io.layout import PARTS_MANIFEST as MANIFEST


class _End:
    """The last chunk a streaming node yields for a :class:`ParquetPartsDataset`."""

    def __repr__(self) -> str:
        return "END"


#: Yield it (for every output) after the last batch: the parts are then published.
END = _End()


class Part:
    """One batch of a streamed table (more follow until :data:`END`).

    Saving a Part takes its frame out of it. Kedro hands a multi-output generator
    node's chunks to the datasets through ``itertools.tee``, which keeps up to 57
    chunks referenced; emptied Parts keep that at a few bytes instead of 57 batches.
    """

    __slots__ = ("frame", "rows")

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame: pd.DataFrame | None = frame
        self.rows = len(frame)

    def take(self) -> pd.DataFrame:
        frame, self.frame = self.frame, None
        if frame is None:
            raise DatasetError(f"{self!r} was saved already")
        return frame

    def __repr__(self) -> str:
        return f"Part({self.rows} rows)"


class ParquetParts:
    """A published version: its parts in order, read one at a time.

    ``shuffle_buffer_rows``: when this is a training split, the rows training shuffles
    together as it reads it by row group (:class:`dynamic_ctr.training.batching.RowGroupData`).
    """

    def __init__(self, folder: Path, shuffle_buffer_rows: int = 1_000_000) -> None:
        self.folder = folder
        self.shuffle_buffer_rows = shuffle_buffer_rows
        manifest = json.loads((folder / MANIFEST).read_text())
        self.files = [folder / name for name in manifest["parts"]]
        self.rows = int(manifest["rows"])
        self.schema = pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(manifest["schema"]))) if manifest.get("schema") else None

    def __iter__(self) -> Iterator[pd.DataFrame]:
        for path in self.files:
            yield pd.read_parquet(path, dtype_backend="pyarrow")

    def __len__(self) -> int:
        return self.rows

    def to_pandas(self, columns: list[str] | None = None, dtype_backend: str | None = "pyarrow") -> pd.DataFrame:
        """The whole table (or ``columns`` of it) in memory."""
        if not self.files:
            return self.schema.empty_table().to_pandas() if self.schema is not None else pd.DataFrame()
        table = pa.concat_tables([pq.read_table(p, columns=columns) for p in self.files])
        return table.to_pandas(types_mapper=pd.ArrowDtype) if dtype_backend == "pyarrow" else table.to_pandas()


class ParquetPartsDataset(AbstractVersionedDataset):
    def __init__(
        self,
        *,
        filepath: str,
        lazy: bool = False,
        shuffle_buffer_rows: int = 1_000_000,
        load_args: dict[str, Any] | None = None,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(filepath=PurePosixPath(filepath), version=version, exists_function=lambda p: Path(p).is_dir())
        self._lazy = lazy
        self._shuffle_buffer_rows = int(shuffle_buffer_rows)
        self._load_args = dict(load_args or {})
        unknown = set(self._load_args) - {"dtype_backend", "columns"}
        if unknown:
            raise DatasetError(f"{filepath}: unknown load_args {sorted(unknown)}; known: columns, dtype_backend")
        self.metadata = metadata

    # --- saving ---------------------------------------------------------------------------
    @classmethod
    def _save_wrapper(cls, save_func):  # type: ignore[no-untyped-def, override]
        # Kedro's versioned wrapper checks, after every save, that the saved version is
        # the latest loadable one; a Part is not loadable until END publishes it, so
        # only the plain dataset wrapper (logging, errors) applies.
        return AbstractDataset._save_wrapper.__func__(cls, save_func)  # type: ignore[attr-defined]

    def _target(self) -> Path:
        return Path(str(self._get_versioned_path(self.resolve_save_version())))  # type: ignore[arg-type]

    def _staging(self) -> Path:
        target = self._target()
        return target.parent / f".{target.name}.partial"

    def save(self, data: pd.DataFrame | Part | _End) -> None:  # type: ignore[override]
        self._clear_version_cache()
        target = self._target()
        if target.exists():
            raise DatasetError(f"{target}: this version is already published; a run never writes into a finished version")
        staging = self._staging()
        if isinstance(data, _End):
            self._publish(staging, target)
            return
        frame = data.take() if isinstance(data, Part) else data
        if not isinstance(frame, pd.DataFrame):
            raise DatasetError(f"{target}: expected a DataFrame, a Part or END, got {type(data).__name__}")
        if not isinstance(data, Part) and staging.exists():
            raise DatasetError(f"{target}: a whole DataFrame saved while parts of this version are being streamed")
        staging.mkdir(parents=True, exist_ok=True)
        index = len(list(staging.glob("part-*.parquet")))
        final = staging / f"part-{index:05d}.parquet"
        tmp = staging / f".part-{index:05d}.tmp"
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, final)
        if not isinstance(data, Part):  # a plain DataFrame is the whole table
            self._publish(staging, target)

    def _publish(self, staging: Path, target: Path) -> None:
        staging.mkdir(parents=True, exist_ok=True)
        parts = sorted(p.name for p in staging.glob("part-*.parquet"))
        rows, schema = 0, None
        for name in parts:
            meta = pq.read_metadata(staging / name)
            rows += meta.num_rows
            schema = schema or meta.schema.to_arrow_schema()
        manifest = {"parts": parts, "rows": rows, "schema": schema.serialize().to_pybytes().hex() if schema is not None else None}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)

    # --- loading -------------------------------------------------------------------------------
    def load(self) -> pd.DataFrame | ParquetParts:
        folder = Path(str(self._get_load_path()))
        if not (folder / MANIFEST).is_file():
            raise DatasetError(f"{folder}: no {MANIFEST}: not a published ParquetPartsDataset version")
        parts = ParquetParts(folder, self._shuffle_buffer_rows)
        if self._lazy:
            return parts
        return parts.to_pandas(self._load_args.get("columns"), self._load_args.get("dtype_backend"))

    def _exists(self) -> bool:
        try:
            return (Path(str(self._get_load_path())) / MANIFEST).is_file()
        except DatasetError:
            return False

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version, "lazy": self._lazy}
