"""Adaptive Parameter Generation (APG) layers and the APG dense tower.

Yan et al., "APG: Adaptive Parameter Generation Network for Click-Through Rate
Prediction" (KDD and NeurIPS 2022 versions). A static hidden layer computes
``y = sigma(W x)``; an APG layer generates (part of) W per instance from a
condition z (see ``models.conditions``) with a generator MLP G (Eq. 3/5/7).

Row-vector convention: ``x (B, M)`` with M = d_in, ``y (B, N)`` with N = d_out.
The paper's column form ``y = U S V x`` (U: N x K, V: K x M) is here
``y = x V S U`` with ``V (M, K)``, ``S (K, K)``, ``U (K, N)``.

Versions (numbered as in the NeurIPS version's Table 3; the KDD version's Table 5
numbers them differently: its v1 is v1, its v2 is v4 with ``reconstruct``, its v3 is
v4, its v4 is v3, and it calls over-parameterisation "v6", stacking "v7/v8"; our v2
has no KDD row):

* ``v1`` ``W_i x``: G emits the full ``W_i (M, N)`` (Eq. 3).
* ``v2`` ``(U_i S_i V_i) x``: G emits V_i, S_i, U_i (Eq. 5), ``W_i`` is reconstructed
  by two batched matmuls, then applied.
* ``v3`` ``U_i (S_i (V_i x))``: same generation as v2, decomposed feed-forward
  (Eq. 6, Figure 4): x goes through V_i, S_i, U_i in turn; W_i is never built.
* ``v4`` ``U (S_i (V x))``: U, V shared (learned), only ``S_i (K, K)`` generated
  (Eq. 7-8), decomposed feed-forward. ``apg.reconstruct=True`` computes the same
  function in v2's order, ``(U S_i V) x`` with ``W_i`` reconstructed: the KDD
  version's Table-5 "v2" (which has no NeurIPS counterpart), for the benchmark.
* ``v5`` v4 with over-parameterised ``U = U^l U^r``, ``V = V^l V^r`` of inner width
  P (Eq. 9-10); ``stack=J`` uses J factors (Appendix F, Eq. 11). ``fold_model``
  multiplies the factors out, giving a v4 layer with the same output.

Nonlinearity: the paper applies sigma only to the layer output,
``sigma(U(S(Vx)))`` (Eq. 6, 8), never between the decomposed steps, so v2 and v3
compute the same function and load each other's weights. The activation (and
optional BatchNorm/Dropout) after each layer is ``layers.HiddenActivation``.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynamic_ctr.models.conditions import build_condition, make_combiner
from dynamic_ctr.models.config import APGConfig, ConditionConfig, ModelConfig
from dynamic_ctr.models.embedding import field_order
from dynamic_ctr.models.layers import HiddenActivation
from dynamic_ctr.spec import FeatureSpec

__all__ = [
    "GENERATED_DEVIATION",
    "APGLinear",
    "APGLinearConfig",
    "APGTower",
    "Generator",
    "GeneratorConfig",
    "MixOutputGenerator",
    "static_init_stds",
]


@dataclass(frozen=True)
class GeneratorConfig:
    """The generator MLP G: ``z (B, C) -> p (B, Q)``.

    Args:
        d_cond: C, the condition width.
        d_out: Q, the number of generated values.
        layers: linear maps in G (1 = a single linear map, the paper's default).
        hidden: width of G's hidden layers (``layers > 1``).
    """

    d_cond: int
    d_out: int
    layers: int = 1
    hidden: int = 64

    def __post_init__(self) -> None:
        for name in ("d_cond", "d_out", "layers", "hidden"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"generator {name}={value} must be >= 1")


class Generator(nn.Module):
    """G: ``(Linear -> ReLU) x (layers - 1) -> Linear``, ``z (B, C) -> (B, Q)``.

    Args:
        cfg: the generator config.
    """

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        dims = [cfg.d_cond] + [cfg.hidden] * (cfg.layers - 1)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.out = nn.Linear(dims[-1], cfg.d_out)

    def forward(self, z: Tensor) -> Tensor:
        for layer in self.hidden:
            z = torch.relu(layer(z))  # (B, H_g)
        return self.out(z)  # (B, Q)

    def output_layers(self) -> list[nn.Linear]:
        return [self.out]

    def activation_numel(self, batch_size: int) -> int:
        """Elements of G's hidden activations and output for one batch."""
        return batch_size * (sum(h.out_features for h in self.hidden) + self.out.out_features)


class MixOutputGenerator(nn.Module):
    """Mix-wise output aggregation (KDD §3.1.2): one G per condition, then combine.

    ``z (B, G, C) -> p^j = G_j(z^j) (B, G, Q) -> combine -> (B, Q)`` with the
    combiner of ``cond.combine`` applied to the generated parameter vectors.

    Args:
        cfg: config of each of the G generators.
        cond: the (mix, output-aggregation) condition config.
    """

    def __init__(self, cfg: GeneratorConfig, cond: ConditionConfig) -> None:
        super().__init__()
        self.generators = nn.ModuleList(Generator(cfg) for _ in cond.fields)
        self.combine, _ = make_combiner(cond, len(cond.fields), cfg.d_out)

    def forward(self, z: Tensor) -> Tensor:
        """``z (B, G, C) -> (B, Q)``."""
        params = torch.stack(
            [g(z[:, j]) for j, g in enumerate(self.generators)], dim=1
        )  # (B, G, Q)
        return self.combine(params)  # (B, Q)

    def output_layers(self) -> list[nn.Linear]:
        return [g.out for g in self.generators]

    def activation_numel(self, batch_size: int) -> int:
        per = sum(g.activation_numel(batch_size) for g in self.generators)
        return per + batch_size * self.generators[0].out.out_features  # + the combined (B, Q)


@dataclass(frozen=True)
class APGLinearConfig:
    """One APG layer.

    Args:
        d_in: M, input width.
        d_out: N, output width.
        d_cond: C, width of the condition z (per condition for output aggregation).
        rank: K (ignored by v1); ``K <= min(M, N)``.
        apg: version, width P, stack J, generator and condition settings.
    """

    d_in: int
    d_out: int
    d_cond: int
    rank: int
    apg: APGConfig

    def __post_init__(self) -> None:
        for name in ("d_in", "d_out", "d_cond", "rank"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if self.apg.version != "v1" and self.rank > min(self.d_in, self.d_out):
            raise ValueError(
                f"rank={self.rank} exceeds min(d_in, d_out)={min(self.d_in, self.d_out)}"
            )

    @property
    def blocks(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Names and shapes of the generated blocks, in the order G emits them."""
        m, n, k = self.d_in, self.d_out, self.rank
        version = self.apg.version
        if version == "v1":
            out: tuple[tuple[str, tuple[int, ...]], ...] = (("W", (m, n)),)
        elif version in ("v2", "v3"):
            out = (("V", (m, k)), ("S", (k, k)), ("U", (k, n)))
        else:
            out = (("S", (k, k)),)
        if self.apg.generated_bias:
            out += (("bias", (n,)),)
        return out


#: Relative std of the generated part at init, for a unit-scale condition z: the
#: generated ``W_i`` (or bias) is the static one plus a z-dependent deviation whose
#: variance is ``GENERATED_DEVIATION^2`` times the static entries' (split evenly over
#: v2/v3's three generated factors). Small, so the layer starts at the static
#: layer's scale whatever z's scale is (embeddings start near zero, self-wise inputs
#: near unit scale).
GENERATED_DEVIATION = 0.3


def static_init_stds(d_in: int, rank: int) -> dict[str, float]:
    """RMS of the static (z-independent) init of each block of an APG layer with
    input width ``M = d_in`` and rank ``K``.

    The layer starts as the static layer it replaces: ``layers.MLPTower``'s
    ``nn.Linear`` with torch's default init draws ``W`` and ``b`` from
    ``U(-1/sqrt(M), 1/sqrt(M))``, entries of variance ``1/(3M)``. The low-rank form
    matches it with ``V ~ N(0, 1/M)`` (``x V`` keeps x's scale), ``S = I`` and
    ``U ~ N(0, 1/(3K))``: ``W = V S U`` has entries of variance
    ``K * 1/M * 1/(3K) = 1/(3M)``, so ``x W`` has, in expectation over the init, the
    static layer's scale for any x. ``S``'s entry is the RMS of the identity.

    Returns:
        ``{"W", "V", "S", "U", "bias"}`` -> std (``"S"``: ``1/sqrt(K)``).
    """
    static = 1.0 / math.sqrt(3 * d_in)
    return {
        "W": static,
        "V": 1.0 / math.sqrt(d_in),
        "S": 1.0 / math.sqrt(rank),
        "U": 1.0 / math.sqrt(3 * rank),
        "bias": static,
    }


class APGLinear(nn.Module):
    """An APG linear map, ``x (B, M), z (B, C) -> (B, N)`` (no activation).

    Init: the layer starts as the static layer it replaces (:func:`static_init_stds`:
    ``W``, ``V S U`` and the bias have ``nn.Linear``'s default scale; ``S = I``).
    G's output bias holds that static layer (the same for every generator of
    mix-wise output aggregation) and G's output weight is scaled so that the
    generated part is a z-dependent deviation of relative std
    ``GENERATED_DEVIATION`` for a unit-scale z. Shared U, V (and their v5 factors)
    and the shared bias get the same static init.

    Args:
        cfg: the layer config.
    """

    def __init__(self, cfg: APGLinearConfig) -> None:
        super().__init__()
        self.cfg = cfg
        version, k, m, n = cfg.apg.version, cfg.rank, cfg.d_in, cfg.d_out
        self._block_sizes = tuple(math.prod(shape) for _, shape in cfg.blocks)
        gen_cfg = GeneratorConfig(
            cfg.d_cond, sum(self._block_sizes), cfg.apg.generator_layers, cfg.apg.generator_hidden
        )
        cond = cfg.apg.condition
        self.generator: nn.Module = (
            MixOutputGenerator(gen_cfg, cond) if cond.output_aggregation else Generator(gen_cfg)
        )
        self.shared = version in ("v4", "v5")
        if self.shared:
            # V = V_factors[0] @ ... (M -> P -> ... -> K); U = U_factors[0] @ ... (K -> ... -> N)
            j, p = cfg.apg.num_factors, cfg.apg.width
            v_dims = [m] + [p] * (j - 1) + [k]
            u_dims = [k] + [p] * (j - 1) + [n]
            self.V_factors = nn.ParameterList(
                nn.Parameter(torch.empty(a, b)) for a, b in itertools.pairwise(v_dims)
            )
            self.U_factors = nn.ParameterList(
                nn.Parameter(torch.empty(a, b)) for a, b in itertools.pairwise(u_dims)
            )
        self.bias = None if cfg.apg.generated_bias else nn.Parameter(torch.empty(n))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        cfg = self.cfg
        m, k = cfg.d_in, cfg.rank
        std = static_init_stds(m, k)
        bound = 1.0 / math.sqrt(m)  # nn.Linear's default: U(-1/sqrt(M), 1/sqrt(M))
        static = {
            "W": functools.partial(nn.init.uniform_, a=-bound, b=bound),
            "V": functools.partial(nn.init.normal_, std=std["V"]),
            "S": nn.init.eye_,
            "U": functools.partial(nn.init.normal_, std=std["U"]),
            "bias": functools.partial(nn.init.uniform_, a=-bound, b=bound),
        }
        for module in self.generator.modules():
            if module is not self.generator and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        # one static layer, shared by all generators (mix-wise output aggregation has G)
        static_bias = torch.cat(
            [static[name](torch.empty(shape)).flatten() for name, shape in cfg.blocks]
        )
        # deviation std per block: GENERATED_DEVIATION of the static RMS, split evenly
        # over the factors of W_i (v2/v3 generate three) so W_i deviates by about that
        factors = sum(1 for name, _ in cfg.blocks if name != "bias")
        row_std = torch.cat(
            [
                torch.full(
                    (size,),
                    std[name] * GENERATED_DEVIATION / math.sqrt(1 if name == "bias" else factors),
                )
                for (name, _), size in zip(cfg.blocks, self._block_sizes)
            ]
        )
        with torch.no_grad():
            for out in self.generator.output_layers():
                out.bias.copy_(static_bias)
                noise = torch.randn_like(out.weight)  # (Q, C)
                scale = (row_std / math.sqrt(out.in_features)).to(noise).unsqueeze(1)  # (Q, 1)
                out.weight.copy_(noise * scale)
        if self.shared:
            self._init_factors(self.V_factors, std["V"])
            self._init_factors(self.U_factors, std["U"])
        if self.bias is not None:
            static["bias"](self.bias)

    @staticmethod
    def _init_factors(factors: nn.ParameterList, target_std: float) -> None:
        """First factor ~ N(0, target_std^2), later ones ~ N(0, 1/rows): the product
        then has entries of std ~ target_std whatever P and J are."""
        with torch.no_grad():
            for i, f in enumerate(factors):
                f.normal_(0.0, target_std if i == 0 else 1.0 / math.sqrt(f.shape[0]))

    def shared_matrices(self) -> tuple[Tensor, Tensor]:
        """``V (M, K)`` and ``U (K, N)``, multiplied out from their factors (v4/v5)."""
        if not self.shared:
            raise ValueError(f"version {self.cfg.apg.version!r} has no shared U, V")
        v = functools.reduce(torch.matmul, self.V_factors)  # (M, K)
        u = functools.reduce(torch.matmul, self.U_factors)  # (K, N)
        return v, u

    def generate(self, z: Tensor) -> dict[str, Tensor]:
        """The generated blocks for condition ``z``.

        Args:
            z: ``(B, C)``, or ``(B, G, C)`` for mix-wise output aggregation.

        Returns:
            ``{"W": (B, M, N)}`` (v1), ``{"V": (B, M, K), "S": (B, K, K), "U": (B, K, N)}``
            (v2, v3) or ``{"S": (B, K, K)}`` (v4, v5), plus ``"bias": (B, N)`` when
            the bias is generated.
        """
        return self._blocks(self.generator(z))

    def _blocks(self, p: Tensor) -> dict[str, Tensor]:
        """Generator output ``p (B, Q)`` split into the named blocks."""
        b = p.shape[0]
        parts = torch.split(p, self._block_sizes, dim=1)
        return {name: part.view(b, *shape) for (name, shape), part in zip(self.cfg.blocks, parts)}

    def _project_and_generate(self, x: Tensor, z: Tensor, v: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``x V (B, K)`` and the generated blocks of a shared (v4/v5) layer.

        Self-wise with a one-layer generator (``z is x``), both are linear in x, so
        they come from ONE GEMM on ``[V | G's weight^T]``: the K-wide ``x V`` alone is
        too thin a matmul to be worth its own call on the CPU.
        """
        gen = self.generator
        if z is x and isinstance(gen, Generator) and not gen.hidden:
            k = v.shape[1]
            weight = torch.cat([v, gen.out.weight.t()], dim=1)  # (M, K + Q)
            bias = torch.cat([gen.out.bias.new_zeros(k), gen.out.bias])  # (K + Q,)
            tp = torch.addmm(bias, x, weight)  # (B, K + Q)
            return tp[:, :k], self._blocks(tp[:, k:])
        return x @ v, self.generate(z)

    @staticmethod
    def _apply_reconstructed(x: Tensor, v: Tensor, s: Tensor, u: Tensor) -> Tensor:
        """``x W_i`` with ``W_i = V S_i U (B, M, N)`` built first (two batched matmuls).

        ``v``: ``(B, M, K)`` generated or ``(M, K)`` shared; ``s`` ``(B, K, K)``;
        ``u``: ``(B, K, N)`` or ``(K, N)``. Returns ``(B, N)``.
        """
        w = torch.matmul(torch.matmul(v, s), u)  # (B, M, N) reconstructed W_i
        return torch.bmm(x.unsqueeze(1), w).squeeze(1)  # (B, N)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        """``x (B, M)``, ``z (B, C)`` (or ``(B, G, C)``) -> ``(B, N)``."""
        if x.ndim != 2 or x.shape[1] != self.cfg.d_in:
            raise ValueError(f"x must be (B, {self.cfg.d_in}), got {tuple(x.shape)}")
        version = self.cfg.apg.version
        if self.shared and self.cfg.apg.reconstruct:  # the KDD version's v2
            v, u = self.shared_matrices()  # (M, K), (K, N)
            g = self.generate(z)
            bias = g["bias"] if self.bias is None else self.bias
            return self._apply_reconstructed(x, v, g["S"], u) + bias  # (B, N)
        if self.shared:
            v, u = self.shared_matrices()  # (M, K), (K, N)
            t, g = self._project_and_generate(x, z, v)  # (B, K)
            t = torch.bmm(t.unsqueeze(1), g["S"]).squeeze(1)  # (B, K)
            bias = g["bias"] if self.bias is None else self.bias
            return torch.addmm(bias, t, u) if bias.ndim == 1 else t @ u + bias  # (B, N)
        g = self.generate(z)
        if version == "v1":
            y = torch.bmm(x.unsqueeze(1), g["W"]).squeeze(1)  # (B, N)
        elif version == "v2":
            y = self._apply_reconstructed(x, g["V"], g["S"], g["U"])  # (B, N)
        else:  # v3
            t = torch.bmm(x.unsqueeze(1), g["V"])  # (B, 1, K)
            t = torch.bmm(t, g["S"])  # (B, 1, K)
            y = torch.bmm(t, g["U"]).squeeze(1)  # (B, N)
        bias = g["bias"] if self.bias is None else self.bias
        return y + bias

    def activation_numel(self, batch_size: int) -> int:
        """Elements materialised per batch: G's activations and generated blocks,
        the intermediates of the feed-forward, and the ``(B, N)`` output."""
        b, m, n, k = batch_size, self.cfg.d_in, self.cfg.d_out, self.cfg.rank
        version = self.cfg.apg.version
        if version == "v1":
            extra = 0
        elif version == "v2" or self.cfg.apg.reconstruct:
            extra = b * (m * k + m * n)  # V_i S_i and the reconstructed W_i
        else:
            extra = 2 * b * k  # the two (B, K) steps of the decomposed feed-forward
        return self.generator.activation_numel(b) + extra + b * n


class APGTower(nn.Module):
    """Dense tower whose every hidden linear map is an :class:`APGLinear`.

    ``h (B, E_in), emb (B, F, D) -> (B, H_last)``. Group/mix conditions are computed
    once from ``emb`` and shared by all layers; self-wise layers use their own input.

    Args:
        cfg: model config with ``apg`` set (resolved: condition fields filled in).
        spec: the feature spec (condition fields and the F axis).
        in_dim: E_in, the tower input width.
    """

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, in_dim: int) -> None:
        super().__init__()
        if cfg.apg is None:
            raise ValueError("apg=None: use layers.MLPTower for a static tower")
        apg = cfg.apg
        self.condition, d_cond = build_condition(
            apg.condition, field_order(spec), cfg.embedding_dim
        )
        dims = [in_dim, *cfg.hidden_units]
        self.layers = nn.ModuleList(
            APGLinear(APGLinearConfig(a, b, d_cond or a, apg.rank_of(i), apg))
            for i, (a, b) in enumerate(itertools.pairwise(dims))
        )
        self.acts = nn.ModuleList(HiddenActivation(b, cfg.batch_norm, cfg.dropout) for b in dims[1:])
        self.out_dim = dims[-1]

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        """``h (B, E_in)``, ``emb (B, F, D)`` -> ``(B, H_last)``."""
        z = None if self.condition is None else self.condition(emb)  # (B, C) or (B, G, D)
        for layer, act in zip(self.layers, self.acts):
            h = act(layer(h, h if z is None else z))  # (B, H_l)
        return h

    def activation_numel(self, batch_size: int) -> int:
        return sum(layer.activation_numel(batch_size) for layer in self.layers)
