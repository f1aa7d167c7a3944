"""A tuning worker: runs trials of one variant's Optuna study in a shared storage.

Start one per process, on as many machines as you like, all against the same storage::

    python -m dynamic_ctr.training.worker --variant wdl_apg --env tiny \\
        --storage postgresql://optuna@db-host/optuna --threads 1

Each worker reads what ``kedro run`` already wrote for the environment's data set: the
suite plan ``data/06_models/<dataset>/<suite>/suite_plan.json`` (the variant's resolved
``model``, ``train``, ``study``, ``seeds`` and ``search_space``) and the encoded splits
``data/05_model_input/<dataset>/{train,valid}.parquet`` + ``feature_spec.json`` (the
newest version of each, or ``--version``), so the plan has to exist first (``kedro run
--env tiny --pipeline apg --to-nodes apg.plan_suite``). It names the study exactly as
the training node does (:func:`~dynamic_ctr.pipelines.training.nodes.variant_study_name`),
and runs queued trials until the study holds the plan's ``n_trials`` finished trials in
total, all workers together (:func:`~dynamic_ctr.training.tuning.tune_worker`: the trials
are planned up front, so N workers run n_trials, not N * n_trials, and find the same
best trial as one). A ``kedro run`` with the same storage afterwards finds the study
complete, retrains its best trial once and trains the further seeds.

Options: ``--storage`` (default: the plan's ``study.storage``; ``journal:///<file>`` for
several processes on one machine without a database server), ``--suite`` (default: the
suite that defines ``--variant``), ``--env`` (the Kedro environment whose
``globals.dataset`` names the data folder) or ``--dataset``, ``--device``,
``--threads`` (torch threads; give 1 to N workers sharing N cores), ``--timeout``
(seconds; default the plan's ``study.timeout``, 0 = none), ``--version``, ``--project``
(the project root; relative paths in the plan are relative to it). Exit status 0 when
the study holds ``n_trials`` finished trials, 1 when this worker stopped before
(timeout, or every remaining trial failed), 2 for a bad command line. SIGTERM fails the
running trial and queues it again before the worker exits.

**N workers on M machines** (PostgreSQL; any SQLAlchemy database every machine reaches
works, with its driver installed, e.g. ``pip install psycopg2-binary``)::

    # 0. a database: createdb -h db-host -U optuna optuna; keep the password out of the
    #    URL with ~/.pgpass or PGPASSWORD on every machine
    # 1. on one machine, plan the suite (and write the encoded splits):
    kedro run --env <env> --pipeline <suite> --to-nodes <suite>.plan_suite \
        --params "training.study.storage=postgresql://optuna@db-host/optuna"
    # 2. give every machine the same checkout and these files (a shared file system,
    #    or copy them; --version pins one Kedro version):
    #    data/06_models/<dataset>/<suite>/suite_plan.json/  data/05_model_input/<dataset>/
    # 3. on every machine, k workers per variant (k = its cores with --threads 1, or one
    #    per GPU with --device cuda:<i>); --storage may be left out when the plan holds it:
    python -m dynamic_ctr.training.worker --variant <variant> --env <env> --threads 1 \
        --storage postgresql://optuna@db-host/optuna &
    # each exits 0 once the study holds n_trials finished trials (all workers together)
    # 4. once they are done, on one machine (same storage): every study is complete, so
    #    each variant's node retrains its best trial once and trains the further seeds:
    kedro run --env <env> --pipeline <suite> --params "training.study.storage=postgresql://optuna@db-host/optuna"

On one machine without a database server, use ``--storage journal:///data/06_models/
<dataset>/optuna.journal`` (relative to the project root; ``journal:////abs/path`` for an
absolute one) in steps 1, 3 and 4. Workers may join or leave at any time: a worker
killed mid-trial leaves that trial FAIL (after the heartbeat's grace period on a
database, at once on a journal file once another worker of the same machine looks) and
another worker runs it again from its checkpoint (same machine) or from scratch. The
plan's ``n_trials``, ``seed``, ``search_space`` and pruner decide the trials: leave them
as they were when the study began (a study that should have more trials gets them
queued on the next worker start). Start ``kedro run`` after the workers, not alongside:
its own (TPE) trials are not planned.

Imports pandas (to read the splits) in :func:`main` only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("dynamic_ctr.training.worker")

PROG = "python -m dynamic_ctr.training.worker"


def newest_version(folder: Path) -> str:
    """The newest Kedro version under a versioned dataset folder ``<name>/<version>/<name>``."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such Kedro version folder (run `kedro run` first)")
    versions = sorted(p.name for p in folder.iterdir() if (p / folder.name).is_file())
    if not versions:
        raise FileNotFoundError(f"{folder}: holds no version")
    return versions[-1]  # Kedro's version strings sort in time order


def _versioned(folder: Path, version: str | None) -> Path:
    chosen = version or newest_version(folder)
    path = folder / chosen / folder.name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (version {chosen!r})")
    return path


def dataset_of_env(project: Path, env: str | None) -> str:
    """``globals.dataset`` of Kedro environment ``env`` (the project's config loader)."""
    from kedro.config import OmegaConfigLoader

    from dynamic_ctr.settings import CONFIG_LOADER_ARGS

    loader = OmegaConfigLoader(conf_source=str(project / "conf"), env=env, **CONFIG_LOADER_ARGS)
    dataset = (loader["globals"] or {}).get("dataset")
    if not dataset:
        raise ValueError(f"environment {env or CONFIG_LOADER_ARGS['default_run_env']!r} defines no globals.dataset")
    return str(dataset)


