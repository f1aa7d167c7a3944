"""Project hooks: one retraining cycle (or rollback) at a time per champion."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

#: Runs holding any of these nodes change the champion, so they take the lock.
CHAMPION_WRITERS = frozenset({"crown", "roll_back"})


class ChampionLockError(RuntimeError):
    """Another run is changing the same champion."""


class ChampionLock:
    """An exclusive ``flock`` on ``<champion folder>/.lock`` for every run that writes
    ``retrain.champion``: a second cycle started while one runs fails at once, before
    reading anything, naming the holder's pid, so two runs never interleave their
    versions of the champion. The kernel drops the lock when its process dies, so a
    run killed with ``kill -9`` never leaves a stale lock behind."""

    def __init__(self) -> None:
        self._handle: Any = None

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        if not CHAMPION_WRITERS & {n.name for n in pipeline.nodes}:
            return
        folder = Path(str(catalog.get("retrain.champion")._describe()["filepath"]))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ".lock"
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the whole run)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ChampionLockError(f"{path} is held by another run ({holder}); nothing was read or written: retry when it ends") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, session {run_params.get('session_id')}\n")
        handle.flush()
        self._handle = handle

    def _release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    @hook_impl
    def after_pipeline_run(self, *args: Any, **kwargs: Any) -> None:
        self._release()

    @hook_impl
    def on_pipeline_error(self, *args: Any, **kwargs: Any) -> None:
        self._release()
