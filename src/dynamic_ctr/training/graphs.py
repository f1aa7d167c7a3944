"""The whole training step (forward, backward, optimiser) replayed as one CUDA graph.

CTR towers are small: on a GPU one step of WDL+APG is a few hundred kernels of a few
microseconds each, so the step costs what the host needs to launch them, not what the
GPU needs to run them. A CUDA graph records the launches once and replays them with one
call (PyTorch's "whole-network capture" recipe, ``torch.cuda.graphs``):

1. the first ``warmup`` full-size steps run eagerly on a side stream, which initialises
   the optimiser state, cuBLAS workspaces and autocast on real batches (they are real
   training steps);
2. the next full-size step is captured into static input buffers, then replayed;
3. every later full-size step copies its batch into those buffers and replays the graph;
   a batch of another size (the epoch's last, partial one) runs eagerly, writing into
   the same gradient tensors the graph writes.

What the graph needs from its parts (:func:`graph_refusal` checks it before training):
one ``torch.optim.Adam`` built with ``capturable=True`` (the step count lives on the GPU),
no float16 loss scaling (``GradScaler`` syncs with the host), no DDP, and a forward without
host syncs or data-dependent shapes. A capture that fails anyway (a model that calls
``.item()``, say) is reported once in the log and the run goes on eagerly; the step it
was capturing is then run eagerly, so no batch is lost.

Autocast caches its casts of the weights between ops, which a replay would read stale,
so steps built here autocast with ``cache_enabled=False``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["GraphedStep", "graph_refusal"]

logger = logging.getLogger(__name__)


def graph_refusal(device: torch.device, optimizer: torch.optim.Optimizer, *, fp16_scaling: bool, ddp: bool,
                  custom_loss: bool) -> str | None:
    """Why the whole step cannot be one CUDA graph here, or ``None`` when it can."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device}"
    if ddp:
        return "CUDA graphs are not used with data-parallel ranks (DDP's bucketed all-reduce)"
    if fp16_scaling:
        return "CUDA graphs are not used with float16 AMP (GradScaler checks for infs on the host)"
    if custom_loss:
        return "CUDA graphs are not used with a model's own loss (meta_loss: MAML's inner steps)"
    if type(optimizer) is not torch.optim.Adam:
        return (f"CUDA graphs need one torch.optim.Adam, not {type(optimizer).__name__} "
                "(group optimisers, FTRL and LazyAdam's sparse rows are not capturable)")
    if not all(g.get("capturable") for g in optimizer.param_groups):
        return "CUDA graphs need the Adam optimiser built with capturable=True"
    return None


class GraphedStep:
    """``step(xb, yb) -> loss``: one training step, replayed from a CUDA graph once captured.

    Args:
        loss_fn: ``loss_fn(xb, yb) -> scalar loss`` (forward, loss and any penalty; autocast
            inside it with ``cache_enabled=False``).
        optimizer: a capturable ``torch.optim.Adam`` (see :func:`graph_refusal`).
        after_backward: called between backward and the optimiser step (gradient clipping);
            captured with the rest, so it must not sync with the host either.
        warmup: eager full-size steps before the capture.
        failure_log_level: the ``logging`` level of the one message a failed capture logs.

    ``captured`` is ``True`` once a graph exists; ``failure`` holds the capture's error
    when it failed (every step is eager from then on).
    """

    def __init__(
        self,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        after_backward: Callable[[], object] | None = None,
        warmup: int = 3,
        failure_log_level: int = logging.WARNING,
    ) -> None:
        if warmup < 1:
            raise ValueError(f"{warmup=} must be >= 1 (the optimiser state must exist before the capture)")
        self.loss_fn, self.optimizer, self.after_backward = loss_fn, optimizer, after_backward
        self.warmup, self.failure_log_level = warmup, failure_log_level
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failure: BaseException | None = None
        self._full_shape: torch.Size | None = None
        self._warmed = 0
        self._side = torch.cuda.Stream()
        self._static_x = self._static_y = self._static_loss = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _eager(self, xb: Tensor, yb: Tensor) -> Tensor:
        # After a capture the gradients are the graph's own tensors: zero them in place
        # (``set_to_none`` would detach them from the parameters the replays update).
        self.optimizer.zero_grad(set_to_none=self.graph is None)
        loss = self.loss_fn(xb, yb)
        loss.backward()
        if self.after_backward is not None:
            self.after_backward()
        self.optimizer.step()
        return loss.detach()

    def _on_side_stream(self, xb: Tensor, yb: Tensor) -> Tensor:
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            loss = self._eager(xb, yb)
        torch.cuda.current_stream().wait_stream(self._side)
        return loss

    def _capture(self, xb: Tensor, yb: Tensor) -> Tensor:
        self._static_x, self._static_y = xb.clone(), yb.clone()
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates them
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                loss = self.loss_fn(self._static_x, self._static_y)
                loss.backward()
                if self.after_backward is not None:
                    self.after_backward()
                self.optimizer.step()
        except Exception as e:  # noqa: BLE001 - any capture error: train on eagerly
            self.failure = e
            self._static_x = self._static_y = None
            torch.cuda.synchronize()
            logger.log(self.failure_log_level, "CUDA graph capture of the training step failed (%s: %s); "
                       "training on eagerly", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return self._eager(xb, yb)  # the captured work never ran: this batch still trains
        self.graph, self._static_loss = graph, loss
        graph.replay()  # capturing ran nothing: the batch trains now
        return loss.detach().clone()

    def __call__(self, xb: Tensor, yb: Tensor) -> Tensor:
        if self._full_shape is None:
            self._full_shape = xb.shape
        full = xb.shape == self._full_shape
        if self.graph is not None and full:
            self._static_x.copy_(xb)
            self._static_y.copy_(yb)
            self.graph.replay()
            return self._static_loss.detach().clone()  # the next replay overwrites it
        if self.failure is not None or self.graph is not None:  # after a failed capture, or a partial batch
            return self._eager(xb, yb)
        if not full or self._warmed < self.warmup:  # warm-up (and partial batches before the capture)
            self._warmed += full
            return self._on_side_stream(xb, yb)
        return self._capture(xb, yb)
