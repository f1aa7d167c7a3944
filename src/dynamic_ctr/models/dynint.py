"""DynInt: dynamic Polynomial Interaction Networks (Yan and Li, DLP-KDD 2022).

Standalone modules on field embeddings ``x0 (B, F, D)`` (``FieldEmbedding``'s output)
that return ``(B,)`` logits; :class:`XDeepInt` wraps them with the field embeddings
(``build_model`` family ``xdeepint``).

Paper map:

* :func:`split_subspaces`: the subspace-crossing mechanism (§3, Figure 2b): D is cut
  into h sub-spaces, so the F fields become R = F*h rows of width d = D/h (h=1 is
  vector-wise, h=D bit-wise crossing) and every ``W`` below is ``(R, R)``.
* :class:`PINLayer`: the static PIN layer with residual, eq. (3),
  ``X_l = X_{l-1} o (W_{l-1} X_0) + X_{l-1}`` (xDeepInt).
* :class:`GatedPINLayer`: DynInt-DA, eq. (4), ``X_l = (X_{l-1} o (W X_0)) o G_l^(i)
  + X_{l-1}``: the instance gate multiplies the interaction term only, never the
  residual ``X_{l-1}``.
* :class:`GeneratedPINLayer`: DynInt-DGP, eqs. (5), (7), (8): ``W^(i) = U Sigma^(i) V^T``
  with shared U, V and a generated diagonal ``Sigma^(i)``; its penalty is eq. (11).
* :class:`WeightedPINLayer`: DynInt-DWP, eqs. (6), (9), (10): ``G^(i) o W`` with
  ``G^(i) = sum_p u~_p v~_p^T`` of generated rank K; its penalty is eq. (12).
* :class:`PolynomialInteraction`: L such layers and the output layer, eq. (2),
  ``logit = (W_out X_L + b_out 1^T) 1``; ``mode`` picks the layer kind; ``penalty()``
  is the orthogonal regulariser of §3.6; ``fold()`` gives the serving form.
* :class:`FoldedPolynomialInteraction`: the serving form of DGP/DWP (see its docstring).
* :func:`orthogonal_penalty`: the ``sum_{p>q} |cos(a_p, a_q)|`` terms of eqs. (11)-(12).

Shapes (besides B, F, D, E = F*D and Q of ``models/__init__``):

====  ==============================================================
h     sub-spaces per embedding (``subspaces``); must divide D
R     rows after subspace crossing, ``F * h``; row ``f*h + s`` is sub-space s of field f
d     row width, ``D / h``
L     PIN layers
K     DGP kernel size / DWP latent rank (``rank``); ``K <= R``
H     hidden width of a generator, ``max(1, E // r)`` for reduction ratio r
====  ==============================================================

Choices where the paper is silent or ambiguous:

* Generators ("two-layer DNN with reduction ratio r, using X_0 as input"):
  ``Linear(E, E // r) -> ReLU -> Linear(., Q)`` on the flattened, gradient-blocked
  ``sg(X_0)``, one generator per layer. The DA gate is element-wise, Q = E = F*D (one
  gate per entry of the F x D map, squeeze-excitation style with equal input and output
  widths); DGP emits the K diagonal entries of ``Sigma^(i)``; DWP the K pairs
  ``(u~_p, v~_p)`` of length R.
* Generator init: the last linear map is near zero (std ``GENERATOR_INIT_STD`` for
  unit-scale hidden units) and a constant offset gives the start value: DA gates
  ``2 sigmoid(0) = 1``; DGP ``Sigma^(i) = I`` (so ``W^(i)`` starts as the static
  ``U V^T``; the paper gives no DGP init); DWP ``u~ = v~ = 1/sqrt(K)``. The paper adds
  "1.0/K to the output of the DNN"; added to both factors that would start G at 1/K,
  not at the stated ~1.0 (except for K=1), so each factor gets ``1/sqrt(K)`` and each
  rank-1 term ``1/K``. Not exactly zero: with every pair equal at init, the K pairs of
  DWP would get equal gradients and stay equal forever (rank 1).
* DWP says the pairs are "unit-norm" and ``u~_p _|_ v~_p``; neither is enforced (a
  ``u~_p`` carries ``sqrt(sigma_p)``, so it is not unit norm). Orthogonality is what
  eq. (12) encourages: among the u~'s and among the v~'s. Note that the all-ones start
  of G is rank 1 (all pairs parallel), so eq. (12) starts at its maximum,
  ``K (K - 1) / 2`` per layer and factor, and pulls against that start (as in the paper).
* Eq. (11) penalises ``u~_p = sqrt(sigma_p) u_p``; the cosine ignores the scale (and
  ``|.|`` the sign), so it is computed on U's and V's columns, once: its ``sum_i`` over
  instances of a shared term is only a factor N, which a batch-mean loss drops. Eq. (12)
  is per instance; ``penalty()`` averages it over the batch for the same reason.
* Eq. (2) with sub-spaces: the rows are merged back into ``(F, D)`` and ``W_out`` has
  one weight per field (as xDeepInt's output layer); ``b_out 1^T 1 = D * b_out``.
* ``W X_0`` has no activation (xDeepInt's setting on Criteo). ``W`` is Glorot-uniform
  (xDeepInt); ``U ~ N(0, 1/K)``, ``V ~ N(0, 1/R)`` give ``U V^T`` the same entry variance.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from dynamic_ctr.models.embedding import FieldEmbedding

__all__ = [
    "GENERATOR_INIT_STD",
    "MODES",
    "FoldedPolynomialInteraction",
    "GatedPINLayer",
    "GeneratedPINLayer",
    "PINLayer",
    "PolynomialInteraction",
    "TwoLayerGenerator",
    "WeightedPINLayer",
    "field_readout",
    "fused_hidden",
    "orthogonal_penalty",
    "split_subspaces",
]

MODES = ("static", "da", "dgp", "dwp")

#: Std of a generator's output deviation at init for unit-scale hidden units: small, so
#: the dynamic parts start at their offset (gates 1, Sigma = I, G = all-ones), nonzero
#: to break the symmetry between DWP's K pairs.
GENERATOR_INIT_STD = 0.01


def split_subspaces(x0: Tensor, subspaces: int) -> Tensor:
    """Subspace crossing: ``x0 (B, F, D) -> (B, R, d)``, R = F*h, d = D/h (a view).

    Row ``f*h + s`` is columns ``[s*d, (s+1)*d)`` of field f, so merging back is the
    inverse reshape, ``(B, R, d) -> (B, F, D)``.
    """
    b, f, dim = x0.shape
    return x0.reshape(b, f * subspaces, dim // subspaces)


def field_readout(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The output layer, eq. (2) without the sigmoid: ``(W_out X_L + b_out 1^T) 1``.

    Args:
        x: ``(B, R, d)``, the last PIN output.
        weight: ``W_out (F,)``, one weight per field (sub-spaces merged back).
        bias: ``b_out ()``, added to each of the D columns before their sum.

    Returns:
        ``(B,)`` logits.
    """
    b, num_fields = x.shape[0], weight.shape[0]
    fields = x.reshape(b, num_fields, -1)  # (B, F, D): sub-spaces merged back
    return torch.einsum("bfd,f->b", fields, weight) + fields.shape[2] * bias  # (B,)


