"""Optuna hyper-parameter search, in process, over the same :func:`train`.

**Search space.** A plain dict (from ``parameters_tuning.yml``) mapping a dotted
path into the base config ``{"model": {...}, "train": {...}}`` to a distribution::

    {
        "train.lr":         {"type": "float", "low": 1e-4, "high": 1e-2, "log": true},
        "train.batch_size": {"type": "categorical", "choices": [512, 1024, 2048]},
        "model.apg.rank":   {"type": "int", "low": 2, "high": 8, "step": 2},
        "model.hidden":     {"type": "categorical", "choices": [[256, 128], [512, 256]]},
    }

There is no shorthand: ``"lr"`` is not ``"train.lr"``. Every path must already
exist in the base config (put the default value there), so a typo fails before the
first trial instead of silently tuning nothing. Categorical choices that are not
scalars (lists, dicts) are passed to Optuna as their JSON text and decoded back.
The Optuna parameter names are the paths themselves.

**Resuming.** ``run_study`` counts the trials already in storage that finished
(COMPLETE or PRUNED) and runs only the missing ones, so a study interrupted after
k trials and started again reaches ``n_trials`` in total. Failed trials (including
the one running when the process was interrupted) do not count and are re-run.

**Killed processes.** With an RDB storage every running trial records a heartbeat
(``StudyConfig.heartbeat_interval``). A trial whose process died (``kill -9``, OOM,
a lost machine) stops beating; when the study is next opened, ``run_study`` marks it
FAIL once its last heartbeat is older than the grace period (waiting for that, at
most ``grace_period + 2 * heartbeat_interval`` seconds, when the study is reopened
sooner), and queues a retry with the same params (``max_retry`` times). With
``StudyConfig.checkpoint_dir`` every trial trains with a resume directory
``<checkpoint_dir>/<study_name>/trial_<n>``; a retry uses the killed trial's
directory, so it continues from that trial's last completed epoch (user attrs
``retry_of`` and ``resumed_from_epoch``). A trial's directory is deleted once the
trial has finished (COMPLETE, PRUNED, or FAIL by an exception); directories no
running or queued trial needs are deleted when the study is opened. Without a
persistent (RDB or journal) storage nothing is checkpointed (an in-memory study cannot
be resumed). Checkpoints are local files: a trial retried on another machine than the
one it was killed on starts from its first epoch.

A sampler's random state is not stored, so the params TPE draws after a restart are
not those an uninterrupted study would have drawn (queued and retried trials keep
theirs).

**Storages.** ``StudyConfig.storage``: ``None`` (in memory), an RDB URL (SQLAlchemy:
``sqlite:///data/06_models/optuna.db`` on one machine, ``postgresql://user@host/db`` for
workers on several machines; needs a driver such as ``psycopg2-binary``), or
``journal:///data/06_models/optuna.journal`` for Optuna's ``JournalStorage`` over a
file (``JournalFileBackend``): several processes on *one* machine without a database
server. As with sqlite URLs, ``journal:///rel/path`` is relative to the working
directory and ``journal:////abs/path`` absolute. The journal storage has no heartbeats:
there, a RUNNING trial counts as dead when the process named by its ``worker`` user attr
(``<host>:<pid>``, set when the trial starts) no longer exists on this machine; it is then
marked FAIL and retried like a stale heartbeat (trials of another machine, or of a
process killed before it recorded itself, stay RUNNING).

**Workers.** :func:`tune_worker` (:func:`run_worker`; the command is
:mod:`dynamic_ctr.training.worker`) is one of N processes, on one or several machines,
that run one study in a shared storage until it holds ``n_trials`` finished trials *in
total*. Their trials are fixed up front: the process that creates the study queues
``n_trials`` trials (:func:`planned_params`: planned trial 0 is the base config, planned
trial ``i`` is drawn by a ``RandomSampler`` seeded with ``(seed, i)`` alone), and every
worker only takes queued trials (taking one is atomic in the storage, so none runs
twice) and stops when none is left and none is running elsewhere. So neither the
params of a trial nor which trials run depend on how many workers there are or which
finished first, and with a deterministic objective (CPU, one seed) the study's best trial
is the one a single worker finds. Not TPE: TPE's next params depend on the trials
finished so far, which differ from worker to worker. What still depends on timing is
pruning (the median pruner compares a trial with the trials reported so far; with
``pruner="none"`` the whole study is independent of the schedule). A killed worker's
trial is failed (heartbeat, or the journal's process check) and queued again with the
same params (``max_retry``); a trial that fails (a diverging loss) or runs out of retries
is replaced by the next planned trial, so the study still reaches ``n_trials``.

Requires optuna (imported at module level: ``dynamic_ctr.training`` loads this
module lazily).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import random
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import optuna
from torch import nn

from dynamic_ctr.spec import FeatureSpec
from dynamic_ctr.training.batching import TensorData
from dynamic_ctr.training.device import seed_everything
from dynamic_ctr.training.loop import NonFiniteLossError, TrainConfig, TrainResult, train
from dynamic_ctr.training.resume import read_manifest, remove_state

if TYPE_CHECKING:
    from dynamic_ctr.training.distributed import World

__all__ = [
    "StudyConfig",
    "TuneResult",
    "apply_overrides",
    "base_params",
    "decode_params",
    "finished_trials",
    "fit",
    "further_seeds",
    "journal_path",
    "make_objective",
    "planned_params",
    "run_study",
    "run_worker",
    "study_checkpoint_dir",
    "suggest",
    "trial_checkpoint_dir",
    "trials_table",
    "tune",
    "tune_worker",
    "validate_space",
]

logger = logging.getLogger(__name__)

_SCALAR = (type(None), bool, int, float, str)
_FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
_PENDING = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
_JOURNAL = "journal:///"
#: Trial user attr naming the process that runs it, ``<host>:<pid>``.
WORKER_ATTR = "worker"
#: Trial user attr of a worker study's queued trials: the index of its planned params.
PLANNED_ATTR = "planned"
#: Study user attr set once the process that created a worker study has queued its trials.
PLAN_ATTR = "worker_plan"
#: Trial user attr of a worker's trial that raised: the exception (it will not be retried).
ERROR_ATTR = "error"
#: Seconds a journal file's lock may stay untouched before another process takes it over
#: (one append holds it for milliseconds; a process killed meanwhile never releases it).
JOURNAL_LOCK_GRACE = 5
# optuna >= 4.9 names it RetryHeartbeatStaleTrialCallback (RDBStorage's
# heartbeat_stale_trial_callback); earlier 4.x: RetryFailedTrialCallback (failed_trial_callback)
_RetryCallback = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
_STALE_CALLBACK_ARG = (
    "heartbeat_stale_trial_callback"
    if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
    else "failed_trial_callback"
)


# ---------------------------------------------------------------- search space


def validate_space(space: Mapping[str, Mapping[str, Any]]) -> None:
    """Check every distribution of ``space``; ``ValueError`` names the bad path."""
    if not space:
        raise ValueError("search space is empty")
    for path, dist in space.items():
        if not isinstance(dist, Mapping):
            raise ValueError(f"space[{path!r}] must be a dict, got {dist!r}")
        kind = dist.get("type")
        if kind in ("float", "int"):
            allowed = {"type", "low", "high", "log", "step"}
            low, high = dist.get("low"), dist.get("high")
            if low is None or high is None or not low <= high:
                raise ValueError(
                    f"space[{path!r}]: need low <= high, got low={low!r} high={high!r}"
                )
            if dist.get("log") and low <= 0:
                raise ValueError(f"space[{path!r}]: log scale needs low > 0, got {low!r}")
            if dist.get("log") and dist.get("step") is not None:
                raise ValueError(f"space[{path!r}]: step and log cannot be combined")
            if kind == "int" and not all(isinstance(v, int) for v in (low, high)):
                raise ValueError(f"space[{path!r}]: int bounds must be ints, got {low!r}, {high!r}")
        elif kind == "categorical":
            allowed = {"type", "choices"}
            choices = dist.get("choices")
            if not isinstance(choices, (list, tuple)) or not choices:
                raise ValueError(
                    f"space[{path!r}]: choices must be a non-empty list, got {choices!r}"
                )
        else:
            raise ValueError(
                f"space[{path!r}]: type={kind!r} must be 'float', 'int' or 'categorical'"
            )
        unknown = sorted(set(dist) - allowed)
        if unknown:
            raise ValueError(f"space[{path!r}]: unknown keys {unknown} for type {kind!r}")


def _encoded_choices(choices: list[Any]) -> tuple[list[Any], bool]:
    if all(isinstance(c, _SCALAR) for c in choices):
        return list(choices), False
    return [json.dumps(c, sort_keys=True) for c in choices], True


def suggest(trial: optuna.Trial, space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Draw one value per path of ``space`` from ``trial``.

    Returns:
        ``{path: value}`` with non-scalar categorical choices decoded, ready for
        :func:`apply_overrides`.
    """
    validate_space(space)
    out: dict[str, Any] = {}
    for path, dist in space.items():
        kind = dist["type"]
        if kind == "float":
            out[path] = trial.suggest_float(
                path,
                float(dist["low"]),
                float(dist["high"]),
                log=bool(dist.get("log", False)),
                step=dist.get("step"),
            )
        elif kind == "int":
            out[path] = trial.suggest_int(
                path,
                dist["low"],
                dist["high"],
                log=bool(dist.get("log", False)),
                step=dist.get("step") or 1,
            )
        else:
            choices, encoded = _encoded_choices(list(dist["choices"]))
            value = trial.suggest_categorical(path, choices)
            out[path] = json.loads(value) if encoded else value
    return out


