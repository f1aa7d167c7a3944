"""DynInt (models.dynint): PIN/DA/DGP/DWP against element-wise and dense references,
init, orthogonal penalties, folding, gradients and stop-gradient, config errors.

References follow the row convention of ``split_subspaces``: row ``f*h + s`` of the
crossed map is columns ``[s*d, (s+1)*d)`` of field f.
"""

from __future__ import annotations

import copy

import pytest
import torch
from modelkit import perturb

from dynamic_ctr.models.dynint import (
    MODES,
    FoldedPolynomialInteraction,
    PolynomialInteraction,
    TwoLayerGenerator,
    fused_hidden,
    orthogonal_penalty,
    split_subspaces,
)

B, F, D, L = 3, 4, 8, 2


pytestmark = pytest.mark.usefixtures("single_thread")


def _model(mode: str, subspaces: int = 2, rank: int = 3, dtype=torch.float64, noise=True):
    """A seeded module; ``noise`` perturbs every parameter so that generated values vary
    visibly between instances and equality tests mean something."""
    torch.manual_seed(0)
    net = PolynomialInteraction(F, D, layers=L, subspaces=subspaces, mode=mode, rank=rank,
                                reduction=2)
    return (perturb(net) if noise else net).to(dtype)


def _x0(dtype=torch.float64, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, F, D, generator=g) * scale).to(dtype)


def _loop_logits(x0, h, weight_of, gate_of, out_w, out_b) -> torch.Tensor:
    """Eqs. (2)-(4) entry by entry in Python floats.

    ``weight_of(l, i)``: the R x R matrix W_l^(i) as nested lists; ``gate_of(l, i)``: the
    R x d gate as nested lists, or None (no gate).
    """
    batch, fields, dim = x0.shape
    d, rows = dim // h, fields * h
    logits = []
    for i in range(batch):
        x0_rows = [[float(x0[i, f, s * d + j]) for j in range(d)]
                   for f in range(fields) for s in range(h)]  # row f*h + s
        x = [row[:] for row in x0_rows]
        for layer in range(L):
            w, gate = weight_of(layer, i), gate_of(layer, i)
            new = []
            for r in range(rows):
                new_row = []
                for j in range(d):
                    wx0 = sum(w[r][q] * x0_rows[q][j] for q in range(rows))  # (W X_0)[r, j]
                    term = x[r][j] * wx0 * (1.0 if gate is None else gate[r][j])
                    new_row.append(term + x[r][j])  # eq. (3) / (4)
                new.append(new_row)
            x = new
        # eq. (2): W_out over the fields (sub-spaces merged back), b_out on each of D columns
        logit = sum(out_w[f] * sum(x[f * h + s][j] for s in range(h) for j in range(d))
                    for f in range(fields))
        logits.append(logit + dim * out_b)
    return torch.tensor(logits, dtype=torch.float64)


