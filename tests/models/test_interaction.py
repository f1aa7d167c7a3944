"""The interaction layers (models.interaction) against direct loops and formulas, and
the PNN, DeepCrossing, xDeepFM, AutoInt(+), FiBiNET and FinalMLP backbones: built from
config dicts, trained one epoch on the shipped tiny MovieLens data, their ``dnn: false``
forms, their config errors, APG folding inside them, and inspection."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from modelkit import perturb, small_config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dynamic_ctr.models import (
    build_model,
    count_parameters,
    fold_model,
    generated_cores,
    hidden_memory_bytes,
)
from dynamic_ctr.models.adasparse import AdaSparseTower
from dynamic_ctr.models.apg import APGLinear, APGTower
from dynamic_ctr.models.interaction import (
    CIN,
    SENET,
    BilinearFusion,
    BilinearInteraction,
    FeatureSelection,
    InnerProduct,
    KernelProduct,
    MultiHeadSelfAttention,
    ResidualUnit,
    field_pairs,
)
from dynamic_ctr.models.layers import MLPTower
from dynamic_ctr.spec import FeatureSpec, FieldSpec

pytestmark = pytest.mark.usefixtures("single_thread")

B, F, D = 3, 4, 5
PAIRS = list(itertools.combinations(range(F), 2))


def _emb(b: int = B, f: int = F, d: int = D, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, f, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


# --- layers against loops and formulas (float64) ----------------------------------------


def test_field_pairs_are_i_below_j_in_order():
    rows, cols = field_pairs(F)
    assert list(zip(rows.tolist(), cols.tolist())) == PAIRS


def test_inner_product_is_every_pairs_dot_product():
    emb = _emb()
    expected = torch.tensor([[emb[b, i] @ emb[b, j] for i, j in PAIRS] for b in range(B)], dtype=emb.dtype)
    _close(InnerProduct(F)(emb), expected)


@pytest.mark.parametrize("kernel", ["mat", "vec", "num"])
def test_kernel_outer_product_is_e_i_K_ij_e_j(kernel):
    torch.manual_seed(0)
    layer = KernelProduct(F, D, kernel).double()
    emb = _emb()
    expected = torch.zeros(B, len(PAIRS), dtype=emb.dtype)
    for b in range(B):
        for p, (i, j) in enumerate(PAIRS):
            k = layer.kernel[p]
            matrix = {"mat": k, "vec": torch.diag(k), "num": k * torch.eye(D, dtype=emb.dtype)}[kernel]
            expected[b, p] = emb[b, i] @ matrix @ emb[b, j]
    _close(layer(emb), expected)


class _ShapeLog(TorchDispatchMode):
    """The largest tensor any aten op produces inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_kernel_products_never_materialise_a_batch_of_pair_matrices():
    """Forward and backward of the ``mat`` kernels stay far below ``B x P x D x D``."""
    b, f, d = 16, 6, 8
    pairs = f * (f - 1) // 2
    for layer in (KernelProduct(f, d, "mat"), BilinearInteraction(f, d, "field_interaction")):
        emb = torch.randn(b, f, d, requires_grad=True)
        with _ShapeLog() as log:
            layer(emb).sum().backward()
        assert log.largest <= max(b * pairs * d, pairs * d * d), type(layer).__name__


