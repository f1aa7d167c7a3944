"""STAR: Star Topology Adaptive Recommender (Sheng et al., CIKM 2021, "One Model to
Serve All: Star Topology Adaptive Recommender for Multi-Domain CTR Prediction").

A core network on the flattened field embeddings ``h (B, E_in)`` plus a per-sample
domain id; it returns ``(B,)`` logits. Domain ids are int64 in ``[0, num_domains)``:
0 (padding) and 1 (``__other__``, the rare domains) are ordinary domains here, with
their own parameters and statistics.

Paper map:

* :class:`PartitionedNorm`: Partitioned Normalization (PN),
  ``z' = (gamma * gamma_p) (z - E_p) / sqrt(Var_p + eps) + (beta + beta_p)``: shared
  ``gamma, beta``, domain-specific ``gamma_p, beta_p`` and per-domain statistics.
* :class:`StarLinear`: one layer of the star topology FCN, ``W*_p = W_p o W`` (o the
  element-wise product) and ``b*_p = b_p + b``, ``out = phi(W*_p in + b*_p)``.
* :class:`StarNetwork`: PN on ``h``, the star topology FCN (ReLU hidden layers, a
  linear 1-unit output) and the auxiliary network on the domain embedding, whose
  logit is added to the main one (``sigmoid(s_main + s_aux)``).
* :class:`FoldedStarNetwork`: the serving form (``W_p o W`` and ``b_p + b`` multiplied
  out per domain, eval PN reduced to ``(h - centre_p) * scale_p + shift_p``).

Shapes (besides B and ``models/__init__``'s names):

====  ==============================================================
E_in  width of ``h`` (``in_dim``), the flattened field embeddings
P     number of domains (``num_domains``), ids in ``[0, P)``
K     distinct domains present in the batch, ``K <= min(B, P)``
M, N  in and out width of one FCN layer
A     width of the domain embedding (``domain_dim``)
====  ==============================================================

Cost: every per-domain tensor is gathered for the K domains of the batch, never for all
P: a forward's work and memory grow with the batch, not with ``B * P`` (nor with P).
Two exact forms of the per-sample product ``(W_d o W) x + (b_d + b)``, one per forward:

* ``grouped``: the batch is sorted by domain once; each layer composes the K present
  domains' ``(K, N, M)`` weights and multiplies each domain's rows by its own matrix.
  Holds ``K * N * M`` weights per layer. In float32 on the CPU with torch >= 2.9 that is
  one grouped-GEMM kernel per layer (``torch.nn.functional.grouped_mm``; two more in the
  backward, see :class:`_GroupedMatmul`), else one Python-level GEMM per domain.
* ``per_sample``: composes the K present weights and gathers them per sample into a
  ``(B, N, M)`` tensor for one ``torch.bmm``. One kernel per layer, but ``B * N * M``
  numbers per layer.

``matmul_form = "auto"`` (the default) takes ``grouped`` on the CPU, and on an
accelerator when ``K <=`` :data:`GROUPED_MAX_DOMAINS` (coarse partitions and small
batches), ``per_sample`` otherwise (fine partitions, where K GEMM launches per layer
would dominate; that threshold is a guess, not measured). On one CPU thread (E_in = 160,
hidden (128, 64, 32), B = 512, eval) the per-domain loop took 1.3 / 2.1 / 19 ms at
K = 4 / 16 / 300 against 33 / 22 / 31 ms for ``per_sample``; the grouped kernel cut a
training step at K = 292 further (docs/benchmarks.md §6). All forms give the same values
up to float rounding.

Choices where the paper is silent or ambiguous:

* PN statistics in training with mixed-domain batches: each domain's rows are
  normalised with the (biased) mean and variance of that domain's rows in the batch
  (with gradients through them, as BatchNorm), so a row never sees another domain's
  rows; this is STAR's PN for a batch of one domain. Running ``E_p, Var_p`` are
  ``(P, E_in)`` buffers updated per present domain with ``momentum`` (as
  ``nn.BatchNorm1d``: ``r <- (1 - m) r + m s``, the unbiased variance), and eval uses
  them, so a prediction never depends on its batch.
* A domain with a single row in a training batch has no variance (batch statistics
  would map the row to ``beta + beta_p`` exactly, whatever it holds): that row is
  normalised with its domain's running statistics (as in eval; no gradient through
  them) and the domain's running statistics are not updated by that batch.
* A domain never seen in training keeps the initial running statistics (mean 0, var 1):
  PN is then the affine map ``(gamma gamma_p) z + (beta + beta_p)`` with its init
  ``gamma_p = 1, beta_p = 0``.
* Init: ``W_p = 1`` and ``b_p = 0`` for every domain (so at start every domain's FCN is
  the shared one, ``W_p o W = W``); the shared ``W, b`` and the auxiliary network take
  ``nn.Linear``'s default init; PN's ``gamma = gamma_p = 1``, ``beta = beta_p = 0``.
* FCN: ReLU after every hidden layer, then dropout (if any); no normalisation inside
  the FCN (PN acts on its input only) and no activation on the 1-unit logit.
* Auxiliary network: ``Linear -> ReLU`` per ``aux_hidden`` width, then a linear 1-unit
  logit, on ``domain_emb`` only (STAR also feeds it other features that describe the
  domain: the caller may concatenate them into ``domain_emb``); no dropout.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from dynamic_ctr.models.layers import check_domain_input, check_units

__all__ = [
    "GROUPED_MAX_DOMAINS",
    "MATMUL_FORMS",
    "DomainGroups",
    "FoldedStarNetwork",
    "PartitionedNorm",
    "StarLinear",
    "StarNetwork",
    "auto_grouped",
    "domain_linear",
    "group_domains",
    "grouped_kernel_fits",
]

#: Off the CPU, ``matmul_form = "auto"`` groups the batch by domain when it holds at most
#: this many distinct domains, and gathers per-sample weights otherwise (on the CPU it
#: always groups; see the module docstring).
GROUPED_MAX_DOMAINS = 16

MATMUL_FORMS = ("auto", "grouped", "per_sample")


class DomainGroups(NamedTuple):
    """The domains of one batch, computed once per forward.

    Attributes:
        ids: ``(K,)`` the distinct domain ids of the batch, ascending.
        inverse: ``(B,)`` position of each row's domain in ``ids``.
        counts: ``(K,)`` rows per present domain.
        order: ``(B,)`` a stable sort of the rows by domain (row ``order[j]`` is j-th).
        rank: ``(B,)`` the inverse permutation: ``sorted[rank]`` restores batch order.
        sizes: the counts as Python ints (the split sizes of the sorted batch).
        sorted_inverse: ``(B,)`` ``inverse[order]``, each sorted row's present domain.
        offsets: ``(K,)`` int32, the end of each domain's block of sorted rows.
    """

    ids: Tensor
    inverse: Tensor
    counts: Tensor
    order: Tensor
    rank: Tensor
    sizes: list[int]
    sorted_inverse: Tensor
    offsets: Tensor


def group_domains(domain: Tensor) -> DomainGroups:
    """``domain (B,)`` int64 -> its :class:`DomainGroups` (K-sized, never P-sized)."""
    ids, inverse, counts = torch.unique(domain, sorted=True, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)  # (B,)
    rank = torch.argsort(order)  # (B,)
    offsets = torch.cumsum(counts, 0).to(torch.int32)  # (K,)
    return DomainGroups(ids, inverse, counts, order, rank, counts.tolist(), inverse[order], offsets)


#: torch's grouped GEMM (``torch.nn.functional.grouped_mm``, torch >= 2.9); None before.
_GROUPED_MM = getattr(nn.functional, "grouped_mm", None)


def auto_grouped(groups: DomainGroups) -> bool:
    """``matmul_form = "auto"``'s form for a batch (:func:`domain_linear`'s ``grouped``):
    grouped on the CPU, and on an accelerator when the batch holds at most
    :data:`GROUPED_MAX_DOMAINS` domains; per-sample gathered weights otherwise."""
    return groups.ids.device.type == "cpu" or len(groups.sizes) <= GROUPED_MAX_DOMAINS


def grouped_kernel_fits(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`domain_linear`'s ``grouped`` form runs as one grouped-GEMM kernel
    (torch >= 2.9, float32 on the CPU; accelerators take it in bfloat16 only, so they
    keep the per-domain loop), rather than one Python-level GEMM per present domain."""
    return (
        _GROUPED_MM is not None
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
    )


