"""Fixtures for running the project's pipelines through a real KedroSession."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from kedro.framework.startup import bootstrap_project

from dynamic_ctr.data.adapters import movielens_latest
from dynamic_ctr.data.encoder import EncoderParams, FeatureEncoder, aggregate_item_lists
from dynamic_ctr.data.raw import RawFileConfig, read_raw
from dynamic_ctr.data.split import SplitParams, split_frame

PROJECT = Path(__file__).resolve().parents[2]


def make_project(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the project's conf, pyproject and shipped tiny data under ``root``,
    made the current directory, so runs never write into the repository's data/."""
    shutil.copytree(PROJECT / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    shutil.copytree(PROJECT / "data" / "01_raw" / "ml-latest-tiny", root / "data" / "01_raw" / "ml-latest-tiny")
    (root / "src").mkdir()  # the package itself is imported from the installed project
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy(PROJECT / name, root / name)
    monkeypatch.chdir(root)
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "1")
    bootstrap_project(root)
    return root


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return make_project(tmp_path / "project", monkeypatch)


@pytest.fixture(scope="session")
def tiny():
    """The shipped tiny MovieLens data, split and encoded: ``(feature spec, test frame)``."""
    root = PROJECT / "data/01_raw/ml-latest-tiny"
    files = {k: read_raw(RawFileConfig(filepath=str(root / f"{k}.csv"))) for k in ("ratings", "movies", "tags")}
    result = movielens_latest(files, {})
    train, valid, test = split_frame(result.table, SplitParams(), result.schema.time_key)
    train, (valid, test), _ = aggregate_item_lists(train, [valid, test], result.schema)
    encoder = FeatureEncoder.fit(train, result.schema, EncoderParams())
    test_frame, _ = encoder.transform(test)
    test_frame["frequency_group"] = np.arange(len(test_frame)) % 10
    return encoder.feature_spec(), test_frame


@pytest.fixture(scope="session")
def project_maker():
    """``(make_project, repository root)`` for fixtures of a wider scope than ``project``."""
    return make_project, PROJECT