def orthogonal_penalty(vectors: Tensor, eps: float = 1e-8) -> Tensor:
    """``sum_{p>q} |cos(a_p, a_q)|``, the L1 norm of the off-diagonal cosine similarities
    (one triangle), the terms of eqs. (11) and (12).

    Args:
        vectors: ``(..., K, N)``, K vectors ``a_p`` of length N per leading index.
        eps: norm floor, so a zero vector counts as orthogonal to everything.

    Returns:
        ``(...)``: 0 for mutually orthogonal vectors, up to ``K (K - 1) / 2`` for
        parallel ones; invariant to each vector's scale and sign.
    """
    unit = nn.functional.normalize(vectors, dim=-1, eps=eps)  # (..., K, N)
    cos = unit @ unit.transpose(-1, -2)  # (..., K, K)
    return cos.triu(diagonal=1).abs().sum((-2, -1))  # (...)


class TwoLayerGenerator(nn.Module):
    """Instance-aware generator with reduction ratio r: ``z (B, E) -> (B, Q)``.

    ``Linear(E, H) -> ReLU -> Linear(H, Q)`` plus a constant ``offset``, with
    ``H = max(1, E // r)``. The last map starts near zero (:data:`GENERATOR_INIT_STD`), so
    the output starts near ``offset``; serving folds ``offset`` into the bias.

    Args:
        d_in: E, the width of z (flattened ``sg(X_0)``).
        d_out: Q, the number of generated values.
        reduction: r >= 1.
        offset: start value of every output.
    """

    def __init__(self, d_in: int, d_out: int, reduction: int, offset: float = 0.0) -> None:
        super().__init__()
        self.hidden = nn.Linear(d_in, max(1, d_in // reduction))
        self.out = nn.Linear(self.hidden.out_features, d_out)
        self.offset = offset
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.hidden.reset_parameters()
        nn.init.normal_(self.out.weight, std=GENERATOR_INIT_STD / math.sqrt(self.out.in_features))
        nn.init.zeros_(self.out.bias)

    def forward(self, z: Tensor) -> Tensor:
        return self.from_hidden(torch.relu(self.hidden(z)))  # (B, Q)

    def from_hidden(self, a: Tensor) -> Tensor:
        """The second map on given hidden units ``a = relu(hidden(z)) (B, H)`` -> ``(B, Q)``
        (:func:`fused_hidden` computes them for several generators at once)."""
        return self.out(a) + self.offset  # (B, Q)


def fused_hidden(generators: list[TwoLayerGenerator], z: Tensor) -> list[Tensor]:
    """Every generator's hidden units ``relu(hidden(z))`` from ONE GEMM: they all read the
    same ``z = sg(X_0)``, so their first maps stack into one ``(sum H, E)`` matrix (the
    same numbers as one map each, one larger GEMM instead of several small ones).

    Returns:
        ``(B, H_l)`` per generator, in order.
    """
    weight = torch.cat([g.hidden.weight for g in generators])  # (sum H, E)
    bias = torch.cat([g.hidden.bias for g in generators])  # (sum H,)
    hidden = torch.relu(nn.functional.linear(z, weight, bias))  # (B, sum H)
    return list(hidden.split([g.hidden.out_features for g in generators], dim=1))


class _PINLayerBase(nn.Module):
    """One PIN layer, ``X_l = X_{l-1} o M_l + X_{l-1}`` with ``M_l`` the layer's form of
    ``W_{l-1} X_0`` (eqs. 3-6). ``M_l`` reads X_0 only, never ``X_{l-1}``.

    Subclasses define :meth:`mix` (``M_l``) and, when dynamic, :meth:`generate` (what the
    instance determines, from ``z = sg(X_0)``).
    """

    def generate(self, z: Tensor, hidden: Tensor | None = None) -> dict[str, Tensor]:
        """Instance-generated tensors from ``z (B, E)``; none for a static layer.
        ``hidden``: the generator's hidden units when already computed (:func:`fused_hidden`)."""
        return {}

    def _generate(self, z: Tensor, hidden: Tensor | None) -> Tensor:
        generator: TwoLayerGenerator = self.generator
        return generator(z) if hidden is None else generator.from_hidden(hidden)

    def mix(self, x0: Tensor, generated: dict[str, Tensor]) -> Tensor:
        """``M_l``: ``x0 = X_0 (B, R, d)`` and :meth:`generate`'s output -> ``(B, R, d)``."""
        raise NotImplementedError

    def forward(self, x: Tensor, x0: Tensor, generated: dict[str, Tensor]) -> Tensor:
        """``x = X_{l-1} (B, R, d)``, ``x0 = X_0 (B, R, d)`` -> ``X_l (B, R, d)``."""
        return x * self.mix(x0, generated) + x


class PINLayer(_PINLayerBase):
    """Static PIN layer, eq. (3): ``X_l = X_{l-1} o (W X_0) + X_{l-1}``, ``W (R, R)``.

    Args:
        rows: R = F*h.
    """

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, rows))
        nn.init.xavier_uniform_(self.weight)

    def mix(self, x0: Tensor, generated: dict[str, Tensor]) -> Tensor:
        return torch.matmul(self.weight, x0)  # (B, R, d)