@pytest.mark.parametrize("split_half", [True, False])
def test_cin_feature_maps_follow_eq_6_by_loops(split_half):
    torch.manual_seed(0)
    sizes = [4, 2, 3]
    cin = CIN(3, sizes, split_half).double()
    x0 = _emb(2, 3, 2)
    pooled, x = [], x0
    for k, (layer, h_k) in enumerate(zip(cin.layers, sizes)):
        w = layer.weight  # (H_k, H_{k-1} F)
        maps = torch.zeros(2, h_k, 2, dtype=x0.dtype)
        for b in range(2):
            for h in range(h_k):
                for i in range(x.shape[1]):
                    for j in range(3):
                        maps[b, h] += w[h, i * 3 + j] * x[b, i] * x0[b, j]
        if split_half and k < len(sizes) - 1:
            x, out = maps[:, : h_k // 2], maps[:, h_k // 2 :]
        else:
            x = out = maps
        pooled.append(out.sum(dim=2))
    expected = torch.cat(pooled, dim=1)
    assert cin.out_dim == expected.shape[1] == (2 + 1 + 3 if split_half else 9)
    _close(cin(x0), expected)


def test_cin_row_blocks_give_the_same_maps_and_gradients():
    """On the CPU a large batch runs in row blocks (bounded temporaries): same numbers."""
    torch.manual_seed(0)
    whole, blocked = CIN(3, [4, 2]).double(), CIN(3, [4, 2]).double()
    blocked.load_state_dict(whole.state_dict())
    blocked.block_numel = 2 * 2 * 9  # blocks of two rows: D = 2, widest H_{k-1} F = 3 x 3
    assert blocked.widest == 9
    x0 = _emb(5, 3, 2).requires_grad_()
    out_whole, out_blocked = whole(x0), blocked(x0)
    _close(out_blocked, out_whole)
    (g_whole,) = torch.autograd.grad(out_whole.square().sum(), x0)
    (g_blocked,) = torch.autograd.grad(out_blocked.square().sum(), x0)
    _close(g_blocked, g_whole)


@pytest.mark.parametrize("in_dim, dim, heads", [(6, 6, 2), (5, 6, 3), (4, 8, 1)])
def test_interacting_layer_equals_multihead_attention_with_the_same_weights(in_dim, dim, heads):
    """Our layer = ``ReLU(MHA(e) + W_res e)`` with Q, K, V copied into
    ``nn.MultiheadAttention`` (identity output projection, no biases); MHA divides the
    scores by sqrt(d'), eq. 5 does not, so its query projection is scaled back."""
    torch.manual_seed(0)
    layer = MultiHeadSelfAttention(in_dim, dim, heads, residual=True).double()
    w_q, w_k, w_v, w_res = layer.weight.detach().split(dim, dim=1)  # (D_in, A) each
    mha = torch.nn.MultiheadAttention(dim, heads, bias=False, kdim=in_dim, vdim=in_dim, batch_first=True).double()
    scale = math.sqrt(dim // heads)
    emb = _emb(3, 4, in_dim)
    with torch.no_grad():
        if mha._qkv_same_embed_dim:  # in_dim == dim: one packed (3A, A) projection
            mha.in_proj_weight.copy_(torch.cat([w_q.T * scale, w_k.T, w_v.T]))
            query = emb
        else:  # query projected here, MHA's own query projection the identity
            mha.q_proj_weight.copy_(torch.eye(dim, dtype=emb.dtype) * scale)
            mha.k_proj_weight.copy_(w_k.T)
            mha.v_proj_weight.copy_(w_v.T)
            query = emb @ w_q
        mha.out_proj.weight.copy_(torch.eye(dim, dtype=emb.dtype))
    attended, _ = mha(query, emb, emb, need_weights=False)
    torch.testing.assert_close(layer(emb), torch.relu(attended + emb @ w_res), rtol=1e-9, atol=1e-12)
    without = MultiHeadSelfAttention(in_dim, dim, heads, residual=False).double()
    with torch.no_grad():
        without.weight.copy_(layer.weight[:, : 3 * dim])
    torch.testing.assert_close(without(emb), torch.relu(attended), rtol=1e-9, atol=1e-12)


def test_senet_follows_its_formula():
    torch.manual_seed(0)
    senet = SENET(F, reduction=2).double()
    emb = _emb()
    w1, w2 = senet.squeeze_to_hidden.weight, senet.hidden_to_weights.weight  # (F//r, F), (F, F//r)
    expected = torch.empty_like(emb)
    for b in range(B):
        z = torch.stack([emb[b, i].mean() for i in range(F)])  # squeeze
        a = torch.relu(w2 @ torch.relu(w1 @ z))  # excitation
        expected[b] = a.unsqueeze(1) * emb[b]  # re-weight
    _close(senet(emb), expected)
    assert w1.shape == (2, F)


@pytest.mark.parametrize("bilinear_type", ["field_all", "field_each", "field_interaction"])
def test_bilinear_interaction_types_by_loops(bilinear_type):
    torch.manual_seed(0)
    layer = BilinearInteraction(F, D, bilinear_type).double()
    emb = _emb()
    expected = torch.zeros(B, len(PAIRS), D, dtype=emb.dtype)
    for p, (i, j) in enumerate(PAIRS):
        w = {"field_all": 0, "field_each": i, "field_interaction": p}[bilinear_type]
        for b in range(B):
            expected[b, p] = (emb[b, i] @ layer.weight[w]) * emb[b, j]
    _close(layer(emb), expected)
    assert layer.weight.shape[0] == {"field_all": 1, "field_each": F - 1, "field_interaction": 6}[bilinear_type]


def _mlp(layers: torch.nn.Sequential, c: torch.Tensor) -> torch.Tensor:
    """Linear -> ReLU -> ... -> Linear by hand."""
    linears = [m for m in layers if isinstance(m, torch.nn.Linear)]
    for k, lin in enumerate(linears):
        c = c @ lin.weight.T + lin.bias
        if k < len(linears) - 1:
            c = torch.relu(c)
    return c


def test_feature_selection_gates_are_two_sigmoids_of_their_context():
    torch.manual_seed(0)
    fs = perturb(FeatureSelection(D, F, ([0, 2], []), [7])).double()
    emb = _emb()
    flat = emb.flatten(1)
    gate1, gate2 = fs.gates
    g1 = 2 * torch.sigmoid(_mlp(gate1.mlp, torch.cat([emb[:, 0], emb[:, 2]], dim=1)))  # (B, E)
    g2 = 2 * torch.sigmoid(_mlp(gate2.mlp, gate2.bias))  # (1, E): a learnable vector, no context
    x1, x2 = fs(emb)
    _close(x1, flat * g1)
    _close(x2, flat * g2)
    assert gate1.bias is None and gate2.bias.shape == (1, D)


def test_bilinear_fusion_is_linear_terms_plus_one_bilinear_form_per_head():
    torch.manual_seed(0)
    fusion = perturb(BilinearFusion(6, 4, heads=2)).double()
    g = torch.Generator().manual_seed(1)
    o1, o2 = torch.randn(B, 6, generator=g, dtype=torch.float64), torch.randn(B, 4, generator=g, dtype=torch.float64)
    expected = []
    for b in range(B):
        value = fusion.linear1.bias[0] + fusion.linear1.weight[0] @ o1[b] + fusion.linear2.weight[0] @ o2[b]
        for h in range(2):
            value = value + o1[b, 3 * h : 3 * h + 3] @ fusion.weight[h] @ o2[b, 2 * h : 2 * h + 2]
        expected.append(value)
    _close(fusion(o1, o2), torch.stack(expected))


def test_residual_unit_follows_deep_crossing_figure_3():
    torch.manual_seed(0)
    unit = ResidualUnit(D, 7).double()
    x = _emb().flatten(0, 1)  # (B*F, D)
    inner = torch.relu(x @ unit.inner.weight.T + unit.inner.bias)
    _close(unit(x), torch.relu(x + inner @ unit.outer.weight.T + unit.outer.bias))


def test_layer_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="kernel"):
        KernelProduct(F, D, "full")
    with pytest.raises(ValueError, match="layer_sizes"):
        CIN(F, [3, 2], split_half=True)
    with pytest.raises(ValueError, match="heads"):
        MultiHeadSelfAttention(D, 6, heads=4)
    with pytest.raises(ValueError, match="bilinear_type"):
        BilinearInteraction(F, D, "all")
    with pytest.raises(ValueError, match="heads"):
        BilinearFusion(6, 4, heads=4)
    with pytest.raises(ValueError, match="emb"):
        InnerProduct(F)(_emb(f=F + 1))


# --- the models --------------------------------------------------------------------------

NEW_FAMILIES = ["pnn", "deepcrossing", "xdeepfm", "autoint", "fibinet", "finalmlp"]
# small settings so the end-to-end runs stay quick
SMALL = {
    "pnn": {"pnn": {"product": "both", "kernel": "mat"}},
    "deepcrossing": {"deepcrossing": {"residual_units": [16, 16]}},
    "xdeepfm": {"xdeepfm": {"cin_layer_sizes": [8, 6]}},
    "autoint": {"autoint": {"attention_layers": 2, "attention_heads": 2, "attention_dim": 8}},
    "fibinet": {"fibinet": {"bilinear_type": "field_each", "senet_reduction": 2}},
    "finalmlp": {"finalmlp": {"mlp2_hidden_units": [16], "fs1_context": ["user"], "fs_hidden_units": [8], "heads": 2}},
}


def _config(family: str, **overrides: object) -> dict:
    return small_config(family=family, **{**SMALL[family], **overrides})


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_config_is_filled_json_able_and_rebuilds(spec, big_batch, family):
    model = perturb(build_model(_config(family, batch_norm=True), spec))
    model.train()
    model(big_batch)  # moves BatchNorm running stats off their init
    model.eval()
    cfg = model.config
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg[family] is not None  # the family's block, filled
    assert all(cfg[other] is None for other in NEW_FAMILIES if other != family)
    rebuilt = build_model(json.loads(json.dumps(cfg)), spec)
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt.eval()(big_batch), model(big_batch), rtol=0, atol=0)
    # defaults: a bare family name builds too, with the block's defaults written out
    bare = build_model({"family": family, "embedding_dim": 4, "hidden_units": [8]}, spec)
    assert bare(big_batch).shape == (64,)
    assert bare.config[family] == json.loads(json.dumps(bare.config[family]))


