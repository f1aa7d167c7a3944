"""Scheduled retraining through real KedroSessions on the shipped MovieLens latest-small,
cut into weekly partitions: three cycles, a rollback, scoring with the champion, and the
cycles that must fail (empty, corrupt, one-class partitions; a second run at once)."""

from __future__ import annotations

import fcntl
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from kedro.framework.session import KedroSession

from dynamic_ctr.hooks import ChampionLockError
from dynamic_ctr.pipelines.retrain.nodes import RetrainError

DATA = "data/01_raw/ml-latest-small"
PARTITIONS = "data/01_raw/movielens_latest-weekly"
CHAMPION = "data/06_models/movielens_latest/retrain/champion"
RECORDS = "data/06_models/movielens_latest/retrain/promotion_record.json"
# Short schedules; the first champion trains on every earlier week (about 98K rows), so
# that it is a model worth defending (holdout AUC about 0.75).
FAST = {"retrain.window": 4, "retrain.cold_start.train.max_epochs": 2, "retrain.warm_start.train.max_epochs": 1, "training.train.progress": False}


def _nested(dotted: dict) -> dict:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``, as ``kedro run --params a.b=1`` reads."""
    out: dict = {}
    for key, value in dotted.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _run(root: Path, pipeline: str, params: dict | None = None, load_versions: dict | None = None) -> None:
    with KedroSession.create(project_path=root, runtime_params=_nested({**FAST, **(params or {})})) as session:
        session.run(pipeline_names=[pipeline], load_versions=load_versions or {})


def _versions(root: Path, relative: str) -> list[Path]:
    folder = root / relative
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []


def _record(root: Path, index: int = -1) -> dict:
    return json.loads((_versions(root, RECORDS)[index] / "promotion_record.json").read_text())


def _champion_meta(root: Path, index: int = -1) -> dict:
    return json.loads((_versions(root, CHAMPION)[index] / "champion" / "release.json").read_text())["meta"]


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory, project_maker) -> Path:
    """A project copy with the shipped log partitioned and three cycles run on its three
    newest partitions: a bootstrap, a promotion (the warm start, under permissive
    thresholds) and a challenger forced to lose (a cold start trained 0 epochs, no warm
    start)."""
    make_project, repository = project_maker
    monkeypatch = pytest.MonkeyPatch()
    root = make_project(tmp_path_factory.mktemp("retrain") / "project", monkeypatch)
    shutil.copytree(repository / DATA, root / DATA)
    _run(root, "partition_log")
    names = sorted(p.stem for p in (root / PARTITIONS).iterdir())
    _run(root, "retrain", {"retrain.as_of": names[-3]})
    _run(root, "retrain", {"retrain.as_of": names[-2], "retrain.cold_start.enabled": False, "retrain.promotion.margin": -1.0, "retrain.promotion.alpha": 1.0})
    _run(root, "retrain", {"retrain.as_of": names[-1], "retrain.warm_start.enabled": False, "retrain.cold_start.train.max_epochs": 0})
    yield root
    monkeypatch.undo()


def test_partitions_hold_every_row_once_by_week(retrained: Path) -> None:
    ratings = pd.read_csv(retrained / DATA / "ratings.csv")
    parts = {p.stem: pd.read_csv(p) for p in sorted((retrained / PARTITIONS).iterdir())}
    assert sum(len(p) for p in parts.values()) == len(ratings)
    joined = pd.concat(parts.values()).sort_values(["userId", "movieId"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(joined, ratings.sort_values(["userId", "movieId"]).reset_index(drop=True))
    assert all(len(p) >= 200 for p in parts.values())  # retrain.partitioning.min_rows
    for name, part in parts.items():
        week_end = pd.Timestamp(name, tz="UTC") + pd.Timedelta(days=7)
        assert pd.Timestamp(name).weekday() == 0 and (pd.to_datetime(part["timestamp"], unit="s", utc=True) < week_end).all()


def test_three_cycles_keep_a_champion_history(retrained: Path) -> None:
    records = [_record(retrained, i) for i in range(3)]
    assert [r["decision"] for r in records] == ["bootstrap", "promoted", "kept"]
    first, second, third = (_champion_meta(retrained, i) for i in range(3))
    assert first["model_id"] != second["model_id"] == third["model_id"]
    assert [h["decision"] for h in third["history"]] == ["bootstrap", "promoted", "kept"]
    # the worse challenger: an untrained cold start, scored and tested, not promoted
    last = records[2]
    assert set(last["metrics"]) == {"cold:apg.wdl", "champion"} and last["training"]["cold:apg.wdl"]["epochs_run"] == 0
    assert last["metrics"]["cold:apg.wdl"]["auc"] < last["metrics"]["champion"]["auc"]
    assert last["tests"]["cold:apg.wdl"]["p_value"] < 0.05 and last["tests"]["cold:apg.wdl"]["delta"] < 0
    # the promoted one won on the holdout, tested against the champion it replaced
    assert records[1]["promoted"] == "warm:apg.wdl" and set(records[1]["metrics"]) == {"warm:apg.wdl", "champion"}
    taken, total = records[1]["training"]["warm:apg.wdl"]["tensors_from_champion"].split(" of ")
    assert taken == total  # its own variant: every tensor from the champion
    assert second["start"] == "warm" and second["trained_in_cycle"] == records[1]["cycle"]["holdout"]
    # what the record must hold: thresholds, partitions and their hashes, code version
    for r in records:
        assert r["cycle"]["holdout"] not in (*r["cycle"]["train"], r["cycle"]["valid"])
        assert all(len(p["sha256"]) == 64 for p in r["cycle"]["partitions"].values())
        assert {"package", "git_commit"} <= set(r["code"]) and {"margin", "alpha"} == set(r["thresholds"])
        for m in r["metrics"].values():
            assert {"auc", "logloss", "gauc_domain"} <= set(m)
    assert records[1]["cycle"]["champion"]["version"] == _versions(retrained, CHAMPION)[0].name


def test_drift_report_is_written_per_cycle(retrained: Path) -> None:
    drift = pd.read_csv(_versions(retrained, "data/08_reporting/movielens_latest/retrain/drift.csv")[-1] / "drift.csv")
    assert {"user", "item", "genres", "domain", "label"} <= set(drift["field"])
    assert (drift["psi"] >= 0).all() and drift.loc[drift["field"] == "user", "oov_share_new"].between(0, 1).all()
    label = drift[drift["field"] == "label"].iloc[0]
    assert 0 < label["label_rate_new"] < 1
    page = (_versions(retrained, "data/08_reporting/movielens_latest/retrain/report.html")[-1] / "report.html").read_text()
    assert "Drift of the new partition" in page and "data:image/png;base64" in page and "kept" in page
    assert len(_versions(retrained, "data/08_reporting/movielens_latest/retrain/auc_trend.png")) == 3


def test_rollback_and_scoring_serve_the_chosen_champion(retrained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(retrained)
    first = _versions(retrained, CHAMPION)[0].name
    with pytest.raises(RetrainError, match="current champion"):  # no version chosen: nothing to roll back to
        _run(retrained, "rollback")
    _run(retrained, "rollback", load_versions={"retrain.rollback_target": first})
    now = _champion_meta(retrained)
    assert now["model_id"] == _champion_meta(retrained, 0)["model_id"] and now["history"][-1]["decision"] == "rolled_back"
    assert len(_versions(retrained, CHAMPION)) == 4  # nothing overwritten
    _run(retrained, "scoring")
    report = json.loads((_versions(retrained, "data/08_reporting/movielens_latest/scoring_report.json")[-1] / "scoring_report.json").read_text())
    assert report["model"]["model_id"] == now["model_id"] and report["rows_scored"] > 0


def test_a_holdout_the_champion_trained_on_is_refused(retrained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(retrained)
    before = _versions(retrained, CHAMPION)
    trained_on = _champion_meta(retrained)["trained_on"]
    with pytest.raises(RetrainError, match=rf"holdout {trained_on[-1]} is not newer than the champion's training data"):
        _run(retrained, "retrain", {"retrain.as_of": trained_on[-1]})
    assert _versions(retrained, CHAMPION) == before


def test_a_cycle_killed_while_training_resumes_from_its_last_epoch(tmp_path: Path, project_maker) -> None:
    make_project, repository = project_maker
    monkeypatch = pytest.MonkeyPatch()
    try:
        root = make_project(tmp_path / "project", monkeypatch)
        shutil.copytree(repository / DATA, root / DATA)
        _run(root, "partition_log")
        holdout = max(p.stem for p in (root / PARTITIONS).iterdir())
        state = root / "data/06_models/movielens_latest/retrain/checkpoints" / holdout / "cold-apg.wdl" / "resume.json"
        args = ["--params", "retrain.cold_start.train.max_epochs=3,retrain.cold_start.train.patience=3,training.train.progress=False"]
        child = subprocess.Popen([sys.executable, "-m", "kedro", "run", "--pipeline", "retrain", *args], cwd=root,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not state.exists() and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert state.exists(), "the cycle never wrote its first epoch's state"
            child.send_signal(signal.SIGKILL)
        finally:
            child.wait()
        assert not (root / CHAMPION).exists() or not _versions(root, CHAMPION)  # killed before any champion
        _run(root, "retrain", {"retrain.cold_start.train.max_epochs": 3, "retrain.cold_start.train.patience": 3})
        cold = _record(root)["training"]["cold:apg.wdl"]
        assert cold["resumed_from_epoch"] >= 1 and [h["epoch"] for h in cold["history"]] == [1, 2, 3]
        assert not state.parent.exists()  # the resume state is removed once the challengers are trained
    finally:
        monkeypatch.undo()


def _newest_partition(root: Path, text: str) -> None:
    names = sorted(p.stem for p in (root / PARTITIONS).iterdir())
    (root / PARTITIONS / "2030-01-07.csv").write_text(text)
    assert names[-1] < "2030-01-07"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("userId,movieId,rating,timestamp\n", r"partition 2030-01-07 cannot be read: .*2030-01-07.csv: file has a header but no rows"),
        ("userId,movieId,rating,timestamp\n" + "1,1,x,y\n" * 50 + "".join(f"{u},1,4.0,1893974400\n" for u in range(2, 7)), r"partition 2030-01-07 .* is corrupt: 50 of 55 rows quarantined \{'unparsable value': 50\}"),
        ("userId,movieId,rating,timestamp\n" + "".join(f"{u},1,5.0,1893974400\n" for u in range(1, 31)), r"holdout partition 2030-01-07 .* holds only label\(s\) \[1\]"),
    ],
    ids=["empty", "corrupt", "one-class"],
)
def test_a_bad_partition_stops_the_cycle_and_leaves_the_champion(retrained: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str) -> None:
    monkeypatch.chdir(retrained)
    before = _versions(retrained, CHAMPION)
    _newest_partition(retrained, text)
    try:
        with pytest.raises(RetrainError, match=message):
            _run(retrained, "retrain")
    finally:
        (retrained / PARTITIONS / "2030-01-07.csv").unlink()
    assert _versions(retrained, CHAMPION) == before


def test_two_cycles_started_at_once_one_runs_the_other_stops_at_the_lock(retrained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(retrained)
    before = _versions(retrained, CHAMPION)
    lock = retrained / CHAMPION / ".lock"
    lock.write_text("")
    child = subprocess.Popen([sys.executable, "-m", "kedro", "run", "--pipeline", "retrain", "--params", "training.train.progress=False"],
                             cwd=retrained, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while f"pid {child.pid}" not in lock.read_text() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"pid {child.pid}" in lock.read_text(), "the first cycle never took the lock"
        with pytest.raises(ChampionLockError, match=rf"held by another run \(pid {child.pid}"):
            _run(retrained, "retrain")
    finally:
        _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-2000:]
    after = _versions(retrained, CHAMPION)
    assert after[: len(before)] == before and len(after) == len(before) + 1  # the first cycle's version only


def test_a_second_run_at_once_fails_at_the_lock(retrained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(retrained)
    before = _versions(retrained, CHAMPION)
    with open(retrained / CHAMPION / ".lock", "a+") as held:  # another run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ChampionLockError, match=r"\.lock is held by another run"):
            _run(retrained, "retrain")
    assert _versions(retrained, CHAMPION) == before
