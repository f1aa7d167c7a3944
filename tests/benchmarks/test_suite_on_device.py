"""benchmarks/suite_on_device.py: export a planned suite's inputs, train them outside Kedro
on the real MovieLens rows, compare two runs. (Wall times are not checked: speed is
measured by the benchmark, not by tests.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "suite_on_device.py"
VERSION = "2026-01-01T00.00.00.000Z"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          check=False)


def _versioned(path: Path, write) -> None:
    target = path / VERSION / path.name
    target.parent.mkdir(parents=True)
    write(target)


@pytest.fixture
def data_folder(tmp_path, small_train_encoded) -> Path:
    """A Kedro data folder as `kedro run` leaves it: versioned model input and one suite's plan."""
    spec, frame = small_train_encoded
    data = tmp_path / "data"
    model_input = data / "05_model_input/movielens_latest"
    _versioned(model_input / "train.parquet", lambda p: frame.iloc[:-5000].to_parquet(p))
    _versioned(model_input / "valid.parquet", lambda p: frame.iloc[-5000:].to_parquet(p))
    _versioned(model_input / "feature_spec.json", lambda p: p.write_text(json.dumps(spec.to_dict())))
    entry = {
        "status": "ready", "train_rows": 20000, "seeds": [2024, 2025],
        "model": {"family": "wdl", "embedding_dim": 8, "hidden_units": [16]},
        "train": {"lr": 0.005, "batch_size": 1024, "max_epochs": 1, "patience": 1, "progress": False, "seed": 2024},
        "search_space": {"train.lr": {"type": "float", "low": 0.001, "high": 0.01, "log": True}},
        "study": {"n_trials": 2, "seed": 2024, "n_startup_trials": 1},
    }
    plan = {"suite": "apg", "variants": {"wdl": entry, "skipped": {"status": "not_applicable"}}}
    _versioned(data / "06_models/movielens_latest/apg/suite_plan.json", lambda p: p.write_text(json.dumps(plan)))
    return data


def test_export_train_and_compare(tmp_path, data_folder):
    exported = tmp_path / "exported"
    done = _run("export", "--to", str(exported), "--suites", "apg", "--data", str(data_folder))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in exported.iterdir()) == [
        "apg_plan.json", "feature_spec.json", "train.parquet", "valid.parquet"]
    runs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.json"
        done = _run("train", "--from", str(exported), "--device", "cpu", "--suites", "apg", "--out", str(out))
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(out.read_text()))
    for run in runs:  # the ready variant only, tuned (2 trials) then retrained under its second seed
        (row,) = run["variants"]
        assert row["variant"] == "wdl" and row["device"] == "cpu" and row["trials"] == 2
        assert len(row["seed_val_aucs"]) == 2 and 0.6 < row["best_val_auc"] < 0.9
    assert runs[0]["variants"][0]["best_val_auc"] == runs[1]["variants"][0]["best_val_auc"]  # fresh studies, one seed
    done = _run("compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert done.returncode == 0 and "apg.wdl" in done.stdout and "total" in done.stdout


def test_export_names_what_is_missing(tmp_path):
    done = _run("export", "--to", str(tmp_path / "x"), "--data", str(tmp_path / "nothing"))
    assert done.returncode != 0 and "no version written yet; run `kedro run` first" in done.stderr