def test_family_defaults_are_filled_from_the_spec(spec):
    autoint = build_model({"family": "autoint", "embedding_dim": 6}, spec).config["autoint"]
    assert autoint == {"attention_layers": 3, "attention_heads": 2, "attention_dim": 6, "attention_residual": True}
    finalmlp = build_model({"family": "finalmlp", "hidden_units": [8, 4]}, spec).config["finalmlp"]
    assert finalmlp["mlp2_hidden_units"] == [8, 4]  # stream 2 mirrors stream 1 unless told
    assert build_model({"family": "pnn"}, spec).config["pnn"] == {"product": "inner", "kernel": "mat"}


def test_pnn_product_layer_feeds_the_tower(spec, big_batch):
    model = perturb(build_model(_config("pnn"), spec)).eval()
    emb = model.embedding(big_batch)
    z = torch.cat([emb.flatten(1), model.inner(emb), model.outer(emb)], dim=1)
    assert z.shape == (64, 4 * 4 + 2 * 6)
    torch.testing.assert_close(model(big_batch), model.head(model.dense(z, emb)).squeeze(1))
    inner_only = build_model(_config("pnn", pnn={"product": "inner"}), spec)
    assert inner_only.outer is None and inner_only.dense.linears[0].in_features == 16 + 6


def test_interaction_layers_alone_without_a_dnn(spec, big_batch):
    """``dnn: false``: PNN = Linear(product layer), xDeepFM = first order + CIN, AutoInt =
    Linear(interacting layers), FiBiNET = first order + Linear(combination layer)."""
    families = ("pnn", "xdeepfm", "autoint", "fibinet")
    models = {f: perturb(build_model(_config(f, dnn=False), spec)).eval() for f in families}
    for family, model in models.items():
        assert model.dense is None, family
        assert count_parameters(model) < count_parameters(build_model(_config(family), spec)), family
    pnn = models["pnn"]
    emb = pnn.embedding(big_batch)
    torch.testing.assert_close(pnn(big_batch), pnn.head(pnn.product_layer(emb)).squeeze(1))
    xdeepfm = models["xdeepfm"]
    emb, linear = xdeepfm.embedding.with_first_order(big_batch)
    torch.testing.assert_close(xdeepfm(big_batch), linear + xdeepfm.cin_head(xdeepfm.cin(emb)).squeeze(1))
    autoint = models["autoint"]
    h = autoint.embedding(big_batch)
    for layer in autoint.attention:
        h = layer(h)
    assert autoint.head.in_features == 4 * 8
    torch.testing.assert_close(autoint(big_batch), autoint.head(h.flatten(1)).squeeze(1))
    fibinet = models["fibinet"]
    emb, linear = fibinet.embedding.with_first_order(big_batch)
    c = fibinet.combination(emb)
    assert c.shape == (64, 2 * 6 * 4)
    torch.testing.assert_close(fibinet(big_batch), linear + fibinet.head(c).squeeze(1))