def base_params(base: Mapping[str, Any], space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The Optuna params that reproduce ``base`` for every path of ``space`` whose base
    value lies inside its distribution (others are left to the sampler)."""
    out: dict[str, Any] = {}
    for path, dist in space.items():
        node: Any = base
        for part in path.split("."):
            node = node[part]
        if dist["type"] == "categorical":
            choices, encoded = _encoded_choices(list(dist["choices"]))
            value = json.dumps(node, sort_keys=True) if encoded else node
            if value in choices:
                out[path] = value
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and dist["low"] <= node <= dist["high"]:
            out[path] = node
    return out


def decode_params(
    params: Mapping[str, Any], space: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """Turn Optuna's stored ``trial.params`` back into overrides (JSON-encoded
    categorical choices decoded). Params not in ``space`` are kept as they are."""
    out = dict(params)
    for path, dist in space.items():
        if path in out and dist.get("type") == "categorical":
            _, encoded = _encoded_choices(list(dist["choices"]))
            if encoded:
                out[path] = json.loads(out[path])
    return out


def apply_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with each dotted ``path: value`` of ``overrides`` set.

    Raises:
        ValueError: a path does not already exist in ``base`` (names the path and
            the first missing component).
    """
    out = copy.deepcopy(dict(base))
    for path, value in overrides.items():
        keys = path.split(".")
        node: Any = out
        for i, key in enumerate(keys):
            if not isinstance(node, dict) or key not in node:
                where = ".".join(keys[:i]) or "<root>"
                hint = ""
                if i == 0 and len(keys) == 1:
                    sections = [s for s, v in out.items() if isinstance(v, dict) and key in v]
                    if sections:
                        hint = f"; did you mean {', '.join(f'{s}.{key}' for s in sections)}?"
                raise ValueError(
                    f"unknown config path {path!r}: no key {key!r} under {where}{hint}"
                )
            if i == len(keys) - 1:
                node[key] = copy.deepcopy(value)
            else:
                node = node[key]
    return out


# ---------------------------------------------------------------- study


