"""ModelBundleDataset: versioned safetensors bundles, rebuilt from their configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kedro.io import DatasetError, Version

from dynamic_ctr.io import model_dataset
from dynamic_ctr.io.model_dataset import ModelBundleDataset
from dynamic_ctr.models import build_model
from dynamic_ctr.spec import FeatureSpec, FieldSpec

SPEC = FeatureSpec(
    (FieldSpec("user", "categorical", 7, source="user"), FieldSpec("genres", "sequence", 5, max_len=3)),
    user_field="user",
)


def _models() -> dict[str, torch.nn.Module]:
    cfg = {"family": "wdl", "embedding_dim": 4, "hidden_units": [8], "apg": {"version": "v5", "rank": 2, "width": 4}}
    return {f"seed_{s}": build_model({**cfg, "seed": s}, SPEC).eval() for s in (1, 2)}


def test_versioned_round_trip_rebuilds_identical_models(tmp_path: Path) -> None:
    x = torch.tensor([[2, 3, 0, 0], [4, 2, 2, 4]])
    models = _models()
    dataset = ModelBundleDataset(filepath=str(tmp_path / "trained_model"), version=Version(None, "v1"))
    dataset.save(models)
    saved = tmp_path / "trained_model" / "v1" / "trained_model"
    assert sorted(p.name for p in saved.iterdir()) == ["seed_1", "seed_2"]
    loaded = ModelBundleDataset(filepath=str(tmp_path / "trained_model"), version=Version("v1", None)).load()
    for name, model in models.items():
        torch.testing.assert_close(loaded[name](x), model(x), rtol=0, atol=0)
    # a version is never overwritten
    with pytest.raises(DatasetError):
        ModelBundleDataset(filepath=str(tmp_path / "trained_model"), version=Version(None, "v1")).save(models)


def test_failed_save_leaves_no_version_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_save(model, directory):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(model, directory)

    real_save = model_dataset.save_checkpoint
    monkeypatch.setattr(model_dataset, "save_checkpoint", failing_save)
    dataset = ModelBundleDataset(filepath=str(tmp_path / "trained_model"), version=Version(None, "v1"))
    with pytest.raises(DatasetError, match="disk full"):
        dataset.save(_models())
    version_dir = tmp_path / "trained_model" / "v1"
    assert not (version_dir / "trained_model").exists()
    assert list(version_dir.iterdir()) == []  # no temporary folder left either


def test_an_empty_bundle_is_saved_marked_and_loads_empty_but_an_unmarked_one_fails(tmp_path: Path) -> None:
    """A variant not applicable to a data set saves no models, on purpose and visibly;
    a version folder without checkpoints and without the marker is still an error."""
    ModelBundleDataset(filepath=str(tmp_path / "m"), version=Version(None, "v1")).save({})
    assert (tmp_path / "m" / "v1" / "m" / model_dataset.EMPTY_MARKER).is_file()
    assert ModelBundleDataset(filepath=str(tmp_path / "m"), version=Version("v1", None)).load() == {}
    (tmp_path / "n" / "v1" / "n").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no model checkpoints"):
        ModelBundleDataset(filepath=str(tmp_path / "n"), version=Version("v1", None)).load()