def _generated(net: PolynomialInteraction, x0: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    z = x0.flatten(1)
    return [layer.generate(z) for layer in net.layers]


def _dense_weights(net: PolynomialInteraction, x0: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the ``(B, R, R)`` matrices W_l^(i) built explicitly per instance."""
    out = []
    for layer, g in zip(net.layers, _generated(net, x0)):
        if net.mode == "dgp":  # eq. (7): U Sigma^(i) V^T
            w = torch.stack([layer.U @ torch.diag(s) @ layer.V.t() for s in g["sigma"]])
        elif net.mode == "dwp":  # eq. (9): (sum_p u~_p v~_p^T) o W
            w = torch.stack([
                sum(torch.outer(u[p], v[p]) for p in range(net.rank)) * layer.weight
                for u, v in zip(g["u"], g["v"])
            ])
        else:
            w = layer.weight.expand(x0.shape[0], -1, -1)
        out.append(w)
    return out


@pytest.mark.parametrize("subspaces", [1, 2, 8])
@pytest.mark.parametrize("mode", ["static", "da"])
def test_pin_matches_elementwise_loop(mode, subspaces):
    net = _model(mode, subspaces)
    x0 = _x0()
    gates = [g.get("gate") for g in _generated(net, x0)]
    expected = _loop_logits(
        x0, subspaces,
        weight_of=lambda l, i: net.layers[l].weight.tolist(),
        gate_of=lambda l, i: None if gates[l] is None else gates[l][i].tolist(),
        out_w=net.out_weight.tolist(), out_b=net.out_bias.item(),
    )
    got = net(x0)
    assert got.shape == (B,)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-9, atol=1e-9)
    if mode == "da":  # the gates matter: not all 1 after perturbation
        assert all((g - 1).abs().max() > 0.1 for g in gates)


@pytest.mark.parametrize("subspaces", [1, 2, 8])  # dwp: direct form at 1 and 2, factorised at 8
@pytest.mark.parametrize("mode", ["dgp", "dwp"])
def test_dynamic_parameters_match_dense_definition(mode, subspaces):
    net = _model(mode, subspaces, rank=3)
    x0 = _x0()
    dense = _dense_weights(net, x0)
    # instance-aware: W^(i) differs between instances
    assert all((w[0] - w[1]).abs().max() > 1e-3 for w in dense)
    expected = _loop_logits(
        x0, subspaces,
        weight_of=lambda l, i: dense[l][i].tolist(), gate_of=lambda l, i: None,
        out_w=net.out_weight.tolist(), out_b=net.out_bias.item(),
    )
    torch.testing.assert_close(net(x0).detach(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("subspaces, factorised", [(1, False), (2, False), (8, True)])
def test_dwp_takes_the_smaller_exact_form_and_both_forms_agree(subspaces, factorised):
    """K d <= R: eq. (10) factorised, else ``(G o W) X_0`` built: same values and gradients."""
    net = _model("dwp", subspaces, rank=3)
    layer = net.layers[0]
    rows, width = F * subspaces, D // subspaces
    assert layer.factorised is factorised is (3 * width <= rows)
    x0 = split_subspaces(_x0(), subspaces).requires_grad_(True)
    generated = layer.generate(x0.detach().flatten(1))
    outputs = []
    for form in (layer.mix_factorised, layer.mix_direct):
        out = form(x0, generated)
        grads = torch.autograd.grad(out.square().sum(), [x0, layer.weight])
        outputs.append((out, *grads))
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gates_sigma_and_weighting_start_near_one():
    x0 = _x0(torch.float32)  # unit-scale inputs: harder than the ~1e-4 embeddings at init
    fresh = {mode: _model(mode, dtype=torch.float32, noise=False) for mode in ("da", "dgp", "dwp")}
    for g in _generated(fresh["da"], x0):
        assert (g["gate"] - 1).abs().max() < 0.05
        assert (g["gate"] - 1).abs().max() > 0  # generated, not a constant
    for g in _generated(fresh["dgp"], x0):
        assert (g["sigma"] - 1).abs().max() < 0.05  # W^(i) starts at the static U V^T
    for g in _generated(fresh["dwp"], x0):
        weighting = torch.einsum("bkr,bks->brs", g["u"], g["v"])  # (B, R, R): G^(i)
        assert (weighting - 1).abs().max() < 0.05
        # the K pairs are not identical at init (else they would train identically)
        assert (g["u"][:, 0] - g["u"][:, 1]).abs().max() > 0


def test_orthogonal_penalty_on_hand_made_vectors():
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    orthogonal = q[:, :3].t() * torch.tensor([[1.0], [5.0], [0.2]])  # orthogonal, not unit
    assert orthogonal_penalty(orthogonal).abs() < 1e-6
    assert orthogonal_penalty(torch.eye(4)) == 0
    s = 2**-0.5
    cases = {
        ((1.0, 0.0), (1.0, 1.0)): s,
        ((1.0, 0.0), (-1.0, 1.0)): s,  # L1: |negative cosine|
        ((1.0, 0.0, 0.0), (1.0, 1.0, 0.0), (0.0, 0.0, -2.0)): s,
        ((1.0, 2.0), (2.0, 4.0), (-3.0, -6.0)): 3.0,  # all parallel: K(K-1)/2
    }
    for vectors, value in cases.items():
        torch.testing.assert_close(orthogonal_penalty(torch.tensor(vectors)), torch.tensor(value))
    pair = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    batched = orthogonal_penalty(torch.stack([torch.eye(2), pair]))  # (2,): one per set
    torch.testing.assert_close(batched, torch.tensor([0.0, s]))


def test_model_penalties():
    x0 = _x0()
    for mode in ("static", "da"):
        net = _model(mode)
        net(x0)
        assert net.penalty() == 0
    dgp = _model("dgp", rank=3)
    expected = sum(orthogonal_penalty(layer.U.t()) + orthogonal_penalty(layer.V.t())
                   for layer in dgp.layers)
    assert dgp.penalty() > 0.1
    torch.testing.assert_close(dgp.penalty(), expected)
    with torch.no_grad():  # orthogonal columns: eq. (11) vanishes
        for layer in dgp.layers:
            layer.U.copy_(torch.linalg.qr(layer.U)[0] * 3.0)
            layer.V.copy_(torch.linalg.qr(layer.V)[0])
    assert dgp.penalty().abs() < 1e-9
    dwp = _model("dwp", rank=3)
    assert dwp.penalty() == 0  # no forward yet
    dwp(x0)
    expected = torch.stack([orthogonal_penalty(g["u"]) + orthogonal_penalty(g["v"])
                            for g in _generated(dwp, x0)]).sum(0).mean()
    assert dwp.penalty() > 0.1
    torch.testing.assert_close(dwp.penalty(), expected)
    # the stored penalty belongs to that forward: a copy neither fails nor inherits it
    assert copy.deepcopy(dwp).penalty() == 0


@pytest.mark.parametrize("subspaces", [1, 2, 8])  # dwp: both exact forms
@pytest.mark.parametrize("mode", MODES)
def test_fold_keeps_the_logits(mode, subspaces):
    net = _model(mode, subspaces, dtype=torch.float32).eval()
    x0 = _x0(torch.float32, scale=0.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = net.fold()
    assert folded is not net and not folded.training
    if mode in ("dgp", "dwp"):
        assert isinstance(folded, FoldedPolynomialInteraction)
        assert not any(isinstance(m, TwoLayerGenerator) for m in folded.modules())  # fused
        assert folded.penalty() == 0
    else:
        assert isinstance(folded, PolynomialInteraction)
    with torch.no_grad():
        expected = net(x0)
        torch.testing.assert_close(folded(x0), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded.fold()(x0), expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().max() > 0.1  # the comparison is not between near-zeros
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_every_parameter(mode):
    net = _model(mode, dtype=torch.float32)
    x0 = _x0(torch.float32).requires_grad_()
    (net(x0).square().mean() + net.penalty()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x0.grad.abs().sum() > 0  # the embeddings learn through the PIN path


@pytest.mark.parametrize("mode", ["da", "dgp", "dwp"])
def test_fused_generator_hidden_units_equal_each_generator_alone(mode):
    net = _model(mode)
    z = _x0().flatten(1)
    fused = fused_hidden([layer.generator for layer in net.layers], z)
    for layer, hidden in zip(net.layers, fused, strict=True):
        for key, value in layer.generate(z, hidden).items():
            torch.testing.assert_close(value, layer.generate(z)[key], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["da", "dgp", "dwp"])
def test_generators_block_the_gradient_to_x0(mode, monkeypatch):
    net = _model(mode)
    x0 = _x0().requires_grad_()
    (grad,) = torch.autograd.grad(net(x0).sum(), x0)

    def grad_with(source: torch.Tensor) -> torch.Tensor:
        """x0's gradient when every generator reads ``source`` instead of sg(x0)."""
        with monkeypatch.context() as m:
            for layer in net.layers:
                m.setattr(layer, "generate",  # the fused hidden units are ignored: recomputed from source
                          lambda z, hidden, layer=layer: type(layer).generate(layer, source.flatten(1)))
            return torch.autograd.grad(net(x0).sum(), x0)[0]

    torch.testing.assert_close(grad, grad_with(x0.detach()))  # generated values are constants
    assert not torch.allclose(grad, grad_with(x0), atol=1e-6)  # a live path would differ
    if mode == "dwp":  # eq. (12) depends on x0 only through the generators
        net(x0)
        assert torch.autograd.grad(net.penalty(), x0, allow_unused=True) == (None,)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"subspaces": 3}, "subspaces"),
        ({"subspaces": 0}, "subspaces"),
        ({"mode": "dgp", "subspaces": 1, "rank": 5}, "rank"),
        ({"mode": "dwp", "subspaces": 2, "rank": 9}, "rank"),
        ({"mode": "dgp", "rank": 0}, "rank"),
        ({"mode": "gated"}, "mode"),
        ({"reduction": 0}, "reduction"),
        ({"layers": 0}, "layers"),
    ],
)
def test_bad_configs_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PolynomialInteraction(F, D, **kwargs)


