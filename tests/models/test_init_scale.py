"""APG at init: every generated layer starts at the scale of the static layer it replaces.

The static layer is ``layers.MLPTower``'s ``nn.Linear`` (torch's default init). A
rank-K layer's output scale varies from one init to the next far more than a full
one's (x is projected on K random directions), so scales are compared over several
seeds: ``sqrt(sum of APG output variances / sum of static output variances)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from modelkit import random_batch

from dynamic_ctr.models.apg import GENERATED_DEVIATION, APGLinear, APGLinearConfig
from dynamic_ctr.models.builder import build_dense
from dynamic_ctr.models.config import APGConfig, resolve_config
from dynamic_ctr.models.embedding import FieldEmbedding

HIDDEN = [256, 128, 64]
DIM = 16
SEEDS = range(8)
BATCH = 128
VERSIONS = {
    "v1": {"version": "v1"},
    "v2": {"version": "v2"},
    "v3": {"version": "v3"},
    "v4": {"version": "v4"},
    "v5": {"version": "v5"},
    "v5-stack3": {"version": "v5", "stack": 3},
}
CONDITIONS = {
    "self": {"mode": "self"},
    "group": {"mode": "group"},
    "mix": {"mode": "mix", "aggregation": "input", "combine": "attention"},
    "mix-output": {"mode": "mix", "aggregation": "output", "combine": "concat"},
}
CASES = [
    *[(v, c) for v in VERSIONS for c in ("self", "group", "mix")],
    ("v1", "mix-output"),
    ("v4", "mix-output"),
]
INPUTS = ("normal", "embedding")


def _inputs(spec, kind: str, seed: int) -> torch.Tensor:
    """``(B, F, D)`` tower input: standard normal, or a freshly built model's embeddings."""
    if kind == "normal":
        shape = (BATCH, len(spec.fields), DIM)
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    return FieldEmbedding(spec, DIM)(random_batch(spec, BATCH, seed=seed))  # std ~1e-4


def _towers(spec, apg: dict, seed: int):
    config = {"family": "dnn", "embedding_dim": DIM, "hidden_units": HIDDEN, "seed": seed}
    in_dim = len(spec.fields) * DIM
    towers = []
    for cfg in (config, {**config, "apg": apg}):
        resolved = resolve_config(cfg, spec)
        torch.manual_seed(seed)
        towers.append(build_dense(resolved, spec, in_dim).eval())
    return towers


@torch.no_grad()
def _scale_ratios(spec, apg: dict) -> dict[str, tuple[list[float], float]]:
    """Per input kind, the pooled APG/static output-std ratios of every hidden layer
    (both fed the static tower's activations) and of the whole towers."""
    var = {kind: ([[0.0, 0.0] for _ in HIDDEN], [0.0, 0.0]) for kind in INPUTS}
    for seed in SEEDS:
        static, dynamic = _towers(spec, apg, seed)
        for kind in INPUTS:
            layer_var, tower_var = var[kind]
            emb = _inputs(spec, kind, seed)
            h = emb.flatten(1)
            z = None if dynamic.condition is None else dynamic.condition(emb)
            tower_var[0] += static(h, emb).var().item()
            tower_var[1] += dynamic(h, emb).var().item()
            layers = zip(static.linears, static.acts, dynamic.layers)
            for i, (linear, act, layer) in enumerate(layers):
                y = linear(h)
                layer_var[i][0] += y.var().item()
                layer_var[i][1] += layer(h, h if z is None else z).var().item()
                h = act(y)
    return {
        kind: ([math.sqrt(a / s) for s, a in layer_var], math.sqrt(tower_var[1] / tower_var[0]))
        for kind, (layer_var, tower_var) in var.items()
    }


@pytest.mark.parametrize("version, condition", CASES, ids=[f"{v}-{c}" for v, c in CASES])
def test_apg_layers_and_tower_start_at_the_static_scale(spec, version, condition):
    """On standard-normal inputs and on a built model's embeddings (std ~1e-4, so the
    static layers' outputs are their biases): each APG layer within [0.8, 1.25]x the
    static layer's output std, the APG tower within [0.7, 1.4]x the static tower's."""
    apg = {**VERSIONS[version], "condition": CONDITIONS[condition]}
    for kind, (layers, tower) in _scale_ratios(spec, apg).items():
        for i, ratio in enumerate(layers):
            assert 0.8 <= ratio <= 1.25, f"{kind} input, layer {i}: APG/static std {ratio:.3f}"
        assert 0.7 <= tower <= 1.4, f"{kind} input, tower: APG/static std {tower:.3f}"


@pytest.mark.parametrize("version", VERSIONS, ids=str)
def test_standalone_layer_matches_nn_linear(version):
    """One layer on unit-scale x and z (self-wise: z = x), against ``nn.Linear(M, N)``."""
    m, n, var = 128, 96, [0.0, 0.0]
    for seed in SEEDS:
        torch.manual_seed(seed)
        static = torch.nn.Linear(m, n)
        apg = APGConfig(**VERSIONS[version])
        layer = APGLinear(APGLinearConfig(d_in=m, d_out=n, d_cond=m, rank=4, apg=apg))
        x = torch.randn(BATCH, m, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            var[0] += static(x).var().item()
            var[1] += layer(x, x).var().item()
    assert 0.8 <= math.sqrt(var[1] / var[0]) <= 1.25


@pytest.mark.parametrize("version", ["v1", "v2", "v4", "v5"])
def test_generated_part_is_a_small_deviation_of_the_static_layer(version):
    """With z = 0 the layer IS a static layer of ``nn.Linear``'s weight scale; a
    unit-scale z moves ``W_i`` by about ``GENERATED_DEVIATION`` of its norm."""
    m, n, c = 64, 32, 16
    zero_x, eye = torch.zeros(m, m), torch.eye(m)  # W_i's rows: the layer on unit vectors
    static_var, moved, static_norm = 0.0, 0.0, 0.0
    for seed in SEEDS:
        torch.manual_seed(seed)
        apg = APGConfig(version=version, generated_bias=True)
        layer = APGLinear(APGLinearConfig(d_in=m, d_out=n, d_cond=c, rank=4, apg=apg))
        z = torch.randn(1, c)
        z = (z / z.square().mean().sqrt()).expand(m, c)  # one instance, RMS exactly 1
        with torch.no_grad():
            static_w = layer(eye, torch.zeros(m, c)) - layer(zero_x, torch.zeros(m, c))  # (M, N)
            moved_w = layer(eye, z) - layer(zero_x, z)  # (M, N)
        static_var += static_w.var().item()
        moved += (moved_w - static_w).square().sum().item()
        static_norm += static_w.square().sum().item()
    static_std = math.sqrt(static_var / len(SEEDS))
    assert 0.8 < static_std * math.sqrt(3 * m) < 1.25, static_std  # nn.Linear: 1/sqrt(3M)
    relative = math.sqrt(moved / static_norm)
    assert 0.5 * GENERATED_DEVIATION < relative < 2 * GENERATED_DEVIATION, relative
