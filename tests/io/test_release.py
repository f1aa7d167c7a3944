"""ReleaseDataset: a model with its encoders and item lists, versioned, nothing pickled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kedro.io import DatasetError, Version

from dynamic_ctr.io.release import ReleaseDataset
from dynamic_ctr.models import build_model
from dynamic_ctr.spec import FeatureSpec, FieldSpec

SPEC = FeatureSpec((FieldSpec("user", "categorical", 7, source="user"), FieldSpec("item", "categorical", 5, source="item")), user_field="user", item_field="item")


def _release() -> dict:
    return {
        "model": build_model({"family": "wdl", "embedding_dim": 4, "hidden_units": [8], "seed": 3}, SPEC).eval(),
        "feature_encoder": {"fields": []},
        "domain_encoder": {"names": ["a"]},
        "feature_spec": SPEC.to_dict(),
        "item_lists": {"tags": {10: ["funny", "dark"], 11: []}},
        "meta": {"model_id": "abc", "history": [{"cycle": "2018-09-24", "decision": "bootstrap"}]},
    }


def test_round_trip_and_versions(tmp_path: Path) -> None:
    release = _release()
    ReleaseDataset(filepath=str(tmp_path / "champion"), version=Version(None, "v1")).save(release)
    loaded = ReleaseDataset(filepath=str(tmp_path / "champion"), version=Version(None, None)).load()
    x = torch.tensor([[2, 3], [4, 1]])
    torch.testing.assert_close(loaded["model"](x), release["model"](x), rtol=0, atol=0)
    assert loaded["item_lists"] == {"tags": {10: ["funny", "dark"], 11: []}}  # item keys keep their type
    assert loaded["meta"] == {**release["meta"], "version": "v1"}
    assert {k: loaded[k] for k in ("feature_encoder", "domain_encoder", "feature_spec")} == {k: release[k] for k in ("feature_encoder", "domain_encoder", "feature_spec")}
    with pytest.raises(DatasetError):  # a version is never overwritten
        ReleaseDataset(filepath=str(tmp_path / "champion"), version=Version(None, "v1")).save(release)


def test_missing_release_is_none_only_when_allowed(tmp_path: Path) -> None:
    assert ReleaseDataset(filepath=str(tmp_path / "champion"), version=Version(None, None), missing_ok=True).load() is None
    with pytest.raises(DatasetError, match="no release yet; run `kedro run --pipeline retrain` first"):
        ReleaseDataset(filepath=str(tmp_path / "champion"), version=Version(None, None)).load()


def test_a_broken_release_is_refused_by_name(tmp_path: Path) -> None:
    ReleaseDataset(filepath=str(tmp_path / "champion"), version=Version(None, "v1")).save(_release())
    path = tmp_path / "champion" / "v1" / "champion" / "release.json"
    path.write_text(path.read_text()[:50])
    with pytest.raises(DatasetError, match=r"release\.json: not a readable release"):
        ReleaseDataset(filepath=str(tmp_path / "champion"), version=Version("v1", None)).load()


def test_a_failed_save_leaves_no_version(tmp_path: Path) -> None:
    broken = {**_release(), "meta": {"auc": float("nan")}}  # not JSON (allow_nan=False): the save fails late
    with pytest.raises(DatasetError, match="Out of range float"):
        ReleaseDataset(filepath=str(tmp_path / "champion"), version=Version(None, "v1")).save(broken)
    assert list((tmp_path / "champion" / "v1").iterdir()) == []  # no half-written release, no temporary folder