@dataclass(frozen=True)
class StudyConfig:
    """How to run an Optuna study.

    Args:
        study_name: the study's name in storage (one name per model variant).
        storage: ``None`` for in-memory, an RDB URL such as
            ``"sqlite:///data/06_models/optuna.db"`` or ``"postgresql://u@host/db"``, or
            ``"journal:///data/06_models/optuna.journal"`` (a journal file; module
            docstring). Parent dirs of sqlite and journal files are created.
        n_trials: finished (COMPLETE or PRUNED) trials the study should hold in total.
        timeout: stop starting new trials after this many seconds; ``None`` = no limit.
        seed: seed of the ``TPESampler``.
        pruner: ``"median"`` (``MedianPruner``) or ``"none"``.
        n_startup_trials: trials run before TPE models the space and before the
            median pruner may prune.
        n_warmup_steps: epochs of a trial that are never pruned.
        direction: ``"maximize"`` (AUC) or ``"minimize"``.
        verbose: keep Optuna's per-trial INFO logs.
        checkpoint_dir: root of the trials' resume directories
            (``<checkpoint_dir>/<study_name>/trial_<n>``, module docstring); ``None``
            = no checkpoints. Used only with a persistent (RDB or journal) ``storage``.
        heartbeat_interval: seconds between a running trial's heartbeats in an RDB
            storage; ``None`` = no heartbeat (a killed trial then stays RUNNING).
            Unused by a journal storage (it has none; see the module docstring).
        grace_period: seconds without a heartbeat after which a RUNNING trial is
            considered dead and marked FAIL; ``None`` = ``2 * heartbeat_interval``.
            Must exceed ``heartbeat_interval``.
        max_retry: how often a trial killed mid-run is queued again with the same
            params (``None`` = always); 0 = never (a new trial is drawn instead).
    """

    study_name: str = "dynamic-ctr"
    storage: str | None = None
    n_trials: int = 20
    timeout: float | None = None
    seed: int = 2024
    pruner: Literal["median", "none"] = "median"
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    direction: Literal["maximize", "minimize"] = "maximize"
    verbose: bool = False
    checkpoint_dir: str | None = None
    heartbeat_interval: int | None = 60
    grace_period: int | None = None
    max_retry: int | None = 3

    def __post_init__(self) -> None:
        if not self.study_name:
            raise ValueError(f"{self.study_name=} must be non-empty")
        if self.n_trials < 1:
            raise ValueError(f"{self.n_trials=} must be >= 1")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"{self.timeout=} must be > 0 or None")
        if self.pruner not in ("median", "none"):
            raise ValueError(f"{self.pruner=} must be 'median' or 'none'")
        if self.direction not in ("maximize", "minimize"):
            raise ValueError(f"{self.direction=} must be 'maximize' or 'minimize'")
        if self.n_startup_trials < 0 or self.n_warmup_steps < 0:
            raise ValueError(f"{self.n_startup_trials=} and {self.n_warmup_steps=} must be >= 0")
        if self.storage is not None and self.storage.startswith("journal:"):
            journal_path(self.storage)  # a malformed journal URL fails here
        if self.checkpoint_dir is not None and not (isinstance(self.checkpoint_dir, (str, os.PathLike)) and str(self.checkpoint_dir)):
            raise ValueError(f"{self.checkpoint_dir=} must be a non-empty path or None")
        for name, low in (("heartbeat_interval", 1), ("grace_period", 1), ("max_retry", 0)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"{name}={value!r} must be an int >= {low} or None")
        if self.grace_period is not None and (self.heartbeat_interval is None or self.grace_period <= self.heartbeat_interval):
            raise ValueError(
                f"{self.grace_period=} needs a heartbeat_interval below it (got {self.heartbeat_interval}): "
                "a grace period shorter than the interval would fail live trials"
            )

    @property
    def effective_grace_period(self) -> int | None:
        """Seconds without a heartbeat before a RUNNING trial counts as dead."""
        if self.heartbeat_interval is None:
            return None
        return self.grace_period if self.grace_period is not None else 2 * self.heartbeat_interval


def journal_path(storage: str | None) -> Path | None:
    """The file of a ``journal:///<path>`` storage URL (``journal:///rel/path`` relative to
    the working directory, ``journal:////abs/path`` absolute, as sqlite URLs); ``None`` for
    any other storage.

    Raises:
        ValueError: a ``journal:`` URL without a path after ``journal:///``.
    """
    if storage is None or not storage.startswith("journal:"):
        return None
    path = storage.removeprefix(_JOURNAL) if storage.startswith(_JOURNAL) else ""
    if not path:
        raise ValueError(f"storage {storage!r}: a journal storage is 'journal:///<file>' (e.g. journal:///data/06_models/optuna.journal)")
    return Path(path)


def _prepare_storage(storage: str | None) -> None:
    """Create the parent directory of a sqlite database or journal file."""
    journal = journal_path(storage)
    if journal is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        return
    if storage is None or not storage.startswith("sqlite:///"):
        return
    db = storage.removeprefix("sqlite:///").split("?", 1)[0]
    if db and db != ":memory:":
        Path(db).parent.mkdir(parents=True, exist_ok=True)


class QueueEmpty(RuntimeError):
    """A worker's study has no queued (WAITING) trial left to take."""


class _QueuedTrialsOnly:
    """Storage mixin of :func:`run_worker`: refuses to create a trial that copies no
    template. ``Study.ask`` creates such a trial (for the sampler to fill) only when it
    found no WAITING trial to take; ``enqueue_trial``, ``add_trial`` and the retry of a
    killed trial all copy a template and pass. So a worker whose queue ran dry (another
    worker took the last trial between its check and its ask) gets :class:`QueueEmpty`
    instead of an extra, unplanned trial."""

    def create_new_trial(self, study_id: int, template_trial: Any = None) -> int:
        if template_trial is None:
            raise QueueEmpty(f"study id {study_id}: no queued trial left")
        return super().create_new_trial(study_id, template_trial)  # type: ignore[misc]

    def _create_new_trial(self, study_id: int, template_trial: Any = None) -> Any:  # what optuna's RDB cache calls
        if template_trial is None:
            raise QueueEmpty(f"study id {study_id}: no queued trial left")
        return super()._create_new_trial(study_id, template_trial)  # type: ignore[misc]


class _WorkerRDBStorage(_QueuedTrialsOnly, optuna.storages.RDBStorage):
    pass


class _WorkerJournalStorage(_QueuedTrialsOnly, optuna.storages.JournalStorage):
    pass


def _has_heartbeat(cfg: StudyConfig) -> bool:
    return cfg.storage is not None and journal_path(cfg.storage) is None and cfg.heartbeat_interval is not None


