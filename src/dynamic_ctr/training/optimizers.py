"""FTRL-Proximal and group-lasso FTRL optimisers, and a lazy Adam for row-sparse
gradients (torch only).

Both optimisers keep two tensors of state per parameter, the same shape as the
parameter: ``z`` (the accumulated, proximally corrected gradient) and ``n`` (the
accumulated squared gradient). The weights are not a running quantity: after each
step they are recomputed in closed form from ``z`` and ``n``.

Notation (per coordinate ``i``; ``alpha`` is the group's ``lr``)::

    sigma_i = (sqrt(n_i + g_i^2) - sqrt(n_i)) / alpha
    z_i    <- z_i + g_i - sigma_i * w_i
    n_i    <- n_i + g_i^2
    den_i   = (beta + sqrt(n_i)) / alpha + l2

:class:`FTRL` (McMahan et al. 2013, "Ad Click Prediction: a View from the
Trenches", Algorithm 1) then sets, per coordinate::

    w_i = 0                                    if |z_i| <= l1
    w_i = -(z_i - sign(z_i) * l1) / den_i      otherwise

:class:`GroupFTRL` (the group-lasso FTRL of the xDeepInt paper, Yan & Li 2020, and
of its authors' ``GFTRL`` in yanyachen/xDeepInt ``src/optimizer.py``) replaces the
per-coordinate L1 soft threshold by a per-row (group) one on 2-d parameters such as
embedding tables, so whole rows (feature values) become exactly zero::

    w_r = 0                                                   if ||z_r||_2 <= l1 * sqrt(d)
    w_r = -(1 - l1 * sqrt(d) / ||z_r||_2) * z_r / den_r       otherwise

where ``r`` is a row, ``d`` its width and ``den_r`` the coordinate-wise denominator
above (division element-wise). It was written from this rule, not copied.

Conventions shared by both classes:

* **Initial weights.** McMahan initialises ``w = z = n = 0``. Here the parameter's
  current value enters the state at its first update through
  ``z <- z + g - sigma * w`` (``sigma = |g| / alpha`` at ``n = 0``), so randomly
  initialised embeddings work: the first step pulls ``w0`` into ``z`` exactly as
  FTRL's proximal term does for any earlier iterate. With ``w0 = 0`` this is the
  paper's algorithm exactly.
* **Untouched coordinates keep their value.** A coordinate (for :class:`GroupFTRL`
  a whole row) whose state is still all zero after the update (``z = n = 0``: it has
  never received a non-zero gradient) keeps its current weight instead of being set
  to the closed-form value (which would be ``0``). With ``w0 = 0`` this changes
  nothing; with a random ``w0`` it makes dense gradients that are zero in some rows
  behave exactly like sparse gradients that omit those rows (FTRL's lazy updates).
* **Sparse gradients** (``nn.Embedding(..., sparse=True)``; any ``torch.sparse_coo``
  gradient) are coalesced (:func:`_coalesced`) and only the coordinates (rows, for :class:`GroupFTRL`)
  they list are updated; everything else, ``w``, ``z`` and ``n``, is left as is.
  **Dense gradients** update every coordinate; where ``g = 0`` this leaves ``z`` and
  ``n`` unchanged (``sigma = 0``) and recomputes ``w`` from them, which returns the
  same value whenever ``w`` already is the FTRL solution (it is after its first
  touch, unless something else wrote to the parameter). Hence dense and sparse
  training give the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["FTRL", "OPTIMIZERS", "CombinedOptimizer", "GroupFTRL", "LazyAdam"]


def _check_hyper_parameters(lr: float, beta: float, l1: float, l2: float) -> None:
    """Raise ``ValueError`` naming every bad hyper-parameter."""
    bad = []
    if not (math.isfinite(lr) and lr > 0):
        bad.append(f"alpha (lr)={lr!r} must be a positive finite number")
    for name, value in (("beta", beta), ("l1", l1), ("l2", l2)):
        if not (math.isfinite(value) and value >= 0):
            bad.append(f"{name}={value!r} must be a finite number >= 0")
    if bad:
        raise ValueError("; ".join(bad))


def _accumulate(
    w: Tensor, z: Tensor, n: Tensor, g: Tensor, alpha: float
) -> tuple[Tensor, Tensor]:
    """The shared state update; returns the new ``(z, n)`` (inputs untouched).

    ``sigma = (sqrt(n + g^2) - sqrt(n)) / alpha``. Beware: two public PyTorch FTRL
    ports compute ``sqrt(n + g^2) / alpha - sqrt(n)``, which agrees with this only
    when ``alpha = 1`` or ``n = 0`` (the first step). ``test_sqrt_bug`` guards it.
    """
    n_new = n + g * g
    sigma = (n_new.sqrt() - n.sqrt()) / alpha
    z_new = z + g - sigma * w
    return z_new, n_new


def _denominator(n: Tensor, alpha: float, beta: float, l2: float) -> Tensor:
    """``(beta + sqrt(n)) / alpha + l2``, with 0 (only possible when ``beta = l2 = 0``
    and ``n = 0``, where ``z`` is 0 too) replaced by 1 so that ``z / den`` is 0, not NaN.
    """
    den = (beta + n.sqrt()) / alpha + l2
    return torch.where(den > 0, den, torch.ones_like(den))


def _ftrl_weights(
    w: Tensor, z: Tensor, n: Tensor, alpha: float, beta: float, l1: float, l2: float
) -> Tensor:
    """Per-coordinate FTRL-Proximal closed form (untouched coordinates keep ``w``)."""
    shrunk = -(z - torch.sign(z) * l1) / _denominator(n, alpha, beta, l2)
    new_w = torch.where(z.abs() <= l1, torch.zeros_like(z), shrunk)
    untouched = (n == 0) & (z == 0)
    return torch.where(untouched, w, new_w)


def _group_weights(
    w: Tensor, z: Tensor, n: Tensor, alpha: float, beta: float, l1: float, l2: float
) -> Tensor:
    """Row-wise group-lasso closed form on ``(rows, d)`` tensors (untouched rows keep ``w``)."""
    threshold = l1 * math.sqrt(z.shape[1])
    norm = torch.linalg.vector_norm(z, dim=1, keepdim=True)  # (rows, 1)
    # 1 - threshold / norm, clamped at 0: equal to the rule where norm > threshold,
    # and finite (0) where norm = 0 (those rows are zeroed below anyway).
    scale = (1 - threshold / norm.clamp_min(torch.finfo(z.dtype).tiny)).clamp_min(0)
    shrunk = -scale * z / _denominator(n, alpha, beta, l2)
    new_w = torch.where(norm <= threshold, torch.zeros_like(z), shrunk)
    untouched = ((n == 0) & (z == 0)).all(dim=1, keepdim=True)
    return torch.where(untouched, w, new_w)


def _evaluate(closure: Callable[[], Tensor] | None) -> Tensor | None:
    """The loss of a ``step(closure)`` call, computed with gradients enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class _FTRLBase(torch.optim.Optimizer):
    """Hyper-parameter checks, the ``step`` loop and sparse/dense dispatch."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        beta: float = 1.0,
        l1: float = 0.0,
        l2: float = 0.0,
    ) -> None:
        _check_hyper_parameters(lr, beta, l1, l2)
        super().__init__(params, {"lr": lr, "beta": beta, "l1": l1, "l2": l2})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, checking the group's values."""
        hp = [param_group.get(k, self.defaults[k]) for k in ("lr", "beta", "l1", "l2")]
        _check_hyper_parameters(*hp)
        super().add_param_group(param_group)

    def _state(self, p: Tensor) -> tuple[Tensor, Tensor]:
        state = self.state[p]
        if not state:
            state["z"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["n"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["z"], state["n"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update of every parameter that has a gradient."""
        loss = _evaluate(closure)
        for group in self.param_groups:
            hp = (group["lr"], group["beta"], group["l1"], group["l2"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.is_complex():
                    raise TypeError(f"{type(self).__name__} does not support complex parameters")
                z, n = self._state(p)
                if p.grad.is_sparse:
                    self._sparse_update(p, z, n, _coalesced(p.grad), *hp)
                else:
                    self._dense_update(p, z, n, p.grad, *hp)
        return loss

    def _dense_update(self, p, z, n, g, alpha, beta, l1, l2) -> None:  # pragma: no cover
        raise NotImplementedError

    def _sparse_update(self, p, z, n, g, alpha, beta, l1, l2) -> None:  # pragma: no cover
        raise NotImplementedError


def _ftrl_dense(p: Tensor, z: Tensor, n: Tensor, g: Tensor, alpha, beta, l1, l2) -> None:
    z_new, n_new = _accumulate(p, z, n, g, alpha)
    p.copy_(_ftrl_weights(p, z_new, n_new, alpha, beta, l1, l2))
    z.copy_(z_new)
    n.copy_(n_new)


def _ftrl_sparse(p: Tensor, z: Tensor, n: Tensor, g: Tensor, alpha, beta, l1, l2) -> None:
    """Update only the coordinates a coalesced COO gradient lists (lazy FTRL)."""
    if g._nnz() == 0:
        return
    key = tuple(g.indices())  # sparse_dim index tensors; values carry the dense dims
    w_k, z_k, n_k = p[key], z[key], n[key]
    z_new, n_new = _accumulate(w_k, z_k, n_k, g.values(), alpha)
    p[key] = _ftrl_weights(w_k, z_new, n_new, alpha, beta, l1, l2)
    z[key] = z_new
    n[key] = n_new


class FTRL(_FTRLBase):
    """FTRL-Proximal with L1 and L2 regularisation, per coordinate.

    McMahan et al. 2013, "Ad Click Prediction: a View from the Trenches",
    Algorithm 1. For a gradient ``g`` of a coordinate with weight ``w`` and state
    ``z``, ``n`` (both start at 0)::

        sigma = (sqrt(n + g^2) - sqrt(n)) / alpha
        z    <- z + g - sigma * w
        n    <- n + g^2
        w    <- 0                                                  if |z| <= l1
                -(z - sign(z) * l1) / ((beta + sqrt(n)) / alpha + l2)  otherwise

    Coordinates whose ``z`` and ``n`` are still 0 (no non-zero gradient yet) keep
    their weight; see the module docstring for this, initial weights, and sparse
    gradients (only the listed coordinates are updated).

    Args:
        params: parameters or parameter-group dicts.
        lr: ``alpha``, the per-coordinate learning-rate scale (> 0). Stored as the
            group's ``"lr"`` so learning-rate schedulers work.
        beta: ``beta`` (>= 0), smooths the per-coordinate rate early on; McMahan
            et al. report ``beta = 1`` is usually good enough.
        l1: ``lambda1`` (>= 0), L1 strength; coordinates with ``|z| <= l1`` are
            exactly 0.
        l2: ``lambda2`` (>= 0), L2 strength.

    Raises:
        ValueError: ``lr <= 0``, ``beta < 0``, ``l1 < 0``, ``l2 < 0`` or a
            non-finite value; the message names each offending hyper-parameter.
    """

    def _dense_update(self, p, z, n, g, alpha, beta, l1, l2) -> None:
        _ftrl_dense(p, z, n, g, alpha, beta, l1, l2)

    def _sparse_update(self, p, z, n, g, alpha, beta, l1, l2) -> None:
        _ftrl_sparse(p, z, n, g, alpha, beta, l1, l2)


class GroupFTRL(_FTRLBase):
    """Group-lasso FTRL: row-wise sparsity for embedding tables.

    The group-lasso FTRL of the xDeepInt paper (Yan & Li, "xDeepInt: a Hybrid
    Architecture for Modeling the Vector-wise and Bit-wise Feature Interactions",
    DLP-KDD 2020) and of its authors' ``GFTRL`` (yanyachen/xDeepInt,
    ``src/optimizer.py``). Each row ``r`` of a 2-d parameter (width ``d``) is one
    group. The state ``z``, ``n`` is per coordinate, updated exactly as in
    :class:`FTRL`; only the closed form for the weights differs::

        sigma = (sqrt(n + g^2) - sqrt(n)) / alpha        (element-wise)
        z    <- z + g - sigma * w
        n    <- n + g^2
        w_r  <- 0                                          if ||z_r||_2 <= l1 * sqrt(d)
                -(1 - l1 * sqrt(d) / ||z_r||_2) * z_r / ((beta + sqrt(n_r)) / alpha + l2)
                                                           otherwise (element-wise division)

    A zero row is a feature value the model has dropped entirely; the
    ``sqrt(d)`` factor is the usual group-lasso weight for groups of size ``d``
    (the threshold of the authors' ``GFTRL``). Rows whose ``z`` and ``n`` are all
    still 0 keep their weights.

    Shapes:
        * 2-d parameters: one group per row (dim 0), ``d = shape[1]``.
        * More than 2 dims: one group per index of dim 0, ``d`` = the product of
          the other dims.
        * 0-d and 1-d parameters (biases, scalars) fall back to per-coordinate
          :class:`FTRL`: a bias vector as a single group would be switched off as a
          whole, which is not the sparsity pattern anyone wants from it.

    Sparse gradients update only the rows they touch (a whole row, also where a
    row's gradient is exactly zero in some columns); untouched rows keep ``w``,
    ``z`` and ``n``.

    Args:
        params: parameters or parameter-group dicts.
        lr: ``alpha`` (> 0), stored as the group's ``"lr"``.
        beta: ``beta`` (>= 0).
        l1: ``lambda1`` (>= 0), group-lasso strength; the threshold on a row's
            ``||z||_2`` is ``l1 * sqrt(d)``.
        l2: ``lambda2`` (>= 0), L2 strength.

    Raises:
        ValueError: as :class:`FTRL`.
    """

    def _dense_update(self, p, z, n, g, alpha, beta, l1, l2) -> None:
        if p.dim() < 2:
            _ftrl_dense(p, z, n, g, alpha, beta, l1, l2)
            return
        rows = p.shape[0]
        w2, z2, n2 = p.reshape(rows, -1), z.reshape(rows, -1), n.reshape(rows, -1)
        z_new, n_new = _accumulate(w2, z2, n2, g.reshape(rows, -1), alpha)
        p.copy_(_group_weights(w2, z_new, n_new, alpha, beta, l1, l2).view_as(p))
        z.copy_(z_new.view_as(z))
        n.copy_(n_new.view_as(n))

    def _sparse_update(self, p, z, n, g, alpha, beta, l1, l2) -> None:
        if p.dim() < 2:
            _ftrl_sparse(p, z, n, g, alpha, beta, l1, l2)
            return
        if g._nnz() == 0:
            return
        idx, values = g.indices(), g.values()
        if g.sparse_dim() == 1:  # nn.Embedding: whole rows, indices already unique
            rows, g_rows = idx[0], values
        else:  # coordinates listed individually: gather them into whole rows
            rows, inverse = torch.unique(idx[0], return_inverse=True)
            g_rows = values.new_zeros((rows.numel(), *p.shape[1:]))
            g_rows[(inverse, *idx[1:])] = values
        r = rows.numel()
        w_r, z_r, n_r = p[rows].reshape(r, -1), z[rows].reshape(r, -1), n[rows].reshape(r, -1)
        z_new, n_new = _accumulate(w_r, z_r, n_r, g_rows.reshape(r, -1), alpha)
        shape = (r, *p.shape[1:])
        p[rows] = _group_weights(w_r, z_new, n_new, alpha, beta, l1, l2).view(shape)
        z[rows] = z_new.view(shape)
        n[rows] = n_new.view(shape)


class LazyAdam(torch.optim.Optimizer):
    """``torch.optim.SparseAdam``'s update rule, computed on the gradient's rows only.

    For parameters whose gradients are row-sparse COO tensors (``nn.Embedding(...,
    sparse=True)``, STAR's per-domain weights): each step coalesces the gradient (:func:`_coalesced`) and
    updates the moments and the weights of the rows it lists; every other row keeps
    its weights and moments (lazy Adam). Per listed row ``r``, with ``t`` the number of
    steps this parameter has taken (SparseAdam's ``state["step"]``)::

        m_r <- m_r + (1 - beta1) (g_r - m_r)
        v_r <- v_r + (1 - beta2) (g_r^2 - v_r)
        w_r <- w_r - lr sqrt(1 - beta2^t) / (1 - beta1^t) * m_r / (sqrt(v_r) + eps)

    the same values as SparseAdam up to float rounding (tested), and the same state
    (``step``, ``exp_avg``, ``exp_avg_sq``). SparseAdam builds sparse tensors for every
    intermediate and adds them into the dense state; here torch's fused Adam kernel
    (SparseAdam's rule is Adam's with ``eps / sqrt(1 - beta2^t)``) updates the listed rows
    in one pass, in one of two ways chosen by the size of a row:

    - rows of at least ``in_place_from`` numbers (STAR's per-domain weight matrices) are
      handed to the kernel as views of the weights and moments, one tensor per row, and
      updated where they lie: one pass over the rows;
    - smaller rows (embedding rows, biases, gates) are gathered into a buffer this
      optimiser keeps (reused from step to step: a fresh multi-megabyte tensor each step
      costs page faults), updated there and written back, seven passes over the rows but
      one kernel call, where a call per row would cost more than the passes.
      The buffer is scratch, not state: ``state_dict`` does not hold it.

    ``benchmarks/multidomain_step.py`` times this against SparseAdam on STAR's per-domain
    rows (docs/benchmarks.md §6), where the optimiser is a large part of a step.

    Args:
        params: parameters (or groups) whose gradients are sparse with one sparse
            dimension (rows); a dense gradient raises, as SparseAdam's does.
        lr: > 0. betas: each in ``[0, 1)``. eps: > 0.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        _check_adam(lr, betas, eps)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})
        self._scratch: dict[Tensor, Tensor] = {}  # parameter -> (3, rows, *row shape)

    #: Rows of at least this many numbers are updated in place, one kernel tensor per row.
    #: The fused kernel costs a few microseconds per tensor, the gather-and-write-back six
    #: more passes over the rows: ``python benchmarks/star_kernels.py`` (docs/benchmarks.md
    #: §6, 285 rows on 2 cores) has rows of 2,048 numbers updated faster gathered, of 4,096
    #: about as fast either way, of 16,384 2.5x faster in place; STAR's per-domain rows at
    #: P = 1,000 take 13 ms a step with this threshold, 27-28 ms all gathered
    #: (``benchmarks/multidomain_step.py``).
    in_place_from: int = 4096

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, checking the group's values."""
        _check_adam(*(param_group.get(k, self.defaults[k]) for k in ("lr", "betas", "eps")))
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update of every parameter that has a gradient."""
        loss = _evaluate(closure)
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse or p.grad.sparse_dim() != 1:
                    kind = f"sparse_dim {p.grad.sparse_dim()}" if p.grad.is_sparse else "dense"
                    raise RuntimeError(
                        f"LazyAdam updates rows of row-sparse gradients (sparse_dim 1); the parameter "
                        f"of shape {tuple(p.shape)} got a {kind} gradient: give it Adam, or read it "
                        "with sparse=True"
                    )
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                grad = _coalesced(p.grad)
                rows, g = grad.indices()[0], grad.values().contiguous()
                if len(rows) == 0:
                    continue
                tables = (p, state["exp_avg"], state["exp_avg_sq"])
                t = state["step"]
                in_place = p[0].numel() >= self.in_place_from
                if in_place:
                    listed = rows.tolist()
                    weights, m, v = ([table[r] for r in listed] for table in tables)
                    grads = list(g.unbind(0))
                else:
                    weights, m, v = ([gathered] for gathered in self._gather(p, rows, tables))
                    grads = [g]
                # torch's fused Adam kernel (what Adam(fused=True) calls) with one step tensor per
                # updated tensor, already at t (Adam's wrapper adds the 1 in one more launch)
                steps = list(torch.full((len(grads),), float(t), device=p.device).unbind(0))
                torch._fused_adam_(
                    weights, grads, m, v, [], steps, lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0,
                    eps=eps / math.sqrt(1 - beta2**t), amsgrad=False, maximize=False,
                )  # fmt: skip
                if not in_place:
                    for table, (updated,) in zip(tables, (weights, m, v), strict=True):
                        table.index_copy_(0, rows, updated)
        return loss

    def _gather(self, p: Tensor, rows: Tensor, tables: tuple[Tensor, ...]) -> Tensor:
        """``(3, len(rows), *row)``: the rows of the weights and of both moments, in this
        parameter's scratch buffer (grown when a step lists more rows than ever before)."""
        scratch = self._scratch.get(p)
        if scratch is None or scratch.shape[1] < len(rows):
            scratch = self._scratch[p] = p.new_empty(3, len(rows), *p.shape[1:])
        out = scratch[:, : len(rows)]
        for table, buffer in zip(tables, out, strict=True):
            torch.index_select(table, 0, rows, out=buffer)
        return out


def _coalesced(grad: Tensor) -> Tensor:
    """A sparse COO gradient with each coordinate listed once, in order (what the lazy
    optimisers read).

    A row-sparse gradient whose rows are already distinct and ascending (STAR's, read
    by the batch's sorted domain ids) is only marked coalesced, sharing its indices and
    values: autograd drops the flag, and ``coalesce()`` would sort and copy every listed
    row again. Any other gradient is coalesced."""
    if grad.is_coalesced():
        return grad
    if grad.sparse_dim() == 1:
        rows = grad._indices()[0]
        if bool((rows[1:] > rows[:-1]).all()):
            return torch.sparse_coo_tensor(
                grad._indices(), grad._values(), grad.shape, is_coalesced=True, check_invariants=False
            )  # distinct and ascending: the invariant holds
    return grad.coalesce()


def _check_adam(lr: float, betas: tuple[float, float], eps: float) -> None:
    """Raise ``ValueError`` naming every bad hyper-parameter."""
    bad = []
    if not (math.isfinite(lr) and lr > 0):
        bad.append(f"lr={lr} must be a positive finite number")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        bad.append(f"betas={betas} must be two values in [0, 1)")
    if not (math.isfinite(eps) and eps > 0):
        bad.append(f"eps={eps} must be a positive finite number")
    if bad:
        raise ValueError("; ".join(bad))


#: Optimisers a parameter role may use (``TrainConfig.group_optimizers``).
OPTIMIZERS = ("adam", "ftrl", "gftrl")


class CombinedOptimizer:
    """Several optimisers stepped as one (e.g. DynInt §4.1.4: G-FTRL for the embedding
    table, FTRL for the PIN layers, Adam for the generators).

    Exposes what the training loop uses: ``zero_grad``, ``step``, ``param_groups``
    (all of them, for learning-rate schedulers and logging) and ``state_dict``.
    Not usable with float16 AMP's ``GradScaler`` (it needs one ``torch.optim``
    optimiser); bfloat16 needs no scaler.

    Args:
        optimizers: ``{role: optimiser}``, in stepping order.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimiser")
        self.optimizers = dict(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {role: opt.state_dict() for role, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for role, opt in self.optimizers.items():
            opt.load_state_dict(state[role])
