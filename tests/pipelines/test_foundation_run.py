"""The ingestion -> features -> domains pipelines through a real KedroSession.

The project is copied to a temporary folder (conf, pyproject and the shipped tiny data)
and run there with ``--env tiny``, so the repository's data/ is never written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from kedro.framework.session import KedroSession

FOUNDATION = ["ingestion", "features", "domains"]


def _run(root: Path, **kwargs) -> None:
    with KedroSession.create(project_path=root, env="tiny") as session:
        session.run(pipeline_names=FOUNDATION, **kwargs)


def _versions(root: Path, relative: str) -> list[Path]:
    return sorted(p for p in (root / relative).iterdir() if p.is_dir())


def test_foundation_pipelines_write_versioned_artifacts(project: Path) -> None:
    _run(project)
    artifacts = {
        "data/02_intermediate/tiny/clean_interactions.parquet": "clean_interactions.parquet",
        "data/02_intermediate/tiny/ingestion_quarantine.parquet": "ingestion_quarantine.parquet",
        "data/04_feature/tiny/feature_encoder.json": "feature_encoder.json",
        "data/05_model_input/tiny/train.parquet": "train.parquet",
        "data/05_model_input/tiny/test.parquet": "test.parquet",
        "data/05_model_input/tiny/feature_spec.json": "feature_spec.json",
        "data/08_reporting/tiny/domain_stats.parquet": "domain_stats.parquet",
        "data/08_reporting/tiny/ingestion_report.json": "ingestion_report.json",
    }
    for folder, filename in artifacts.items():
        versions = _versions(project, folder)
        assert len(versions) == 1, folder
        assert (versions[0] / filename).is_file(), folder

    report = json.loads(next((project / "data/08_reporting/tiny/ingestion_report.json").glob("*/*.json")).read_text())
    ratings = pd.read_csv(project / "data/01_raw/ml-latest-tiny/ratings.csv")
    assert report["rows"] == len(ratings)
    spec = json.loads(next((project / "data/05_model_input/tiny/feature_spec.json").glob("*/*.json")).read_text())
    assert spec["domain_field"] == "domain"
    model_inputs = [pd.read_parquet(next((project / f"data/05_model_input/tiny/{s}.parquet").glob("*/*.parquet"))) for s in ("train", "valid", "test")]
    assert sum(len(m) for m in model_inputs) == len(ratings)
    domain_field = next(f for f in spec["fields"] if f["name"] == "domain")
    for frame in model_inputs:
        assert frame["domain"].between(1, domain_field["vocab_size"] - 1).all()
        for f in spec["fields"]:
            cols = [f["name"]] if f["kind"] == "categorical" else [f"{f['name']}__{i}" for i in range(f["max_len"])]
            assert frame[cols].to_numpy().max() < f["vocab_size"], f["name"]
    assert set(model_inputs[0]["frequency_group"]) == set(range(10))


def test_runs_keep_every_version_and_an_old_version_reproduces(project: Path) -> None:
    _run(project)
    first = _versions(project, "data/05_model_input/tiny/test.parquet")[0]
    clean_v1 = _versions(project, "data/02_intermediate/tiny/clean_interactions.parquet")[0].name
    # New raw data: the second run must give a different model input ...
    ratings = project / "data/01_raw/ml-latest-tiny/ratings.csv"
    lines = ratings.read_text().splitlines(keepends=True)
    ratings.write_text("".join(lines[:-500]))
    _run(project)
    versions = _versions(project, "data/05_model_input/tiny/test.parquet")
    assert len(versions) == 2 and first in versions
    second = next(v for v in versions if v != first)
    assert len(pd.read_parquet(second / "test.parquet")) < len(pd.read_parquet(first / "test.parquet"))
    # ... and --load-versions on the first run's clean table reproduces the first run.
    pinned = {name: clean_v1 for name in ("clean_interactions", "table_schema", "ingestion_check")}
    with KedroSession.create(project_path=project, env="tiny") as session:
        session.run(pipeline_names=["features", "domains"], load_versions=pinned)
    third = next(v for v in _versions(project, "data/05_model_input/tiny/test.parquet") if v not in versions)
    pd.testing.assert_frame_equal(pd.read_parquet(first / "test.parquet"), pd.read_parquet(third / "test.parquet"))