def test_autoint_plus_reads_the_attention_and_the_tower(spec, big_batch):
    model = perturb(build_model(_config("autoint"), spec)).eval()
    emb = model.embedding(big_batch)
    h = emb
    for layer in model.attention:
        h = layer(h)
    both = torch.cat([h.flatten(1), model.dense(emb.flatten(1), emb)], dim=1)
    torch.testing.assert_close(model(big_batch), model.head(both).squeeze(1))


def test_finalmlp_streams_are_two_towers_with_their_own_widths(spec, big_batch):
    model = perturb(build_model(_config("finalmlp"), spec)).eval()
    assert isinstance(model.dense, MLPTower) and isinstance(model.dense2, MLPTower)
    assert [lin.out_features for lin in model.dense.linears] == [12, 8]
    assert [lin.out_features for lin in model.dense2.linears] == [16]
    emb = model.embedding(big_batch)
    x1, x2 = model.selection(emb)
    torch.testing.assert_close(model(big_batch), model.fusion(model.dense(x1, emb), model.dense2(x2, emb)))
    # a per-layer APG rank lists stream 1's layers, then stream 2's
    apg = build_model(_config("finalmlp", apg={"version": "v4", "rank": [3, 2, 4]}), spec)
    assert isinstance(apg.dense, APGTower) and isinstance(apg.dense2, APGTower)
    assert [layer.cfg.rank for layer in apg.dense.layers] == [3, 2]
    assert [layer.cfg.rank for layer in apg.dense2.layers] == [4]
    # APG reads the gated features of its own stream: a self-wise layer's input
    assert apg.dense.layers[0].cfg.d_in == apg.dense2.layers[0].cfg.d_in == 16


