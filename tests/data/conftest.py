"""Fixtures of the data-layer tests: the project's own raw-file configuration and
adapter runs on the real data, shared by the test modules.

Raw files are read exactly as the catalog of a Kedro environment configures them
(``conf/<env>/catalog.yml``), with ``${globals:data_root}`` replaced by a folder the
test chooses: the external data root, or a ``tmp_path`` holding a transformed copy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from dynamic_ctr.data.adapters import ADAPTERS, AdapterResult
from dynamic_ctr.data.raw import RawFileConfig, RawTable, read_raw

SHIPPED = Path("data/01_raw/ml-latest-small")


class ProjectConf:
    """Reads ``conf/<env>/*.yml`` the way the tests need it (no Kedro session)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def yaml(self, env: str, name: str) -> dict[str, Any]:
        return yaml.safe_load((self.root / "conf" / env / name).read_text()) or {}

    def raw_files(self, env: str, data_root: Path | None = None) -> dict[str, dict[str, Any]]:
        """``raw_source.files`` of ``env`` with absolute paths."""
        files = self.yaml(env, "catalog.yml")["raw_source"]["files"]
        out = {}
        for role, cfg in files.items():
            cfg = dict(cfg)
            path = cfg["filepath"]
            # `${runtime_params:raw_file, <default>}` (an env's file, overridable with --params): the default
            override = re.fullmatch(r"\$\{runtime_params:[^,]+,\s*(.*)\}", path)
            path = override.group(1) if override else path
            if "${globals:data_root}" in path:
                assert data_root is not None, f"{env}: {role} needs a data root"
                path = path.replace("${globals:data_root}", str(data_root))
            cfg["filepath"] = str(self.root / path) if not Path(path).is_absolute() else path
            out[role] = cfg
        return out

    def params(self, env: str, key: str) -> dict[str, Any]:
        """Top-level parameter ``key`` as Kedro merges it (an env's key replaces base's)."""
        env_file = self.root / "conf" / env / "parameters.yml"
        if env != "base" and env_file.is_file():
            value = self.yaml(env, "parameters.yml").get(key)
            if value is not None:
                return value
        for name in sorted((self.root / "conf" / "base").glob("parameters*.yml")):
            value = (yaml.safe_load(name.read_text()) or {}).get(key)
            if value is not None:
                return value
        raise KeyError(f"no parameter {key!r} for env {env!r}")

    @staticmethod
    def read(files: dict[str, dict[str, Any]]) -> dict[str, RawTable | None]:
        """Read ``{role: file options}`` as ``RawSourceDataset`` does."""
        return {role: read_raw(RawFileConfig.from_dict(cfg)) for role, cfg in files.items()}

    def read_env(self, env: str, data_root: Path | None = None) -> dict[str, RawTable | None]:
        return self.read(self.raw_files(env, data_root))

    def run(self, env: str, data_root: Path | None = None) -> AdapterResult:
        """The adapter and options of ``env``'s ``ingestion`` parameters on its raw files."""
        params = self.params(env, "ingestion")
        return ADAPTERS[params["adapter"]](self.read_env(env, data_root), dict(params.get("options") or {}))


@pytest.fixture(scope="session")
def conf(project_root: Path) -> ProjectConf:
    return ProjectConf(project_root)


@pytest.fixture(scope="session")
def shipped(project_root: Path) -> Path:
    """The shipped MovieLens latest-small folder."""
    path = project_root / SHIPPED
    assert (path / "ratings.csv").is_file(), f"shipped data missing at {path}"
    return path


@pytest.fixture(scope="session")
def latest_result(conf: ProjectConf) -> AdapterResult:
    """``movielens_latest`` on the shipped data, configured as ``conf/base``."""
    return conf.run("base")


@pytest.fixture(scope="session")
def latest_table(latest_result: AdapterResult) -> pd.DataFrame:
    return latest_result.table


@pytest.fixture(scope="session")
def ml100k_result(conf: ProjectConf, data_root: Path) -> AdapterResult:
    """``movielens_100k`` (typed layout) on the data root, configured as ``conf/ml100k``."""
    return conf.run("ml100k", data_root)