@contextmanager
def _quiet_experimental() -> Iterator[None]:
    """Optuna flags its heartbeat API as experimental; it is what we rely on here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        yield


def _make_storage(cfg: StudyConfig, *, queued_only: bool = False) -> optuna.storages.BaseStorage | None:
    """``None`` (in memory), the journal storage of a ``journal:///`` URL, or the RDB
    storage of ``cfg.storage`` with heartbeats and retries of killed trials when
    ``cfg.heartbeat_interval`` is set. ``queued_only``: a worker's storage
    (:class:`_QueuedTrialsOnly`)."""
    if cfg.storage is None:
        return None
    _prepare_storage(cfg.storage)
    journal = journal_path(cfg.storage)
    if journal is not None:
        from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

        cls = _WorkerJournalStorage if queued_only else optuna.storages.JournalStorage
        # A process killed while appending leaves the file's lock behind; the others take
        # it over after JOURNAL_LOCK_GRACE s (Optuna's default, 30 s, stalls them that long).
        lock = JournalFileSymlinkLock(str(journal), grace_period=JOURNAL_LOCK_GRACE)
        return cls(JournalFileBackend(str(journal), lock_obj=lock))
    rdb = _WorkerRDBStorage if queued_only else optuna.storages.RDBStorage
    import sqlalchemy.exc

    for attempt in range(1, 6):
        try:
            with _quiet_experimental():
                if cfg.heartbeat_interval is None:
                    return rdb(cfg.storage)
                return rdb(
                    cfg.storage,
                    heartbeat_interval=cfg.heartbeat_interval,
                    grace_period=cfg.effective_grace_period,
                    **{_STALE_CALLBACK_ARG: _RetryCallback(max_retry=cfg.max_retry)},
                )
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            # N processes opening a new database at once race to create Optuna's tables
            # (PostgreSQL: a duplicate key in pg_type); the tables exist on the next try.
            if attempt == 5:
                raise
            logger.info("opening storage %s failed (%s); retrying", cfg.storage, type(e).__name__)
            time.sleep(0.2 * attempt + random.random())
    raise AssertionError("unreachable")


def study_checkpoint_dir(cfg: StudyConfig) -> Path | None:
    """``<checkpoint_dir>/<study_name>``: where a study's runs keep their resume state;
    ``None`` without ``checkpoint_dir`` or without a persistent (RDB or journal) storage."""
    if cfg.checkpoint_dir is None or cfg.storage is None:
        return None
    return Path(cfg.checkpoint_dir) / cfg.study_name


def _retry_of(trial: optuna.trial.FrozenTrial) -> int | None:
    with _quiet_experimental():
        return _RetryCallback.retried_trial_number(trial)


def _frozen(trial: optuna.Trial | optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
    if isinstance(trial, optuna.trial.FrozenTrial):
        return trial
    for t in trial.study.get_trials(deepcopy=False, states=_PENDING):
        if t.number == trial.number:
            return t
    raise LookupError(f"trial {trial.number} is not running in study {trial.study.study_name!r}")


def trial_checkpoint_dir(cfg: StudyConfig, trial: optuna.Trial | optuna.trial.FrozenTrial) -> Path | None:
    """The resume directory of ``trial``: ``<checkpoint_dir>/<study_name>/trial_<n>``
    with ``n`` the number of the trial it retries (the original one, however often it
    was retried), else its own; ``None`` when the study keeps no checkpoints."""
    root = study_checkpoint_dir(cfg)
    if root is None:
        return None
    frozen = _frozen(trial)
    original = _retry_of(frozen)
    return root / f"trial_{frozen.number if original is None else original}"


def _fail_dead_trials(study: optuna.Study, cfg: StudyConfig) -> None:
    """Mark FAIL (and queue for retry) the RUNNING trials whose heartbeat stopped.

    A trial killed less than the grace period ago does not look dead yet: wait for it
    (polling, at most ``grace_period + 2 * heartbeat_interval`` seconds: its last beat
    may be an interval older than its death, and some databases keep time in whole
    seconds). A trial still beating after that belongs to a live worker and is left
    alone (it is not counted as finished, so this process runs trials of its own).
    """
    if cfg.storage is not None and journal_path(cfg.storage) is not None:
        _fail_orphaned_trials(study, cfg)
        still = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
        if still:
            logger.warning(
                "study %r: trial(s) %s are RUNNING in a process alive on this machine, on another machine, "
                "or killed before it recorded itself (a journal storage has no heartbeats); not touching them",
                cfg.study_name, still,
            )  # fmt: skip
        return
    grace = cfg.effective_grace_period
    if cfg.storage is None or grace is None or cfg.heartbeat_interval is None:
        return

    def running() -> list[int]:
        with _quiet_experimental():
            optuna.storages.fail_stale_trials(study)
        states = (optuna.trial.TrialState.RUNNING,)
        return [t.number for t in study.get_trials(deepcopy=False, states=states)]

    numbers = running()
    if not numbers:
        return
    limit = grace + 2 * cfg.heartbeat_interval
    logger.warning(
        "study %r: trial(s) %s are RUNNING; waiting up to %ds for them to finish or for their "
        "heartbeat to go stale (a killed process), so they can be retried",
        cfg.study_name, numbers, limit,
    )  # fmt: skip
    deadline = time.monotonic() + limit
    while numbers and time.monotonic() < deadline:
        time.sleep(min(1.0, cfg.heartbeat_interval / 2))
        numbers = running()
    if numbers:
        logger.warning("study %r: trial(s) %s still running elsewhere; not touching them", cfg.study_name, numbers)


def worker_id() -> str:
    """``<host>:<pid>`` of this process (a trial's ``worker`` user attr)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _fail_orphaned_trials(study: optuna.Study, cfg: StudyConfig) -> list[int]:
    """A storage without heartbeats (journal): mark FAIL the RUNNING trials whose worker
    process (``worker`` user attr) was on this machine and is gone, and queue their retry
    as a stale heartbeat would (``max_retry``). Only the process whose FAIL the storage
    took queues the retry. A recycled pid would keep a dead trial RUNNING (not mistaken
    the other way round)."""
    host = socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner_host, sep, pid = str(t.user_attrs.get(WORKER_ATTR, "")).rpartition(":")
        if not sep or owner_host != host or not pid.isdigit() or _process_alive(int(pid)):
            continue
        try:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError, ValueError):
            continue  # another process failed it first
        frozen = next(x for x in study.get_trials(deepcopy=False) if x.number == t.number)
        with _quiet_experimental():
            _RetryCallback(max_retry=cfg.max_retry)(study, frozen)
        failed.append(t.number)
    if failed:
        logger.warning("study %r: trial(s) %s were RUNNING in processes that are gone; marked FAIL", cfg.study_name, failed)
    return failed


def _fail_dead_trials_now(study: optuna.Study, cfg: StudyConfig) -> None:
    """Without waiting: fail (and queue again) the trials whose heartbeat went stale, or
    whose process is gone (journal)."""
    if _has_heartbeat(cfg):
        with _quiet_experimental():
            optuna.storages.fail_stale_trials(study)
    elif cfg.storage is not None and journal_path(cfg.storage) is not None:
        _fail_orphaned_trials(study, cfg)


