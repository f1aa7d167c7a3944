"""``ReleaseDataset``: a servable model with everything that encodes its input, versioned.

A release is what the retraining cycle crowns and what scoring serves: one model plus
the encoders and feature spec it was trained with, the item-level lists it reads
(``item_lists``: each item's aggregated values from its training window), and ``meta``
(which variant, trained in which cycle on which partitions, the champion history).
Layout of one version::

    <filepath>/<version>/<name>/model/           safetensors + config.json (training.checkpoint)
    <filepath>/<version>/<name>/release.json     encoders, spec, item lists, meta

Nothing is pickled, and a version is written into a temporary folder and renamed into
place, so a run killed mid-save leaves no half-written release. Every cycle saves a new
version (the same model again when the challenger lost), so the latest version *is*
the champion pointer and older versions are the history a rollback returns to.

``missing_ok: true`` (the retraining cycle's input) loads ``None`` while no version
exists yet (the first cycle); scoring leaves it off and fails, naming the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypedDict

from kedro.io import DatasetError, Version
from kedro.io.core import VersionNotFoundError
from torch import nn

from dynamic_ctr.io.model_dataset import VersionedFolderDataset
from dynamic_ctr.training.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["RELEASE_FORMAT", "Release", "ReleaseDataset"]

RELEASE_FORMAT = 1
_KEYS = ("feature_encoder", "domain_encoder", "feature_spec", "item_lists", "meta")


class Release(TypedDict):
    model: nn.Module
    feature_encoder: dict[str, Any]
    domain_encoder: dict[str, Any]
    feature_spec: dict[str, Any]
    item_lists: dict[str, dict[Any, list[str]]]
    meta: dict[str, Any]


class ReleaseDataset(VersionedFolderDataset):
    def __init__(self, *, filepath: str, version: Version | None = None, missing_ok: bool = False, metadata: dict[str, Any] | None = None) -> None:
        super().__init__(filepath=filepath, version=version, metadata=metadata)
        self._missing_ok = missing_ok

    def load(self) -> Release | None:
        try:
            root = Path(self._get_load_path())
        except VersionNotFoundError:
            if self._missing_ok:
                return None
            raise DatasetError(f"{self._filepath}: no release yet; run `kedro run --pipeline retrain` first") from None
        path = root / "release.json"
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DatasetError(f"{path}: not a readable release ({e})") from e
        if stored.get("format_version") != RELEASE_FORMAT or any(k not in stored for k in _KEYS):
            raise DatasetError(f"{path}: format_version {stored.get('format_version')!r} or keys {sorted(stored)} are not a release of format {RELEASE_FORMAT}")
        release: Release = {
            "model": load_checkpoint(root / "model"),
            **{k: stored[k] for k in _KEYS},  # type: ignore[typeddict-item]
            "item_lists": {name: {item: values for item, values in pairs} for name, pairs in stored["item_lists"].items()},
        }
        release["meta"] = {**release["meta"], "version": root.parent.name}  # <filepath>/<version>/<name>
        return release

    def save(self, data: Release) -> None:
        missing = [k for k in ("model", *_KEYS) if k not in data]
        if missing:
            raise DatasetError(f"a release needs {missing}")
        stored = {
            "format_version": RELEASE_FORMAT,
            **{k: data[k] for k in ("feature_encoder", "domain_encoder", "feature_spec")},
            # JSON keys are text: item ids (ints or text) travel as [item, values] pairs
            "item_lists": {name: [[item, list(values)] for item, values in lookup.items()] for name, lookup in data["item_lists"].items()},
            "meta": {k: v for k, v in data["meta"].items() if k != "version"},  # the folder name says it
        }

        def fill(tmp: Path) -> None:
            save_checkpoint(data["model"], tmp / "model")
            (tmp / "release.json").write_text(json.dumps(stored, indent=1, allow_nan=False, default=str) + "\n", encoding="utf-8")

        self._write_folder(fill)

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "missing_ok": self._missing_ok}