def _aligned(t: Tensor) -> Tensor:
    """``t`` itself if the grouped GEMM kernel takes its layout (every stride but the
    unit one a multiple of 16 bytes), else a copy whose rows are padded to 16 bytes
    (the padding is never read: a view of the original shape)."""
    quantum = 16 // t.element_size()
    strides = list(t.stride())
    inner = t.ndim - 1 if strides[-1] == 1 else t.ndim - 2  # the unit-stride dimension
    outer = strides[:inner] + strides[inner + 1 :]
    if strides[inner] == 1 and all(s % quantum == 0 for s in outer) and t.data_ptr() % 16 == 0:
        return t
    padded = t.new_zeros(*t.shape[:-1], -(-t.shape[-1] // quantum) * quantum)[..., : t.shape[-1]]
    return padded.copy_(t)


class _GroupedMatmul(torch.autograd.Function):
    """``x (B, M)`` sorted by domain, ``weight (K, N, M)`` -> ``(B, N)``: block k of rows
    (ending at ``offsets[k]``) times ``weight[k]^T``. One grouped-GEMM kernel forward and
    two backward (the kernel has no autograd on the CPU); the same values as the
    per-domain loop up to float rounding (tested against it)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, offsets)
        return _GROUPED_MM(_aligned(x), _aligned(weight).transpose(1, 2), offs=offsets)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight, offsets = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = _GROUPED_MM(_aligned(grad), _aligned(weight), offs=offsets)  # (B, M)
        if ctx.needs_input_grad[1]:
            grad_weight = _GROUPED_MM(_aligned(grad.t()), _aligned(x), offs=offsets)  # (K, N, M)
        return grad_x, grad_weight, None


def domain_linear(x: Tensor, weight: Tensor, bias: Tensor, groups: DomainGroups, grouped: bool) -> Tensor:
    """``y_b = weight[k(b)] x_b + bias[k(b)]`` with ``k(b)`` the row's present domain.

    Args:
        x: ``(B, M)``; sorted by domain (``x[groups.order]``) when ``grouped``, in batch
            order otherwise.
        weight: ``(K, N, M)``, one matrix per present domain (``groups.ids`` order).
        bias: ``(K, N)``.
        groups: the batch's domains.
        grouped: each present domain's (contiguous, sorted) rows by its own matrix (one
            grouped-GEMM kernel where :func:`grouped_kernel_fits`, else one GEMM per
            domain), or one ``bmm`` over per-sample gathered ``(B, N, M)`` weights.

    Returns:
        ``(B, N)``, in the row order of ``x``.
    """
    if grouped:
        if not groups.sizes:  # empty batch
            return x.new_zeros(0, weight.shape[1])
        if grouped_kernel_fits(x, weight):
            return _GroupedMatmul.apply(x, weight, groups.offsets) + bias.index_select(0, groups.sorted_inverse)
        pieces = x.split(groups.sizes)  # K blocks of (n_k, M)
        # unbind, not weight[k]: each indexing's backward would zero-fill a whole (K, N, M)
        # gradient, K^2 N M per layer; unbind's backward stacks the K pieces once.
        weights, biases = weight.unbind(0), bias.unbind(0)
        return torch.cat([torch.addmm(b, rows, w.t()) for w, b, rows in zip(weights, biases, pieces, strict=True)])
    w = weight[groups.inverse]  # (B, N, M): each row's own weight
    return torch.baddbmm(bias[groups.inverse].unsqueeze(2), w, x.unsqueeze(2)).squeeze(2)  # (B, N)


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")


def _linear_init_(weight: Tensor, bias: Tensor, fan_in: int) -> None:
    """``nn.Linear``'s default init, ``U(-1/sqrt(M), 1/sqrt(M))`` for weight and bias."""
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    nn.init.uniform_(bias, -bound, bound)


class PartitionedNorm(nn.Module):
    """STAR's Partitioned Normalization of ``h (B, E_in)`` by domain.

    ``(gamma * gamma_d) (h - mu_d) / sqrt(var_d + eps) + (beta + beta_d)``: per-domain
    batch statistics in training (each domain's rows alone; a domain with one row uses
    its running statistics), the running ``(P, E_in)`` statistics in eval (see the
    module docstring).

    Args:
        dim: E_in.
        num_domains: P.
        momentum: running-statistics momentum in ``(0, 1]``.
        eps: added to the variance, > 0.
    """

    running_mean: Tensor
    running_var: Tensor

    def __init__(self, dim: int, num_domains: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        _check_dims(in_dim=dim, num_domains=num_domains)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum={momentum} must be in (0, 1]")
        if not eps > 0.0:
            raise ValueError(f"eps={eps} must be > 0")
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(dim))  # gamma (shared)
        self.bias = nn.Parameter(torch.zeros(dim))  # beta (shared)
        self.domain_weight = nn.Parameter(torch.ones(num_domains, dim))  # gamma_p
        self.domain_bias = nn.Parameter(torch.zeros(num_domains, dim))  # beta_p
        self.register_buffer("running_mean", torch.zeros(num_domains, dim))  # E_p
        self.register_buffer("running_var", torch.ones(num_domains, dim))  # Var_p

    def forward(self, h: Tensor, domain: Tensor, groups: DomainGroups | None = None) -> Tensor:
        """``h (B, E_in)``, ``domain (B,)`` -> ``(B, E_in)``; ``groups`` if at hand."""
        if self.training:
            if groups is None:
                groups = group_domains(domain)
            mean, var = self._batch_statistics(h, groups)  # (K, E_in) each
            mean, var = mean[groups.inverse], var[groups.inverse]  # (B, E_in)
        else:
            mean, var = self.running_mean[domain], self.running_var[domain]  # (B, E_in)
        # sparse gradients: only the rows of the batch's domains (see StarNetwork.parameter_roles)
        gamma = nn.functional.embedding(domain, self.domain_weight, sparse=True)  # (B, E_in)
        scale = self.weight * gamma / torch.sqrt(var + self.eps)  # (B, E_in)
        shift = self.bias + nn.functional.embedding(domain, self.domain_bias, sparse=True)  # (B, E_in)
        return (h - mean) * scale + shift  # (B, E_in)

    def _batch_statistics(self, h: Tensor, groups: DomainGroups) -> tuple[Tensor, Tensor]:
        """Per present domain ``(K, E_in)`` mean and variance used in training; updates
        the running statistics of the domains with >= 2 rows."""
        k = groups.ids.shape[0]
        n = groups.counts.to(h.dtype).unsqueeze(1)  # (K, 1)
        mean = h.new_zeros(k, h.shape[1]).index_add(0, groups.inverse, h) / n  # (K, E_in)
        centred = h - mean[groups.inverse]  # (B, E_in)
        sq = h.new_zeros(k, h.shape[1]).index_add(0, groups.inverse, centred.square())  # (K, E_in)
        var = sq / n  # (K, E_in), biased
        several = (groups.counts >= 2).unsqueeze(1)  # (K, 1)
        with torch.no_grad():
            keep = several.squeeze(1)
            ids, m = groups.ids[keep], self.momentum
            if ids.numel():
                unbiased = var[keep] * n[keep] / (n[keep] - 1)
                self.running_mean.index_copy_(0, ids, (1 - m) * self.running_mean[ids] + m * mean[keep])
                self.running_var.index_copy_(0, ids, (1 - m) * self.running_var[ids] + m * unbiased)
        # one row: no variance; normalise it with its domain's running statistics
        mean = torch.where(several, mean, self.running_mean[groups.ids])
        var = torch.where(several, var, self.running_var[groups.ids])
        return mean, var

    def folded(self) -> tuple[Tensor, Tensor, Tensor]:
        """Eval PN as ``(h - centre_d) * scale_d + shift_d``: ``(P, E_in)`` each, computed
        with the same operations as the eval forward (so the values agree exactly)."""
        scale = self.weight * self.domain_weight / torch.sqrt(self.running_var + self.eps)
        return self.running_mean.clone(), scale, self.bias + self.domain_bias


class StarLinear(nn.Module):
    """One star-topology FCN layer: ``W*_d = W_d o W``, ``b*_d = b_d + b``.

    Every domain's ``W_d (N, M)`` and ``b_d (N,)`` is a row of one registered parameter,
    ``domain_weight (P, N * M)`` (row p = ``W_p`` flattened) and ``domain_bias (P, N)``
    (init 1 and 0). They are read with sparse gradients, so a step's gradient holds the
    batch's domains only and a lazy optimiser (``training.optimizers.LazyAdam``; the training
    loop's default for the ``domain`` role) leaves the other domains' weights as they
    are: each domain's parameters learn from its own rows only, and the cost of a step
    does not grow with P.

    Args:
        in_dim: M. out_dim: N. num_domains: P.
    """

    def __init__(self, in_dim: int, out_dim: int, num_domains: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))  # W (shared)
        self.bias = nn.Parameter(torch.empty(out_dim))  # b (shared)
        self.domain_weight = nn.Parameter(torch.ones(num_domains, out_dim * in_dim))  # W_p, flattened
        self.domain_bias = nn.Parameter(torch.zeros(num_domains, out_dim))  # b_p
        _linear_init_(self.weight, self.bias, in_dim)

    def composite(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``ids (K,)`` -> ``W_d o W (K, N, M)`` and ``b_d + b (K, N)`` for those domains.
        With distinct ascending ids (``DomainGroups.ids``) the sparse gradients list each
        row once, in order, which the lazy optimiser reads without sorting them again."""
        weight = nn.functional.embedding(ids, self.domain_weight, sparse=True).view(-1, self.out_dim, self.in_dim)
        bias = nn.functional.embedding(ids, self.domain_bias, sparse=True)  # (K, N)
        return self.weight * weight, self.bias + bias

    def forward(self, x: Tensor, groups: DomainGroups, grouped: bool) -> Tensor:
        """``x (B, M) -> (B, N)`` (no activation); see :func:`domain_linear`."""
        weight, bias = self.composite(groups.ids)  # (K, N, M), (K, N)
        return domain_linear(x, weight, bias, groups, grouped)


class StarNetwork(nn.Module):
    """STAR core network: ``h (B, E_in)``, ``domain (B,)``, ``domain_emb (B, A)`` ->
    logits ``(B,)``.

    ``PN -> [StarLinear -> ReLU -> Dropout] * len(hidden_units) -> StarLinear(., 1)``,
    plus the auxiliary network's logit. ``matmul_form`` (an attribute, one of
    :data:`MATMUL_FORMS`) picks the form of the per-domain products.

    Args:
        in_dim: E_in.
        hidden_units: widths of the hidden FCN layers (may be empty: one star linear map).
        num_domains: P.
        domain_dim: A, the width of ``domain_emb``.
        aux_hidden: hidden widths of the auxiliary network.
        dropout: after each hidden ReLU of the FCN, in ``[0, 1)``.
        norm: PN on ``h`` (else ``h`` enters the FCN as is).
        momentum, eps: PN's, as ``nn.BatchNorm1d``'s.

    Example::

        >>> net = StarNetwork(in_dim=8, hidden_units=(16, 8), num_domains=5, domain_dim=4)
        >>> net(torch.randn(3, 8), torch.tensor([0, 2, 2]), torch.randn(3, 4)).shape
        torch.Size([3])
    """

    def __init__(
        self,
        in_dim: int,
        hidden_units: Sequence[int],
        num_domains: int,
        domain_dim: int,
        *,
        aux_hidden: Sequence[int] = (64,),
        dropout: float = 0.0,
        norm: bool = True,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        _check_dims(in_dim=in_dim, num_domains=num_domains, domain_dim=domain_dim)
        hidden_units = check_units("hidden_units", hidden_units, allow_empty=True)
        aux_hidden = check_units("aux_hidden", aux_hidden, allow_empty=True)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.in_dim, self.num_domains, self.domain_dim = in_dim, num_domains, domain_dim
        self.hidden_units, self.aux_hidden = hidden_units, aux_hidden
        self.matmul_form = "auto"
        self.norm = PartitionedNorm(in_dim, num_domains, momentum, eps) if norm else None
        dims = [in_dim, *hidden_units, 1]
        self.layers = nn.ModuleList(StarLinear(a, b, num_domains) for a, b in itertools.pairwise(dims))
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        aux_dims = [domain_dim, *aux_hidden, 1]
        aux: list[nn.Module] = []
        for a, b in itertools.pairwise(aux_dims):
            aux += [nn.Linear(a, b), nn.ReLU()]
        self.aux = nn.Sequential(*aux[:-1])  # no ReLU on the aux logit

    def check_inputs(self, h: Tensor, domain: Tensor, domain_emb: Tensor) -> None:
        """ValueError on wrong shapes, a non-integer ``domain`` or an id outside ``[0, P)``."""
        b = check_domain_input(h, domain, self.in_dim, self.num_domains)
        if domain_emb.shape != (b, self.domain_dim):
            raise ValueError(f"domain_emb must be ({b}, {self.domain_dim}), got {tuple(domain_emb.shape)}")

    def use_grouped(self, groups: DomainGroups) -> bool:
        """Whether this batch runs in the ``grouped`` form (see ``matmul_form``)."""
        if self.matmul_form not in MATMUL_FORMS:
            raise ValueError(f"matmul_form={self.matmul_form!r} must be one of {MATMUL_FORMS}")
        if self.matmul_form == "auto":
            return auto_grouped(groups)
        return self.matmul_form == "grouped"

    def main_logit(self, h: Tensor, domain: Tensor) -> Tensor:
        """PN and the star FCN: ``(B,)``, without the auxiliary logit."""
        groups = group_domains(domain)
        x = self.norm(h, domain, groups) if self.norm is not None else h  # (B, E_in)
        grouped = self.use_grouped(groups)
        if grouped:
            x = x[groups.order]  # (B, E_in), sorted by domain
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, groups, grouped)  # (B, N)
            if i < last:
                x = self.dropout(torch.relu(x))
        logit = x.squeeze(1)  # (B,): linear, no activation
        return logit[groups.rank] if grouped else logit

    def forward(self, h: Tensor, domain: Tensor, domain_emb: Tensor) -> Tensor:
        """``h (B, E_in)``, ``domain (B,)`` int64, ``domain_emb (B, A)`` -> logits ``(B,)``."""
        self.check_inputs(h, domain, domain_emb)
        return self.main_logit(h, domain) + self.aux(domain_emb).squeeze(1)  # (B,)

    def parameter_count_by_part(self) -> dict[str, int]:
        """Parameters by part: ``shared`` (the FCN's W, b), ``specific`` (the FCN's
        ``W_p, b_p``: ``P * sum(N M + N)``), ``norm`` (PN's gamma, beta, gamma_p,
        beta_p; its ``2 P E_in`` running statistics are buffers, not counted) and
        ``aux``. The values sum to the module's parameter count."""
        return {
            "shared": sum(l.weight.numel() + l.bias.numel() for l in self.layers),
            "specific": sum(l.domain_weight.numel() + l.domain_bias.numel() for l in self.layers),
            "norm": sum(p.numel() for p in self.norm.parameters()) if self.norm is not None else 0,
            "aux": sum(p.numel() for p in self.aux.parameters()),
        }

    def parameter_roles(self) -> dict[str, list[nn.Parameter]]:
        """``{"domain": [...]}``: the per-domain parameters (PN's gamma_p, beta_p, every
        layer's W_p, b_p), whose gradients are sparse; the training loop updates them
        lazily (``TrainConfig.group_optimizers`` may pick FTRL for them instead)."""
        domain = [self.norm.domain_weight, self.norm.domain_bias] if self.norm is not None else []
        for layer in self.layers:
            domain += [layer.domain_weight, layer.domain_bias]
        return {"domain": domain}

    def fold(self) -> FoldedStarNetwork:
        """The serving form (eval; ``self`` is left untouched)."""
        return FoldedStarNetwork(self).eval()