def test_finalmlp_adasparse_prunes_both_streams_and_sums_their_penalties(spec, big_batch):
    model = build_model(_config("finalmlp", adasparse={"formulation": "scaling"}), spec).train()
    assert isinstance(model.dense, AdaSparseTower) and isinstance(model.dense2, AdaSparseTower)
    model(big_batch)
    torch.testing.assert_close(model.penalty(), model.dense.penalty() + model.dense2.penalty())


def test_pnn_tower_input_width_sets_the_apg_rank_bound(spec):
    """The rank check sees each family's real tower input: PNN's first layer reads
    E + 2P = 28 values (not E = 16)."""
    build_model(_config("pnn", hidden_units=[24], apg={"rank": 20}), spec)  # min(28, 24) = 24 >= 20
    with pytest.raises(ValueError, match=r"apg\.rank"):
        build_model(_config("pnn", hidden_units=[24], apg={"rank": 25}), spec)


BAD_CONFIGS = [
    ({"family": "pnn", "pnn": {"product": "cross"}}, "pnn.product"),
    ({"family": "pnn", "pnn": {"kernel": "full"}}, "pnn.kernel"),
    ({"family": "pnn", "pnn": {"kernels": "mat"}}, "pnn.kernels"),
    ({"family": "wdl", "pnn": {}}, "pnn"),
    ({"family": "deepcrossing", "apg": {"version": "v4"}}, "apg"),
    ({"family": "deepcrossing", "adasparse": {}}, "adasparse"),
    ({"family": "deepcrossing", "dnn": False}, "dnn"),
    ({"family": "deepcrossing", "deepcrossing": {"residual_units": []}}, "deepcrossing.residual_units"),
    ({"family": "xdeepfm", "xdeepfm": {"cin_layer_sizes": [3, 4]}}, "xdeepfm.cin_layer_sizes"),
    ({"family": "xdeepfm", "xdeepfm": {"cin_layer_sizes": [0]}}, "xdeepfm.cin_layer_sizes"),
    ({"family": "xdeepfm", "xdeepfm": {"cin_split_half": "yes"}}, "xdeepfm.cin_split_half"),
    ({"family": "autoint", "autoint": {"attention_dim": 6, "attention_heads": 4}}, "autoint.attention_dim"),
    ({"family": "autoint", "autoint": {"attention_heads": 3}}, "autoint.attention_dim"),  # D = 4
    ({"family": "autoint", "autoint": {"attention_layers": 0}}, "autoint.attention_layers"),
    ({"family": "autoint", "autoint": {"attention_residual": 1}}, "autoint.attention_residual"),
    ({"family": "fibinet", "fibinet": {"bilinear_type": "all"}}, "fibinet.bilinear_type"),
    ({"family": "fibinet", "fibinet": {"senet_reduction": 0}}, "fibinet.senet_reduction"),
    ({"family": "finalmlp", "finalmlp": {"fs1_context": ["nope"]}}, "finalmlp.fs1_context"),
    ({"family": "finalmlp", "finalmlp": {"fs2_context": "user"}}, "finalmlp.fs2_context"),
    ({"family": "finalmlp", "finalmlp": {"fs1_context": ["user", "user"]}}, "finalmlp.fs1_context"),
    ({"family": "finalmlp", "finalmlp": {"heads": 3}}, "finalmlp.heads"),
    ({"family": "finalmlp", "finalmlp": {"mlp2_hidden_units": [0]}}, "finalmlp.mlp2_hidden_units"),
    ({"family": "finalmlp", "finalmlp": {"fs_hidden_units": [-1]}}, "finalmlp.fs_hidden_units"),
    ({"family": "finalmlp", "dnn": False}, "dnn"),
    ({"family": "finalmlp", "apg": {"rank": [2, 2]}}, "apg.rank"),  # 2 + 2 hidden layers
]