class GatedPINLayer(PINLayer):
    """DynInt-DA, eq. (4): ``X_l = (X_{l-1} o (W X_0)) o G_l^(i) + X_{l-1}``.

    ``G_l^(i) = 2 sigmoid(net(sg(X_0)))`` has one gate per entry of the ``(R, d)`` map
    (F*D gates), starts at 1 and multiplies the interaction term, never the residual.
    Computed as ``X_{l-1} o ((W X_0) o G) + X_{l-1}`` (Hadamard products commute).

    Args:
        rows: R. width: d. reduction: the generator's r.
    """

    def __init__(self, rows: int, width: int, reduction: int) -> None:
        super().__init__(rows)
        self.generator = TwoLayerGenerator(rows * width, rows * width, reduction)

    def generate(self, z: Tensor, hidden: Tensor | None = None) -> dict[str, Tensor]:
        """``{"gate": (B, R, d)}`` in ``(0, 2)``."""
        gate = 2.0 * torch.sigmoid(self._generate(z, hidden))  # (B, E)
        return {"gate": gate.view(z.shape[0], self.weight.shape[0], -1)}  # (B, R, d)

    def mix(self, x0: Tensor, generated: dict[str, Tensor]) -> Tensor:
        return torch.matmul(self.weight, x0) * generated["gate"]  # (B, R, d)


