"""Tuning throughput of the worker command: trials per minute with 1 and with 2 workers.

Each worker is ``python -m dynamic_ctr.training.worker`` with one torch thread, run on
the default data (MovieLens latest-small): in a temporary copy of the project, ``kedro
run --pipeline apg --to-nodes apg.plan_suite`` first plans the suite with
``--trials`` trials per study and pruning off (so every run trains the same planned
trials: the work does not depend on the number of workers), then every run starts 1 or 2
workers at once on variant ``--variant`` (default ``wdl``, the plan's 4 epochs with
patience 1), against a fresh storage (``--storage journal``: a journal file, the
one-machine choice; ``sqlite``; or a ``postgresql://`` URL of a server where the script
may create and drop databases).

Measured per run: trials per minute = finished trials / (last trial's end - first trial's
start) x 60, from the study's own timestamps (the workers' start-up, about 3 s of
imports and reading the splits, is left out), and the wall time of the whole run
(start-up included). Every run is checked: all workers exit 0, the study holds exactly
``--trials`` COMPLETE trials, and its best trial is the same in every run. Runs are
interleaved: ``--repeats`` rounds, each running both contenders in a fresh random order,
with the ratio paired per round; a round during which other processes used more than
``--max-other`` of the CPU is repeated (``benchmarks/_machine.py``).

From the repository root::

    python benchmarks/tuning_workers.py
    python benchmarks/tuning_workers.py --repeats 5 --trials 8 --storage sqlite
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _machine import add_quiet_arguments, interleaved_rounds  # noqa: E402
from apg_table5 import fmt, machine_line, median, paired_ratio, spread  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402

ENV = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def make_project(root: Path, trials: int) -> None:
    """A copy of conf and the shipped data under ``root``, planned by ``kedro run``."""
    shutil.copytree(ROOT / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    shutil.copytree(ROOT / "data/01_raw/ml-latest-small", root / "data/01_raw/ml-latest-small")
    (root / "src").mkdir()
    for name in ("pyproject.toml", ".telemetry"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, root / name)
    params = f"training.study.n_trials={trials},training.study.trials_per_extra_dimension=0,training.study.pruner=none"
    run = subprocess.run(
        [sys.executable, "-m", "kedro", "run", "--pipeline", "apg", "--to-nodes", "apg.plan_suite", "--params", params],
        cwd=root, env=ENV, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if run.returncode != 0:
        raise SystemExit(f"planning failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")


class Storages:
    """A fresh storage URL per run: a journal or sqlite file, or a new PostgreSQL database."""

    def __init__(self, kind: str, folder: Path) -> None:
        self.kind, self.folder, self.made = kind, folder, []

    def fresh(self) -> str:
        name = f"bench_{uuid.uuid4().hex[:10]}"
        if self.kind == "journal":
            return f"journal:///{self.folder / name}.journal"
        if self.kind == "sqlite":
            return f"sqlite:///{self.folder / name}.db"
        import sqlalchemy as sa

        engine = sa.create_engine(self.kind, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        self.made.append(name)
        return str(sa.engine.make_url(self.kind).set(database=name).render_as_string(hide_password=False))

    def close(self) -> None:
        if not self.made:
            return
        import sqlalchemy as sa

        engine = sa.create_engine(self.kind, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            for name in self.made:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def run_workers(project: Path, variant: str, storage: str, n: int, trials: int) -> dict:
    """Start ``n`` workers at once on a fresh storage; the run's measurements."""
    t0 = time.perf_counter()
    command = [sys.executable, "-m", "dynamic_ctr.training.worker", "--variant", variant, "--storage", storage,
               "--threads", "1", "--poll", "0.2", "--timeout", "0", "--project", str(project)]  # fmt: skip
    workers = [
        subprocess.Popen(command, cwd=project, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(n)
    ]
    outs = [w.communicate()[0] for w in workers]
    wall = time.perf_counter() - t0
    for w, out in zip(workers, outs):
        if w.returncode != 0:
            raise SystemExit(f"a worker exited {w.returncode}:\n{out[-4000:]}")
    summary = json.loads(outs[0].strip().splitlines()[-1])
    if storage.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        from dynamic_ctr.training.tuning import journal_path

        trials_ = optuna.load_study(
            study_name=summary["study"], storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal_path(storage))))
        ).get_trials()
    else:
        rdb = optuna.storages.RDBStorage(storage)
        trials_ = optuna.load_study(study_name=summary["study"], storage=rdb).get_trials()
        rdb.engine.dispose()  # no connection left open: the database is dropped at the end
    complete = [t for t in trials_ if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) != trials or len(trials_) != trials:
        raise SystemExit(f"{n} worker(s): {len(complete)} COMPLETE of {len(trials_)} trials, expected {trials}")
    span = (max(t.datetime_complete for t in complete) - min(t.datetime_start for t in complete)).total_seconds()
    per_worker = sorted(len(json.loads(out.strip().splitlines()[-1])["ran"]) for out in outs)
    return {"rate": len(complete) / span * 60, "wall": wall, "span": span, "best": (summary["best_trial"], summary["best_value"]),
            "split": per_worker}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="wdl", help="variant of the apg suite whose study the workers run")
    parser.add_argument("--trials", type=int, default=8, help="trials per study (n_trials)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--storage", default="journal", help="journal | sqlite | a postgresql:// URL (databases are created and dropped)")
    add_quiet_arguments(parser, "run", timeout=20.0, budget=120.0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # what each worker uses (the machine line reports it)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tuning-workers-") as tmp:
        project = Path(tmp) / "project"
        make_project(project, args.trials)
        storages = Storages(args.storage, Path(tmp))
        print(machine_line(torch.device("cpu")) + " per worker")
        shown = args.storage if args.storage in ("journal", "sqlite") else "postgresql"
        print(f"MovieLens latest-small, apg suite, variant {args.variant}, {args.trials} planned trials per study (no pruning), "
              f"storage {shown}, {args.repeats} interleaved rounds")
        try:
            rounds, shares, discarded = interleaved_rounds(
                args, [1, 2], lambda n: run_workers(project, args.variant, storages.fresh(), n, args.trials), key=lambda n: n
            )
        finally:
            storages.close()
    rate = {n: [r[n]["rate"] for r in rounds] for n in (1, 2)}
    wall = {n: [r[n]["wall"] for r in rounds] for n in (1, 2)}
    bests = {r[n]["best"] for r in rounds for n in (1, 2)}
    print("\n| workers | trials / min | spread | min | max | wall s (with start-up) | trials per worker |\n|---|---|---|---|---|---|---|")
    for n in (1, 2):
        splits = " ".join("/".join(map(str, r[n]["split"])) for r in rounds)
        print(f"| {n} | {median(rate[n]):.1f} | {fmt(spread(rate[n]), '.0%')} | {min(rate[n]):.1f} | {max(rate[n]):.1f} "
              f"| {median(wall[n]):.1f} | {splits} |")
    print(f"\n2 workers / 1 worker, trials per minute (median of {len(rounds)} paired rounds): {paired_ratio(rate[2], rate[1]):.2f}x "
          f"(per round: {' '.join(f'{b / a:.2f}' for a, b in zip(rate[1], rate[2]))})")
    print(f"wall time, start-up included: {paired_ratio(wall[1], wall[2]):.2f}x faster with 2 workers")
    print(f"best trial (number, value) in every run: {sorted(bests)} -> {'the same' if len(bests) == 1 else 'DIFFERENT'}")
    print(f"other processes' CPU share during the kept rounds: max {max(shares):.0%}; {discarded} disturbed round(s) repeated")
    print(f"total run {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