def _remove_unneeded_checkpoints(study: optuna.Study, cfg: StudyConfig) -> None:
    """Delete the trial resume directories no RUNNING or WAITING trial will use."""
    root = study_checkpoint_dir(cfg)
    if root is None or not root.is_dir():
        return
    keep = {trial_checkpoint_dir(cfg, t).name for t in study.get_trials(deepcopy=False, states=_PENDING)}
    for path in root.glob("trial_*"):
        if path.name not in keep:
            remove_state(path)


def _remove_finished_checkpoint(cfg: StudyConfig, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Optimize callback: a trial that ended in this process (COMPLETE, PRUNED, or FAIL
    by a caught exception) will not resume; delete its resume directory."""
    if trial.state not in _PENDING:
        remove_state(trial_checkpoint_dir(cfg, trial))


@contextmanager
def _optuna_verbosity(verbose: bool) -> Iterator[None]:
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


def _log_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    logger.debug(
        "trial %d %s: value=%s params=%s", trial.number, trial.state.name, trial.value, trial.params
    )


def finished_trials(study: optuna.Study) -> int:
    """Trials of ``study`` that count toward ``n_trials`` (COMPLETE or PRUNED)."""
    return len(study.get_trials(deepcopy=False, states=_FINISHED))


def _make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps)
    return optuna.pruners.NopPruner()


def _check_direction(study: optuna.Study, cfg: StudyConfig) -> None:
    if study.direction.name.lower() != cfg.direction:
        stored = study.direction.name.lower()
        raise ValueError(f"study {cfg.study_name!r} in storage is {stored}, but {cfg.direction=}")


def run_study(
    objective_fn: Callable[[optuna.Trial], float],
    cfg: StudyConfig,
    *,
    catch: tuple[type[Exception], ...] = (),
    first_params: Mapping[str, Any] | None = None,
) -> optuna.Study:
    """Create or resume ``cfg.study_name`` and run it up to ``cfg.n_trials`` finished trials.

    Uses ``TPESampler(seed=cfg.seed)`` and a ``MedianPruner`` (or none), and
    ``load_if_exists=True``. Trials already finished in storage count toward
    ``n_trials``; calling this again on a complete study runs nothing. With an RDB
    storage, trials of killed processes are failed and retried first (module
    docstring); ``objective_fn`` finds a trial's resume directory with
    :func:`trial_checkpoint_dir`.

    Args:
        objective_fn: maps an ``optuna.Trial`` to its objective value.
        cfg: study settings.
        catch: exception types that fail a trial without stopping the study.
        first_params: Optuna params of a trial to run first in a new (empty) study,
            e.g. the configured defaults, so tuning never ends worse than them.
    """
    storage = _make_storage(cfg)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.n_startup_trials)
    with _optuna_verbosity(cfg.verbose):
        study = optuna.create_study(
            storage=storage,
            sampler=sampler,
            pruner=_make_pruner(cfg),
            study_name=cfg.study_name,
            direction=cfg.direction,
            load_if_exists=True,
        )
        _check_direction(study, cfg)
        if first_params and not study.trials:
            study.enqueue_trial(dict(first_params))
        _fail_dead_trials(study, cfg)  # before counting: a killed trial becomes FAIL + a queued retry
        _remove_unneeded_checkpoints(study, cfg)
        done = finished_trials(study)
        remaining = cfg.n_trials - done
        logger.info(
            "study %r: %d finished trial(s) in storage, running %d more (n_trials=%d)",
            cfg.study_name, done, max(remaining, 0), cfg.n_trials,
        )  # fmt: skip
        callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = [_log_trial]
        if study_checkpoint_dir(cfg) is not None:
            callbacks.append(functools.partial(_remove_finished_checkpoint, cfg))
        # tuning workers may fill the same study meanwhile: stop once it holds n_trials
        callbacks.append(optuna.study.MaxTrialsCallback(cfg.n_trials, states=_FINISHED))
        if remaining > 0:
            with _quiet_experimental():
                study.optimize(
                    objective_fn,
                    n_trials=remaining,
                    timeout=cfg.timeout,
                    catch=catch,
                    callbacks=callbacks,
                )
    return study


def _json_number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def trials_table(study: optuna.Study) -> list[dict[str, Any]]:
    """One JSON-able dict per trial: ``number``, ``state``, ``value``, ``params``,
    ``duration_s``, ``datetime_start`` (ISO text) and ``user_attrs``
    (``pandas.DataFrame(trials_table(study))`` gives a tidy table)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": _json_number(t.value)
                if t.values is not None and len(t.values) == 1
                else None,
                "params": dict(t.params),
                "duration_s": t.duration.total_seconds() if t.duration is not None else None,
                "datetime_start": t.datetime_start.isoformat()
                if t.datetime_start is not None
                else None,
                "user_attrs": dict(t.user_attrs),
            }
        )
    return rows


# ---------------------------------------------------------------- tune


@dataclass
class TuneResult:
    """What :func:`tune` returns.

    Args:
        best_params: the best trial's overrides ``{path: value}`` (decoded).
        best_value: its best validation AUC.
        best_config: ``apply_overrides(base_config, best_params)``.
        study: the Optuna study (``trials_table(study)`` for a report).
        best_model: the best trial's model (best epoch's weights), on the data's
            device, in eval mode.
        best_history: that model's per-epoch history (see ``TrainResult``).
        retrained: True when the best trial ran in an earlier process and its
            model was rebuilt by training its params again.
    """

    best_params: dict[str, Any]
    best_value: float
    best_config: dict[str, Any]
    study: optuna.Study
    best_model: nn.Module
    best_history: list[dict[str, float]]
    retrained: bool


ModelBuilder = Callable[[dict[str, Any], FeatureSpec], nn.Module]


def fit(
    config: Mapping[str, Any],
    spec: FeatureSpec,
    train_data: TensorData,
    valid_data: TensorData,
    builder: ModelBuilder | None = None,
    on_epoch_end: Callable[[int, float], None] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    world: World | None = None,
) -> TrainResult:
    """Build ``config["model"]`` and :func:`train` it with ``config["train"]``.

    The training seed drives everything random: the model's initial weights (the
    model config's ``seed`` is set to it), dropout and the batch order. Two seeds
    therefore differ in both initialisation and batch order; one seed reproduces a
    run exactly on the CPU. ``checkpoint_dir``: the run's resume directory (see
    :func:`train`); a killed run continues from its last completed epoch. ``world``:
    this rank's place in a data-parallel run (see :func:`train`).
    """
    if builder is None:
        from dynamic_ctr.models import build_model as builder
    train_cfg = TrainConfig.from_dict(config["train"])
    seed_everything(train_cfg.seed)
    model = builder(seeded_model_config(config), spec)
    return train(model, train_data, valid_data, train_cfg, on_epoch_end=on_epoch_end, checkpoint_dir=checkpoint_dir, world=world)