class GeneratedPINLayer(_PINLayerBase):
    """DynInt-DGP, eqs. (5), (7), (8): ``M = W^(i) X_0`` with ``W^(i) = U Sigma^(i) V^T``.

    U, V ``(R, K)`` are shared; the K diagonal entries ``sigma^(i)`` of ``Sigma^(i)`` are
    generated from ``sg(X_0)`` (linear output, sign free; ``Sigma = I`` at init). Computed
    as ``U (sigma^(i) o (V^T X_0))``: an instance holds K values and a ``(K, d)``
    product, the layer ``B*K*d + 2*R*K`` numbers; the ``(B, R, R)`` ``W^(i)`` is never
    built.

    Args:
        rows: R. width: d. rank: K <= R. reduction: the generator's r.
    """

    def __init__(self, rows: int, width: int, rank: int, reduction: int) -> None:
        super().__init__()
        self.U = nn.Parameter(torch.empty(rows, rank))
        self.V = nn.Parameter(torch.empty(rows, rank))
        # U V^T then has the Glorot entry variance 1/R of a static W: K * (1/K) * (1/R).
        nn.init.normal_(self.U, std=1.0 / math.sqrt(rank))
        nn.init.normal_(self.V, std=1.0 / math.sqrt(rows))
        self.generator = TwoLayerGenerator(rows * width, rank, reduction, offset=1.0)

    def generate(self, z: Tensor, hidden: Tensor | None = None) -> dict[str, Tensor]:
        """``{"sigma": (B, K)}``, the diagonal of ``Sigma^(i)``."""
        return {"sigma": self._generate(z, hidden)}

    def mix(self, x0: Tensor, generated: dict[str, Tensor]) -> Tensor:
        t = torch.matmul(self.V.t(), x0)  # (B, K, d): V^T X_0
        t = generated["sigma"].unsqueeze(-1) * t  # (B, K, d): Sigma^(i) V^T X_0
        return torch.matmul(self.U, t)  # (B, R, d)

    def orthogonality(self) -> Tensor:
        """Eq. (11) for this layer: ``sum_{p>q} |cos(u_p, u_q)| + |cos(v_p, v_q)|`` over
        the columns of U and V (a scalar)."""
        return orthogonal_penalty(self.U.t()) + orthogonal_penalty(self.V.t())


