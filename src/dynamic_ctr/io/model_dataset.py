"""``ModelBundleDataset``: trained models as safetensors + JSON config, versioned.

A bundle is ``{name: model}`` (one model per training seed, e.g. ``seed_2024``). Each
model is written by :func:`dynamic_ctr.training.checkpoint.save_checkpoint` into
``<filepath>/<version>/<name>/`` (``model.safetensors`` + ``config.json``) and read back
by rebuilding the module from its config: nothing is pickled. The whole bundle is
written into a temporary folder and renamed into place, so a failed save leaves no
half-written version.

Catalog entry (a factory covers every variant)::

    "{variant}.trained_model":
      type: dynamic_ctr.io.model_dataset.ModelBundleDataset
      filepath: data/06_models/${globals:dataset}/{variant}/trained_model
      versioned: true
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import AbstractVersionedDataset, DatasetError, Version
from torch import nn

from dynamic_ctr.training.checkpoint import load_checkpoint, save_checkpoint

ModelBundle = dict[str, nn.Module]
#: Marks a bundle saved empty on purpose (a variant not applicable to the data set); a
#: folder with neither checkpoints nor this marker is an error.
EMPTY_MARKER = "EMPTY"


class VersionedFolderDataset(AbstractVersionedDataset):
    """A versioned dataset whose every version is a folder, written whole or not at all
    (:meth:`_write_folder`: into a temporary sibling, then renamed into place)."""

    def __init__(self, *, filepath: str, version: Version | None = None, metadata: dict[str, Any] | None = None) -> None:
        super().__init__(filepath=PurePosixPath(filepath), version=version, exists_function=lambda p: Path(p).is_dir())
        self.metadata = metadata

    def _write_folder(self, fill: Callable[[Path], None]) -> None:
        """``fill(tmp)`` writes the version's files into ``tmp``; then it becomes the version."""
        target = Path(self._get_save_path())
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            fill(tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _exists(self) -> bool:
        try:
            return Path(self._get_load_path()).is_dir()
        except DatasetError:
            return False

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}


class ModelBundleDataset(VersionedFolderDataset):
    def load(self) -> ModelBundle:
        root = Path(self._get_load_path())
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names and not (root / EMPTY_MARKER).is_file():
            raise DatasetError(f"{root}: no model checkpoints in this bundle")
        return {name: load_checkpoint(root / name) for name in names}

    def save(self, data: ModelBundle) -> None:
        def fill(tmp: Path) -> None:
            if not data:  # a variant not applicable to this data set: say so, explicitly
                (tmp / EMPTY_MARKER).write_text("no models: the variant was not trained on this data set\n")
            for name, model in data.items():
                save_checkpoint(model, tmp / name)

        self._write_folder(fill)