#: ``fitter(config, on_epoch_end, checkpoint_dir) -> TrainResult``: how :func:`tune` trains
#: one config, :func:`fit` on the tuned splits by default, or the ranks of a data-parallel
#: run started by the training node (:class:`~dynamic_ctr.training.distributed.LocalRanks`).
Fitter = Callable[[Mapping[str, Any], Callable[[int, float], None] | None, "str | os.PathLike[str] | None"], TrainResult]


def in_process_fitter(spec: FeatureSpec, train_data: TensorData, valid_data: TensorData, builder: ModelBuilder | None = None) -> Fitter:
    """The default :data:`Fitter`: :func:`fit` in this process."""

    def fitter(config: Mapping[str, Any], on_epoch_end: Callable[[int, float], None] | None, checkpoint_dir: Any) -> TrainResult:
        return fit(config, spec, train_data, valid_data, builder, on_epoch_end, checkpoint_dir=checkpoint_dir)

    return fitter


def further_seeds(
    fitter: Fitter,
    best_config: Mapping[str, Any],
    seeds: Sequence[int],
    checkpoint_dirs: Mapping[int, str | os.PathLike[str] | None] | None = None,
) -> dict[int, TrainResult]:
    """The tuned ``best_config`` trained again under each of ``seeds`` (each seed changes
    the initial weights, dropout and the batch order), one ``fitter`` run per seed, with
    its resume directory from ``checkpoint_dirs`` (none when absent)."""
    dirs = checkpoint_dirs or {}
    return {seed: fitter(apply_overrides(best_config, {"train.seed": seed}), None, dirs.get(seed)) for seed in seeds}


