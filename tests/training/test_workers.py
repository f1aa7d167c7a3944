"""Tuning workers: several processes run one variant's study in a shared storage.

The workers are real processes (``python -m dynamic_ctr.training.worker``, one torch
thread each; the single-worker reference runs :func:`tune_worker` in this process) on
the shipped tiny MovieLens data, reading the suite plan and the encoded
splits that ``kedro run`` wrote into a copy of the project. The storages are a
PostgreSQL server started here on a loopback port (``initdb``/``pg_ctl``; skipped when
no PostgreSQL binaries are found, failed instead with ``DYNAMIC_CTR_REQUIRE_POSTGRES=1``)
and a journal file.

Why the best trial of two workers equals one worker's: the worker study's trials are
planned up front (planned trial ``i`` is drawn by a ``RandomSampler`` seeded with the
study seed and ``i`` alone, trial 0 is the base config), queued once by the process that
creates the study, and only taken from that queue. Their params therefore depend neither
on how many workers there are nor on which trial finished first (TPE's would), and
training one set of params is deterministic on the CPU (one seed, one thread; a killed
trial resumes bit-identically from its checkpoint). The plan here turns pruning off, the
one thing that would still depend on the schedule (the median pruner compares a trial
with the trials reported so far).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import torch

from dynamic_ctr.pipelines.training.nodes import (
    frame_to_tensors,
    train_variant,
    variant_study_name,
    variant_train_frame,
)
from dynamic_ctr.spec import FeatureSpec
from dynamic_ctr.training.device import resolve_device
from dynamic_ctr.training.tuning import (
    PLANNED_ATTR,
    WORKER_ATTR,
    QueueEmpty,
    StudyConfig,
    journal_path,
    run_study,
    run_worker,
    tune_worker,
)
from dynamic_ctr.training.worker import load_variant

PROJECT = Path(__file__).resolve().parents[2]
VARIANT, N_TRIALS = "wdl", 6
# Planned by `kedro run`: 6 trials without pruning, 8 epochs each (about 0.6 s on one
# thread: long enough to kill a worker mid-trial), 1 s heartbeats failing after 2 s.
PLAN_PARAMS = (
    "training.study.n_trials=6,training.study.pruner=none,training.study.heartbeat_interval=1,"
    "training.study.grace_period=2,training.train.max_epochs=8,training.train.patience=8"
)
ENV = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "PYTHONPATH": os.pathsep.join([str(PROJECT / "src"), os.environ.get("PYTHONPATH", "")])}


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project in which `kedro run` has planned the apg suite on the tiny data."""
    root = tmp_path_factory.mktemp("workers") / "project"
    shutil.copytree(PROJECT / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    shutil.copytree(PROJECT / "data/01_raw/ml-latest-tiny", root / "data/01_raw/ml-latest-tiny")
    (root / "src").mkdir()
    for name in ("pyproject.toml", ".telemetry"):
        if (PROJECT / name).exists():
            shutil.copy(PROJECT / name, root / name)
    run = subprocess.run(
        [sys.executable, "-m", "kedro", "run", "--env", "tiny", "--pipeline", "apg", "--to-nodes", "apg.plan_suite", "--params", PLAN_PARAMS],
        cwd=root, env=ENV, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def variant(project) -> dict:
    """The plan entry, frames and study name the training node would use."""
    loaded = load_variant(project, "tiny", "apg", VARIANT, None)
    train = variant_train_frame(loaded["train"], loaded["entry"])
    loaded["study_name"] = variant_study_name(VARIANT, loaded["entry"], loaded["feature_spec"], len(train), len(loaded["valid"]))
    assert loaded["entry"]["study"]["n_trials"] == N_TRIALS and loaded["entry"]["study"]["pruner"] == "none"
    return loaded


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_worker_left():
    """Kill the workers a failed test left running."""
    yield
    while _STARTED:
        worker = _STARTED.pop()
        if worker.poll() is None:
            worker.kill()
            worker.communicate()


def _start_worker(project: Path, storage: str) -> subprocess.Popen:
    worker = subprocess.Popen(
        [sys.executable, "-m", "dynamic_ctr.training.worker", "--variant", VARIANT, "--env", "tiny", "--storage", storage,
         "--threads", "1", "--poll", "0.2", "--project", str(project)],
        cwd=project, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    _STARTED.append(worker)
    return worker


def _finish(worker: subprocess.Popen, timeout: float = 90) -> dict:
    """Wait for a worker; its summary line (exit status 0 required)."""
    out, _ = worker.communicate(timeout=timeout)
    assert worker.returncode == 0, f"worker {worker.pid} exited {worker.returncode}:\n{out[-4000:]}"
    return json.loads(out.strip().splitlines()[-1])


def _trials(storage: str | optuna.storages.BaseStorage, name: str) -> list[optuna.trial.FrozenTrial]:
    if isinstance(storage, str) and storage.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal_path(storage))))
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def _by_plan(trials: list[optuna.trial.FrozenTrial]) -> dict[int, tuple[dict, float]]:
    """``{planned index: (params, value)}`` of the COMPLETE trials; each index at most once."""
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    out = {t.user_attrs[PLANNED_ATTR]: (t.params, t.value) for t in done}
    assert len(out) == len(done), "a planned trial completed twice"
    return out


