"""AdaSparse: adaptively sparse dense towers (Yang et al., CIKM 2022,
"AdaSparse: Learning Adaptively Sparse Structures for Multi-Domain Click-Through Rate
Prediction", https://arxiv.org/abs/2206.13108).

:class:`AdaSparseTower` is a *dense tower* (``out_dim`` and
``forward(h (B, E_in), emb (B, F, D)) -> (B, H_last)``, see ``models.layers``), so any
backbone takes it in place of its ``MLPTower``. A domain-aware pruner scales (or cuts)
the input neurons of every hidden layer; ``emb`` supplies the domain-aware embedding
``e_d``, the concatenated embeddings of the fields ``domain_fields``.

Paper map:

* §2, §3: ``e_d = emb[:, domain_fields].flatten(1)`` (:meth:`AdaSparseTower.domain_embedding`);
  the main network ``h^{l+1} = act(W^l h^l)``, here with bias and the activation block of
  ``MLPTower`` (``Linear -> BatchNorm1d? -> ReLU -> Dropout?``) instead of the paper's tanh.
* Eq. (2): ``h^l(d) = h^l o pi^l(d)``: the factors multiply the INPUT of ``W^l``, so
  ``pi^0`` prunes the tower input (E_in neurons) and ``pi^l``, l >= 1, the outputs of
  layer l-1. The tower output ``h^L`` is not pruned.
* Eq. (3): ``pi^l = S_eps(sigma(W_p^l [e_d; h^l]))``, one linear layer per hidden layer
  (§4.1.2: "a fully-connected layer is used to produce weight factors of each layer"),
  ``pruner_input="domain_and_hidden"``. ``pruner_input="domain"`` drops ``h^l``: then
  ``pi^l`` is a function of the domain alone and :meth:`AdaSparseTower.pruned_for_domain`
  is exact.
* Eqs. (4)-(8), :func:`weighting_factors`, on the pruner logits ``v = W_p^l [e_d; h^l]``:

  - binarization, (4)-(5): ``pi = step(sigma(alpha v) - eps)`` in {0, 1};
  - scaling, (6)-(7): ``pi = beta sigma(v)`` (``sign(|v_out|) = 1`` as ``sigma > 0``: no
    threshold in effect, no alpha);
  - fusion, (8): ``pi = beta sigma(alpha v) step(beta sigma(alpha v) - eps)``.

  ``step`` is the paper's footnote-1 ``sign``: 1 for x > 0, else 0 (not ``torch.sign``,
  which would NEGATE the pruned neurons instead of zeroing them). ``|sigma(.)| =
  sigma(.)`` since sigma > 0.
* Eq. (4): ``alpha`` anneals from ``alpha_start`` to ``alpha_max`` (§4.1.2: 0.1 -> 5).
* Eqs. (9)-(10): the sparsity-controlled regulariser, :meth:`AdaSparseTower.penalty`:
  ``R_s = (1/L) sum_l lambda^l |r^l - r|``, ``r = (r_min + r_max)/2``, ``lambda^l = 0``
  for ``r^l in [r_min, r_max]``, else ``lambda_hat |r^l - r|``; ``lambda_hat`` starts at
  ``lambda_start`` (paper: 0.01) and grows with the training steps.

Shapes (besides B, F, D, E and H of ``models/__init__``):

====  ==============================================================
L     hidden layers (``len(hidden_units)``); layer l maps N_l -> N_{l+1}
N_l   width of ``h^l``, the input of layer l: ``N_0 = E_in``, ``N_l = hidden_units[l-1]``
G     domain-aware fields (``len(domain_fields)``)
C     width of ``e_d``, ``G * D``
====  ==============================================================

Choices where the paper is silent or ambiguous:

* Straight-through estimator (STE): the step of binarization and fusion has zero
  gradient almost everywhere. The forward uses the hard 0/1 value; the backward uses the
  gradient of the surrogate ``s = sigma(alpha v)`` (``hard + (s - sg(s))``; the
  difference is exactly 0 in the forward, so pruned factors are exact zeros). For fusion
  the same STE replaces the step only: ``pi = beta s * ste(step(beta s - eps), s)``, so a
  pruned neuron still receives the gradient ``beta s * d s / d v`` and can come back.
* alpha schedule: geometric (exponential in the step),
  ``alpha_t = alpha_start (alpha_max / alpha_start)^{min(t, T) / T}`` with ``T =
  anneal_steps``, then constant at ``alpha_max``: alpha is a scale (a 50x range in the
  paper), so every doubling gets the same number of steps. ``t`` counts training-mode
  forwards only; a forward at step t uses ``alpha_t``, then t becomes t + 1. Eval-mode
  forwards and the inspection helpers never advance it. alpha is unused by scaling.
* lambda_hat schedule: linear, ``lambda_hat_t = min(lambda_start + lambda_growth t,
  lambda_max)`` on the same step counter. Linear rather than geometric so that it stays
  bounded by ``lambda_start + lambda_growth t`` on long runs even without ``lambda_max``.
* ``lambda^l`` is treated as a weight: it is computed from ``r^l`` but detached, so
  ``R_s`` has the value of eq. (9) (``lambda_hat (r^l - r)^2`` outside the boundary) and
  the gradient ``lambda_hat |r^l - r| * d|r^l - r|``. ``||r^l - r||_2`` of the scalar
  ``r^l`` is ``|r^l - r|``.
* Sparsity ratio ``r^l = 1 - mean over the batch of ||rho^l||_1 / N_l`` with
  ``rho = pi`` for binarization (the paper), ``rho`` = the STE step (the 0/1 keep mask,
  so ``r^l`` is exactly the share of zero factors) for fusion, and ``rho = pi / beta`` in
  (0, 1) for scaling, which has no zero factors (the share of zeros would be a constant
  0 without gradient). Scaling's soft ratio starts near 0.5 (``sigma(v) ~ 1/2``), so the
  paper's boundary [0.15, 0.25] pushes its factors up towards ``0.8 beta`` on average;
  ``lambda_start = lambda_growth = 0`` switches the regulariser off. The gradient reaches
  the pruner through the STE (binarization, fusion) or through sigma (scaling).
* Stop-gradient: with ``stop_gradient=True`` (default) the pruner reads
  ``sg([e_d; h^l])``. The embeddings and the lower layers then learn through the
  prediction path only: the pruner's gradient is a biased STE surrogate and the
  regulariser is meant to shape ``pi``, not to move the shared embeddings (which the
  backbone's other parts, FM or cross network, also read). Same choice as DynInt's
  generators (``models.dynint``). The pruner's own weights get both gradients.
* Pruner: ``nn.Linear`` with bias and PyTorch's default init. At ``alpha_start = 0.1``
  binarization keeps a neuron unless ``v < logit(eps) / alpha`` (-11 for eps = 0.25),
  so early training prunes nothing by accident (§3.1.2); pruning sets in as alpha grows.
* :meth:`AdaSparseTower.factors` and :meth:`AdaSparseTower.sparsity` evaluate with
  inference semantics (BatchNorm running statistics, no dropout) in either mode, under
  ``no_grad``: no alpha step, no penalty, no BatchNorm statistics update, no RNG use.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from dynamic_ctr.models.layers import HiddenActivation

__all__ = [
    "FORMULATIONS",
    "PRUNER_INPUTS",
    "AdaSparseTower",
    "PrunedAdaSparseTower",
    "weighting_factors",
]

FORMULATIONS = ("binarization", "scaling", "fusion")
PRUNER_INPUTS = ("domain_and_hidden", "domain")


def _straight_through(hard: Tensor, surrogate: Tensor) -> Tensor:
    """Forward ``hard``, backward the gradient of ``surrogate``.

    ``hard + (surrogate - sg(surrogate))``: the bracket is exactly 0 in the forward, so
    the result equals ``hard`` bit for bit.
    """
    return hard + (surrogate - surrogate.detach())


def _factors_and_retention(
    logits: Tensor, formulation: str, alpha: Tensor | float, beta: float, epsilon: float
) -> tuple[Tensor, Tensor]:
    """``pi`` (eqs. 4-8) and ``rho``, the retention that the sparsity ratio reads
    (``r = 1 - mean(rho)``): ``pi`` (binarization), the keep mask (fusion), ``pi / beta``
    (scaling). Both ``(..., N)`` like ``logits``."""
    if formulation == "scaling":
        factors = beta * torch.sigmoid(logits)  # eqs. (6)-(7)
        return factors, factors / beta
    s = torch.sigmoid(alpha * logits)  # eq. (4)
    if formulation == "binarization":
        keep = _straight_through((s > epsilon).to(s.dtype), s)  # eq. (5)
        return keep, keep
    scaled = beta * s  # eq. (8)
    keep = _straight_through((scaled > epsilon).to(s.dtype), s)
    return scaled * keep, keep


def weighting_factors(
    logits: Tensor,
    formulation: str,
    *,
    alpha: Tensor | float = 1.0,
    beta: float = 2.0,
    epsilon: float = 0.25,
) -> Tensor:
    """The weighting factors ``pi = S_eps(v_out)`` of pruner logits ``v`` (eqs. 4-8).

    Args:
        logits: ``v (..., N)``, the pruner's linear output ``W_p [e_d; h]``.
        formulation: ``"binarization"`` (``step(sigma(alpha v) - eps)``, in {0, 1}),
            ``"scaling"`` (``beta sigma(v)``) or ``"fusion"``
            (``beta sigma(alpha v) step(beta sigma(alpha v) - eps)``); ``step(x) = 1``
            for x > 0, else 0.
        alpha: the sigmoid's slope (binarization, fusion).
        beta: the scale (scaling, fusion).
        epsilon: the threshold (binarization, fusion).

    Returns:
        ``(..., N)``, never negative; pruned factors are exact zeros. The step's gradient
        is the straight-through one of ``sigma(alpha v)``.
    """
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation={formulation!r} must be one of {FORMULATIONS}")
    return _factors_and_retention(logits, formulation, alpha, beta, epsilon)[0]


class AdaSparseTower(nn.Module):
    """AdaSparse dense tower: ``h^{l+1} = act(W^l (h^l o pi^l))`` per hidden layer, with
    the domain-aware pruner ``pi^l = S_eps(sigma(W_p^l [e_d; h^l]))`` (eqs. 2-8).

    ``forward(h (B, E_in), emb (B, F, D)) -> (B, H_last)``. A training-mode forward
    records the sparsity regulariser of its batch (:meth:`penalty`) and advances the
    step counter, alpha and lambda_hat (buffers ``step``, ``alpha``, ``lambda_hat``, saved
    in the state dict). See the module docstring for the choices the paper leaves open.

    Args:
        in_dim: E_in = N_0, the width of the tower input.
        hidden_units: N_1 .. N_L, the hidden widths (L >= 1).
        domain_fields: the F-axis indices of the domain-aware fields (at least one,
            distinct, >= 0); ``e_d`` is their embeddings concatenated, ``(B, G * D)``.
        embedding_dim: D.
        formulation: ``"binarization"``, ``"scaling"`` or ``"fusion"`` (§3.1.2).
        pruner_input: ``"domain_and_hidden"`` (eq. 3, ``[e_d; h^l]``) or ``"domain"``
            (``e_d`` alone: one mask per domain, :meth:`pruned_for_domain`).
        beta: ``beta >= 1``, the scale of scaling and fusion.
        epsilon: the threshold, ``0 < eps < 1`` (binarization) or ``< beta`` (fusion);
            unused by scaling.
        alpha_start, alpha_max: alpha's schedule ends, ``0 < alpha_start <= alpha_max``.
        anneal_steps: T >= 1, training steps from ``alpha_start`` to ``alpha_max``.
        r_min, r_max: the sparsity ratio boundary, ``0 <= r_min <= r_max <= 1``.
        lambda_start: lambda_hat at step 0 (>= 0; paper: 0.01).
        lambda_growth: lambda_hat's increase per training step (>= 0).
        lambda_max: lambda_hat's cap (>= lambda_start; ``math.inf``: none).
        dropout: dropout rate after each hidden ReLU, ``0 <= p < 1``.
        batch_norm: BatchNorm1d after each hidden linear map.
        stop_gradient: the pruner reads ``sg([e_d; h^l])`` (see the module docstring).

    Example::

        >>> tower = AdaSparseTower(12, [8, 4], domain_fields=[2], embedding_dim=4)
        >>> tower(torch.randn(5, 12), torch.randn(5, 3, 4)).shape
        torch.Size([5, 4])
    """

    step: Tensor
    alpha: Tensor
    lambda_hat: Tensor
    _last_penalty: Tensor | None

    def __init__(
        self,
        in_dim: int,
        hidden_units: Sequence[int],
        domain_fields: Sequence[int],
        embedding_dim: int,
        *,
        formulation: str = "binarization",
        pruner_input: str = "domain_and_hidden",
        beta: float = 2.0,
        epsilon: float = 0.25,
        alpha_start: float = 0.1,
        alpha_max: float = 5.0,
        anneal_steps: int = 1000,
        r_min: float = 0.15,
        r_max: float = 0.25,
        lambda_start: float = 0.01,
        lambda_growth: float = 1e-4,
        lambda_max: float = 1.0,
        dropout: float = 0.0,
        batch_norm: bool = False,
        stop_gradient: bool = True,
    ) -> None:
        super().__init__()
        hidden_units, domain_fields = list(hidden_units), list(domain_fields)
        _check(_is_int(in_dim) and in_dim >= 1, "in_dim", in_dim, "must be an int >= 1")
        _check(
            len(hidden_units) >= 1 and all(_is_int(n) and n >= 1 for n in hidden_units),
            "hidden_units", hidden_units, "must be a non-empty list of ints >= 1",
        )
        _check(
            len(domain_fields) >= 1
            and all(_is_int(f) and f >= 0 for f in domain_fields)
            and len(set(domain_fields)) == len(domain_fields),
            "domain_fields", domain_fields,
            "must be a non-empty list of distinct field indices >= 0 (AdaSparse's pruner "
            "reads the domain-aware embedding e_d)",
        )
        _check(_is_int(embedding_dim) and embedding_dim >= 1, "embedding_dim", embedding_dim,
               "must be an int >= 1")
        _check(formulation in FORMULATIONS, "formulation", formulation, f"must be one of {FORMULATIONS}")
        _check(pruner_input in PRUNER_INPUTS, "pruner_input", pruner_input,
               f"must be one of {PRUNER_INPUTS}")
        _check(_is_real(beta) and beta >= 1, "beta", beta, "must be >= 1 (eq. 6)")
        eps_max = {"binarization": 1.0, "fusion": beta}.get(formulation, math.inf)
        _check(_is_real(epsilon) and 0 < epsilon < eps_max, "epsilon", epsilon,
               f"must be in (0, {eps_max}) for formulation={formulation!r}")
        _check(_is_real(alpha_start) and 0 < alpha_start < math.inf, "alpha_start", alpha_start,
               "must be > 0 and finite")
        _check(_is_real(alpha_max) and alpha_start <= alpha_max < math.inf, "alpha_max", alpha_max,
               f"must be finite and >= alpha_start={alpha_start}")
        _check(_is_int(anneal_steps) and anneal_steps >= 1, "anneal_steps", anneal_steps,
               "must be an int >= 1")
        _check(_is_real(r_min) and 0 <= r_min <= 1, "r_min", r_min, "must be in [0, 1]")
        _check(_is_real(r_max) and r_min <= r_max <= 1, "r_max", r_max,
               f"must be in [r_min={r_min}, 1]")
        _check(_is_real(lambda_start) and 0 <= lambda_start < math.inf, "lambda_start",
               lambda_start, "must be >= 0 and finite")
        _check(_is_real(lambda_growth) and 0 <= lambda_growth < math.inf, "lambda_growth",
               lambda_growth, "must be >= 0 and finite")
        _check(_is_real(lambda_max) and lambda_max >= lambda_start, "lambda_max", lambda_max,
               f"must be >= lambda_start={lambda_start}")
        _check(_is_real(dropout) and 0 <= dropout < 1, "dropout", dropout, "must be in [0, 1)")
        _check(isinstance(batch_norm, bool), "batch_norm", batch_norm, "must be a bool")
        _check(isinstance(stop_gradient, bool), "stop_gradient", stop_gradient, "must be a bool")

        self.in_dim, self.hidden_units = in_dim, tuple(hidden_units)
        self.domain_fields, self.embedding_dim = tuple(domain_fields), embedding_dim
        first, count = self.domain_fields[0], len(self.domain_fields)
        # adjacent fields in increasing order are read as one slice of emb (domain_embedding)
        adjacent = self.domain_fields == tuple(range(first, first + count))
        self._adjacent_fields = slice(first, first + count) if adjacent else None
        self.formulation, self.pruner_input = formulation, pruner_input
        self.beta, self.epsilon = float(beta), float(epsilon)
        self.alpha_start, self.alpha_max, self.anneal_steps = float(alpha_start), float(alpha_max), anneal_steps
        self.r_min, self.r_max = float(r_min), float(r_max)
        self.lambda_start, self.lambda_growth = float(lambda_start), float(lambda_growth)
        self.lambda_max = float(lambda_max)
        self.dropout, self.batch_norm, self.stop_gradient = float(dropout), batch_norm, stop_gradient

        dims = [in_dim, *hidden_units]
        self.domain_dim = len(domain_fields) * embedding_dim  # C
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.acts = nn.ModuleList(HiddenActivation(b, batch_norm, dropout) for b in dims[1:])
        with_hidden = pruner_input == "domain_and_hidden"
        self.pruners = nn.ModuleList(
            nn.Linear(self.domain_dim + (n if with_hidden else 0), n) for n in dims[:-1]
        )  # W_p^l: [e_d; h^l] (C + N_l) or e_d (C) -> N_l
        self.out_dim = dims[-1]
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("alpha", torch.tensor(self.alpha_start))
        self.register_buffer("lambda_hat", torch.tensor(self.lambda_start))
        self._last_penalty = None
        # a fixed random direction whose projections tell the batch's domains apart
        # (_distinct_domains); not state: the same for every tower of this width
        probe = torch.randn(self.domain_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.register_buffer("_probe", probe, persistent=False)
        # (sum N_l, L), 1 / N_l on layer l's block of columns: one matmul turns the stacked
        # retentions (U, sum N_l) into per-layer means (U, L)
        # (from Python numbers: models are also built on the meta device, to count them)
        layer_means = [[1.0 / n if j == l else 0.0 for j in range(len(dims) - 1)]
                       for l, n in enumerate(dims[:-1]) for _ in range(n)]
        self.register_buffer("_layer_means", torch.tensor(layer_means), persistent=False)

    # ------------------------------------------------------------------ schedules

    def _advance(self) -> None:
        """One training step: ``t += 1``, then alpha_t and lambda_hat_t (tensor ops, no
        host sync)."""
        with torch.no_grad():
            self.step.add_(1)
            t = self.step.clamp(max=self.anneal_steps).to(self.alpha.dtype)
            ratio = self.alpha_max / self.alpha_start
            self.alpha.copy_(self.alpha_start * torch.pow(ratio, t / self.anneal_steps))
            lam = self.lambda_start + self.lambda_growth * self.step.to(self.lambda_hat.dtype)
            self.lambda_hat.copy_(lam.clamp(max=self.lambda_max))

    # ------------------------------------------------------------------ forward

    def domain_embedding(self, emb: Tensor) -> Tensor:
        """``e_d``: ``emb (B, F, D)`` -> ``(B, C)``, the domain-aware fields' embeddings
        concatenated in ``domain_fields`` order."""
        if emb.ndim != 3 or emb.shape[2] != self.embedding_dim or emb.shape[1] <= max(self.domain_fields):
            raise ValueError(
                f"emb must be (B, F, {self.embedding_dim}) with F > max(domain_fields)="
                f"{max(self.domain_fields)}, got {tuple(emb.shape)}"
            )
        if self._adjacent_fields is not None:  # a view, no copy
            return emb[:, self._adjacent_fields].flatten(1)  # (B, C)
        return emb[:, list(self.domain_fields)].flatten(1)  # (B, C)

    def _pruner_logits(self, layer: int, e_d: Tensor, h: Tensor) -> Tensor:
        """``v^l = W_p^l [e_d; h^l]``: ``(B, N_l)``; ``e_d`` is already stop-gradient when
        ``stop_gradient``. (``pruner_input="domain"`` takes :meth:`_domain_factors`.)"""
        if self.stop_gradient:
            h = h.detach()
        return self.pruners[layer](torch.cat([e_d, h], dim=1))  # (B, N_l)

    def _distinct_domains(self, e_d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The distinct rows of ``e_d``: ``rows (U, C)``, ``inverse (B,)`` with
        ``rows[inverse] == e_d`` exactly, and ``counts (U,)``.

        Found by sorting one number per row, a random projection (``torch.unique(dim=0)``
        sorts whole rows, far slower); the exact check falls back to that sort on a
        collision. Both ``unique`` and the check wait for the device on a GPU.
        The projection is in float64 whatever the model's dtype (``model.float()`` or
        ``.to(bfloat16)`` also cast the probe buffer)."""
        keys = e_d.to(torch.float64) @ self._probe.to(device=e_d.device, dtype=torch.float64)  # (B,)
        _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        first = torch.empty_like(counts).scatter_(0, inverse, torch.arange(len(e_d), device=e_d.device))
        rows = e_d.index_select(0, first)
        if not torch.equal(rows.index_select(0, inverse), e_d):  # two domains, one key
            rows, inverse, counts = torch.unique(e_d, dim=0, return_inverse=True, return_counts=True)
        return rows, inverse, counts

    def _domain_factors(self, e_d: Tensor, alpha: Tensor) -> tuple[list[Tensor], Tensor]:
        """``pruner_input="domain"``: ``pi^l (B, N_l)`` of every layer and the batch mean of
        every layer's retention ``rho^l``, ``(L,)``.

        ``pi^l`` is a function of ``e_d`` alone, so the pruners and the formulation run
        once per DISTINCT domain of the batch, as one matmul over all L layers, and the
        rows take their domain's factors by index: the extra cost per row is a gather and
        the product ``h^l o pi^l``, the paper's O(D N_l) (§3.1.3). Same values as running
        every row; a millisecond step is bound by passes over (B, N_l) tensors
        (docs/benchmarks.md §6). When ``e_d`` needs a gradient (``stop_gradient=False``
        in training) every row runs its own pruner, so each row's gradient is its own.
        """
        weight = torch.cat([pruner.weight for pruner in self.pruners])  # (sum N_l, C)
        bias = torch.cat([pruner.bias for pruner in self.pruners])
        widths = [pruner.out_features for pruner in self.pruners]
        if e_d.requires_grad:  # every row its own pruner
            rows, inverse, counts = e_d, None, None
        else:
            rows, inverse, counts = self._distinct_domains(e_d)
        pi, rho = _factors_and_retention(torch.addmm(bias, rows, weight.t()), self.formulation,
                                         alpha, self.beta, self.epsilon)  # (U or B, sum N_l)
        per_layer = rho @ self._layer_means.to(rho.dtype)  # (U or B, L): each row's mean per layer
        if counts is None:
            retained = per_layer.mean(0)  # (L,)
        else:  # each domain weighted by its share of the batch's rows
            retained = (counts.to(rho.dtype) / len(e_d)) @ per_layer
        if inverse is not None:  # one gather for all layers (one scatter in the backward)
            pi = pi.index_select(0, inverse)  # (B, sum N_l)
        return list(pi.split(widths, dim=1)), retained

    def _run(self, h: Tensor, emb: Tensor, alpha: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """The tower: output ``(B, H_last)``, ``pi^l (B, N_l)`` per layer, and the batch
        mean of every layer's retention ``rho^l`` (``(L,)``; ``r^l = 1 - rho^l``)."""
        if h.ndim != 2 or h.shape[1] != self.in_dim:
            raise ValueError(f"h must be (B, {self.in_dim}), got {tuple(h.shape)}")
        e_d = self.domain_embedding(emb)  # (B, C)
        if self.stop_gradient:
            e_d = e_d.detach()
        per_layer = self.pruner_input == "domain_and_hidden"  # each pruner waits for its h^l
        if per_layer:
            factors, retention = [], []
        else:
            factors, retained = self._domain_factors(e_d, alpha)  # eqs. (3)-(8), all layers
        for i, (linear, act) in enumerate(zip(self.linears, self.acts)):
            if per_layer:
                logits = self._pruner_logits(i, e_d, h)  # (B, N_l): eq. (3) before S_eps o sigma
                pi, rho = _factors_and_retention(logits, self.formulation, alpha, self.beta, self.epsilon)
                factors.append(pi)
                retention.append(rho.mean())
            h = act(linear(h * factors[i]))  # (B, N_{l+1}): eq. (2), then W^l
        if per_layer:
            retained = torch.stack(retention)
        return h, factors, retained

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        """``h (B, E_in)``, ``emb (B, F, D)`` -> ``(B, H_last)``.

        In training mode also records this batch's regulariser (:meth:`penalty`) and
        advances ``step``, ``alpha`` and ``lambda_hat``; eval mode changes nothing.
        """
        out, _, retained = self._run(h, emb, self.alpha.clone())  # clone: alpha moves in place
        if self.training:
            self._last_penalty = self.regulariser(retained, self.lambda_hat.clone())
            self._advance()
        return out

    def regulariser(self, retained: Tensor, lambda_hat: Tensor | float) -> Tensor:
        """Eqs. (9)-(10) from the batch-mean retentions ``rho^l`` of the L layers, ``(L,)``
        (``r^l = 1 - rho^l = 1 - ||pi^l||_1 / N_l``, averaged over the batch).

        Returns:
            ``R_s = (1/L) sum_l lambda^l |r^l - r|`` (a scalar) with ``lambda^l = 0``
            inside ``[r_min, r_max]``, else ``lambda_hat |r^l - r|`` (detached: a weight).
        """
        target = 0.5 * (self.r_min + self.r_max)
        ratio = 1.0 - retained  # r^l, (L,): a handful of operations whatever L is
        distance = (ratio - target).abs()
        inside = (ratio >= self.r_min) & (ratio <= self.r_max)
        weight = torch.where(inside, 0.0, lambda_hat * distance).detach()  # lambda^l
        return (weight * distance).mean()

    def penalty(self) -> Tensor:
        """The sparsity regulariser R_s (eq. 9) of the LAST training-mode forward, a scalar
        that carries that forward's graph (the training loop adds it to the loss right
        after the forward). 0 before any training forward, and 0 in eval mode."""
        if not self.training or self._last_penalty is None:
            return self.alpha.new_zeros(())
        return self._last_penalty

    # ------------------------------------------------------------------ inspection

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval semantics and no_grad for the block; every submodule's mode is restored."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for module, training in modes:
                module.training = training

    def factors(self, h: Tensor, emb: Tensor) -> list[Tensor]:
        """``pi^l`` of every layer, ``(B, N_l)`` each, at the current alpha.

        Inference semantics (BatchNorm running statistics, no dropout) in either mode and
        no side effects: no alpha step, no penalty, no statistics update; detached.
        """
        with self._inference():
            return self._run(h, emb, self.alpha)[1]

    def sparsity(self, h: Tensor, emb: Tensor) -> list[float]:
        """Per layer, the share of exactly-zero factors in ``pi^l`` over the batch (as
        :meth:`factors`; 0 for scaling, which never zeroes a neuron)."""
        return [(pi == 0).to(torch.float64).mean().item() for pi in self.factors(h, emb)]

    def activation_numel(self, batch_size: int) -> int:
        """Elements materialised per batch, counted analytically: ``e_d`` (B, C) once;
        per layer the concatenated pruner input ``(B, C + N_l)`` (domain_and_hidden only),
        the pruner logits and the factors (``2 (B, N_l)``; with ``pruner_input="domain"``
        the logits are per distinct domain, counted here at their most, B), the pruned
        input ``h^l o pi^l`` (B, N_l) and the output ``(B, N_{l+1})``. BatchNorm/ReLU
        copies, the STE's intermediates and autograd buffers are not counted."""
        b, c = batch_size, self.domain_dim
        total = b * c
        for linear in self.linears:
            n_in, n_out = linear.in_features, linear.out_features
            if self.pruner_input == "domain_and_hidden":
                total += b * (c + n_in)
            total += 3 * b * n_in + b * n_out
        return total

    # ------------------------------------------------------------------ serving

    def pruned_for_domain(self, e_d: Tensor) -> PrunedAdaSparseTower:
        """The serving tower of ONE domain, its zero-factor neurons cut out.

        Only for ``pruner_input="domain"``: then ``pi^l`` depends on ``e_d`` alone and is
        a constant for the domain. For each layer l the input neurons with ``pi^l_j = 0``
        are removed: ``W^l`` loses those columns (for l = 0: the tower input columns,
        selected by index), ``W^{l-1}``, its bias and BatchNorm entries the rows that
        produce them; the kept factors (1, or the scaling/fusion value) are folded into
        ``W^l``'s columns. Dropout is dropped (serving is eval).

        Args:
            e_d: ``(C,)``, the domain's embedding (:meth:`domain_embedding` of one row).

        Returns:
            A :class:`PrunedAdaSparseTower` in eval mode whose ``forward(h (B, E_in))``
            equals this tower's eval-mode forward on every instance of the domain (at the
            current alpha); ``self`` is left untouched.

        Raises:
            ValueError: ``pruner_input="domain_and_hidden"`` (the factors depend on
                ``h^l``, i.e. on the instance: no per-domain structure exists), or ``e_d``
                of the wrong shape.
        """
        if self.pruner_input != "domain":
            raise ValueError(
                f"pruner_input={self.pruner_input!r}: pi^l reads [e_d; h^l] and so depends on "
                "the instance, not on the domain alone; a per-domain pruned tower needs "
                "pruner_input='domain'"
            )
        if e_d.shape != (self.domain_dim,):
            raise ValueError(
                f"e_d must be ({self.domain_dim},) = (len(domain_fields) * D,), got {tuple(e_d.shape)}"
            )
        with self._inference():
            factors = [pi[0] for pi in self._domain_factors(e_d.unsqueeze(0), self.alpha)[0]]  # pi^l (N_l,)
            kept = [torch.nonzero(pi, as_tuple=True)[0] for pi in factors]  # neurons with pi != 0
            kept.append(torch.arange(self.out_dim, device=e_d.device))  # the output: all
            linears, acts = [], []
            for i, (linear, act) in enumerate(zip(self.linears, self.acts)):
                rows, cols = kept[i + 1], kept[i]
                weight = linear.weight[rows][:, cols] * factors[i][cols]  # (N'_{l+1}, N'_l)
                linears.append(_linear_from(weight, linear.bias[rows]))
                acts.append(_sliced_activation(act, rows))
        return PrunedAdaSparseTower(kept[0], linears, acts).eval()

    def __getstate__(self) -> dict:
        # The last penalty is a non-leaf tensor of a past forward: deepcopy would fail on
        # it and a copy has no business with that batch.
        state = dict(self.__dict__)
        state["_last_penalty"] = None
        return state


def _linear_from(weight: Tensor, bias: Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight (N, M)`` and ``bias (N,)``; no init
    (which would warn on a zero-size map, where a layer's inputs are all cut)."""
    linear = nn.Linear(1, 1, device=weight.device, dtype=weight.dtype)
    linear.out_features, linear.in_features = weight.shape
    linear.weight = nn.Parameter(weight.detach().clone())
    linear.bias = nn.Parameter(bias.detach().clone())
    return linear


def _sliced_activation(act: HiddenActivation, rows: Tensor) -> HiddenActivation:
    """The serving activation of the kept ``rows``: BatchNorm entries sliced, no dropout
    (no BatchNorm either for zero rows: nothing to normalise)."""
    batch_norm = isinstance(act.norm, nn.BatchNorm1d) and len(rows) > 0
    new = HiddenActivation(len(rows), batch_norm, 0.0)
    if batch_norm:
        norm, src = new.norm, act.norm
        norm.eps, norm.momentum = src.eps, src.momentum
        norm.to(device=rows.device, dtype=src.running_mean.dtype)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(norm, name).copy_(getattr(src, name)[rows])
        norm.num_batches_tracked.copy_(src.num_batches_tracked)
    return new


class PrunedAdaSparseTower(nn.Module):
    """Serving form of an :class:`AdaSparseTower` for one domain (``pruner_input="domain"``).

    ``forward(h (B, E_in)) -> (B, H_last)``: select the kept input columns, then per
    layer ``Linear(N'_l, N'_{l+1}) -> BatchNorm1d? -> ReLU`` with the factors folded into
    the weights. No pruner, no regulariser (:meth:`penalty` is 0). Keep it in eval mode
    (its BatchNorm holds the tower's running statistics). Built by
    :meth:`AdaSparseTower.pruned_for_domain`.

    Args:
        input_index: ``(N'_0,)``, the kept tower input columns.
        linears: the pruned linear maps.
        acts: their activation blocks (BatchNorm sliced, no dropout).
    """

    input_index: Tensor

    def __init__(self, input_index: Tensor, linears: Sequence[nn.Linear], acts: Sequence[nn.Module]) -> None:
        super().__init__()
        self.register_buffer("input_index", input_index.clone())
        self.linears = nn.ModuleList(linears)
        self.acts = nn.ModuleList(acts)
        self.out_dim = self.linears[-1].out_features

    def forward(self, h: Tensor, emb: Tensor | None = None) -> Tensor:
        """``h (B, E_in)`` -> ``(B, H_last)``; ``emb`` is unused (the domain is fixed)."""
        h = h.index_select(1, self.input_index)  # (B, N'_0)
        for linear, act in zip(self.linears, self.acts):
            h = act(linear(h))  # (B, N'_{l+1})
        return h

    def penalty(self) -> Tensor:
        """0: serving has no loss."""
        return self.linears[0].bias.new_zeros(())

    def activation_numel(self, batch_size: int) -> int:
        """Elements of the hidden activations of one batch: the selected input
        ``(B, N'_0)`` and one ``(B, N'_{l+1})`` per layer."""
        return batch_size * (len(self.input_index) + sum(lin.out_features for lin in self.linears))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _check(ok: bool, name: str, value: object, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} {requirement}")
