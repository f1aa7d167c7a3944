"""MMoE: Multi-gate Mixture-of-Experts (Ma et al., KDD 2018, "Modeling Task
Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts"), with the
domains as its tasks.

A core network on the flattened field embeddings ``h (B, E_in)`` plus a per-sample
domain id; it returns ``(B,)`` logits. Domain ids are int64 in ``[0, num_domains)``:
0 (padding) and 1 (``__other__``, the rare domains) are ordinary domains here, with
their own gate and tower.

Paper map (the MMoE model of the paper):

* experts ``f_i``: shared feed-forward networks on the input, ``i = 1..n``;
* gates ``g^k(x) = softmax(W_gk x)``, one per task k (here: per domain), ``W_gk`` of
  shape ``(n, E_in)``;
* ``f^k(x) = sum_i g^k(x)_i f_i(x)``, and the task tower ``y_k = h^k(f^k(x))``.

A sample of domain d uses gate d and tower d only. Coarse and fine-grained settings
(APG's Table 6: e.g. movie gender vs movie) differ only in which domain ids are fed;
:meth:`MMoENetwork.parameter_count_by_part` shows how the gates and towers grow with P.

Shapes (besides B and ``models/__init__``'s names):

====  ==============================================================
E_in  width of ``h`` (``in_dim``)
P     number of domains (``num_domains``)
X     number of experts (``num_experts``)
H     expert output width, ``expert_units[-1]``
M, N  in and out width of one expert or tower layer
====  ==============================================================

Cost: the experts run as batched ``(X, N, M)`` products over the whole batch (one GEMM
for the first layer, one ``bmm`` per further layer). Each sample's gate and tower
weights are gathered by its domain: ``(B, X, E_in)`` for the gates and ``(B, N, M)`` per
tower layer, so work and memory grow with B (``B * (X E_in + sum N M)`` numbers), never
with ``B * P``; gates and towers are small, so the gather is cheaper than grouping.
With ``lazy_domains`` (the default) the gathers' gradients are row-sparse
(``layers.rows_with_sparse_grad``) and the gates and towers are parameter role ``domain``
(:meth:`MMoENetwork.parameter_roles`), which the training loop updates lazily, the
batch's domains only: at the fine grain (a domain per item, P in the thousands) a dense
Adam step over every domain's gate and tower costs more than the rest of the step
(docs/benchmarks.md §6). Without it they are ordinary dense parameters, as data-parallel
training (no sparse all-reduce) and CUDA graphs (no lazy optimiser) need.

Choices where the paper is silent:

* Experts: ``Linear -> ReLU -> Dropout`` per ``expert_units`` width, the ReLU on the
  last layer too (an expert's output is a hidden representation). Towers: ``Linear ->
  ReLU -> Dropout`` per ``tower_units`` width, then a linear 1-unit logit.
* Gates read ``h`` itself and have a bias, ``softmax(W_gk x + b_gk)`` (the paper's
  ``softmax(W_gk x)`` has none): it lets a domain prefer experts whatever the input.
* Init: every expert, gate and tower layer (each domain's slice and each expert on its
  own) takes ``nn.Linear``'s default, ``U(-1/sqrt(M), 1/sqrt(M))`` for weight and bias.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dynamic_ctr.models.layers import check_domain_input, check_units, rows_with_sparse_grad

__all__ = ["MMoENetwork"]


def _batched_linear(count: int, dims: Sequence[int]) -> tuple[nn.ParameterList, nn.ParameterList]:
    """``count`` independent stacks of linear maps: ``(count, N, M)`` weights and
    ``(count, N)`` biases per layer, each slice with ``nn.Linear``'s default init."""
    weights, biases = nn.ParameterList(), nn.ParameterList()
    for m, n in itertools.pairwise(dims):
        bound = 1.0 / math.sqrt(m)
        weights.append(nn.Parameter(torch.empty(count, n, m).uniform_(-bound, bound)))
        biases.append(nn.Parameter(torch.empty(count, n).uniform_(-bound, bound)))
    return weights, biases