@pytest.mark.parametrize("overrides, key", BAD_CONFIGS, ids=[k for _, k in BAD_CONFIGS])
def test_bad_config_raises_value_error_naming_the_key(spec, overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_model(small_config(**overrides), spec)


def test_fibinet_needs_two_fields():
    one = FeatureSpec((FieldSpec("a", "categorical", 5),))
    with pytest.raises(ValueError, match="fibinet"):
        build_model({"family": "fibinet"}, one)


# --- APG folding and inspection inside the new models --------------------------------------


@pytest.mark.parametrize("family", ["finalmlp", "xdeepfm", "pnn", "autoint", "fibinet"])
def test_apg_v5_folds_inside_the_model(spec, big_batch, family):
    apg = {"version": "v5", "rank": 3, "width": 6, "condition": {"mode": "mix"}}
    model = perturb(build_model(_config(family, apg=apg, dropout=0.1, batch_norm=True), spec), scale=0.1)
    model.train()
    model(big_batch)  # BatchNorm running stats off their init
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, APGLinear)]
    assert layers and all(len(m.V_factors) == 2 for m in layers)
    folded = fold_model(model)
    assert all(len(m.V_factors) == 1 for m in folded.modules() if isinstance(m, APGLinear))
    assert not any(isinstance(m, torch.nn.Dropout) for m in folded.modules())
    expected = model(big_batch)
    torch.testing.assert_close(folded(big_batch), expected, rtol=0, atol=1e-5)
    rebuilt = build_model(folded.config, spec)  # the deployment structure, from its config
    rebuilt.load_state_dict(folded.state_dict())
    torch.testing.assert_close(rebuilt(big_batch), expected, rtol=0, atol=1e-5)
    assert count_parameters(folded) < count_parameters(model)
    assert generated_cores(model, big_batch).shape == (64, 9)