class WeightedPINLayer(PINLayer):
    """DynInt-DWP, eqs. (6), (9), (10): ``M = (G^(i) o W) X_0``, ``G^(i) = sum_p u~_p v~_p^T``.

    W ``(R, R)`` is shared; the K pairs ``u~_p, v~_p (R,)`` are generated from
    ``sg(X_0)`` (``G`` = all-ones at init). Two exact forms of the same product, and the
    layer takes the one that holds less per instance:

    * eq. (10), factorised, ``sum_p diag(u~_p) W diag(v~_p) X_0``: ``v~_p`` scales X_0's
      rows, W maps them (one GEMM over all instances and pairs), ``u~_p`` scales the
      result's rows; ``(K, R, d)`` products per instance, no ``(R, R)`` matrix;
    * direct, ``(G^(i) o W) X_0``: builds ``G^(i)`` and ``W^(i)``, ``(R, R)`` each.

    Factorised when ``K * d <= R`` (bit-wise crossing, many sub-spaces: at h = 16 on
    Criteo, R = 624 and K d = 4 against R^2 = 389,376 per instance), direct otherwise
    (h = 1: K d = 64 > R = 39, where the factorised products are the larger and slower;
    ``benchmarks/dynint_memory.py`` measures both).

    Args:
        rows: R. width: d. rank: K <= R. reduction: the generator's r.
    """

    def __init__(self, rows: int, width: int, rank: int, reduction: int) -> None:
        super().__init__(rows)
        self.rank = rank
        self.factorised = rank * width <= rows
        self.generator = TwoLayerGenerator(
            rows * width, 2 * rank * rows, reduction, offset=1.0 / math.sqrt(rank)
        )

    def generate(self, z: Tensor, hidden: Tensor | None = None) -> dict[str, Tensor]:
        """``{"u": (B, K, R), "v": (B, K, R)}``: row p is ``u~_p`` / ``v~_p``."""
        u, v = self._generate(z, hidden).view(z.shape[0], 2, self.rank, -1).unbind(1)
        return {"u": u, "v": v}

    def mix(self, x0: Tensor, generated: dict[str, Tensor]) -> Tensor:
        """``x0 (B, R, d) -> (G^(i) o W) X_0 (B, R, d)``, in the cheaper exact form."""
        return self.mix_factorised(x0, generated) if self.factorised else self.mix_direct(x0, generated)

    def mix_factorised(self, x0: Tensor, generated: dict[str, Tensor]) -> Tensor:
        """Eq. (10). Laid out ``(B, K, d, R)`` so ``W`` applies as one ``(B K d, R) x (R, R)``
        GEMM rather than B*K small ones."""
        y = generated["v"].unsqueeze(2) * x0.transpose(1, 2).unsqueeze(1)  # (B, K, d, R): (diag(v~_p) X_0)^T
        y = torch.matmul(y, self.weight.t())  # (B, K, d, R): (W diag(v~_p) X_0)^T
        return (generated["u"].unsqueeze(2) * y).sum(1).transpose(1, 2)  # (B, R, d)

    def mix_direct(self, x0: Tensor, generated: dict[str, Tensor]) -> Tensor:
        """``(G^(i) o W) X_0`` with ``G^(i) = U~^T V~`` built: ``(B, R, R)``."""
        gate = torch.bmm(generated["u"].transpose(1, 2), generated["v"])  # (B, R, R): sum_p u~_p v~_p^T
        return torch.bmm(gate * self.weight, x0)  # (B, R, d)

    def orthogonality(self, generated: dict[str, Tensor]) -> Tensor:
        """Eq. (12) for this layer, per instance: ``(B,)``."""
        return orthogonal_penalty(generated["u"]) + orthogonal_penalty(generated["v"])


