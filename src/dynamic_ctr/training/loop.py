"""The training loop: an explicit epoch/step loop in nanoGPT's spirit.

``train`` fits any model that maps ``x (B, S)`` int64 to logits ``(B,)`` with Adam
and binary cross-entropy, validates on AUC after every epoch, stops early when the
validation AUC stops improving, and hands back the best epoch's weights.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from dynamic_ctr.training import resume as _resume
from dynamic_ctr.training.batching import RowGroupData, TensorData, batches, num_batches
from dynamic_ctr.training.device import flush_denormals, make_generator
from dynamic_ctr.training.graphs import GraphedStep, graph_refusal
from dynamic_ctr.training.metrics import auc, evaluate, log_loss
from dynamic_ctr.training.optimizers import FTRL, OPTIMIZERS, CombinedOptimizer, GroupFTRL, LazyAdam

if TYPE_CHECKING:
    from dynamic_ctr.training.distributed import World

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainResult", "make_optimizer", "train"]

logger = logging.getLogger(__name__)

_AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train one model.

    Args:
        lr: Adam learning rate.
        batch_size: training rows per step.
        max_epochs: upper bound on passes over the training split.
        patience: stop after this many consecutive epochs without a new best
            validation AUC (set it >= ``max_epochs`` to never stop early).
        weight_decay: Adam (coupled, L2) weight decay of dense weight matrices;
            biases and other 1-d parameters are never decayed.
        embedding_weight_decay: the same for parameters of ``nn.Embedding`` /
            ``nn.EmbeddingBag`` modules (the usual CTR embedding regulariser).
        amp: run forward under ``torch.autocast``. On CUDA with ``amp_dtype``
            ``"float16"`` a ``GradScaler`` scales the loss; on CPU only
            ``"bfloat16"`` is allowed.
        amp_dtype: ``"bfloat16"`` or ``"float16"``.
        seed: seeds dropout (torch's global generator) and the shuffling generator.
        grad_clip: clip the global gradient L2 norm to this value; ``None`` = off.
        log_every: steps between host syncs of the loss: each one refreshes the
            progress bar and checks finiteness of the losses since the last one.
            Larger values sync the GPU less often; the failing step is still
            reported exactly.
        progress: show a tqdm bar per epoch (hidden anyway when stderr is not a tty).
        eval_batch_size: rows per forward pass at validation; ``None`` = 4x
            ``batch_size``.
        group_optimizers: ``{role: {optimizer, lr, beta, l1, l2}}`` to give parameter
            roles their own optimiser (``adam``, ``ftrl`` or ``gftrl``; FTRL's ``beta``,
            ``l1``, ``l2`` default to 1, 0, 0). Roles: ``embedding`` (every embedding
            table) and those a model names in ``model.parameter_roles()`` (DynInt:
            ``interaction``, ``generator``). Parameters of no listed role keep Adam at
            ``lr``. ``None``: Adam for everything (the three groups of
            :func:`make_optimizer`).
        cuda_graphs: replay each full-size training step from one CUDA graph
            (:mod:`dynamic_ctr.training.graphs`): ``"off"``; ``"on"`` (a run that cannot
            use them, e.g. on the CPU or with group optimisers, is refused before
            training); ``"auto"`` (the default: used on CUDA where they can be, else eager
            steps; 6-18x the eager step rate of this project's models on an H200,
            docs/benchmarks.md section 11).
    """

    lr: float = 0.005
    batch_size: int = 1024
    max_epochs: int = 10
    patience: int = 2
    weight_decay: float = 0.0
    embedding_weight_decay: float = 0.0
    amp: bool = False
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    seed: int = 2024
    grad_clip: float | None = None
    log_every: int = 50
    progress: bool = True
    eval_batch_size: int | None = None
    group_optimizers: dict[str, dict[str, Any]] | None = None
    cuda_graphs: Literal["off", "on", "auto"] = "auto"

    def __post_init__(self) -> None:
        if self.cuda_graphs not in ("off", "on", "auto"):
            raise ValueError(f"{self.cuda_graphs=} must be 'off', 'on' or 'auto'")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"{self.lr=} must be a positive finite number")
        for name in ("batch_size", "max_epochs", "patience", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        for name in ("weight_decay", "embedding_weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if self.amp_dtype not in _AMP_DTYPES:
            raise ValueError(f"{self.amp_dtype=} must be one of {sorted(_AMP_DTYPES)}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"{self.seed=} must be a non-negative int")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"{self.grad_clip=} must be > 0 or None")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"{self.eval_batch_size=} must be >= 1 or None")
        for role, spec in (self.group_optimizers or {}).items():
            unknown = set(spec) - {"optimizer", "lr", "beta", "l1", "l2"}
            if unknown or spec.get("optimizer") not in OPTIMIZERS:
                raise ValueError(
                    f"group_optimizers.{role}={spec!r}: needs optimizer in {OPTIMIZERS} and only lr, beta, l1, l2"
                )
            if spec.get("optimizer") == "adam" and set(spec) & {"beta", "l1", "l2"}:
                raise ValueError(f"group_optimizers.{role}: beta, l1 and l2 are FTRL's, not Adam's")
        if self.group_optimizers and self.amp and self.amp_dtype == "float16":
            raise ValueError("group_optimizers cannot be combined with float16 AMP (its GradScaler needs one optimiser)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a parameters dict; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Args:
        best_val_auc: validation AUC of the best epoch.
        best_epoch: 1-based epoch whose weights ``model`` holds.
        history: one dict per epoch run: ``epoch``, ``train_loss``, ``val_auc``,
            ``val_logloss``, ``seconds`` (whole epoch, validation included) and
            ``samples_per_s`` (training rows per second of the training steps only).
        model: the trained model, best weights loaded, in train mode.
        resumed_from_epoch: the epoch whose resume state the run continued from
            (``train(..., checkpoint_dir=...)``); 0 when it started afresh.
        cuda_graph: whether full-size training steps were replayed from a CUDA graph
            (``TrainConfig.cuda_graphs``).
    """

    best_val_auc: float
    best_epoch: int
    history: list[dict[str, float]]
    model: nn.Module
    resumed_from_epoch: int = 0
    cuda_graph: bool = False


def parameter_roles(model: nn.Module) -> dict[int, str]:
    """``{id(parameter): role}``: ``embedding`` for embedding tables, then whatever the
    model names in ``model.parameter_roles() -> {role: [parameters]}``."""
    roles = {
        id(p): "embedding"
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        for p in m.parameters()
    }
    named = getattr(model, "parameter_roles", None)
    for role, params in (named() if callable(named) else {}).items():
        roles.update({id(p): role for p in params})
    return roles


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """``nn.utils.clip_grad_norm_`` that also takes sparse gradients (STAR's per-domain
    rows; torch's has no sparse norm): the total L2 norm over every gradient, each
    scaled by ``max_norm / norm`` when that is below 1. Returns the total norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = [torch.linalg.vector_norm(g.coalesce().values() if g.is_sparse else g) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # a tensor: no host sync per step
    for g in grads:
        g.mul_(scale)
    return total


#: The role of per-domain parameters read with sparse gradients (STAR's W_p, b_p): unless
#: ``group_optimizers`` names it, updated lazily by :class:`LazyAdam` (SparseAdam's rule).
LAZY_ROLE = "domain"


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device, *, capturable: bool = False
) -> torch.optim.Adam | CombinedOptimizer:
    """Adam over three parameter groups: embeddings, decayed dense, undecayed 1-d.

    With ``cfg.group_optimizers``, each listed role gets its own optimiser (FTRL,
    group-lasso FTRL or Adam at its own ``lr``) and the rest keeps these Adam groups;
    parameters of role ``domain`` (sparse gradients) get :class:`LazyAdam` at ``cfg.lr``
    unless listed; the result steps them all as one (:class:`CombinedOptimizer`). Adam uses the fused
    CUDA kernel on CUDA and the ``foreach`` implementation elsewhere; ``capturable`` keeps
    its step count on the GPU, as a CUDA graph of the step needs.
    """
    roles = parameter_roles(model)
    own = cfg.group_optimizers or {}
    per_role: dict[str, list[nn.Parameter]] = {role: [] for role in own}
    emb, dense, flat, lazy = [], [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        role = roles.get(id(p))
        if role in own:
            per_role[role].append(p)
        elif role == LAZY_ROLE:
            lazy.append(p)
        elif role == "embedding":
            emb.append(p)
        elif p.ndim >= 2:
            dense.append(p)
        else:
            flat.append(p)
    groups = [
        {"params": emb, "weight_decay": cfg.embedding_weight_decay},
        {"params": dense, "weight_decay": cfg.weight_decay},
        {"params": flat, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups and not lazy and not any(per_role.values()):
        raise ValueError("model has no trainable parameters")
    kernel = {"fused": True, "capturable": capturable} if device.type == "cuda" else {"foreach": True}
    if not own and not lazy:
        return torch.optim.Adam(groups, lr=cfg.lr, **kernel)
    empty = sorted(role for role, params in per_role.items() if not params)
    if empty:
        raise ValueError(f"group_optimizers names role(s) {empty} that no parameter of this model has")
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for role, spec in own.items():
        kind, hyper = spec["optimizer"], {k: v for k, v in spec.items() if k != "optimizer"}
        hyper.setdefault("lr", cfg.lr)
        if kind == "adam":
            optimizers[role] = torch.optim.Adam(per_role[role], **hyper, **kernel)
        else:
            optimizers[role] = (FTRL if kind == "ftrl" else GroupFTRL)(per_role[role], **hyper)
    if lazy:  # sparse gradients (only the batch's domains): Adam's moments for those rows only
        optimizers[LAZY_ROLE] = LazyAdam(lazy, lr=cfg.lr)
    if groups:
        optimizers["default"] = torch.optim.Adam(groups, lr=cfg.lr, **kernel)
    return CombinedOptimizer(optimizers)


def _autocast(
    cfg: TrainConfig, device: torch.device
) -> tuple[AbstractContextManager[Any], torch.dtype | None]:
    if not cfg.amp:
        return nullcontext(), None
    dtype = _AMP_DTYPES[cfg.amp_dtype]
    if device.type == "cpu" and dtype != torch.bfloat16:
        raise ValueError(f"{cfg.amp_dtype=} is not supported on CPU; use 'bfloat16'")
    return torch.autocast(device.type, dtype=dtype), dtype


def _check_finite(
    losses: list[Tensor],
    epoch: int,
    first_step: int,
    last_finite: float | None,
    world: World | None = None,
) -> tuple[float | None, float]:
    """Pull buffered per-step losses to the host (one sync); raise at the first bad one.

    With a ``world``, the losses are first averaged over the ranks (one all-reduce), so
    every rank checks the global-batch losses and raises at the same step.

    Returns:
        ``(last finite loss so far, mean loss of the window)``.
    """
    if not losses:
        return last_finite, float("nan")
    stacked = torch.stack(losses).float()
    if world is not None:
        stacked = world.mean(stacked)
    values = stacked.cpu().tolist()
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"non-finite training loss {value} at epoch {epoch}, step {first_step + i} "
                f"(last finite loss: {last_finite})"
            )
        last_finite = value
    return last_finite, sum(values) / len(values)


def train(
    model: nn.Module,
    train: TensorData | RowGroupData,
    valid: TensorData,
    cfg: TrainConfig | None = None,
    *,
    on_epoch_end: Callable[[int, float], None] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    world: World | None = None,
) -> TrainResult:
    """Fit ``model`` on ``train``, early-stopping on the validation AUC of ``valid``.

    The model is moved to ``train.device``. Each epoch shuffles with a generator
    seeded from ``cfg.seed`` (so two runs with one seed on one device see the same
    batches), takes Adam steps on ``binary_cross_entropy_with_logits`` (plus ``model.penalty()`` when the
    model supplies one), then scores
    ``valid``. A copy of the weights is kept whenever the validation AUC improves,
    and loaded back at the end.

    Args:
        model: maps ``x (B, S)`` int64 to logits ``(B,)``.
        train: training split (already on the device), or a :class:`RowGroupData`
            read row group by row group through a shuffle buffer (no ``adapt``; with a
            ``world``, each rank reads only its own row groups, see
            :meth:`RowGroupData.batches`).
        valid: validation split, on the same device; must hold both classes.
        cfg: hyper-parameters; ``None`` = ``TrainConfig()``.
        on_epoch_end: called as ``on_epoch_end(epoch, val_auc)`` after each epoch's
            validation (1-based epoch); exceptions it raises (e.g.
            ``optuna.TrialPruned``) propagate to the caller. A resumed run first
            calls it for each epoch restored from the checkpoint, in order, so the
            callback sees every epoch of the run (an Optuna trial that resumes a
            killed one gets all its intermediate values).
        checkpoint_dir: the run's resume directory (:mod:`dynamic_ctr.training.resume`);
            ``None`` = no resume state. After every completed epoch (validation and
            early-stopping bookkeeping done, before ``on_epoch_end``) the full
            state is written there atomically. If the directory already holds the
            state of this very run (same config, model, data and device; anything
            else is refused), training continues at the next epoch, bit-identical to
            an uninterrupted run on the CPU; if that state says training had
            stopped, the result is returned without training more. The directory
            is left in place (delete it when the result is safe).
        world: this process's place in a data-parallel run
            (:func:`dynamic_ctr.training.distributed.init_from_env`, launched by
            ``torchrun``); ``None`` or a world of size 1 trains in this process alone.
            With several ranks, ``train``/``valid`` are the whole splits on every rank,
            ``cfg.batch_size`` is the global batch, the model is wrapped in DDP, and
            every rank returns the same result (see :mod:`dynamic_ctr.training.distributed`
            for the sharding, the last batch, validation and what is refused).

    Returns:
        :class:`TrainResult`; ``result.model`` is ``model`` with the best weights.

    Raises:
        NonFiniteLossError: a training loss is NaN/inf (message names epoch, step
            and the last finite loss) or validation predictions are not finite.
        CheckpointError: ``checkpoint_dir`` holds a damaged or tampered-with resume
            state, or that of another run (a ``ValueError``; names the file).
    """
    cfg = TrainConfig() if cfg is None else cfg
    device = train.device
    if valid.device != device:
        raise ValueError(f"valid is on {valid.device} but train is on {device}")
    if len(train) == 0 or len(valid) == 0:
        raise ValueError(
            f"train ({len(train)} rows) and valid ({len(valid)} rows) must be non-empty"
        )
    ddp = world if world is not None and world.size > 1 else None
    if isinstance(train, RowGroupData) and callable(getattr(model, "adapt", None)):
        raise ValueError(  # noqa: TRY004 - a model/split combination, not a wrong type
            "a training split read by row group (RowGroupData) trains without a per-domain adaptation over the "
            f"whole split ({type(model).__name__} defines adapt()): load it into memory"
        )
    if ddp is not None:
        ddp.check_supported(model, cfg.batch_size, checkpoint_dir)
        if len(train) < ddp.size:
            raise ValueError(f"train has {len(train)} rows, fewer than the {ddp.size} ranks")
    model.to(device)
    autocast_ctx, amp_dtype = _autocast(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and cfg.amp_dtype == "float16")
    want_graphs = cfg.cuda_graphs == "on" or (cfg.cuda_graphs == "auto" and device.type == "cuda")
    optimizer = make_optimizer(model, cfg, device, capturable=want_graphs and device.type == "cuda")
    # A model may supply its own loss term, ``model.penalty() -> Tensor | None``, read
    # right after each forward (a per-instance penalty belongs to that batch).
    penalty_of = getattr(model, "penalty", None)
    penalty_of = penalty_of if callable(penalty_of) else None
    # A model may also replace the loss (``model.meta_loss(x, y) -> Tensor``, first-order
    # MAML) and adapt itself to the training rows before it is evaluated
    # (``model.adapt(train)``, MAML's per-domain adaptation); both optional.
    meta_loss = getattr(model, "meta_loss", None)
    adapt = getattr(model, "adapt", None)
    # dropout and any other global-RNG use in forward (each rank its own masks)
    torch.manual_seed(cfg.seed if ddp is None else cfg.seed + ddp.rank)
    shuffle_gen = make_generator(cfg.seed, device)  # one permutation for every rank
    eval_bs = cfg.eval_batch_size or 4 * cfg.batch_size
    steps_per_epoch = num_batches(len(train), cfg.batch_size)
    forward = model  # what the training step calls: with several ranks, DDP around model
    if ddp is not None:
        steps_per_epoch = ddp.num_batches(len(train), cfg.batch_size)
        forward = ddp.wrap(model)

    def batch_loss(xb: Tensor, yb: Tensor, autocast: AbstractContextManager[Any]) -> Tensor:
        """The mean loss of one batch: the model's own (MAML) or binary cross-entropy,
        plus the model-supplied penalty (e.g. DynInt's eqs. 11-12)."""
        with autocast:
            if meta_loss is not None:  # a model that trains on its own objective (MAML)
                loss = meta_loss(xb, yb).float()
            else:
                loss = F.binary_cross_entropy_with_logits(forward(xb).float(), yb)  # logits (B,)
        if penalty_of is not None:
            extra = penalty_of()
            if extra is not None:
                loss = loss + extra.float()
        return loss

    graphed = None
    if want_graphs:
        refusal = graph_refusal(device, optimizer, fp16_scaling=scaler.is_enabled(), ddp=ddp is not None,
                                custom_loss=callable(meta_loss))
        if refusal is not None and cfg.cuda_graphs == "on":
            raise ValueError(f"cuda_graphs='on': {refusal}")
        if refusal is None:
            # autocast without its weight cache, which a replay would read stale
            uncached = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None, cache_enabled=False)
            clip = None if cfg.grad_clip is None else (lambda: clip_grad_norm(model.parameters(), cfg.grad_clip))
            # "auto" expects some models not to be capturable (AdaSparse's per-domain dedupe
            # syncs with the host): their fallback is logged at INFO, an explicit "on"'s at WARNING.
            graphed = GraphedStep(
                lambda xb, yb: batch_loss(xb, yb, uncached), optimizer, after_backward=clip,
                failure_log_level=logging.WARNING if cfg.cuda_graphs == "on" else logging.INFO,
            )
        else:
            logger.info("training steps run eagerly: %s", refusal)
    if isinstance(train, RowGroupData) and ddp is not None:
        steps_per_epoch = None  # each epoch's group order decides it (RowGroupData.sharded_steps)

    best_auc, best_epoch, best_state = -math.inf, 0, None
    history: list[dict[str, float]] = []
    epochs_without_improvement = 0
    last_finite: float | None = None
    start_epoch, stopped, resumed_from = 1, False, 0

    run = None
    if checkpoint_dir is not None:
        run = _resume.run_description(model, cfg, train, valid)
        saved = _resume.load_state(checkpoint_dir, run)
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            if saved["scaler"]:
                scaler.load_state_dict(saved["scaler"])
            best_state = saved["best_state"]
            best_auc, best_epoch = float(saved["best_auc"]), saved["best_epoch"]
            epochs_without_improvement = saved["epochs_without_improvement"]
            history, last_finite = saved["history"], saved["last_finite"]
            resumed_from, stopped = saved["epoch"], saved["stopped"]
            start_epoch = resumed_from + 1
            logger.info(
                "resuming from the state after epoch %d in %s%s",
                resumed_from, checkpoint_dir, " (training had already stopped)" if stopped else "",
            )  # fmt: skip
            if on_epoch_end is not None:
                for h in history:
                    on_epoch_end(int(h["epoch"]), h["val_auc"])
            _resume.restore_rng(saved["rng"], shuffle_gen, device)  # last: where epoch start_epoch draws
            flush_denormals()  # as an uninterrupted run's first validation left it
            del saved

    for epoch in range(start_epoch, cfg.max_epochs + 1):
        if stopped:
            break
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)  # sum of per-row losses, stays on device
        rows_trained = 0.0  # the rows loss_sum stands for (this rank's share of them)
        window: list[Tensor] = []  # per-step losses not yet checked on the host
        window_start = 1
        with tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{cfg.max_epochs}",
            disable=None if cfg.progress and (ddp is None or ddp.is_main) else True,
            leave=True,
            dynamic_ncols=True,
        ) as bar:
            # (x, y, rows): rows = the global-batch rows this step's mean loss stands for
            if isinstance(train, RowGroupData):  # read by row group through a shuffle buffer
                if ddp is None:
                    groups = train.batches(cfg.batch_size, shuffle_gen)
                else:  # each rank reads its own row groups, in micro-batches of B / W rows
                    groups = train.batches(cfg.batch_size // ddp.size, shuffle_gen, rank=ddp.rank, world_size=ddp.size)
                batch_iter = ((xb, yb, yb.shape[0]) for xb, yb in groups)
            elif ddp is None:
                shuffled = batches(train, cfg.batch_size, shuffle=True, generator=shuffle_gen)
                batch_iter = ((xb, yb, yb.shape[0]) for xb, yb in shuffled)
            else:  # this rank's slice of each global batch, rows = R / W
                batch_iter = ddp.batches(train, cfg.batch_size, shuffle_gen)
            for step, (xb, yb, rows) in enumerate(batch_iter, 1):
                if graphed is not None:  # the same step, replayed from a CUDA graph once captured
                    loss = graphed(xb, yb)
                else:
                    loss = batch_loss(xb, yb, autocast_ctx)
                    if yb.shape[0] != rows:  # a rank's uneven share of the last global batch:
                        loss = loss * (yb.shape[0] / rows)  # DDP's average = the mean over its rows
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if cfg.grad_clip is not None:
                        scaler.unscale_(optimizer)
                        clip_grad_norm(model.parameters(), cfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()

                loss = loss.detach()
                loss_sum += loss * rows
                rows_trained += rows
                window.append(loss)
                if step % cfg.log_every == 0:
                    last_finite, window_mean = _check_finite(
                        window, epoch, window_start, last_finite, ddp
                    )
                    window, window_start = [], step + 1
                    bar.set_postfix(loss=f"{window_mean:.4f}")
                bar.update()
            last_finite, _ = _check_finite(window, epoch, window_start, last_finite, ddp)
            if ddp is None:
                rows_epoch = rows_trained
                train_loss = loss_sum.item() / rows_epoch
            else:
                totals = ddp.sum(torch.stack([loss_sum.double(), torch.tensor(rows_trained, dtype=torch.float64, device=device)]))
                rows_epoch = totals[1].item()
                train_loss = totals[0].item() / rows_epoch
            train_seconds = time.perf_counter() - t0

            if callable(adapt):  # validate (and keep as best) the adapted model
                adapt(train)
            if ddp is None:
                probs = evaluate(model, valid, eval_bs, autocast_dtype=amp_dtype)
            else:  # rank 0's buffers everywhere, each rank scores a shard, all get every row
                probs = ddp.evaluate(model, valid, eval_bs, autocast_dtype=amp_dtype)
            if not np.isfinite(probs).all():
                raise NonFiniteLossError(
                    f"validation predictions are not finite after epoch {epoch}"
                )
            val_auc = auc(valid.y, probs)
            val_logloss = log_loss(valid.y, probs)
            bar.set_postfix(loss=f"{train_loss:.4f}", val_auc=f"{val_auc:.4f}")
        seconds = time.perf_counter() - t0
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_auc": val_auc,
                "val_logloss": val_logloss,
                "seconds": seconds,
                "samples_per_s": rows_epoch / train_seconds,
            }
        )
        logger.info(
            "epoch %d: train_loss=%.5f val_auc=%.5f val_logloss=%.5f (%.1fs, %.0f samples/s)",
            epoch, train_loss, val_auc, val_logloss, seconds, rows_epoch / train_seconds,
        )  # fmt: skip

        if val_auc > best_auc:
            best_auc, best_epoch, epochs_without_improvement = val_auc, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            epochs_without_improvement += 1
        if checkpoint_dir is not None:
            assert run is not None and best_state is not None
            _resume.save_state(
                checkpoint_dir,
                {
                    "epoch": epoch,
                    "stopped": epochs_without_improvement >= cfg.patience or epoch == cfg.max_epochs,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "best_state": best_state,
                    "best_auc": best_auc,
                    "best_epoch": best_epoch,
                    "epochs_without_improvement": epochs_without_improvement,
                    "history": history,
                    "last_finite": last_finite,
                    "rng": _resume.capture_rng(shuffle_gen, device),
                },
                run,
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch, val_auc)
        if epochs_without_improvement >= cfg.patience:
            logger.info(
                "early stop after epoch %d: best val_auc=%.5f at epoch %d",
                epoch,
                best_auc,
                best_epoch,
            )
            break

    assert best_state is not None  # at least one epoch ran
    model.load_state_dict(best_state)
    return TrainResult(
        best_val_auc=best_auc, best_epoch=best_epoch, history=history, model=model, resumed_from_epoch=resumed_from,
        cuda_graph=graphed is not None and graphed.captured,
    )