class FoldedStarNetwork(nn.Module):
    """Serving form of a :class:`StarNetwork`: the same eval logits.

    * PN becomes ``(h - centre_d) * scale_d + shift_d`` with ``(P, E_in)`` constants
      (the running statistics and ``gamma gamma_p / sqrt(Var_p + eps)``,
      ``beta + beta_p``), the same operations as the eval forward;
    * each FCN layer keeps one ``(P, N, M)`` weight ``W_p o W`` and one ``(P, N)`` bias
      ``b_p + b``: the shared ``(N, M)`` parameters and the per-forward products are gone;
    * the auxiliary network's weights are copied.

    Everything is a buffer (no parameters); dropout is gone, so train and eval agree.
    The folded numbers are the values the eval forward computes, so the logits agree up to
    float rounding (bit for bit on CPU in the same ``matmul_form``).

    Args:
        source: the trained network.
    """

    def __init__(self, source: StarNetwork) -> None:
        super().__init__()
        self.in_dim, self.num_domains = source.in_dim, source.num_domains
        self.domain_dim = source.domain_dim
        self.matmul_form = source.matmul_form
        self.num_layers = len(source.layers)
        self.has_norm = source.norm is not None
        with torch.no_grad():
            if source.norm is not None:
                centre, scale, shift = source.norm.folded()
                self.register_buffer("norm_centre", centre.detach().clone())  # (P, E_in)
                self.register_buffer("norm_scale", scale.detach().clone())  # (P, E_in)
                self.register_buffer("norm_shift", shift.detach().clone())  # (P, E_in)
            for i, layer in enumerate(source.layers):
                ids = torch.arange(source.num_domains, device=layer.weight.device)
                weight, bias = layer.composite(ids)  # (P, N, M), (P, N)
                self.register_buffer(f"weight_{i}", weight.detach().clone())
                self.register_buffer(f"bias_{i}", bias.detach().clone())
        self.aux = copy.deepcopy(source.aux)
        for name, p in list(self.aux.named_parameters()):  # parameters -> buffers
            module_name, _, attr = name.rpartition(".")
            module = self.aux.get_submodule(module_name)
            delattr(module, attr)
            module.register_buffer(attr, p.detach().clone())

    check_inputs = StarNetwork.check_inputs
    use_grouped = StarNetwork.use_grouped

    def forward(self, h: Tensor, domain: Tensor, domain_emb: Tensor) -> Tensor:
        """``h (B, E_in)``, ``domain (B,)`` int64, ``domain_emb (B, A)`` -> logits ``(B,)``."""
        self.check_inputs(h, domain, domain_emb)
        groups = group_domains(domain)
        x = h
        if self.has_norm:
            x = (h - self.norm_centre[domain]) * self.norm_scale[domain] + self.norm_shift[domain]
        grouped = self.use_grouped(groups)
        if grouped:
            x = x[groups.order]
        for i in range(self.num_layers):
            weight = getattr(self, f"weight_{i}")[groups.ids]  # (K, N, M)
            bias = getattr(self, f"bias_{i}")[groups.ids]  # (K, N)
            x = domain_linear(x, weight, bias, groups, grouped)
            if i < self.num_layers - 1:
                x = torch.relu(x)
        logit = x.squeeze(1)
        if grouped:
            logit = logit[groups.rank]
        return logit + self.aux(domain_emb).squeeze(1)  # (B,)

    def numel_by_part(self) -> dict[str, int]:
        """Stored numbers by part (all buffers): ``specific`` (the ``P`` folded FCNs),
        ``norm`` (``3 P E_in``) and ``aux``."""
        buffers = dict(self.named_buffers())
        return {
            "specific": sum(v.numel() for k, v in buffers.items() if k.startswith(("weight_", "bias_"))),
            "norm": sum(v.numel() for k, v in buffers.items() if k.startswith("norm_")),
            "aux": sum(v.numel() for k, v in buffers.items() if k.startswith("aux.")),
        }

    def fold(self) -> FoldedStarNetwork:
        """Already folded: a copy."""
        return copy.deepcopy(self).eval()