class PolynomialInteraction(nn.Module):
    """DynInt / xDeepInt interaction network: ``x0 (B, F, D) -> logits (B,)``.

    Subspace crossing, L PIN layers of kind ``mode`` on the crossed rows, then the
    output layer eq. (2) (:func:`field_readout`). Every generator reads the flattened
    ``sg(X_0)``: the embeddings get gradients through the PIN path only, never through a
    generator (§3.2, §3.5.1: "to ensure training stability").

    Args:
        num_fields: F.
        dim: D.
        layers: L >= 1 (0 layers would be logistic regression on the embeddings).
        subspaces: h, dividing D (1: vector-wise, D: bit-wise).
        mode: ``"static"`` (xDeepInt, eq. 3), ``"da"`` (eq. 4), ``"dgp"`` (eqs. 7-8) or
            ``"dwp"`` (eqs. 9-10).
        rank: K, DGP kernel size / DWP latent rank, ``1 <= K <= F*h`` (dgp, dwp only).
        reduction: r >= 1, the generators' reduction ratio (da, dgp, dwp).

    Example::

        >>> net = PolynomialInteraction(num_fields=3, dim=4, layers=2, subspaces=2, mode="dgp")
        >>> net(torch.randn(5, 3, 4)).shape
        torch.Size([5])
    """

    _instance_penalty: Tensor | None

    def __init__(
        self,
        num_fields: int,
        dim: int,
        layers: int = 3,
        subspaces: int = 1,
        mode: str = "static",
        rank: int = 4,
        reduction: int = 4,
    ) -> None:
        super().__init__()
        for name, value in (("num_fields", num_fields), ("dim", dim), ("layers", layers),
                            ("subspaces", subspaces), ("reduction", reduction)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if dim % subspaces:
            raise ValueError(f"subspaces={subspaces} must divide dim={dim}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {MODES}")
        rows, width = num_fields * subspaces, dim // subspaces
        if mode in ("dgp", "dwp") and not 1 <= rank <= rows:
            raise ValueError(
                f"rank={rank} must be in [1, num_fields * subspaces = {num_fields} * {subspaces}"
                f" = {rows}] for mode={mode!r}"
            )
        self.num_fields, self.dim, self.subspaces = num_fields, dim, subspaces
        self.mode, self.rank, self.reduction = mode, rank, reduction

        def make_layer() -> _PINLayerBase:
            if mode == "static":
                return PINLayer(rows)
            if mode == "da":
                return GatedPINLayer(rows, width, reduction)
            kind = GeneratedPINLayer if mode == "dgp" else WeightedPINLayer
            return kind(rows, width, rank, reduction)

        self.layers = nn.ModuleList(make_layer() for _ in range(layers))
        self.out_weight = nn.Parameter(torch.empty(num_fields))  # W_out of eq. (2)
        self.out_bias = nn.Parameter(torch.zeros(()))  # b_out of eq. (2)
        # Glorot-uniform for the (1, F) W_out, as xDeepInt's output layer.
        bound = math.sqrt(6.0 / (num_fields + 1))
        nn.init.uniform_(self.out_weight, -bound, bound)
        self._instance_penalty = None

    def forward(self, x0: Tensor) -> Tensor:
        """``x0 (B, F, D)`` field embeddings -> ``(B,)`` logits."""
        if x0.ndim != 3 or x0.shape[1:] != (self.num_fields, self.dim):
            raise ValueError(
                f"x0 must be (B, {self.num_fields}, {self.dim}), got {tuple(x0.shape)}"
            )
        rows = split_subspaces(x0, self.subspaces)  # (B, R, d): X_0
        z = x0.detach().flatten(1)  # (B, E): sg(X_0), every generator's input
        generators = [layer.generator for layer in self.layers if hasattr(layer, "generator")]
        hidden = fused_hidden(generators, z) if generators else [None] * len(self.layers)
        x = rows
        orthogonality = []
        for layer, a in zip(self.layers, hidden, strict=True):
            generated = layer.generate(z, a)
            x = layer(x, rows, generated)  # (B, R, d): X_l
            if self.mode == "dwp":
                orthogonality.append(layer.orthogonality(generated))  # (B,)
        if orthogonality:
            self._instance_penalty = torch.stack(orthogonality).sum(0).mean()
        return field_readout(x, self.out_weight, self.out_bias)  # (B,)

    def penalty(self) -> Tensor:
        """The orthogonal regulariser of §3.6 (a scalar; the loss adds ``rate * penalty``).

        * dgp: eq. (11), ``sum_l sum_{p>q} |cos(u_p, u_q)| + |cos(v_p, v_q)|`` over the
          columns of each layer's shared U and V (needs no forward).
        * dwp: eq. (12) for the batch of the LAST forward: per instance the same sum over
          layers and pairs of its generated ``u~``, ``v~``, averaged over the batch. It
          carries that forward's graph, so call it after the forward it regularises;
          0 before any forward.
        * static, da: 0.
        """
        if self.mode == "dgp":
            return torch.stack([layer.orthogonality() for layer in self.layers]).sum()
        if self.mode == "dwp" and self._instance_penalty is not None:
            return self._instance_penalty
        return self.out_bias.new_zeros(())

    def fold(self) -> nn.Module:
        """Serving form with the same logits (eval mode; ``self`` is left untouched).

        Returns:
            dgp, dwp: a :class:`FoldedPolynomialInteraction`; static, da: a copy of this
            module (no instance-independent part to precompute).
        """
        if self.mode in ("dgp", "dwp"):
            return FoldedPolynomialInteraction(self).eval()
        return copy.deepcopy(self).eval()

    def __getstate__(self) -> dict:
        # The last DWP penalty is a non-leaf tensor of a past forward: deepcopy would fail
        # on it and a copy has no business with that batch.
        state = dict(self.__dict__)
        state["_instance_penalty"] = None
        return state


class FoldedPolynomialInteraction(nn.Module):
    """Serving form of a DGP or DWP :class:`PolynomialInteraction`: the same logits.

    Every layer's ``M_l`` reads X_0 alone, never ``X_{l-1}``, so all L layers are
    computed in one pass from precomputed, instance-independent constants:

    * the L generators (all reading ``X_0``) become one GEMM ``(E -> L*H)`` and one
      batched ``(L, Q, H)`` matmul, their offsets (DGP 1, DWP 1/sqrt(K)) in the biases;
    * DGP: ``V_1^T .. V_L^T`` are one ``(L*K, R)`` factor (one GEMM for every layer's
      ``V^T X_0``) and ``U_1 .. U_L`` one ``(L, R, K)`` factor (one batched matmul);
    * DWP: ``W_1 .. W_L`` one ``(L, R, R)`` tensor, applied in the smaller exact form as
      :class:`WeightedPINLayer` does;
    * the residual recursion eq. (3) becomes a product, ``X_L = X_0 o prod_l (1 + M_l)``
      (xDeepInt's form).

    Constants are buffers (no parameters); :meth:`penalty` is 0.

    Args:
        source: the trained DGP/DWP module.
    """

    def __init__(self, source: PolynomialInteraction) -> None:
        super().__init__()
        if source.mode not in ("dgp", "dwp"):
            raise ValueError(f"mode={source.mode!r}: only dgp and dwp have a folded form")
        self.num_fields, self.dim, self.subspaces = source.num_fields, source.dim, source.subspaces
        self.mode, self.rank, self.num_layers = source.mode, source.rank, len(source.layers)
        layers = list(source.layers)
        gens = [layer.generator for layer in layers]
        constants = {
            "gen_hidden_weight": torch.cat([g.hidden.weight for g in gens]),  # (L*H, E)
            "gen_hidden_bias": torch.cat([g.hidden.bias for g in gens]),  # (L*H,)
            "gen_out_weight": torch.stack([g.out.weight for g in gens]),  # (L, Q, H)
            "gen_out_bias": torch.stack([g.out.bias + g.offset for g in gens]),  # (L, Q)
            "out_weight": source.out_weight,  # (F,)
            "out_bias": source.out_bias,  # ()
        }
        if self.mode == "dgp":
            constants["V_t"] = torch.cat([layer.V.t() for layer in layers])  # (L*K, R)
            constants["U"] = torch.stack([layer.U for layer in layers])  # (L, R, K)
        else:
            constants["W"] = torch.stack([layer.weight for layer in layers])  # (L, R, R)
        for name, value in constants.items():
            self.register_buffer(name, value.detach().clone())

    def forward(self, x0: Tensor) -> Tensor:
        """``x0 (B, F, D)`` -> ``(B,)`` logits."""
        b, num_layers = x0.shape[0], self.num_layers
        rows = split_subspaces(x0, self.subspaces)  # (B, R, d)
        hidden = torch.relu(
            nn.functional.linear(x0.flatten(1), self.gen_hidden_weight, self.gen_hidden_bias)
        ).view(b, num_layers, -1)  # (B, L, H)
        p = torch.einsum("blh,lqh->blq", hidden, self.gen_out_weight) + self.gen_out_bias
        if self.mode == "dgp":  # p: (B, L, K), the diagonals sigma^(i)
            t = torch.matmul(self.V_t, rows).view(b, num_layers, self.rank, -1)  # (B, L, K, d)
            m = torch.einsum("lrk,blkd->blrd", self.U, p.unsqueeze(-1) * t)  # (B, L, R, d)
        else:  # p: (B, L, 2*K*R), the pairs (u~_p, v~_p)
            u, v = p.view(b, num_layers, 2, self.rank, -1).unbind(2)  # (B, L, K, R) each
            if self.rank * rows.shape[2] <= rows.shape[1]:  # K d <= R: eq. (10), as WeightedPINLayer
                y = v.unsqueeze(-1) * rows[:, None, None]  # (B, L, K, R, d): diag(v~) X_0
                y = torch.einsum("lrs,blksd->blkrd", self.W, y)  # (B, L, K, R, d)
                m = (u.unsqueeze(-1) * y).sum(2)  # (B, L, R, d)
            else:  # the smaller form: W^(i) = (sum_p u~_p v~_p^T) o W built
                gate = torch.einsum("blkr,blks->blrs", u, v)  # (B, L, R, R)
                m = torch.einsum("blrs,bsd->blrd", gate * self.W, rows)  # (B, L, R, d)
        x = rows * torch.prod(1.0 + m, dim=1)  # (B, R, d): X_L
        return field_readout(x, self.out_weight, self.out_bias)  # (B,)

    def penalty(self) -> Tensor:
        """0: serving has no loss."""
        return self.out_bias.new_zeros(())

    def fold(self) -> FoldedPolynomialInteraction:
        """Already folded: a copy."""
        return copy.deepcopy(self).eval()


class XDeepInt(nn.Module):
    """xDeepInt / DynInt as a CTR model: ``x (B, S) -> (B,)`` logits.

    ``FieldEmbedding`` (sequence fields mean-pooled) -> :class:`PolynomialInteraction`;
    there is no DNN tower (the paper's models read out the PIN alone, eq. 2). The
    model-supplied loss term :meth:`penalty` is ``orthogonal_rate`` times the network's
    orthogonal regulariser; the training loop adds it after each forward.

    Args:
        cfg: model config of family ``xdeepint`` (``embedding_dim`` and ``dynint``).
        spec: the feature spec.
        dense: must be None (the signature of every backbone; xdeepint has no tower).
    """

    def __init__(self, cfg: Any, spec: Any, dense: nn.Module | None = None) -> None:
        super().__init__()
        if dense is not None:
            raise ValueError("xdeepint takes no dense tower")
        d = cfg.dynint
        self.embedding = FieldEmbedding(spec, cfg.embedding_dim)
        num_fields = len(spec.fields)
        # §4.1.4: the kernel size is capped at what the fields allow (K <= F * h).
        rank = min(d.rank, num_fields * d.subspaces)
        self.pin: nn.Module = PolynomialInteraction(
            num_fields, cfg.embedding_dim, d.layers, d.subspaces, d.mode, rank, d.reduction
        )
        self.orthogonal_rate = d.orthogonal_rate
        if cfg.folded:  # rebuild the serving structure that the saved weights belong to
            self.pin = self.pin.fold()

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S)`` int64 -> logits ``(B,)``."""
        return self.pin(self.embedding(x))  # (B, F, D) -> (B,)

    def parameter_roles(self) -> dict[str, list[nn.Parameter]]:
        """The roles of §4.1.4's optimisers (``TrainConfig.group_optimizers``):
        ``interaction`` (the PIN's W, U, V and output layer: FTRL in the paper) and
        ``generator`` (the gate and parameter generators: Adam); the embedding table is
        the ``embedding`` role of every model."""
        generators = {id(p) for m in self.pin.modules() if isinstance(m, TwoLayerGenerator) for p in m.parameters()}
        params = list(self.pin.parameters())
        return {
            "interaction": [p for p in params if id(p) not in generators],
            "generator": [p for p in params if id(p) in generators],
        }

    def penalty(self) -> Tensor | None:
        """``orthogonal_rate * pin.penalty()``; None without a regulariser (static, da, a
        rate of 0, or the folded serving form)."""
        pin = self.pin
        if not self.orthogonal_rate or not isinstance(pin, PolynomialInteraction) or pin.mode not in ("dgp", "dwp"):
            return None
        return self.orthogonal_rate * self.pin.penalty()

    def interaction_kernels(self) -> list[Tensor]:
        """The static ``(R, R)`` PIN kernel of every layer (detached): ``W`` (static, da,
        dwp, whose ``G_i`` starts at all-ones around it) or ``U V^T`` (dgp, the kernel
        at ``Sigma_i = I``); their spectra are DynInt's Figure 4. Empty once folded."""
        if not isinstance(self.pin, PolynomialInteraction):
            return []
        return [
            (layer.U @ layer.V.t() if isinstance(layer, GeneratedPINLayer) else layer.weight).detach()
            for layer in self.pin.layers
        ]