def test_rank_is_only_checked_where_used_and_input_shape_is_checked():
    PolynomialInteraction(F, D, mode="da", subspaces=1, rank=99)  # rank unused by DA
    with pytest.raises(ValueError, match="x0"):
        PolynomialInteraction(F, D)(torch.randn(B, F, D + 1))
    with pytest.raises(ValueError, match="mode"):
        FoldedPolynomialInteraction(PolynomialInteraction(F, D, mode="static"))


# ------------------------------------------------------------ as a CTR model (family xdeepint)


@pytest.mark.parametrize("mode", ["static", "da", "dgp", "dwp"])
def test_xdeepint_builds_folds_and_rebuilds_from_its_config(mode, spec, batch) -> None:
    from dynamic_ctr.models import build_model, fold_model

    config = {"family": "xdeepint", "embedding_dim": 8,
              "dynint": {"mode": mode, "layers": 2, "subspaces": 2, "rank": 3, "orthogonal_rate": 0.1}}
    model = build_model(config, spec).eval()
    x = batch
    logits = model(x)
    assert logits.shape == (x.shape[0],) and torch.isfinite(logits).all()
    folded = fold_model(model)
    assert folded.config["folded"] is True
    torch.testing.assert_close(folded(x), logits, atol=1e-5, rtol=0)
    rebuilt = build_model(folded.config, spec)  # the serving structure, from the config alone
    rebuilt.load_state_dict(folded.state_dict())
    torch.testing.assert_close(rebuilt(x), logits, atol=1e-5, rtol=0)
    penalty = model.penalty()
    assert (penalty is None) == (mode in ("static", "da"))
    if penalty is not None:
        assert penalty.item() > 0 and folded.penalty() is None


def test_xdeepint_caps_the_rank_at_what_the_fields_allow_and_checks_its_config(spec) -> None:
    from dynamic_ctr.models import build_model

    model = build_model({"family": "xdeepint", "embedding_dim": 8, "dynint": {"mode": "dgp", "subspaces": 1, "rank": 999}}, spec)
    assert model.pin.rank == len(spec.fields)  # K <= F * h
    for bad, match in (
        ({"family": "xdeepint", "embedding_dim": 8, "dynint": {"subspaces": 3}}, "dynint.subspaces=3 must divide"),
        ({"family": "xdeepint"}, "needs a dynint config"),
        ({"family": "wdl", "dynint": {}}, "only it takes one"),
        ({"family": "xdeepint", "dynint": {"mode": "dgpp"}}, "dynint.mode"),
        ({"family": "xdeepint", "dynint": {"orthogonal_rate": -1}}, "dynint.orthogonal_rate"),
    ):
        with pytest.raises(ValueError, match=match):
            build_model(bad, spec)
