"""Data-parallel training: ``torch.distributed`` + ``DistributedDataParallel``; NCCL with
one GPU per process, gloo on CPUs.

Two ways in:

- **The training node** (``kedro run --params training.data_parallel.ranks=W``):
  :class:`LocalRanks` starts ``W`` ranks on this machine once per variant and trains every
  trial and seed on them, while Optuna and the catalog stay in the node's process.
- **A command beside Kedro**, launched by ``torchrun`` on one or several machines
  (:func:`main`), for one config on an encoded split read by path.

Launch (one machine, two processes; ``--standalone`` picks a free rendezvous port)::

    torchrun --standalone --nproc_per_node=2 -m dynamic_ctr.training.distributed \\
        --config wdl.json --data data/05_model_input/movielens_latest \\
        --out data/06_models/movielens_latest/wdl_ddp [--device auto] [--version V]

``--config`` is a JSON file ``{"model": {...}, "train": {...}}`` (a model config for
:func:`~dynamic_ctr.models.build_model` and :class:`~dynamic_ctr.training.loop.TrainConfig`
fields, as in the suite's parameters); ``train.batch_size`` is the **global** batch.
``--data`` is an encoded split as the pipeline writes it, ``<dir>/{train,valid}.parquet``
and ``<dir>/feature_spec.json``, each a file or a Kedro version folder
(``train.parquet/<version>/train.parquet``, a file or, from the streaming environments,
a folder of Parquet parts); the newest version that all three have is read unless
``--version`` names one. ``--row-groups BUFFER_ROWS`` reads the training split by row
group instead of into memory, each rank only its own row groups (*Row groups* below). Rank 0 writes ``<out>/model/`` (a checkpoint,
:func:`~dynamic_ctr.training.checkpoint.save_checkpoint`) and ``<out>/metrics.json``; the
other ranks write nothing. Without ``torchrun`` (``WORLD_SIZE`` unset or 1) the same
command trains in one process.

In code::

    with distributed("auto") as world:          # a no-op World(size=1) without torchrun
        tr, va = ...                            # the whole splits, on world.device
        result = train(model, tr, va, cfg, world=world)
        if world.is_main:
            save_checkpoint(result.model, out)

**Global batch -> ranks.** Every rank holds the whole training split (CTR rows are a few
int64 slots: a split fits on each device, see :mod:`~dynamic_ctr.training.batching`) and
draws the *same* seeded permutation each epoch as a single process would
(``batches(shuffle=True)`` with the generator of ``cfg.seed``). Each global batch of
``cfg.batch_size`` rows is cut into ``W`` contiguous slices (:func:`shard`), rank ``r``
taking slice ``r``: the ranks together see exactly the rows one process sees in that
step. A rank's shard of the split is therefore its slice of every global batch, not a
fixed set of rows: a fixed row partition shuffled per rank would change which rows meet
in a batch, so the run could not equal a single-process one. ``cfg.batch_size`` must be
divisible by ``W``. (With :class:`LocalRanks` the split's tensors sit in shared memory:
one copy per machine, whatever ``W``.)

**Row groups.** A split too large for memory
(:class:`~dynamic_ctr.training.batching.RowGroupData`) is sharded instead: each rank reads
only every ``W``-th row group of the epoch's seeded order, through its own shuffle buffer,
in micro-batches of ``B/W`` rows, and all ranks take the smallest shard's number of steps
(:meth:`~dynamic_ctr.training.batching.RowGroupData.batches`). The batches then differ from
a single-process run's, as with any sharded sampler.

**Gradients.** The model is wrapped in DDP (CPU: no ``device_ids``), which averages the
gradients over the ranks during backward. With equal micro-batches of ``B/W`` rows, the
average of the ranks' mean losses is the mean over the global batch, so every step is
the single-process step up to floating point summation order. The last, smaller global
batch of ``R`` rows is split into slices that differ by at most one row (``b_r``); each
rank scales its loss by ``W * b_r / R``, so the average is again the mean over the ``R``
rows. If ``R < W`` (a rank would get no row) those ``R`` rows are skipped by every rank,
that epoch only (the next permutation puts them elsewhere). A model-supplied
``penalty()`` is part of each rank's loss (scaled alike) and so averaged by DDP: exact for
penalties of the parameters alone (DynInt ``dgp``: the scales average to 1) and for
batch means (DynInt ``dwp``); AdaSparse's sparsity regulariser, non-linear in the batch's
retention ratio, becomes the mean of its per-micro-batch values.

**Validation and early stopping.** Rank 0's buffers are broadcast first (see *Not
exact*), then each rank scores its contiguous shard of the validation split; the
probabilities are all-gathered in row order, so every rank computes the same AUC
and log loss from the same array and takes the same early-stopping decision. The logged training losses are all-reduced too (every rank raises
``NonFiniteLossError`` at the same step, and ``history`` holds the global-batch means).
Every rank returns the same :class:`~dynamic_ctr.training.loop.TrainResult` (identical
weights, history, best epoch); only rank 0 writes files.

**Not exact.** Dropout draws from ``cfg.seed + rank`` (independent masks per rank, not
the single-process masks). BatchNorm normalises each rank's micro-batch, and buffers
(its running statistics) are broadcast from rank 0 before every training forward (DDP's
``broadcast_buffers``) and before each validation, so they follow rank 0's
micro-batches; a warning is logged for models with BatchNorm. The replicas stay
identical either way.

**Refused** (a ``ValueError`` naming the model, before any communication): models with
``meta_loss``/``adapt`` hooks (MAML: the loss bypasses the DDP forward and its inner step
needs the per-domain support rows of the whole batch); parameters with sparse gradients
(STAR's per-domain weights, role ``domain``, read with ``F.embedding(sparse=True)`` and
updated by LazyAdam; also ``nn.Embedding(sparse=True)``: DDP fails on the former and
NCCL has no sparse all-reduce); ``checkpoint_dir`` (per-epoch resume state); a global
batch not divisible by ``W``.

Needs torch only; the entry point (:func:`main`) imports pandas to read Parquet.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from dynamic_ctr.training.batching import TensorData, batches
from dynamic_ctr.training.device import resolve_device
from dynamic_ctr.training.metrics import evaluate

__all__ = [
    "LocalRanks",
    "RankFailure",
    "World",
    "destroy",
    "distributed",
    "init_from_env",
    "is_main",
    "load_split",
    "main",
    "shard",
]

logger = logging.getLogger(__name__)


def _bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``rank``: ``W`` contiguous slices whose sizes
    differ by at most one, the larger ones first (``torch.tensor_split``'s rule)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"{rank=} must be in [0, {world_size=})")
    size, extra = divmod(n, world_size)
    start = rank * size + min(rank, extra)
    return start, start + size + (rank < extra)


def shard(data: TensorData, rank: int, world_size: int) -> TensorData:
    """Rank ``rank``'s contiguous slice of ``data``'s rows (views, no copy; groups too).

    The ``W`` slices cover every row once, in order, and differ in size by at most one
    row (the first ``N mod W`` ranks hold one more). Applied to every global batch by
    :meth:`World.batches` and to the validation split by :meth:`World.evaluate`.
    """
    start, stop = _bounds(len(data), rank, world_size)
    return TensorData(
        x=data.x[start:stop],
        y=data.y[start:stop],
        groups={k: v[start:stop] for k, v in data.groups.items()},
    )


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run (``size == 1``: a single process,
    no process group; :func:`~dynamic_ctr.training.loop.train` then takes its usual path).

    Args:
        rank: global rank, 0 .. size-1.
        size: number of processes (``WORLD_SIZE``).
        local_rank: rank on this machine (``LOCAL_RANK``): the CUDA device index.
        device: where this rank trains (``cuda:<local_rank>`` with NCCL).
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (no process group).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs progress and writes files."""
        return self.rank == 0

    # ------------------------------------------------------------------ training

    def check_supported(self, model: nn.Module, batch_size: int, checkpoint_dir: Any) -> None:
        """Refuse what data-parallel training does not do (module docstring), naming the
        model; called by ``train`` before any communication."""
        from dynamic_ctr.training.loop import LAZY_ROLE, parameter_roles

        name = type(model).__name__
        hooks = [h for h in ("meta_loss", "adapt") if callable(getattr(model, h, None))]
        if hooks:
            raise ValueError(
                f"model {name} defines {' and '.join(hooks)} (its own training objective / "
                "adaptation, e.g. first-order MAML): distributed training supports neither, "
                "since the loss bypasses the DDP forward and the inner step needs the whole "
                "batch; train it in one process"
            )
        roles = parameter_roles(model)
        sparse = [n for n, p in model.named_parameters() if roles.get(id(p)) == LAZY_ROLE]
        sparse += [
            f"{n}.weight"
            for n, m in model.named_modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
        ]
        if sparse:
            raise ValueError(
                f"model {name} has parameters with sparse gradients {sparse[:4]}"
                f"{' ...' if len(sparse) > 4 else ''} (e.g. STAR's per-domain weights, "
                "role 'domain'): DDP cannot all-reduce them (NCCL has no sparse all-reduce); "
                "train it in one process (MMoE: or set mmoe.lazy_domains: false)"
            )
        if checkpoint_dir is not None:
            raise ValueError(
                "checkpoint_dir (per-epoch resume state) is not supported in distributed training"
            )
        if batch_size % self.size:
            raise ValueError(
                f"batch_size={batch_size} (the global batch) must be divisible by the "
                f"world size {self.size}, so every rank's micro-batch has batch_size/{self.size} rows"
            )
        if self.is_main and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
        ):
            logger.warning(
                "model %s has BatchNorm: each rank normalises its own micro-batch of %d rows and the "
                "running statistics follow rank 0's, so the run differs from a single-process one",
                name, batch_size // self.size,
            )  # fmt: skip

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` (already on ``self.device``) in ``DistributedDataParallel``: rank 0's
        parameters and buffers are broadcast now, gradients averaged in every backward."""
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def num_batches(self, n: int, batch_size: int) -> int:
        """Steps per epoch: the full global batches, and the last one if it has at least
        one row per rank."""
        return n // batch_size + (n % batch_size >= self.size)

    def batches(
        self, data: TensorData, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor, float]]:
        """This rank's slices ``(x (b, S), y (b,), rows)`` of the shuffled global batches
        of ``batch_size`` rows that a single process draws with ``generator``.

        ``rows = R / W`` for a global batch of ``R`` rows: the rows this rank's mean loss
        stands for. The training loop scales the loss by ``b / rows`` (1 on every full
        batch) so that DDP's average is the mean over the ``R`` rows. A last global batch
        with fewer rows than ranks is skipped (module docstring).
        """
        for xb, yb in batches(data, batch_size, shuffle=True, generator=generator):
            rows = len(yb)
            if rows < self.size:
                continue
            start, stop = _bounds(rows, self.rank, self.size)
            yield xb[start:stop], yb[start:stop], rows / self.size

    def mean(self, t: Tensor) -> Tensor:
        """The mean of ``t`` over the ranks (a new tensor; identical on every rank)."""
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.size

    def sum(self, t: Tensor) -> Tensor:
        """The sum of ``t`` over the ranks (a new tensor; identical on every rank)."""
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def sync_buffers(self, model: nn.Module) -> None:
        """Overwrite every buffer of ``model`` with rank 0's (in place)."""
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)

    def evaluate(
        self,
        model: nn.Module,
        data: TensorData,
        batch_size: int,
        *,
        autocast_dtype: torch.dtype | None = None,
    ) -> np.ndarray:
        """Click probabilities on every row of ``data``, in row order, identical on every
        rank: each rank scores its :func:`shard`, then the shards are all-gathered.

        First, rank 0's buffers are broadcast (:meth:`sync_buffers`): DDP broadcasts them
        at the start of each training forward, but the forward then updates every rank's
        own (BatchNorm's running statistics), so after an epoch's last step they differ.
        """
        self.sync_buffers(model)
        part = torch.from_numpy(
            evaluate(
                model, shard(data, self.rank, self.size), batch_size, autocast_dtype=autocast_dtype
            )
        ).to(self.device)  # (n_r,) float64
        width = -(-len(data) // self.size)
        padded = torch.zeros(width, dtype=torch.float64, device=self.device)
        padded[: len(part)] = part  # all_gather wants equal sizes
        gathered = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(gathered, padded)
        sizes = [
            stop - start
            for start, stop in (_bounds(len(data), r, self.size) for r in range(self.size))
        ]
        return torch.cat([g[:n] for g, n in zip(gathered, sizes, strict=True)]).cpu().numpy()


# ---------------------------------------------------------------------- process group


def init_from_env(device: str = "auto") -> World:
    """Join the process group ``torchrun`` describes in the environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (``MASTER_ADDR``/``MASTER_PORT`` are
    read by ``init_process_group``'s ``env://``). ``device`` is resolved by
    :func:`~dynamic_ctr.training.device.resolve_device`; CUDA means ``cuda:<LOCAL_RANK>``
    and the NCCL backend (an index in ``device`` is ignored), anything else gloo.
    Without ``torchrun`` (``WORLD_SIZE`` unset or 1) no group is created: ``World(size=1)``
    on the resolved device.

    Raises:
        ValueError: an environment variable is malformed, or ``LOCAL_RANK`` names a GPU
            this machine does not have.
    """
    resolved = resolve_device(device)
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return World(device=resolved)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"torchrun environment incomplete or malformed ({type(e).__name__}: {e})"
        ) from None
    if resolved.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s)"
            )
        resolved, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(resolved)
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size)
    logger.info(
        "rank %d/%d (local %d) joined the %s group on %s", rank, size, local_rank, backend, resolved
    )
    return World(rank=rank, size=size, local_rank=local_rank, device=resolved, backend=backend)


def destroy() -> None:
    """Leave the process group (nothing happens when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0, and in a process that belongs to no process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextmanager
def distributed(device: str = "auto") -> Iterator[World]:
    """:func:`init_from_env` for the block, then :func:`destroy` (also on an exception)."""
    world = init_from_env(device)
    try:
        yield world
    finally:
        if world.size > 1:
            destroy()


# ---------------------------------------------------------------------- ranks of the training node


class RankFailure(RuntimeError):
    """A rank of :class:`LocalRanks` died, or raised an error that cannot be sent back."""


class _Stopped(Exception):
    """Raised on every rank when the coordinator's epoch callback stopped the run."""


def _describe(error: BaseException, rank: int) -> tuple[str, str, str, str]:
    """What crosses back from a rank: ``(module, class name, message, traceback)``."""
    import traceback

    kind = type(error)
    return kind.__module__, kind.__qualname__, str(error), f"(raised on rank {rank} of the data-parallel run)\n" + "".join(
        traceback.format_exception(error)
    )


def _rebuilt(module: str, name: str, message: str, text: str) -> BaseException:
    """A rank's error raised again here: the same class when it is a built-in one or this
    project's (built from its message, the rank's traceback as a note), else a
    :class:`RankFailure` carrying the traceback."""
    import importlib

    error: BaseException | None = None
    if module == "builtins" or module.split(".")[0] == "dynamic_ctr":
        kind = getattr(importlib.import_module(module), name, None)
        if isinstance(kind, type) and issubclass(kind, Exception):
            try:
                error = kind(message)
            except Exception:  # noqa: BLE001 - a class that cannot be built from its message
                error = None
    if error is None:
        return RankFailure(f"{module}.{name}: {message}\n{text}")
    error.add_note(text)
    return error


def _rank_loop(
    rank: int, size: int, store: str, device_name: str, spec: Any, train: Any, valid: TensorData,
    threads: int, commands: Any, results: Any,
) -> None:  # fmt: skip
    """One rank of :class:`LocalRanks`: join the group, then train each config sent on
    ``commands`` (``None`` ends) with :func:`~dynamic_ctr.training.tuning.fit`."""
    import dataclasses

    from dynamic_ctr.training.tuning import fit

    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(name)s %(levelname)s: %(message)s")
    torch.set_num_threads(threads)
    device = resolve_device(device_name)
    backend = "gloo"
    if device.type == "cuda":
        device, backend = torch.device("cuda", rank), "nccl"
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=size)
    world = World(rank=rank, size=size, local_rank=rank, device=device, backend=backend)
    if isinstance(train, TensorData):
        train = train.to(device)
    else:  # RowGroupData: this rank reads its own row groups onto its device
        train = dataclasses.replace(train, device=device)
    valid = valid.to(device)

    def on_epoch_end(epoch: int, val_auc: float) -> None:
        # every rank gets here with the same val_auc; rank 0 asks the coordinator
        stop = torch.zeros(1, dtype=torch.int64, device=device)
        if world.is_main:
            results.put(("epoch", epoch, val_auc))
            stop.fill_(int(commands.get() == "stop"))
        dist.broadcast(stop, src=0)
        if stop.item():
            raise _Stopped

    try:
        while (config := commands.get()) is not None:
            try:
                result = fit(config, spec, train, valid, on_epoch_end=on_epoch_end, world=world)
            except _Stopped:
                if world.is_main:
                    results.put(("stopped",))
                continue
            except Exception as e:  # noqa: BLE001 - the coordinator stops every rank on the first error
                results.put(("error", *_describe(e, rank)))
                return
            if world.is_main:
                state = {k: v.detach().to("cpu", copy=True) for k, v in result.model.state_dict().items()}
                results.put(("done", state, result.history, result.best_val_auc, result.best_epoch))
    finally:
        with suppress(Exception):  # a broken group (a rank died) may fail to tear down
            dist.destroy_process_group()


class LocalRanks:
    """``size`` data-parallel ranks on this machine, started once and kept for many
    trainings: the training node's way to train every trial and seed of a variant
    with DDP (``training.data_parallel.ranks``) while Optuna, the callbacks and the
    catalog stay in the node's process.

    The ranks are processes started with ``torch.multiprocessing`` (``spawn``) that
    join one process group through a file store (gloo on CPUs, NCCL with one GPU per
    rank, ``cuda:<rank>``), as ``torchrun --standalone`` would start them. The splits
    are handed over once, when the ranks start: an in-memory split's CPU tensors move
    to shared memory, so the machine holds one copy that every rank reads its slices
    from (:meth:`World.batches`); a :class:`~dynamic_ctr.training.batching.RowGroupData`
    split is only its list of files, and each rank reads its own row groups. :meth:`fit`
    is the :data:`~dynamic_ctr.training.tuning.Fitter` of :func:`~dynamic_ctr.training.tuning.tune`:
    it sends the config to every rank, runs the caller's ``on_epoch_end`` here on rank
    0's validation AUC (an Optuna pruning decision reaches every rank by broadcast) and
    returns rank 0's model. On CPUs each rank uses ``cpu_count // size`` threads.

    A rank that raises or dies stops all of them (the others would wait in a
    collective): :meth:`fit` raises the rank's error (or :class:`RankFailure`), and the
    next :meth:`fit` starts a fresh set. Use it as a context manager; :meth:`close` ends
    the ranks.

    Args:
        size: number of ranks, at least 2.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (resolved by each rank; on CUDA the
            machine needs ``size`` GPUs).
        spec: the feature spec the models are built for (``build_model``).
        train: the training split, on the CPU, or a ``RowGroupData``.
        valid: the validation split, on the CPU.
    """

    def __init__(self, size: int, device: str, spec: Any, train: Any, valid: TensorData) -> None:
        if size < 2:
            raise ValueError(f"LocalRanks needs at least 2 ranks, got {size}")
        if resolve_device(device).type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(f"{size} data-parallel ranks need {size} GPUs; this machine has {torch.cuda.device_count()}")
        self.size, self.device, self.spec, self.train, self.valid = size, device, spec, train, valid
        self._processes: list[Any] | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the ranks (done by the first :meth:`fit`)."""
        import tempfile

        import torch.multiprocessing as mp

        context = mp.get_context("spawn")
        self._store_dir = tempfile.mkdtemp(prefix="dynamic-ctr-ranks-")
        store = os.path.join(self._store_dir, "store")
        self._commands = [context.SimpleQueue() for _ in range(self.size)]
        self._results = context.Queue()
        threads = max(1, (os.cpu_count() or 1) // self.size)
        self._processes = [
            context.Process(
                target=_rank_loop,
                args=(r, self.size, store, self.device, self.spec, self.train, self.valid, threads, self._commands[r], self._results),
                name=f"dynamic-ctr-rank-{r}",
                daemon=True,
            )
            for r in range(self.size)
        ]
        for process in self._processes:
            process.start()
        logger.info("started %d data-parallel ranks on %s", self.size, self.device)

    def close(self) -> None:
        """End the ranks: ask them to stop, then kill what is left after 30 s."""
        import shutil

        if self._processes is None:
            return
        for process, commands in zip(self._processes, self._commands, strict=True):
            if process.is_alive():
                commands.put(None)
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
        self._processes = None
        shutil.rmtree(self._store_dir, ignore_errors=True)

    def _fail(self, error: BaseException) -> None:
        for process in self._processes or []:
            if process.is_alive():
                process.kill()
        self.close()
        raise error

    def _receive(self) -> tuple[Any, ...]:
        import queue

        while True:
            try:
                return self._results.get(timeout=1.0)
            except queue.Empty:
                if any(p.exitcode is not None for p in self._processes or []):
                    time.sleep(2)  # the others fail in their next collective: name every rank's end
                    self._fail(RankFailure(f"a data-parallel rank ended during training: {self._ends()}"))

    def _ends(self) -> str:
        """How each rank stands: running, or its exit code (and signal)."""
        return ", ".join(
            f"rank {r} {'is still running' if p.exitcode is None else f'exited with code {p.exitcode}'}"
            + (f" ({signal.Signals(-p.exitcode).name})" if (p.exitcode or 0) < 0 else "")
            for r, p in enumerate(self._processes or [])
        )

    def _explained(self, error: BaseException) -> BaseException:
        """A rank's error; when another rank was killed (a signal), the kill is the cause
        and the error (a broken connection, typically) only its consequence."""
        time.sleep(1)
        if any((p.exitcode or 0) < 0 for p in self._processes or []):
            failure = RankFailure(f"a data-parallel rank was killed during training: {self._ends()}")
            failure.__cause__ = error
            return failure
        return error

    def fit(self, config: dict[str, Any], on_epoch_end: Any = None, checkpoint_dir: Any = None) -> Any:
        """Train ``config`` (``{"model", "train"}``) on every rank; rank 0's
        :class:`~dynamic_ctr.training.loop.TrainResult`, its model rebuilt here (CPU).

        Raises:
            ValueError: ``checkpoint_dir`` is given (see :meth:`World.check_supported`).
            RankFailure: a rank died.
            Exception: whatever a rank or ``on_epoch_end`` raised (e.g. ``optuna.TrialPruned``).
        """
        from dynamic_ctr.models import build_model
        from dynamic_ctr.training.loop import TrainResult
        from dynamic_ctr.training.tuning import seeded_model_config

        if checkpoint_dir is not None:
            raise ValueError("checkpoint_dir (per-epoch resume state) is not supported in distributed training")
        if self._processes is None:
            self.start()
        for commands in self._commands:
            commands.put(config)
        stopped: BaseException | None = None
        while True:
            message = self._receive()
            if message[0] == "epoch":
                reply = "go"
                if on_epoch_end is not None:
                    try:
                        on_epoch_end(message[1], message[2])
                    except BaseException as e:  # noqa: BLE001 - e.g. optuna.TrialPruned: every rank stops, then it is raised
                        stopped, reply = e, "stop"
                self._commands[0].put(reply)
            elif message[0] == "stopped":
                assert stopped is not None
                raise stopped
            elif message[0] == "error":
                self._fail(self._explained(_rebuilt(*message[1:])))
            else:
                _, state, history, best_val_auc, best_epoch = message
                model = build_model(seeded_model_config(config), self.spec)
                model.load_state_dict({k: v.clone() for k, v in state.items()})
                return TrainResult(best_val_auc=best_val_auc, best_epoch=best_epoch, history=history, model=model)


# ---------------------------------------------------------------------- entry point

_SPLIT_FILES = ("train.parquet", "valid.parquet", "feature_spec.json")


def _resolve_paths(directory: Path, version: str | None) -> dict[str, Path]:
    """``{file name: path}`` of the split's three files: a plain file, or the chosen
    version inside a Kedro version folder ``<name>/<version>/<name>``."""
    from dynamic_ctr.io.layout import is_parts_folder

    versions: dict[str, set[str]] = {}
    for name in _SPLIT_FILES:
        path = directory / name
        if path.is_dir() and not is_parts_folder(path):  # a version holds a file or a parts folder
            versions[name] = {p.name for p in path.iterdir() if (p / name).is_file() or is_parts_folder(p / name)}
        elif not (path.is_file() or is_parts_folder(path)):
            raise FileNotFoundError(f"{path}: no such file or Kedro version folder")
    if versions:
        common = set.intersection(*versions.values())
        if version is None:
            if not common:
                raise FileNotFoundError(f"{directory}: no version common to {sorted(versions)}")
            version = max(common)  # Kedro's version strings sort in time order
        elif version not in common:
            raise FileNotFoundError(
                f"{directory}: version {version!r} is not in every one of {sorted(versions)}"
            )
    return {
        name: directory / name / version / name if name in versions else directory / name
        for name in _SPLIT_FILES
    }


def load_split(
    directory: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    version: str | None = None,
    *,
    row_groups: int | None = None,
) -> tuple[Any, Any, TensorData, dict[str, Path]]:
    """Read an encoded split (module docstring) onto ``device``; each table a Parquet
    file or a published parts folder (the streaming environments write those).

    Args:
        row_groups: read the training split by row group through a shuffle buffer of
            this many rows (:class:`~dynamic_ctr.training.batching.RowGroupData`; with
            several ranks each reads only its own row groups) instead of into memory.

    Returns:
        ``(FeatureSpec, train, valid, {file name: path read})``.
    """
    import pyarrow.parquet as pq

    from dynamic_ctr.io.layout import parquet_files
    from dynamic_ctr.spec import FeatureSpec
    from dynamic_ctr.training.batching import RowGroupData, tensors_from_columns

    paths = _resolve_paths(Path(directory), version)
    spec = FeatureSpec.from_dict(json.loads(paths["feature_spec.json"].read_text(encoding="utf-8")))
    columns = [*spec.index_columns, spec.label]
    splits: list[Any] = []
    for name in ("train.parquet", "valid.parquet"):
        files = parquet_files(paths[name])
        if name == "train.parquet" and row_groups is not None:
            splits.append(RowGroupData(tuple(str(f) for f in files), spec, torch.device(device), row_groups))
            continue
        table = pq.ParquetDataset([str(f) for f in files]).read(columns=columns) if len(files) > 1 else pq.read_table(files[0], columns=columns)
        splits.append(tensors_from_columns({c: table.column(c).to_numpy() for c in columns}, spec, device, group_columns=[]))
    return spec, splits[0], splits[1], paths


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(
        json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8"
    )
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Train one model config data-parallel (module docstring); returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m dynamic_ctr.training.distributed", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--config", required=True, type=Path, help='JSON {"model": {...}, "train": {...}}'
    )
    parser.add_argument(
        "--data", required=True, type=Path, help="encoded split: data/05_model_input/<dataset>"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="rank 0 writes <out>/model/ and <out>/metrics.json"
    )
    parser.add_argument(
        "--version", default=None, help="Kedro version of the split (default: the newest)"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument(
        "--row-groups", type=int, default=None, metavar="BUFFER_ROWS",
        help="read the training split by row group, each rank only its own, through a shuffle buffer of BUFFER_ROWS",
    )  # fmt: skip
    args = parser.parse_args(argv)

    from dynamic_ctr.models import build_model
    from dynamic_ctr.training.checkpoint import save_checkpoint
    from dynamic_ctr.training.device import seed_everything
    from dynamic_ctr.training.loop import TrainConfig, train

    config = json.loads(args.config.read_text(encoding="utf-8"))
    if not isinstance(config, dict) or set(config) != {"model", "train"}:
        parser.error(
            f'{args.config}: expected a JSON object {{"model": {{...}}, "train": {{...}}}}'
        )
    cfg = TrainConfig.from_dict(config["train"])
    with distributed(args.device) as world:
        logging.basicConfig(
            level=logging.INFO if world.is_main else logging.WARNING,
            format=f"[rank {world.rank}] %(asctime)s %(name)s %(levelname)s: %(message)s",
        )
        spec, train_data, valid_data, paths = load_split(args.data, world.device, args.version, row_groups=args.row_groups)
        seed_everything(cfg.seed)
        # the model's initialisation follows the training seed, as tuning.fit does
        model = build_model({**config["model"], "seed": cfg.seed}, spec)
        result = train(model, train_data, valid_data, cfg, world=world)
        if world.is_main:
            args.out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(result.model.to("cpu").eval(), args.out / "model")
            _write_json(
                args.out / "metrics.json",
                {
                    "best_val_auc": result.best_val_auc,
                    "best_epoch": result.best_epoch,
                    "history": result.history,
                    "world_size": world.size,
                    "backend": world.backend,
                    "device": str(world.device),
                    "global_batch_size": cfg.batch_size,
                    "rank_batch_size": cfg.batch_size // world.size,
                    "train_rows": len(train_data),
                    "valid_rows": len(valid_data),
                    "written_by_rank": world.rank,
                    "config": {"model": result.model.config, "train": config["train"]},
                    "data": {name: str(path) for name, path in paths.items()},
                },
            )
            logger.info("wrote %s and %s", args.out / "model", args.out / "metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
