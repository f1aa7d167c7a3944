"""Reusable layers: the static dense tower, cross networks and the FM interaction.

A *dense tower* is any module with ``out_dim`` and
``forward(h (B, E_in), emb (B, F, D)) -> (B, H)``: ``h`` is the tower input and
``emb`` the field embeddings, which APG towers read their conditions from (static
towers ignore it). Backbones take the tower as an injected module.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dynamic_ctr.models.config import ModelConfig

__all__ = [
    "CrossNetV1",
    "CrossNetV2",
    "FactorizationMachine",
    "HiddenActivation",
    "MLPTower",
    "check_domain_input",
    "check_units",
    "rows_with_sparse_grad",
]


def check_units(name: str, units: Sequence[int], allow_empty: bool = False) -> tuple[int, ...]:
    """Layer widths as a tuple of ints >= 1 (``allow_empty``: none is fine); raises
    ``ValueError`` naming ``name`` otherwise."""
    values = list(units)
    try:
        checked: tuple[int, ...] | None = tuple(operator.index(u) for u in values)
    except TypeError:
        checked = None
    if checked is None or any(u < 1 for u in checked) or (not checked and not allow_empty):
        raise ValueError(f"{name}={values} must hold{'' if allow_empty else ' one or more'} ints >= 1")
    return checked


def check_domain_input(h: Tensor, domain: Tensor, in_dim: int, num_domains: int) -> int:
    """The input checks of a multi-domain network (STAR, MMoE): ``h (B, in_dim)`` and
    integer ``domain (B,)`` ids in ``[0, num_domains)`` (a negative id would silently pick
    the last domain). Returns B; raises ``ValueError`` naming what is wrong.
    """
    b = h.shape[0] if h.ndim == 2 else -1
    if h.ndim != 2 or h.shape[1] != in_dim:
        raise ValueError(f"h must be (B, {in_dim}), got {tuple(h.shape)}")
    if domain.shape != (b,) or domain.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"domain must be an int64 ({b},) tensor, got {domain.dtype} {tuple(domain.shape)}")
    if b:
        low, high = torch.aminmax(domain)
        if int(low) < 0 or int(high) >= num_domains:
            raise ValueError(f"domain ids must be in [0, {num_domains}), got [{int(low)}, {int(high)}]")
    return b


class _RowsWithSparseGrad(torch.autograd.Function):
    """``weight[ids]`` along dim 0, whose gradient is a row-sparse COO tensor."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, ids: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.weight_shape = weight.shape
        return weight.index_select(0, ids)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (ids,) = ctx.saved_tensors
        # one sparse dim (rows), the row shape dense; repeated ids stay uncoalesced (summed).
        # No invariant check: the ids were valid rows for the forward's index_select.
        return torch.sparse_coo_tensor(ids.unsqueeze(0), grad, ctx.weight_shape, check_invariants=False), None


def rows_with_sparse_grad(weight: Tensor, ids: Tensor) -> Tensor:
    """``weight[ids]`` for a per-domain table ``weight (P, ...)`` and ids ``(B,)``, whose
    gradient lists the B rows only (a COO tensor with one sparse dimension), so that
    a lazy optimiser (``training.optimizers.LazyAdam``, parameter role ``domain``) updates
    the batch's domains and never touches the other P rows. ``F.embedding(...,
    sparse=True)`` does the same for 2-d tables; this also takes ``(P, N, M)`` ones."""
    return _RowsWithSparseGrad.apply(weight, ids.long())


class HiddenActivation(nn.Module):
    """What follows each hidden linear map: ``BatchNorm1d? -> ReLU -> Dropout?``.

    Absent parts are ``nn.Identity`` so parameter names do not depend on them (a
    folded model, whose dropout is removed, loads the unfolded state dict).

    Args:
        width: H, the layer width.
        batch_norm: BatchNorm1d before the ReLU.
        dropout: dropout after it (0 = none).
    """

    def __init__(self, width: int, batch_norm: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm: nn.Module = nn.BatchNorm1d(width) if batch_norm else nn.Identity()
        self.act = nn.ReLU()
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, h: Tensor) -> Tensor:
        """``(B, H) -> (B, H)``."""
        return self.dropout(self.act(self.norm(h)))


class MLPTower(nn.Module):
    """Static dense tower: ``Linear -> HiddenActivation`` per hidden layer.

    Args:
        cfg: model config (``hidden_units``, ``batch_norm``, ``dropout``).
        in_dim: E_in, the width of the tower input.
    """

    def __init__(self, cfg: ModelConfig, in_dim: int) -> None:
        super().__init__()
        dims = [in_dim, *cfg.hidden_units]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.acts = nn.ModuleList(HiddenActivation(b, cfg.batch_norm, cfg.dropout) for b in dims[1:])
        self.out_dim = dims[-1]

    def forward(self, h: Tensor, emb: Tensor | None = None) -> Tensor:
        """``h (B, E_in)`` -> ``(B, H_last)``; ``emb`` is unused."""
        for linear, act in zip(self.linears, self.acts):
            h = act(linear(h))  # (B, H_l)
        return h

    def activation_numel(self, batch_size: int) -> int:
        """Elements of the hidden activations of one batch: one ``(B, H)`` per layer."""
        return sum(batch_size * lin.out_features for lin in self.linears)


class CrossNetV1(nn.Module):
    """DCN cross network (Wang et al., 2017, https://arxiv.org/abs/1708.05123).

    ``x_{l+1} = x_0 * (x_l . w_l) + b_l + x_l`` with ``w_l, b_l`` of shape ``(E,)``.

    Args:
        dim: E, the input width.
        num_layers: L, the number of cross layers.
    """

    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_layers, dim))
        self.bias = nn.Parameter(torch.empty(num_layers, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x0: Tensor) -> Tensor:
        """``x0 (B, E) -> (B, E)``."""
        x = x0
        for w, b in zip(self.weight, self.bias):
            xw = x @ w  # (B,)
            x = x0 * xw.unsqueeze(1) + b + x  # (B, E)
        return x


class CrossNetV2(nn.Module):
    """DCN-V2 cross network, full-rank (Wang et al., 2021, https://arxiv.org/abs/2008.13535).

    ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` with ``W_l`` of shape ``(E, E)``.

    Args:
        dim: E, the input width.
        num_layers: L, the number of cross layers.
    """

    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers))

    def forward(self, x0: Tensor) -> Tensor:
        """``x0 (B, E) -> (B, E)``."""
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x  # (B, E)
        return x


class FactorizationMachine(nn.Module):
    """Second-order FM term (Rendle, 2010): ``sum_{i<j} <v_i, v_j>``.

    ``0.5 * (||sum_i v_i||^2 - sum_i ||v_i||^2)``: over field embeddings
    (``forward``), or over any set of features given its two sums (:meth:`from_sums`,
    e.g. from ``FieldEmbedding.with_feature_sums``).
    """

    @staticmethod
    def from_sums(total: Tensor, sq_norms: Tensor) -> Tensor:
        """``total (B, D) = sum_i v_i``, ``sq_norms (B,) = sum_i ||v_i||^2`` -> ``(B,)``."""
        return 0.5 * (total.square().sum(dim=1) - sq_norms)  # (B,)

    def forward(self, emb: Tensor) -> Tensor:
        """``emb (B, F, D) -> (B,)``: the pairs of fields."""
        square_of_sum = emb.sum(dim=1).square()  # (B, D)
        sum_of_square = emb.square().sum(dim=1)  # (B, D)
        return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)  # (B,)