def _check_study(trials: list[optuna.trial.FrozenTrial]) -> None:
    """n_trials finished in all, numbers unique, no param set completed twice, none left running."""
    assert [t.number for t in trials] == list(range(len(trials)))
    assert not [t.number for t in trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == N_TRIALS and not [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == N_TRIALS
    assert set(_by_plan(trials)) == set(range(N_TRIALS))


@pytest.fixture(scope="module")
def reference(project, variant, tmp_path_factory) -> dict:
    """One worker alone (in this process, one torch thread), on a sqlite file:
    ``{"by_plan", "best": (number, params, value)}``."""
    storage = f"sqlite:///{tmp_path_factory.mktemp('single') / 'optuna.db'}"
    entry = variant["entry"]
    spec = FeatureSpec.from_dict(variant["feature_spec"])
    device = resolve_device("cpu")  # as the worker command does (it also sets the CPU's denormal flushing)
    train = frame_to_tensors(variant_train_frame(variant["train"], entry), spec, device)
    valid = frame_to_tensors(variant["valid"], spec, device)
    cfg = StudyConfig(study_name=variant["study_name"], **{**entry["study"], "storage": storage})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(project)  # the plan's checkpoint_dir is relative to the project root
            study = tune_worker({"model": entry["model"], "train": entry["train"]}, entry["search_space"], spec, train, valid, cfg)
    finally:
        torch.set_num_threads(threads)
    trials = study.get_trials()
    _check_study(trials)
    best = study.best_trial
    return {"by_plan": _by_plan(trials), "best": (best.number, best.params, best.value)}


def _postgres_binaries() -> dict[str, str] | None:
    found = {}
    for name in ("initdb", "pg_ctl"):
        path = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)), None)
        if path is None:
            return None
        found[name] = str(path)
    return found


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on a free loopback port in a temp dir; ``make_url(db)`` creates
    database ``db`` and returns its SQLAlchemy URL. Stopped (and its dir removed) at the end.
    As root it runs as the ``postgres`` user (``runuser``): initdb and postgres refuse root."""
    binaries = _postgres_binaries()
    problem, as_user, owner = None, [], None
    if binaries is None:
        problem = "no PostgreSQL binaries (initdb, pg_ctl) on PATH or under /usr/lib/postgresql"
    elif os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            problem = "running as root, and there is no 'postgres' user to run initdb and postgres as"
        if shutil.which("runuser") is None:
            problem = "running as root without runuser to run initdb and postgres as another user"
        as_user = ["runuser", "-u", "postgres", "--"]
    if problem is not None:
        if os.environ.get("DYNAMIC_CTR_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{problem}, and DYNAMIC_CTR_REQUIRE_POSTGRES=1 requires PostgreSQL")
        pytest.skip(problem)
    import psycopg2  # the test extra's driver for SQLAlchemy

    root = Path(tempfile.mkdtemp(prefix="dynamic-ctr-pg-"))
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data = root / "data"

    def pg(*command: str, check: bool = True) -> None:
        done = subprocess.run([*as_user, *command], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0 or not check, f"{command[0]} failed:\n{done.stdout}\n{done.stderr}"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        pg(binaries["initdb"], "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=40"
        pg(binaries["pg_ctl"], "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o", options, "start")

        def make_url(db: str) -> str:
            conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{db}"')
            conn.close()
            return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{db}"

        yield make_url
    finally:
        if (data / "postmaster.pid").exists():
            pg(binaries["pg_ctl"], "-D", str(data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


def _kill_mid_trial(workers: list[subprocess.Popen], storage, name: str, timeout: float = 60) -> tuple[subprocess.Popen, int]:
    """SIGKILL the first worker seen running a trial past its first epoch; ``(victim, trial number)``."""
    pids = {f"{socket.gethostname()}:{w.pid}": w for w in workers}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            trials = _trials(storage, name)
        except KeyError:  # not created yet
            trials = []
        for t in trials:
            victim = pids.get(t.user_attrs.get(WORKER_ATTR))
            if t.state == optuna.trial.TrialState.RUNNING and victim is not None and t.intermediate_values:
                os.kill(victim.pid, signal.SIGKILL)
                victim.communicate(timeout=30)  # reaped: no zombie left
                assert victim.returncode == -signal.SIGKILL
                return victim, t.number
        time.sleep(0.03)
    for w in workers:
        w.kill()
    raise AssertionError("no worker was seen mid-trial")


def _check_killed(trials: list[optuna.trial.FrozenTrial], victim: subprocess.Popen, killed: int, survivor: subprocess.Popen, reference: dict) -> None:
    _check_study(trials)
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert [t.number for t in failed] == [killed]  # FAIL, not RUNNING
    assert failed[0].user_attrs[WORKER_ATTR].endswith(f":{victim.pid}")
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == killed)
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == failed[0].params
    assert retry.user_attrs[WORKER_ATTR].endswith(f":{survivor.pid}") and retry.user_attrs["retry_of"] == killed
    assert retry.user_attrs["resumed_from_epoch"] >= 1  # from the killed trial's checkpoint
    assert _by_plan(trials) == reference["by_plan"]  # every trial, the resumed one included, as one worker ran it


# ------------------------------------------------------------------ tests


@pytest.mark.slow
def test_two_postgres_workers_run_n_trials_in_all_and_find_the_single_workers_best(project, variant, reference, postgres, monkeypatch):
    storage = postgres("pair")
    workers = [_start_worker(project, storage) for _ in range(2)]  # a fresh database: they race to create it
    summaries = [_finish(w) for w in workers]
    name = variant["study_name"]
    assert {s["study"] for s in summaries} == {name}
    trials = _trials(storage, name)
    _check_study(trials)
    assert not [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(trials) == N_TRIALS  # none lost, none run twice, no extra trial
    ran = sorted(sorted(s["ran"]) for s in summaries)
    assert all(ran) and sorted(n for numbers in ran for n in numbers) == list(range(N_TRIALS))  # both worked, each trial once
    assert {t.user_attrs[WORKER_ATTR] for t in trials} == {f"{socket.gethostname()}:{w.pid}" for w in workers}
    assert _by_plan(trials) == reference["by_plan"]
    assert all((s["best_trial"], s["best_params"], s["best_value"]) == reference["best"] for s in summaries)

    # `kedro run` afterwards: the training node names the same study, finds it complete,
    # runs no trial, retrains the best trial's params once and trains the further seed
    monkeypatch.chdir(project)
    plan = {"variants": {VARIANT: {**variant["entry"], "study": {**variant["entry"]["study"], "storage": storage}}}}
    models, summary, table, _ = train_variant(variant["train"], variant["valid"], variant["feature_spec"], plan, "cpu", variant_name=VARIANT)
    assert summary["study_name"] == name and len(table) == N_TRIALS and summary["budget"]["finished_trials"] == N_TRIALS
    assert summary["retrained_best"] and summary["best_value"] == reference["best"][2]
    assert sorted(models) == [f"seed_{s}" for s in variant["entry"]["seeds"]]


@pytest.mark.slow
def test_a_postgres_worker_killed_mid_trial_leaves_it_failed_and_the_other_finishes_the_study(project, variant, reference, postgres):
    storage = postgres("kill")
    name = variant["study_name"]
    watcher = optuna.storages.RDBStorage(storage)  # Optuna's tables exist before the workers start
    workers = [_start_worker(project, storage) for _ in range(2)]
    victim, killed = _kill_mid_trial(workers, watcher, name)
    survivor = next(w for w in workers if w is not victim)
    summary = _finish(survivor)  # waits for the heartbeat to go stale (2 s), runs the retry
    assert summary["finished"] == N_TRIALS and summary["best_value"] == reference["best"][2]
    _check_killed(_trials(storage, name), victim, killed, survivor, reference)


@pytest.mark.slow
def test_journal_workers_fail_a_killed_workers_trial_by_its_process_and_finish_the_study(project, variant, reference, tmp_path):
    storage = f"journal:///{tmp_path / 'optuna.journal'}"  # journal:////abs/path
    name = variant["study_name"]
    workers = [_start_worker(project, storage) for _ in range(2)]
    victim, killed = _kill_mid_trial(workers, storage, name)
    survivor = next(w for w in workers if w is not victim)
    summary = _finish(survivor)  # no heartbeats: the survivor sees the victim's process is gone
    assert summary["finished"] == N_TRIALS
    _check_killed(_trials(storage, name), victim, killed, survivor, reference)


# ------------------------------------------------------------------ in process


def test_run_worker_replaces_a_failed_trial_with_the_next_planned_one_and_never_adds_unplanned_ones(tmp_path):
    cfg = StudyConfig(study_name="w", storage=f"journal:///{tmp_path / 'w.journal'}", n_trials=4, pruner="none")

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0, 100)
        if x == 1.0:
            raise ArithmeticError("diverged")
        return -abs(x - 2)

    study = run_worker(objective, cfg, lambda i: {"x": float(i)}, catch=(ArithmeticError,), poll_interval=0.05)
    trials = study.get_trials()
    assert [(t.user_attrs[PLANNED_ATTR], t.state.name) for t in trials] == [
        (0, "COMPLETE"), (1, "FAIL"), (2, "COMPLETE"), (3, "COMPLETE"), (4, "COMPLETE")
    ]  # fmt: skip
    assert study.best_trial.params == {"x": 2.0}
    again = run_worker(objective, cfg, lambda i: {"x": float(i)}, catch=(ArithmeticError,))
    assert len(again.get_trials()) == 5  # complete: nothing more runs
    with pytest.raises(QueueEmpty):  # a worker's storage never creates an unplanned trial
        again.ask()
    # the single-process path reads the same journal and finds the study complete
    assert len(run_study(objective, cfg).get_trials()) == 5


@pytest.mark.parametrize(
    "url, path", [("journal:///data/06_models/x.journal", Path("data/06_models/x.journal")), ("journal:////tmp/x.journal", Path("/tmp/x.journal")), ("sqlite:///x.db", None)]
)  # fmt: skip
def test_journal_urls_are_paths_like_sqlite_urls(url, path):
    assert journal_path(url) == path
    with pytest.raises(ValueError, match="journal:///<file>"):
        StudyConfig(storage="journal://x.journal")