class MMoENetwork(nn.Module):
    """MMoE core network over domains: ``h (B, E_in)``, ``domain (B,)`` -> logits ``(B,)``.

    X shared experts, one softmax gate and one tower per domain; all of them are
    registered as batched parameters: ``expert_weights[l] (X, N, M)``, ``gate_weight
    (P, X, E_in)``, ``tower_weights[l] (P, N, M)`` (and the matching biases).

    Args:
        in_dim: E_in.
        num_domains: P.
        num_experts: X.
        expert_units: the experts' layer widths (at least one; H is the last).
        tower_units: hidden widths of each tower (may be empty: a linear tower).
        dropout: after each hidden ReLU of the experts and towers, in ``[0, 1)``.
        lazy_domains: read the gates and towers with row-sparse gradients (role
            ``domain``, lazy updates); False: dense gradients.

    Example::

        >>> net = MMoENetwork(in_dim=8, num_domains=5, num_experts=3, expert_units=(16,))
        >>> net(torch.randn(4, 8), torch.tensor([0, 1, 4, 4])).shape
        torch.Size([4])
    """

    def __init__(
        self,
        in_dim: int,
        num_domains: int,
        *,
        num_experts: int = 4,
        expert_units: Sequence[int] = (128, 64),
        tower_units: Sequence[int] = (32,),
        dropout: float = 0.0,
        lazy_domains: bool = True,
    ) -> None:
        super().__init__()
        dims = (("in_dim", in_dim), ("num_domains", num_domains), ("num_experts", num_experts))
        for name, value in dims:
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        expert_units = check_units("expert_units", expert_units, allow_empty=False)
        tower_units = check_units("tower_units", tower_units, allow_empty=True)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.in_dim, self.num_domains, self.num_experts = in_dim, num_domains, num_experts
        self.expert_units, self.tower_units = expert_units, tower_units
        self.expert_weights, self.expert_biases = _batched_linear(num_experts, [in_dim, *expert_units])
        gate_weights, gate_biases = _batched_linear(num_domains * num_experts, [in_dim, 1])
        self.gate_weight = nn.Parameter(gate_weights[0].detach().view(num_domains, num_experts, in_dim))
        self.gate_bias = nn.Parameter(gate_biases[0].detach().view(num_domains, num_experts))
        self.tower_weights, self.tower_biases = _batched_linear(
            num_domains, [expert_units[-1], *tower_units, 1]
        )
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lazy_domains = bool(lazy_domains)

    def check_inputs(self, h: Tensor, domain: Tensor) -> None:
        """ValueError on wrong shapes, a non-integer ``domain`` or an id outside ``[0, P)``."""
        check_domain_input(h, domain, self.in_dim, self.num_domains)

    def _rows(self, table: Tensor, domain: Tensor) -> Tensor:
        """``table[domain]``: each row's own slice of a per-domain table, its gradient
        row-sparse with ``lazy_domains``."""
        return rows_with_sparse_grad(table, domain) if self.lazy_domains else table[domain]

    def experts(self, h: Tensor) -> Tensor:
        """``h (B, E_in)`` -> every expert's output ``(X, B, H)``."""
        x = torch.einsum("bm,xnm->xbn", h, self.expert_weights[0]) + self.expert_biases[0].unsqueeze(1)
        x = self.dropout(torch.relu(x))  # (X, B, N)
        for w, b in zip(self.expert_weights[1:], self.expert_biases[1:]):
            x = self.dropout(torch.relu(torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))))  # (X, B, N)
        return x

    def gates(self, h: Tensor, domain: Tensor) -> Tensor:
        """``h (B, E_in)``, ``domain (B,)`` -> each row's gate of its domain ``(B, X)``
        (softmax: non-negative, rows sum to 1)."""
        w = self._rows(self.gate_weight, domain)  # (B, X, E_in)
        logits = torch.einsum("bxm,bm->bx", w, h) + self._rows(self.gate_bias, domain)  # (B, X)
        return torch.softmax(logits, dim=1)

    def tower(self, x: Tensor, domain: Tensor) -> Tensor:
        """``x (B, H)``, ``domain (B,)`` -> each row's own tower's logit ``(B,)``."""
        last = len(self.tower_weights) - 1
        for i, (w, b) in enumerate(zip(self.tower_weights, self.tower_biases)):
            w_rows, b_rows = self._rows(w, domain), self._rows(b, domain)  # (B, N, M), (B, N)
            x = torch.baddbmm(b_rows.unsqueeze(2), w_rows, x.unsqueeze(2)).squeeze(2)  # (B, N)
            if i < last:
                x = self.dropout(torch.relu(x))
        return x.squeeze(1)  # (B,): linear, no activation

    def forward(self, h: Tensor, domain: Tensor) -> Tensor:
        """``h (B, E_in)``, ``domain (B,)`` int64 -> logits ``(B,)``."""
        self.check_inputs(h, domain)
        experts = self.experts(h)  # (X, B, H)
        mixed = torch.einsum("bx,xbh->bh", self.gates(h, domain), experts)  # (B, H): f^k(x)
        return self.tower(mixed, domain)  # (B,)

    def parameter_roles(self) -> dict[str, list[nn.Parameter]]:
        """``{"domain": [...]}``: every domain's gate and tower, read with row-sparse
        gradients; the training loop updates them lazily (the batch's domains only). None
        without ``lazy_domains``."""
        if not self.lazy_domains:
            return {}
        return {"domain": [self.gate_weight, self.gate_bias, *self.tower_weights, *self.tower_biases]}

    def parameter_count_by_part(self) -> dict[str, int]:
        """Parameters by part: ``experts`` (independent of P), ``gates`` (``P X (E_in +
        1)``) and ``towers`` (``P * sum(N M + N)``); they sum to the parameter count."""
        return {
            "experts": sum(p.numel() for p in itertools.chain(self.expert_weights, self.expert_biases)),
            "gates": self.gate_weight.numel() + self.gate_bias.numel(),
            "towers": sum(p.numel() for p in itertools.chain(self.tower_weights, self.tower_biases)),
        }
