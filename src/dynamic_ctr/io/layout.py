"""The on-disk layout of a published :class:`~dynamic_ctr.io.parquet_parts.ParquetPartsDataset`
version, readable without Kedro (the ``torchrun`` entry point runs where Kedro may not be
installed): a folder of ``part-<n>.parquet`` files and a manifest listing them in order."""

from __future__ import annotations

import json
from pathlib import Path

#: The manifest of a published parts folder: ``{"parts": [...], "rows": n, "schema": hex}``.
PARTS_MANIFEST = "_manifest.json"


def is_parts_folder(path: Path) -> bool:
    """Whether ``path`` is a published parts folder (its manifest is written last)."""
    return path.is_dir() and (path / PARTS_MANIFEST).is_file()


def parquet_files(path: Path) -> list[Path]:
    """The Parquet files of a table: ``[path]`` for a file, the parts in manifest order
    for a published parts folder."""
    if is_parts_folder(path):
        manifest = json.loads((path / PARTS_MANIFEST).read_text(encoding="utf-8"))
        return [path / name for name in manifest["parts"]]
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"{path}: neither a Parquet file nor a published parts folder ({PARTS_MANIFEST} missing)")
