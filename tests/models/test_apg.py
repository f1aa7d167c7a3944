"""APG layers (v1-v5), generators, conditions, and the APG inspection helpers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from modelkit import perturb, small_config

from dynamic_ctr.models import build_model, generated_cores, hidden_memory_bytes
from dynamic_ctr.models.apg import APGLinear, APGLinearConfig, MixOutputGenerator
from dynamic_ctr.models.conditions import (
    AttentionTokens,
    GroupCondition,
    MixInputCondition,
    MixOutputCondition,
)
from dynamic_ctr.models.config import APGConfig, ConditionConfig

VERSIONS = ["v1", "v2", "v3", "v4", "v5"]


def _layer(version: str, **apg: object) -> APGLinear:
    torch.manual_seed(0)
    cfg = APGLinearConfig(d_in=6, d_out=5, d_cond=3, rank=2, apg=APGConfig(version=version, **apg))
    return perturb(APGLinear(cfg))


@pytest.mark.parametrize("version", VERSIONS)
def test_apg_linear_shape_and_gradients(version):
    layer = _layer(version)
    x, z = torch.randn(4, 6, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    y = layer(x, z)
    assert y.shape == (4, 5)
    y.square().sum().backward()
    assert x.grad.abs().sum() > 0 and z.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_v1_applies_the_generated_full_matrix():
    layer = _layer("v1")
    x, z = torch.randn(4, 6), torch.randn(4, 3)
    w = layer.generator(z).view(4, 6, 5)
    expected = torch.stack([x[i] @ w[i] for i in range(4)]) + layer.bias
    torch.testing.assert_close(layer(x, z), expected)


def test_v4_shares_u_v_and_generates_only_s():
    layer = _layer("v4")
    assert layer.generator.out.out_features == 2 * 2  # K*K
    x, z = torch.randn(4, 6), torch.randn(4, 3)
    s = layer.generator(z).view(4, 2, 2)
    v, u = layer.V_factors[0], layer.U_factors[0]
    expected = torch.stack([x[i] @ v @ s[i] @ u for i in range(4)]) + layer.bias
    torch.testing.assert_close(layer(x, z), expected)
    # instance-specific: same x, different z -> different output
    assert not torch.allclose(layer(x[:1], z[:1]), layer(x[:1], z[1:2]))


@pytest.mark.parametrize("version,generated_bias", [("v4", False), ("v5", False), ("v4", True)])
def test_self_wise_fused_projection_equals_the_separate_matmuls(version, generated_bias):
    """``z is x`` takes the one-GEMM path; a copy of x takes the generic one."""
    torch.manual_seed(0)
    cfg = APGLinearConfig(d_in=6, d_out=5, d_cond=6, rank=2, apg=APGConfig(version=version, generated_bias=generated_bias))
    layer = perturb(APGLinear(cfg))
    x = torch.randn(8, 6)
    fused = layer(x, x)
    fused.square().sum().backward()
    fused_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    generic = layer(x, x.clone())
    generic.square().sum().backward()
    torch.testing.assert_close(fused, generic, rtol=1e-5, atol=1e-6)
    for a, p in zip(fused_grads, layer.parameters()):  # float32 sums in another order
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-4)
    blocks = layer.generate(x)
    s, v_u = blocks["S"], layer.shared_matrices()
    v, u = v_u
    bias = blocks["bias"] if generated_bias else layer.bias
    expected = torch.stack([x[i] @ v @ s[i] @ u for i in range(8)]) + bias
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)


def test_v5_equals_v4_with_the_product_of_its_factors():
    layer = _layer("v5", width=7)
    assert [tuple(f.shape) for f in layer.V_factors] == [(6, 7), (7, 2)]
    assert [tuple(f.shape) for f in layer.U_factors] == [(2, 7), (7, 5)]
    x, z = torch.randn(4, 6), torch.randn(4, 3)
    s = layer.generator(z).view(4, 2, 2)
    v = layer.V_factors[0] @ layer.V_factors[1]
    u = layer.U_factors[0] @ layer.U_factors[1]
    expected = torch.stack([x[i] @ v @ s[i] @ u for i in range(4)]) + layer.bias
    torch.testing.assert_close(layer(x, z), expected)


def test_stack_sets_the_number_of_factors():
    layer = _layer("v5", width=7, stack=4)
    assert [tuple(f.shape) for f in layer.V_factors] == [(6, 7), (7, 7), (7, 7), (7, 2)]
    assert len(layer.U_factors) == 4


def test_v2_reconstructed_equals_v3_decomposed_layer():
    v2 = _layer("v2")
    v3 = _layer("v3")
    v3.load_state_dict(v2.state_dict())  # same structure, same parameters
    x, z = torch.randn(16, 6), torch.randn(16, 3)
    y2, y3 = v2(x, z), v3(x, z)
    assert y2.std() > 0.1  # a non-trivial function of the input
    torch.testing.assert_close(y3, y2, rtol=0, atol=1e-5)
    g = v2.generate(z)
    expected = torch.stack([x[i] @ g["V"][i] @ g["S"][i] @ g["U"][i] for i in range(16)]) + v2.bias
    torch.testing.assert_close(y2, expected)


@pytest.mark.parametrize("mode", ["self", "group"])
def test_v2_equals_v3_in_a_full_model(spec, big_batch, mode):
    base = {"generated_bias": True, "condition": {"mode": mode}}
    m2 = perturb(
        build_model(small_config(apg={"version": "v2", **base}), spec), scale=0.05, table_scale=0.5
    ).eval()
    m3 = build_model(small_config(apg={"version": "v3", **base}), spec).eval()
    m3.load_state_dict(m2.state_dict())
    y2, y3 = m2(big_batch), m3(big_batch)
    assert y2.std() > 0.1, y2.std()
    assert y2.abs().max() < 10
    torch.testing.assert_close(y3, y2, rtol=0, atol=1e-5)


@pytest.mark.parametrize("generated_bias", [False, True])
def test_v4_reconstructed_equals_v4_decomposed_layer(generated_bias):
    """``reconstruct=True`` (the KDD version's v2): W_i = V S_i U built, then applied;
    v4's parameters and function."""
    v4 = _layer("v4", generated_bias=generated_bias)
    rec = _layer("v4", generated_bias=generated_bias, reconstruct=True)
    rec.load_state_dict(v4.state_dict())  # same structure, same parameters
    x, z = torch.randn(16, 6), torch.randn(16, 3)
    y4, yr = v4(x, z), rec(x, z)
    assert y4.std() > 0.1
    torch.testing.assert_close(yr, y4, rtol=0, atol=1e-5)
    g = rec.generate(z)
    v, u = rec.shared_matrices()
    bias = g["bias"] if generated_bias else rec.bias
    w = torch.stack([v @ g["S"][i] @ u for i in range(16)])  # (B, M, N)
    torch.testing.assert_close(yr, torch.einsum("bm,bmn->bn", x, w) + bias)


@pytest.mark.parametrize("mode", ["self", "group"])
def test_v4_reconstructed_equals_v4_in_a_full_model(spec, big_batch, mode):
    base = {"version": "v4", "condition": {"mode": mode}}
    m4 = perturb(build_model(small_config(apg=base), spec), scale=0.05, table_scale=0.5).eval()
    mr = build_model(small_config(apg={**base, "reconstruct": True}), spec).eval()
    mr.load_state_dict(m4.state_dict())
    y4, yr = m4(big_batch), mr(big_batch)
    assert y4.std() > 0.1, y4.std()
    torch.testing.assert_close(yr, y4, rtol=0, atol=1e-5)
    assert mr.config["apg"]["reconstruct"] is True


def test_generated_bias_replaces_the_shared_bias():
    layer = _layer("v4", generated_bias=True)
    assert layer.bias is None
    x, z = torch.randn(4, 6), torch.randn(4, 3)
    g = layer.generate(z)
    assert g["bias"].shape == (4, 5)
    v, u = layer.shared_matrices()
    expected = torch.einsum("bk,bkj->bj", x @ v, g["S"]) @ u + g["bias"]
    torch.testing.assert_close(layer(x, z), expected)


def test_rank_larger_than_layer_raises():
    with pytest.raises(ValueError, match="rank=6"):
        APGLinearConfig(d_in=6, d_out=5, d_cond=3, rank=6, apg=APGConfig(version="v3"))
    APGLinearConfig(
        d_in=6, d_out=5, d_cond=3, rank=6, apg=APGConfig(version="v1")
    )  # v1 has no rank


def test_generator_init_starts_near_a_static_layer():
    """G's output bias is a static layer (S = I), its weight a small deviation."""
    torch.manual_seed(0)
    layer = APGLinear(APGLinearConfig(d_in=32, d_out=16, d_cond=8, rank=4, apg=APGConfig()))
    s = layer.generate(torch.randn(256, 8))["S"]  # (B, K, K)
    torch.testing.assert_close(s.mean(0), torch.eye(4), atol=0.15, rtol=0)
    assert 0.1 < s.std(0).mean() < 1.0


def test_multi_layer_generator():
    layer = _layer("v4", generator_layers=3, generator_hidden=11)
    assert [h.out_features for h in layer.generator.hidden] == [11, 11]
    assert layer(torch.randn(2, 6), torch.randn(2, 3)).shape == (2, 5)


# --- conditions ----------------------------------------------------------------------

CONDITIONS = [
    ({"mode": "self"}, None),
    ({"mode": "group"}, None),
    *[
        ({"mode": "mix", "aggregation": agg, "combine": comb}, None)
        for agg in ("input", "output")
        for comb in ("concat", "mean", "attention")
    ],
]


@pytest.mark.parametrize(
    "condition", [c for c, _ in CONDITIONS], ids=lambda c: "-".join(str(v) for v in c.values())
)
def test_condition_modes_shapes_and_gradients(spec, batch, condition):
    model = build_model(small_config(apg={"version": "v4", "condition": condition}), spec)
    perturb(model)
    logits = model(batch)
    assert logits.shape == (3,)
    # Gradients through the condition path only: feed the tower a detached input.
    tower = model.dense
    emb = model.embedding(batch).detach().requires_grad_(True)  # (B, F, D)
    h = emb.detach().flatten(1)
    tower(h, emb).sum().backward()
    if condition["mode"] == "self":
        assert emb.grad is None
        for layer in tower.layers:
            assert layer.generator.out.weight.grad.abs().sum() > 0
        return
    cond_fields = {"group": [0], "mix": [0, 1]}[condition["mode"]]  # user, item
    for f in range(emb.shape[1]):
        reached = emb.grad[:, f].abs().sum() > 0
        assert reached == (f in cond_fields), f"field {f}"


@pytest.mark.parametrize("combine, width", [("concat", 2 * 4), ("mean", 4), ("attention", 4)])
def test_mix_input_aggregation_feeds_one_generator(spec, combine, width):
    condition = {"mode": "mix", "aggregation": "input", "combine": combine}
    model = build_model(small_config(apg={"condition": condition}), spec)
    assert isinstance(model.dense.condition, MixInputCondition)
    for layer in model.dense.layers:
        assert layer.generator.out.in_features == width


@pytest.mark.parametrize("combine", ["concat", "mean", "attention"])
def test_mix_output_aggregation_has_one_generator_per_condition(spec, batch, combine):
    condition = {
        "mode": "mix",
        "aggregation": "output",
        "combine": combine,
        "fields": ["user", "item", "genres"],
    }
    model = build_model(small_config(apg={"condition": condition}), spec)
    assert isinstance(model.dense.condition, MixOutputCondition)
    first = model.dense.layers[0]
    assert isinstance(first.generator, MixOutputGenerator)
    assert len(first.generator.generators) == 3
    z = model.dense.condition(model.embedding(batch))
    assert z.shape == (3, 3, 4)  # (B, G, D)
    assert first.generate(z)["S"].shape == (3, 4, 4)


def test_mix_output_mean_is_the_mean_of_per_condition_parameters(spec, batch):
    condition = {"mode": "mix", "aggregation": "output", "combine": "mean"}
    model = perturb(build_model(small_config(apg={"condition": condition}), spec))
    gen = model.dense.layers[0].generator
    z = model.dense.condition(model.embedding(batch))  # (B, 2, D)
    expected = (gen.generators[0](z[:, 0]) + gen.generators[1](z[:, 1])) / 2
    torch.testing.assert_close(gen(z), expected)


def test_group_condition_is_the_fields_embedding(spec, batch):
    model = build_model(
        small_config(apg={"condition": {"mode": "group", "fields": ["item"]}}), spec
    )
    assert isinstance(model.dense.condition, GroupCondition)
    emb = model.embedding(batch)
    torch.testing.assert_close(model.dense.condition(emb), emb[:, 1])


def test_group_cores_depend_only_on_the_group_field(spec):
    model = perturb(build_model(small_config(apg={"condition": {"mode": "group"}}), spec)).eval()
    x = torch.tensor([[2, 3, 2, 2, 0, 0, 0], [2, 5, 3, 4, 5, 0, 0], [4, 3, 2, 2, 0, 0, 0]])
    cores = generated_cores(model, x)  # (B, K*K)
    assert cores.shape == (3, 16)
    torch.testing.assert_close(cores[0], cores[1])  # same user, other item/domain/genres
    assert not torch.allclose(cores[0], cores[2])  # other user


def test_self_cores_depend_on_every_field(spec):
    model = perturb(build_model(small_config(apg={"condition": {"mode": "self"}}), spec)).eval()
    x = torch.tensor([[2, 3, 2, 2, 0, 0, 0], [2, 5, 2, 2, 0, 0, 0]])
    cores = generated_cores(model, x)
    assert not torch.allclose(cores[0], cores[1])


def test_attention_weights_are_a_distribution():
    torch.manual_seed(0)
    att = AttentionTokens(5, 3)
    tokens = torch.randn(4, 3, 5)
    alpha = att.attention(tokens)
    assert alpha.shape == (4, 3)
    torch.testing.assert_close(alpha.sum(1), torch.ones(4))
    torch.testing.assert_close(att(tokens), (alpha.unsqueeze(-1) * tokens).sum(1))
    assert not torch.allclose(alpha[0], alpha[1])  # instance-dependent


def test_condition_config_fields_must_be_a_tuple():
    with pytest.raises(ValueError, match="apg.condition.fields"):
        ConditionConfig(mode="group", fields="user")  # type: ignore[arg-type]


# --- inspection ----------------------------------------------------------------------


def test_generated_cores_v1_and_errors(spec, batch):
    model = build_model(small_config(apg={"version": "v1"}), spec)
    assert generated_cores(model, batch).shape == (3, 16 * 12)  # full W_i of layer 0
    with pytest.raises(ValueError, match="no APG layer"):
        generated_cores(build_model(small_config(), spec), batch)


def test_generated_cores_leaves_the_model_unchanged(spec, batch):
    model = build_model(small_config(apg={"version": "v4"}), spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generated_cores(model, batch)
    generated_cores(model, batch)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.dense.layers[0]._forward_pre_hooks


def test_hidden_memory_bytes(spec):
    static = build_model(small_config(), spec)
    assert hidden_memory_bytes(static, 10) == 10 * (12 + 8) * 4
    b = 10
    sizes = {
        v: hidden_memory_bytes(build_model(small_config(apg={"version": v}), spec), b)
        for v in VERSIONS
    }
    # v4: per layer the output, the generated S (K*K) and two (B, K) intermediates
    assert sizes["v4"] == b * ((12 + 16 + 8) + (8 + 16 + 8)) * 4
    assert sizes["v5"] == sizes["v4"]  # over-parameterisation costs no activations
    assert sizes["v1"] == b * ((16 * 12 + 12) + (12 * 8 + 8)) * 4  # generated W_i + output
    assert sizes["v2"] > sizes["v3"] > sizes["v4"]  # v2 also materialises W_i (B, M, N)
    reconstructed = build_model(small_config(apg={"version": "v4", "reconstruct": True}), spec)
    # v4 with V S_i (B, M, K) and W_i (B, M, N) per layer (as v2) instead of two (B, K)
    extra = sum(m * 4 + m * n - 2 * 4 for m, n in [(16, 12), (12, 8)])
    assert hidden_memory_bytes(reconstructed, b) == sizes["v4"] + b * extra * 4
    assert sizes["v1"] > sizes["v4"]
    with pytest.raises(ValueError, match="batch_size"):
        hidden_memory_bytes(static, 0)


def test_apg_linear_config_is_frozen():
    cfg = APGLinearConfig(d_in=6, d_out=5, d_cond=3, rank=2, apg=APGConfig())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 3  # type: ignore[misc]