def test_hidden_memory_counts_both_finalmlp_streams(spec):
    model = build_model(_config("finalmlp", apg={"version": "v4", "rank": 2}), spec)
    both = hidden_memory_bytes(model, 32)
    element = 4
    assert both == (model.dense.activation_numel(32) + model.dense2.activation_numel(32)) * element
    with pytest.raises(ValueError, match="dense tower"):
        hidden_memory_bytes(build_model(_config("deepcrossing"), spec), 32)


# --- end to end on the shipped tiny data ---------------------------------------------------

TINY = Path(__file__).resolve().parents[2] / "data/01_raw/ml-latest-tiny"


@pytest.fixture(scope="module")
def tiny_splits():
    """The shipped tiny MovieLens data, split and encoded: ``(spec, train, valid)``."""
    from dynamic_ctr.data.adapters import movielens_latest
    from dynamic_ctr.data.encoder import EncoderParams, FeatureEncoder, aggregate_item_lists
    from dynamic_ctr.data.raw import RawFileConfig, read_raw
    from dynamic_ctr.data.split import SplitParams, split_frame
    from dynamic_ctr.training import tensors_from_columns

    files = {k: read_raw(RawFileConfig(filepath=str(TINY / f"{k}.csv"))) for k in ("ratings", "movies", "tags")}
    result = movielens_latest(files, {})
    train, valid, test = split_frame(result.table, SplitParams(), result.schema.time_key)
    train, (valid, _), _ = aggregate_item_lists(train, [valid, test], result.schema)
    encoder = FeatureEncoder.fit(train, result.schema, EncoderParams())
    spec = encoder.feature_spec()
    cols = [*spec.index_columns, spec.label]
    data = []
    for frame in (train, valid):
        encoded, _ = encoder.transform(frame)
        data.append(tensors_from_columns({c: encoded[c].to_numpy() for c in cols}, spec, group_columns=[]))
    return spec, data[0], data[1]


E2E = [
    ("pnn", {"pnn": {"product": "both", "kernel": "mat"}}),
    ("pnn", {"pnn": {"product": "outer", "kernel": "vec"}, "dnn": False}),
    ("deepcrossing", {"deepcrossing": {"residual_units": [32, 32]}}),
    ("xdeepfm", {"xdeepfm": {"cin_layer_sizes": [16, 16]}, "apg": {"version": "v5", "rank": 4}}),
    ("autoint", {"autoint": {"attention_layers": 2, "attention_dim": 16}}),
    ("autoint", {"dnn": False}),
    ("fibinet", {"fibinet": {"bilinear_type": "field_interaction"}}),
    ("fibinet", {"fibinet": {"bilinear_type": "field_all"}, "dnn": False}),
    ("finalmlp", {"finalmlp": {"mlp2_hidden_units": [16], "fs1_context": ["user"], "fs2_context": ["item", "genres"]},
                  "apg": {"version": "v5", "rank": 4, "condition": {"mode": "group"}}}),
]


@pytest.mark.parametrize("family, settings", E2E, ids=[f"{f}-{i}" for i, (f, _) in enumerate(E2E)])
def test_trains_one_epoch_on_the_tiny_data(tiny_splits, family, settings):
    from dynamic_ctr.training import TrainConfig, train

    spec, train_data, valid_data = tiny_splits
    model = build_model({"family": family, "embedding_dim": 8, "hidden_units": [32, 16], **settings}, spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(lr=0.005, batch_size=256, max_epochs=1, patience=1, progress=False)
    result = train(model, train_data, valid_data, cfg)
    assert len(result.history) == 1
    assert 0.0 <= result.history[0]["val_auc"] <= 1.0
    after = result.model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight")), "a weight did not move"
    logits = result.model.eval()(valid_data.x[:64])
    assert logits.shape == (64,) and torch.isfinite(logits).all()

