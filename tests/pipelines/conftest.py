"""Fixtures for running the project's pipelines through a real KedroSession."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from kedro.framework.startup import bootstrap_project

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