def seeded_model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config["model"]`` whose ``seed`` (the initialisation) is the
    training seed."""
    return {**copy.deepcopy(dict(config["model"])), "seed": TrainConfig.from_dict(config["train"]).seed}


def _check_tune_inputs(base_config: Mapping[str, Any], space: Mapping[str, Mapping[str, Any]], study_cfg: StudyConfig) -> None:
    if study_cfg.direction != "maximize":
        raise ValueError(f"{study_cfg.direction=}: tune maximises validation AUC")
    for section in ("model", "train"):
        if not isinstance(base_config.get(section), Mapping):
            raise ValueError(f"base_config[{section!r}] must be a dict")
    validate_space(space)
    # fail on unknown paths before the first trial (value irrelevant: path check only)
    apply_overrides(base_config, {path: None for path in space})


def make_objective(
    base_config: Mapping[str, Any],
    space: Mapping[str, Mapping[str, Any]],
    spec: FeatureSpec,
    train_data: TensorData,
    valid_data: TensorData,
    study_cfg: StudyConfig,
    builder: ModelBuilder | None = None,
    on_result: Callable[[optuna.Trial, TrainResult], None] | None = None,
    fitter: Fitter | None = None,
) -> Callable[[optuna.Trial], float]:
    """The objective of :func:`tune` and :func:`tune_worker` (see :func:`tune`): records
    the trial's ``worker`` (``<host>:<pid>``), draws its overrides, resumes from its
    checkpoint, trains with pruning, records ``best_epoch``, ``history`` and
    ``overrides``, calls ``on_result(trial, result)`` and returns the best validation AUC.
    ``fitter`` trains each config (default: :func:`in_process_fitter`)."""
    if fitter is None:
        fitter = in_process_fitter(spec, train_data, valid_data, builder)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER_ATTR, worker_id())
        overrides = suggest(trial, space)
        config = apply_overrides(base_config, overrides)
        checkpoint = trial_checkpoint_dir(study_cfg, trial)
        if checkpoint is not None:
            retry_of = _retry_of(_frozen(trial))
            manifest = read_manifest(checkpoint)
            resumed = manifest["epoch"] if manifest is not None else 0
            if retry_of is not None:
                trial.set_user_attr("retry_of", retry_of)
            if retry_of is not None or resumed:
                trial.set_user_attr("resumed_from_epoch", resumed)
            if resumed:
                logger.info("trial %d resumes %s after epoch %d", trial.number, checkpoint, resumed)

        def on_epoch_end(epoch: int, val_auc: float) -> None:
            trial.report(val_auc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val_auc={val_auc:.5f} at epoch {epoch}")

        result = fitter(config, on_epoch_end, checkpoint)
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("history", result.history)
        trial.set_user_attr("overrides", overrides)
        if on_result is not None:
            on_result(trial, result)
        return result.best_val_auc

    return objective


def tune(
    base_config: Mapping[str, Any],
    space: Mapping[str, Mapping[str, Any]],
    spec: FeatureSpec,
    train_data: TensorData,
    valid_data: TensorData,
    study_cfg: StudyConfig,
    builder: ModelBuilder | None = None,
    fitter: Fitter | None = None,
) -> TuneResult:
    """Search ``space`` around ``base_config`` and return the best model.

    Each trial: ``overrides = suggest(trial, space)``, ``config =
    apply_overrides(base_config, overrides)``, then :func:`fit` (initial weights, dropout
    and batch order all from ``config["train"]["seed"]``) with an epoch callback
    that reports the validation AUC to the trial (step = epoch) and raises
    ``optuna.TrialPruned`` when the pruner says so. A new study's first trial runs the
    base config itself (:func:`base_params`), so tuning never ends below the defaults. The trial's ``best_epoch``,
    ``history`` and decoded ``overrides`` go into its user attrs. A trial whose
    loss diverges (``NonFiniteLossError``) fails without stopping the study.

    The best model is kept in memory: whenever a trial beats the best value seen
    in this call, a CPU copy of its (best-epoch) state dict is kept. When the
    study's best trial ran in an earlier process (a resumed study), its params are
    trained once more with the same seed to rebuild the model; on CPU this
    reproduces it exactly, on CUDA up to non-deterministic summation order.

    Args:
        base_config: ``{"model": {...}, "train": {...}}``; ``train`` holds
            :class:`TrainConfig` fields.
        space: the search space (module docstring).
        spec: feature spec passed to ``builder``.
        train_data: training split on the device.
        valid_data: validation split on the same device.
        study_cfg: study settings; ``direction`` must be ``"maximize"``.
        builder: ``builder(model_config, spec) -> nn.Module``; ``None`` =
            ``dynamic_ctr.models.build_model``.
        fitter: trains one config (:data:`Fitter`); ``None`` = :func:`fit` in this
            process with ``builder``. A data-parallel fitter holds its own copy of
            the splits and builds with ``build_model``.

    Raises:
        ValueError: bad space or path (before any trial runs), a non-maximising
            study, or a study without any COMPLETE trial.
    """
    if builder is None:
        from dynamic_ctr.models import build_model as builder
    if fitter is None:
        fitter = in_process_fitter(spec, train_data, valid_data, builder)
    _check_tune_inputs(base_config, space, study_cfg)
    best: dict[str, Any] = {"value": -math.inf, "number": None, "state": None, "history": None}

    def keep_best(trial: optuna.Trial, result: TrainResult) -> None:
        if result.best_val_auc > best["value"]:
            best.update(
                value=result.best_val_auc,
                number=trial.number,
                history=result.history,
                state={
                    k: v.detach().to("cpu", copy=True) for k, v in result.model.state_dict().items()
                },
            )

    objective = make_objective(base_config, space, spec, train_data, valid_data, study_cfg, builder, on_result=keep_best, fitter=fitter)
    study = run_study(
        objective, study_cfg, catch=(NonFiniteLossError,), first_params=base_params(base_config, space)
    )
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise ValueError(f"study {study_cfg.study_name!r} has no COMPLETE trial")
    best_trial = study.best_trial
    best_params = decode_params(best_trial.params, space)
    best_config = apply_overrides(base_config, best_params)

    if best["number"] == best_trial.number:
        model = builder(seeded_model_config(best_config), spec)
        model.load_state_dict(best["state"])
        model.to(train_data.device)
        history, retrained = best["history"], False
    else:
        logger.info(
            "best trial %d ran in an earlier process; retraining its params once", best_trial.number
        )
        root = study_checkpoint_dir(study_cfg)
        checkpoint = None if root is None else root / f"best_trial_{best_trial.number}"
        result = fitter(best_config, None, checkpoint)
        remove_state(checkpoint)
        model, history, retrained = result.model, result.history, True
        if not math.isclose(result.best_val_auc, best_trial.value, abs_tol=1e-4):
            logger.warning(
                "retrained best trial %d reached val_auc=%.5f, the study recorded %.5f",
                best_trial.number, result.best_val_auc, best_trial.value,
            )  # fmt: skip
    return TuneResult(
        best_params=best_params,
        best_value=float(best_trial.value),
        best_config=best_config,
        study=study,
        best_model=model.eval(),
        best_history=history,
        retrained=retrained,
    )


# ---------------------------------------------------------------- workers


def _index_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:4], "big")


def planned_params(
    base_config: Mapping[str, Any], space: Mapping[str, Mapping[str, Any]], seed: int, index: int
) -> dict[str, Any]:
    """The Optuna params of planned trial ``index`` of a worker study.

    Drawn by a ``RandomSampler`` seeded with ``(seed, index)`` alone, so they depend on
    nothing that happened in the study; index 0 takes the base config's values where they
    lie inside the space (:func:`base_params`), as :func:`tune`'s first trial does.
    """
    validate_space(space)
    with _optuna_verbosity(False):
        draw = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=_index_seed(seed, index)))
    if index == 0:
        draw.enqueue_trial(base_params(base_config, space))
    trial = draw.ask()
    suggest(trial, space)
    return dict(trial.params)


def _params_key(params: Mapping[str, Any]) -> str:
    return json.dumps(dict(params), sort_keys=True, default=str)


def _top_up(study: optuna.Study, cfg: StudyConfig, plan: Callable[[int], dict[str, Any]]) -> int:
    """Queue planned trials until the study's finished, running and queued trials
    together number ``cfg.n_trials``; returns how many were queued.

    Planned indices already in the study are skipped (a failed one would fail again),
    and so are params some trial already has (e.g. the base config, run first by a
    ``kedro run`` that began the study). At most ``2 * n_trials`` planned indices are
    ever used, so a study whose trials keep failing ends.
    """
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}

    def retry_due(t: optuna.trial.FrozenTrial) -> bool:
        """A FAIL trial of a killed worker whose retry is being queued (by the process
        that failed it) but is not there yet: counted, so no replacement races it."""
        if t.state != optuna.trial.TrialState.FAIL or ERROR_ATTR in t.user_attrs or t.number in retried:
            return False
        return cfg.max_retry is None or len(t.system_attrs.get("retry_history", [])) < cfg.max_retry

    live = sum(t.state in (*_FINISHED, *_PENDING) or retry_due(t) for t in trials)
    need = cfg.n_trials - live
    if need <= 0:
        return 0
    used = {t.user_attrs.get(PLANNED_ATTR) for t in trials}
    seen = {_params_key(t.system_attrs.get("fixed_params", t.params)) for t in trials}
    added, index = 0, 0
    while added < need and index < 2 * cfg.n_trials:
        if index not in used:
            params = plan(index)
            if _params_key(params) not in seen:
                study.enqueue_trial(params, user_attrs={PLANNED_ATTR: index})
                seen.add(_params_key(params))
                added += 1
        index += 1
    if added:
        logger.info("study %r: queued %d planned trial(s)", cfg.study_name, added)
    return added


def _open_worker_study(
    cfg: StudyConfig, plan: Callable[[int], dict[str, Any]], plan_wait: float
) -> optuna.Study:
    """Create the study and queue its planned trials, or load it once its creator has
    queued them (the study user attr ``worker_plan``). Creating a study is atomic in
    the storage, so exactly one of N workers started at once queues the plan."""
    storage = _make_storage(cfg, queued_only=True)
    if storage is None:
        raise ValueError(f"study {cfg.study_name!r}: tuning workers need a shared storage (StudyConfig.storage)")
    kwargs = {
        "storage": storage,
        "study_name": cfg.study_name,
        # never consulted: every trial a worker takes was queued with all its params
        "sampler": optuna.samplers.RandomSampler(seed=cfg.seed),
        "pruner": _make_pruner(cfg),
    }
    try:
        study = optuna.create_study(direction=cfg.direction, load_if_exists=False, **kwargs)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**kwargs)
        _check_direction(study, cfg)
        deadline = time.monotonic() + plan_wait
        while PLAN_ATTR not in study.user_attrs:
            if any(PLANNED_ATTR not in t.user_attrs for t in study.get_trials(deepcopy=False)):
                logger.info("study %r was begun by a single-process run; topping it up with planned trials", cfg.study_name)
                break
            if time.monotonic() > deadline:
                logger.warning("study %r: its creator queued no plan within %.0fs; topping it up", cfg.study_name, plan_wait)
                break
            time.sleep(0.2)
        _top_up(study, cfg, plan)  # the plan may now ask for more trials than when the study began
        return study
    _top_up(study, cfg, plan)
    study.set_user_attr(PLAN_ATTR, {"n_trials": cfg.n_trials, "seed": cfg.seed})
    return study


def run_worker(
    objective_fn: Callable[[optuna.Trial], float],
    cfg: StudyConfig,
    plan: Callable[[int], dict[str, Any]],
    *,
    catch: tuple[type[Exception], ...] = (),
    poll_interval: float = 1.0,
    plan_wait: float = 60.0,
) -> optuna.Study:
    """Run queued trials of ``cfg.study_name`` until the study holds ``cfg.n_trials``
    finished (COMPLETE or PRUNED) trials, counting every worker's (module docstring).

    The first worker creates the study and queues ``plan(0) ... plan(n_trials - 1)``
    (``plan(i)``: Optuna params of planned trial ``i``, e.g. :func:`planned_params`).
    Then, in a loop: fail the trials of dead workers (stale heartbeat; journal: process
    gone), which queues their retries; stop if the study holds ``n_trials`` finished
    trials or ``cfg.timeout`` seconds have passed; else take a queued trial and run it.
    With nothing queued, it queues replacements for failed trials, or waits
    (``poll_interval``) while trials run elsewhere: they finish, or their worker died
    and they come back as retries. It also stops when nothing is queued or running and
    no planned trial is left (every one failed). A trial interrupted in this process
    (Ctrl-C, or SIGTERM made into ``KeyboardInterrupt`` as the worker command does) is
    FAIL and queued again before the interrupt propagates.

    Args:
        objective_fn: maps an ``optuna.Trial`` to its objective value.
        cfg: study settings; ``storage`` is required (shared by the workers).
        plan: ``index -> params`` of the planned trials; must be the same in every worker.
        catch: exception types that fail a trial without stopping the worker.
        poll_interval: seconds between looks at the study while waiting.
        plan_wait: longest wait (s) for the study's creator to queue its plan.
    """
    with _optuna_verbosity(cfg.verbose):
        study = _open_worker_study(cfg, plan, plan_wait)
        _remove_unneeded_checkpoints(study, cfg)
        current: dict[str, int | None] = {"number": None}

        def objective(trial: optuna.Trial) -> float:
            current["number"] = trial.number
            try:
                return objective_fn(trial)
            except optuna.TrialPruned:
                raise
            except Exception as e:  # FAIL for good: replaced by the next planned trial, not retried
                trial.set_user_attr(ERROR_ATTR, repr(e)[:1000])
                raise

        ended: list[optuna.trial.FrozenTrial] = []
        callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = [_log_trial, lambda s, t: ended.append(t)]
        if study_checkpoint_dir(cfg) is not None:
            callbacks.append(functools.partial(_remove_finished_checkpoint, cfg))
        deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout
        waiting_logged = False
        while True:
            _fail_dead_trials_now(study, cfg)
            done = finished_trials(study)
            if done >= cfg.n_trials:
                logger.info("study %r holds %d finished trial(s) (n_trials=%d): done", cfg.study_name, done, cfg.n_trials)
                break
            if deadline is not None and time.monotonic() > deadline:
                logger.warning("study %r: timeout=%ss reached with %d of %d trial(s) finished", cfg.study_name, cfg.timeout, done, cfg.n_trials)
                break
            try:
                with _quiet_experimental():
                    study.optimize(objective, n_trials=1, catch=catch, callbacks=callbacks)
            except QueueEmpty:
                pass
            except KeyboardInterrupt:
                _requeue_interrupted(study, cfg, current["number"])
                raise
            else:
                waiting_logged = False
                if ended and ended[-1].state == optuna.trial.TrialState.FAIL:
                    _top_up(study, cfg, plan)  # a diverging trial: queue the next planned one
                continue
            if _top_up(study, cfg, plan):
                continue
            running = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
            if not running:
                logger.warning(
                    "study %r: %d of %d trial(s) finished, nothing queued or running, and no planned trial left",
                    cfg.study_name, done, cfg.n_trials,
                )  # fmt: skip
                break
            if not waiting_logged:
                logger.info("study %r: nothing queued; waiting for trial(s) %s running elsewhere", cfg.study_name, running)
                waiting_logged = True
            time.sleep(poll_interval)
    return study


def _requeue_interrupted(study: optuna.Study, cfg: StudyConfig, number: int | None) -> None:
    """Queue again (same params, ``max_retry``) the trial this process was running when
    interrupted; Optuna has already marked it FAIL."""
    if number is None:
        return
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if trial is None or trial.state != optuna.trial.TrialState.FAIL:
        return
    with _quiet_experimental():
        _RetryCallback(max_retry=cfg.max_retry)(study, trial)
    logger.warning("study %r: trial %d interrupted; queued again", cfg.study_name, number)


def tune_worker(
    base_config: Mapping[str, Any],
    space: Mapping[str, Mapping[str, Any]],
    spec: FeatureSpec,
    train_data: TensorData,
    valid_data: TensorData,
    study_cfg: StudyConfig,
    builder: ModelBuilder | None = None,
    *,
    poll_interval: float = 1.0,
) -> optuna.Study:
    """One tuning worker of the study ``study_cfg.study_name`` (module docstring): the
    trials of :func:`tune` (same objective, resume directories and pruning), but only
    planned ones (:func:`planned_params` with ``study_cfg.seed``), shared with every other
    worker through ``study_cfg.storage``, until the study holds ``n_trials`` finished
    trials. Returns the study; the best model is not kept (the training node retrains
    the best trial's params when it finds the study complete).
    """
    _check_tune_inputs(base_config, space, study_cfg)
    if study_cfg.storage is None:
        raise ValueError("tune_worker needs study_cfg.storage: the storage the workers share")
    objective = make_objective(base_config, space, spec, train_data, valid_data, study_cfg, builder)
    plan = functools.partial(planned_params, base_config, space, study_cfg.seed)
    return run_worker(objective, study_cfg, plan, catch=(NonFiniteLossError,), poll_interval=poll_interval)