def suite_of_variant(project: Path, variant: str) -> str:
    from dynamic_ctr.pipelines.suite import all_variant_names

    owners = all_variant_names(project)
    if variant not in owners:
        raise ValueError(f"no suite defines variant {variant!r}; variants: {sorted(owners)}")
    return owners[variant]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--variant", required=True, help="the variant whose study to work on (e.g. wdl_apg)")
    parser.add_argument("--suite", default=None, help="its suite (default: the suite that defines the variant)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--env", default=None, help="Kedro environment whose globals.dataset names the data folder (default: $KEDRO_ENV, else local)")
    where.add_argument("--dataset", default=None, help="the data folder name under data/*/ (instead of --env)")
    parser.add_argument("--storage", default=None, help="Optuna storage URL shared by the workers (default: the plan's study.storage)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds (default: the plan's; 0 = none)")
    parser.add_argument("--version", default=None, help="Kedro version of the plan and the splits (default: the newest of each)")
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="project root (default: the working directory)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between looks at the study while waiting")
    return parser


def load_variant(project: Path, dataset: str, suite: str, variant: str, version: str | None) -> dict[str, Any]:
    """The plan entry of ``variant``, the feature spec and the two split frames, as the
    training node receives them: ``{"entry", "feature_spec", "train", "valid", "paths"}``."""
    import pandas as pd

    plan_path = _versioned(project / "data/06_models" / dataset / suite / "suite_plan.json", version)
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    entry = (plan.get("variants") or {}).get(variant)
    if entry is None:
        raise ValueError(f"{plan_path}: no variant {variant!r}; planned: {sorted(plan.get('variants') or {})}")
    if entry.get("status") != "ready":
        raise ValueError(f"{plan_path}: variant {variant!r} is {entry.get('status')!r} ({entry.get('reason')}); nothing to tune")
    inputs = project / "data/05_model_input" / dataset
    spec_path = _versioned(inputs / "feature_spec.json", version)
    feature_spec = json.loads(spec_path.read_text(encoding="utf-8"))
    frames = {}
    paths = {"suite_plan": plan_path, "feature_spec": spec_path}
    for split in ("train", "valid"):
        paths[split] = _versioned(inputs / f"{split}.parquet", version)
        frames[split] = pd.read_parquet(paths[split])
    return {"entry": entry, "feature_spec": feature_spec, **frames, "paths": paths}


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one tuning worker (module docstring); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[worker {os.getpid()}] %(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads={args.threads} must be >= 1")

    import torch

    from dynamic_ctr.pipelines.training.nodes import (
        frame_to_tensors,
        variant_study_name,
        variant_train_frame,
    )
    from dynamic_ctr.spec import FeatureSpec
    from dynamic_ctr.training.device import resolve_device
    from dynamic_ctr.training.tuning import (
        WORKER_ATTR,
        StudyConfig,
        finished_trials,
        tune_worker,
        worker_id,
    )

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    project = args.project.resolve()
    os.chdir(project)  # the plan's storage and checkpoint paths are relative to the project root
    try:
        dataset = args.dataset or dataset_of_env(project, args.env or os.environ.get("KEDRO_ENV"))
        suite = args.suite or suite_of_variant(project, args.variant)
        loaded = load_variant(project, dataset, suite, args.variant, args.version)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    entry, feature_spec = loaded["entry"], loaded["feature_spec"]
    for name, path in loaded["paths"].items():
        logger.info("%s: %s", name, path.relative_to(project))

    train_frame = variant_train_frame(loaded["train"], entry)
    valid_frame = loaded["valid"]
    study_name = variant_study_name(args.variant, entry, feature_spec, len(train_frame), len(valid_frame))
    settings = dict(entry["study"])
    if args.storage is not None:
        settings["storage"] = args.storage
    if args.timeout is not None:
        settings["timeout"] = args.timeout or None
    if not settings.get("storage"):
        parser.error("the plan's study has no storage; give --storage (the URL every worker shares)")
    study_cfg = StudyConfig(study_name=study_name, **settings)

    spec = FeatureSpec.from_dict(feature_spec)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    train_data = frame_to_tensors(train_frame, spec, device)
    valid_data = frame_to_tensors(valid_frame, spec, device)
    base = {"model": entry["model"], "train": entry["train"]}
    logger.info(
        "variant %s: study %s in %s, n_trials=%d, on %s (%d torch threads, %d train rows)",
        args.variant, study_name, _redacted(study_cfg.storage), study_cfg.n_trials, device,
        torch.get_num_threads(), len(train_data),
    )  # fmt: skip

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        study = tune_worker(base, entry["search_space"], spec, train_data, valid_data, study_cfg, poll_interval=args.poll)
    except KeyboardInterrupt:
        logger.warning("interrupted; the running trial was queued again")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    done = finished_trials(study)
    mine = [t.number for t in study.get_trials(deepcopy=False) if t.user_attrs.get(WORKER_ATTR) == worker_id()]
    logger.info("study %s: %d of %d trial(s) finished; this worker ran %s", study_name, done, study_cfg.n_trials, mine)
    if done >= study_cfg.n_trials:
        best = study.best_trial
        print(json.dumps({"study": study_name, "finished": done, "best_trial": best.number, "best_value": best.value,
                          "best_params": best.params, "ran": mine}))
        return 0
    return 1


def _redacted(url: str | None) -> str:
    """``url`` without a password (``user:***@host``)."""
    if url is None or "@" not in url or "://" not in url:
        return str(url)
    scheme, rest = url.split("://", 1)
    auth, host = rest.rsplit("@", 1)
    user = auth.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in auth else ''}@{host}"


if __name__ == "__main__":
    sys.exit(main())
