"""Backbones x dense towers, the config contract, and checkpoint round trips."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from modelkit import perturb, small_config

from dynamic_ctr.models import BACKBONES, build_model, count_parameters
from dynamic_ctr.models.apg import APGTower
from dynamic_ctr.models.config import DENSE_FAMILIES
from dynamic_ctr.models.layers import CrossNetV1, CrossNetV2, FactorizationMachine, MLPTower
from dynamic_ctr.spec import FeatureSpec, FieldSpec

FAMILIES = sorted(BACKBONES)
APG_V4 = {"version": "v4", "rank": 4}
# every backbone with a dense tower gets APG; deepcrossing (residual units only) none
FAMILY_TOWERS = [(f, apg) for f in FAMILIES for apg in ([None, APG_V4] if f in DENSE_FAMILIES else [None])]


@pytest.mark.parametrize("family, apg", FAMILY_TOWERS)
def test_forward_shape_and_finite_gradients(spec, batch, family, apg):
    model = build_model(small_config(family=family, apg=apg, dropout=0.1, batch_norm=True), spec)
    tower = APGTower if apg else MLPTower
    if family in DENSE_FAMILIES:
        assert isinstance(model.dense, tower)
    else:
        assert model.dense is None
    if family == "finalmlp":
        assert isinstance(model.dense2, tower)  # stream 2 is built the same way
    logits = model(batch)
    assert logits.shape == (3,)
    assert torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.tensor([1.0, 0.0, 1.0])
    ).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert model.embedding.table.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_depend_on_every_field(spec, family):
    model = perturb(build_model(small_config(family=family), spec)).eval()
    x = torch.tensor([[2, 3, 2, 2, 3, 0, 0]])
    base = model(x)
    for slot, new in [(0, 5), (1, 4), (2, 3), (3, 5)]:
        changed = x.clone()
        changed[0, slot] = new
        assert not torch.allclose(model(changed), base), f"slot {slot}"


def test_fm_matches_pairwise_sum():
    emb = torch.randn(2, 5, 3)
    pairwise = sum((emb[:, i] * emb[:, j]).sum(-1) for i in range(5) for j in range(i + 1, 5))
    torch.testing.assert_close(FactorizationMachine()(emb), pairwise)


def test_cross_net_v1_formula():
    torch.manual_seed(0)
    net = CrossNetV1(4, 2)
    x0 = torch.randn(3, 4)
    x = x0
    for w, b in zip(net.weight, net.bias):
        x = torch.stack([x0[i] * (x[i] @ w) + b + x[i] for i in range(3)])
    torch.testing.assert_close(net(x0), x)


def test_cross_net_v2_formula():
    torch.manual_seed(0)
    net = CrossNetV2(4, 2)
    x0 = torch.randn(3, 4)
    x = x0
    for layer in net.layers:
        x = x0 * (x @ layer.weight.T + layer.bias) + x
    torch.testing.assert_close(net(x0), x)


def test_deepfm_fields_option_adds_pooled_fm_to_wdl_structure(spec, batch):
    """``fm_input="fields"``: the old form, WDL plus an FM over the mean-pooled fields."""
    wdl = build_model(small_config(family="wdl"), spec)
    deepfm = build_model(small_config(family="deepfm", fm_input="fields"), spec)
    perturb(wdl)
    deepfm.load_state_dict(wdl.state_dict())  # same embedding (with first-order column) and tower
    emb = wdl.embedding(batch)
    torch.testing.assert_close(deepfm(batch), wdl(batch) + FactorizationMachine()(emb))


# Two multi-valued fields, so the FM has pairs within genres, within tags and across.
FM_SPEC = FeatureSpec(
    fields=(
        FieldSpec("user", "categorical", vocab_size=7, source="user"),
        FieldSpec("item", "categorical", vocab_size=6, source="item"),
        FieldSpec("genres", "sequence", vocab_size=6, max_len=3, source="item"),
        FieldSpec("tags", "sequence", vocab_size=9, max_len=4, source="item"),
    ),
    user_field="user",
    item_field="item",
)
# columns: user | item | genres__0..2 | tags__0..3 (0 = pad)
FM_BATCH = torch.tensor(
    [
        [2, 3, 2, 4, 5, 3, 7, 8, 0],  # 3 genres, 3 tags
        [4, 2, 3, 0, 0, 0, 0, 0, 0],  # 1 genre, no tags (all pad)
        [5, 5, 0, 4, 0, 2, 0, 6, 2],  # pads between values; tag 2 in two slots
        [1, 1, 5, 3, 2, 8, 7, 6, 5],  # OOV user and item, every slot filled
        [0, 4, 0, 0, 0, 4, 0, 0, 0],  # categorical pad index: still a feature
    ]
)


def _active_features(model, x: torch.Tensor) -> list[list[int]]:
    """Per row, the embedding-table rows of its active features, by a plain loop."""
    offsets = model.embedding.offsets.tolist()
    first_sequence_slot = len(FM_SPEC.categorical)
    return [
        [
            offsets[s] + int(v)
            for s, v in enumerate(row)
            if s < first_sequence_slot or int(v) != 0  # sequence pad slots are no feature
        ]
        for row in x
    ]


def _deepfm(**overrides: object) -> torch.nn.Module:
    config = small_config(family="deepfm", **overrides)
    return perturb(build_model(config, FM_SPEC), table_scale=0.5).double().eval()


def test_deepfm_fm_runs_over_every_active_feature():
    """Default FM = sum over ALL pairs of active features (Rendle), pairs within one
    multi-valued field included; first-order term = sum of their weights."""
    model = _deepfm()
    assert model.fm_input == "features"
    table = model.embedding.table.weight.detach()  # (V, D + 1): embedding | weight
    v, w = table[:, :-1], table[:, -1]
    fm, linear = [], []
    for rows in _active_features(model, FM_BATCH):
        fm.append(
            sum(
                (v[rows[i]] @ v[rows[j]]).item()
                for i in range(len(rows))
                for j in range(i + 1, len(rows))
            )
        )
        linear.append(sum(w[r].item() for r in rows) + model.embedding.bias.item())
    fm_t, linear_t = torch.tensor(fm, dtype=table.dtype), torch.tensor(linear, dtype=table.dtype)
    emb, got_linear, total, sq_norms = model.embedding.with_features(FM_BATCH)
    torch.testing.assert_close(model.fm.from_sums(total, sq_norms), fm_t, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_linear, linear_t, rtol=0, atol=1e-5)
    # the dense part still reads the mean-pooled fields
    torch.testing.assert_close(emb, model.embedding(FM_BATCH), rtol=0, atol=1e-12)
    expected = linear_t + fm_t + model.deep(model.embedding(FM_BATCH))
    torch.testing.assert_close(model(FM_BATCH), expected, rtol=0, atol=1e-5)
    # and it differs from the pooled form on rows with a multi-valued field
    pooled = _deepfm(fm_input="fields")
    pooled.load_state_dict(model.state_dict())
    assert not torch.allclose(pooled(FM_BATCH)[[0, 2, 3]], model(FM_BATCH)[[0, 2, 3]])


def test_interaction_layers_alone_without_a_dnn(spec, big_batch):
    """``dnn: false`` (DynInt Table 2): WDL is logistic regression, DeepFM first order +
    FM, DCN / DCNv2 ``Linear(CrossNet(flat))``: each equals its formula."""
    wdl = perturb(build_model(small_config(family="wdl", dnn=False), spec)).eval()
    assert wdl.dense is None and wdl.head is None
    _, linear = wdl.embedding.with_first_order(big_batch)
    torch.testing.assert_close(wdl(big_batch), linear)
    deepfm = perturb(build_model(small_config(family="deepfm", dnn=False), spec)).eval()
    _, linear, total, sq_norms = deepfm.embedding.with_features(big_batch)
    torch.testing.assert_close(deepfm(big_batch), linear + deepfm.fm.from_sums(total, sq_norms))
    for family in ("dcn", "dcnv2"):
        model = perturb(build_model(small_config(family=family, dnn=False), spec)).eval()
        flat = model.embedding(big_batch).flatten(1)
        assert model.head.in_features == flat.shape[1]
        torch.testing.assert_close(model(big_batch), model.head(model.cross(flat)).squeeze(1))
    # no tower's parameters remain, and every parameter still gets a gradient
    for family in ("wdl", "deepfm", "dcn", "dcnv2"):
        model = build_model(small_config(family=family, dnn=False), spec)
        with_dnn = build_model(small_config(family=family), spec)
        assert count_parameters(model) < count_parameters(with_dnn)
        model(big_batch).sum().backward()
        assert all(p.grad is not None for p in model.parameters()), family


def test_deepfm_fields_option_is_the_pooled_form():
    """``fm_input="fields"`` = FM over the mean-pooled fields + mean weight per field."""
    model = _deepfm(fm_input="fields")
    table = model.embedding.table.weight.detach()
    offsets = model.embedding.offsets.tolist()
    fields = [(0, 1), (1, 2), (2, 5), (5, 9)]  # slot ranges of user, item, genres, tags
    expected = []
    for row in FM_BATCH:
        pooled = []
        for start, end in fields:
            rows = [offsets[s] + int(row[s]) for s in range(start, end)]
            if end - start > 1:  # sequence: mean over non-pad slots, zero if none
                rows = [r for s, r in zip(range(start, end), rows) if int(row[s]) != 0]
            pooled.append(
                sum((table[r] for r in rows), torch.zeros_like(table[0])) / max(1, len(rows))
            )
        fm = sum(
            (pooled[i][:-1] @ pooled[j][:-1]).item() for i in range(4) for j in range(i + 1, 4)
        )
        expected.append(fm + sum(p[-1].item() for p in pooled) + model.embedding.bias.item())
    expected_t = torch.tensor(expected, dtype=table.dtype)
    expected_t += model.deep(model.embedding(FM_BATCH))
    torch.testing.assert_close(model(FM_BATCH), expected_t, rtol=0, atol=1e-5)


def test_fm_forms_agree_without_multi_valued_fields():
    spec = FeatureSpec((FieldSpec("a", "categorical", 5), FieldSpec("b", "categorical", 4)))
    features = perturb(build_model(small_config(family="deepfm", embedding_dim=3), spec)).eval()
    fields = build_model(small_config(family="deepfm", embedding_dim=3, fm_input="fields"), spec)
    fields.load_state_dict(features.state_dict())
    x = torch.tensor([[1, 2], [4, 3], [0, 0]])
    torch.testing.assert_close(features(x), fields.eval()(x))


def test_deepfm_features_gradients_skip_pad_rows(spec):
    model = perturb(build_model(small_config(family="deepfm"), spec))
    model(torch.tensor([[2, 3, 2, 4, 0, 5, 0]])).sum().backward()
    grad = model.embedding.table.weight.grad
    assert torch.all(grad[22] == 0)  # genres pad row
    assert torch.all(grad[26] != 0) and torch.all(grad[27] != 0)  # genres 4 and 5


def test_checkpoint_config_without_fm_input_builds_the_default(spec, batch):
    """Configs saved before ``fm_input`` existed build the feature-level FM."""
    model = perturb(build_model(small_config(family="deepfm"), spec))
    old = {k: v for k, v in model.config.items() if k != "fm_input"}
    rebuilt = build_model(json.loads(json.dumps(old)), spec)
    assert rebuilt.config["fm_input"] == "features" and rebuilt.fm_input == "features"
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(batch), model(batch), rtol=0, atol=0)


# --- config contract -----------------------------------------------------------------


def test_config_is_normalized_and_json_able(spec):
    model = build_model({"family": "dnn", "apg": {"condition": {"mode": "mix"}}}, spec)
    cfg = model.config
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["embedding_dim"] == 16 and cfg["hidden_units"] == [256, 128, 64]
    assert cfg["apg"]["version"] == "v4" and cfg["apg"]["rank"] == 4
    assert cfg["apg"]["condition"] == {
        "mode": "mix",
        "fields": ["user", "item"],
        "aggregation": "input",
        "combine": "attention",
        "attention_dim": 16,
    }
    assert model.spec is spec
    assert build_model({"apg": {"condition": {"mode": "group"}}}, spec).config["apg"]["condition"][
        "fields"
    ] == ["user"]


BAD_CONFIGS = [
    ({"family": "xgboost"}, "family"),
    ({"famly": "wdl"}, "famly"),
    ({"embedding_dim": 0}, "embedding_dim"),
    ({"embedding_dim": True}, "embedding_dim"),
    ({"hidden_units": []}, "hidden_units"),
    ({"hidden_units": [8, 0]}, "hidden_units"),
    ({"dropout": 1.5}, "dropout"),
    ({"batch_norm": "yes"}, "batch_norm"),
    ({"cross_layers": 0}, "cross_layers"),
    ({"fm_input": "slots"}, "fm_input"),
    ({"family": "deepfm", "fm_input": None}, "fm_input"),
    ({"apg": {"verison": "v4"}}, "apg.verison"),
    ({"apg": {"version": "v9"}}, "apg.version"),
    ({"apg": {"rank": 9}}, "apg.rank"),  # min(d_in=16, 12, 8) = 8 for the last layer
    ({"apg": {"rank": [4]}}, "apg.rank"),  # one rank per hidden layer
    ({"apg": {"rank": 0}}, "apg.rank"),
    ({"apg": {"version": "v4", "stack": 3}}, "apg.stack"),
    ({"apg": {"width": 0}}, "apg.width"),
    ({"apg": {"generator_layers": 0}}, "apg.generator_layers"),
    ({"apg": {"version": "v3", "reconstruct": True}}, "apg.reconstruct"),
    ({"apg": {"version": "v5", "reconstruct": True}}, "apg.reconstruct"),
    ({"apg": {"reconstruct": 1}}, "apg.reconstruct"),
    ({"apg": {"condition": {"mode": "team"}}}, "apg.condition.mode"),
    ({"apg": {"condition": {"mode": "self", "combine": "mean"}}}, "apg.condition.combine"),
    (
        {"apg": {"condition": {"mode": "group", "aggregation": "input"}}},
        "apg.condition.aggregation",
    ),
    ({"apg": {"condition": {"mode": "group", "fields": ["user", "item"]}}}, "apg.condition.fields"),
    ({"apg": {"condition": {"mode": "mix", "fields": ["user"]}}}, "apg.condition.fields"),
    ({"apg": {"condition": {"mode": "mix", "fields": ["user", "nope"]}}}, "apg.condition.fields"),
    ({"apg": {"condition": {"mode": "group", "fields": "user"}}}, "apg.condition.fields"),
    ({"apg": {"condition": {"mode": "mix", "combine": "sum"}}}, "apg.condition.combine"),
    ({"apg": {"condition": {"mode": "mix", "aggregation": "middle"}}}, "apg.condition.aggregation"),
    ({"apg": {"condition": {"mode": "self", "extra": 1}}}, "apg.condition.extra"),
    ({"folded": True, "dropout": 0.1}, "folded"),
    ({"folded": True, "apg": {"version": "v5"}}, "folded"),
    ({"seed": -1}, "seed"),
    ({"dnn": 0}, "dnn"),
    ({"family": "dnn", "dnn": False}, "dnn"),
    ({"dnn": False, "apg": {"version": "v4"}}, "dnn"),
]


@pytest.mark.parametrize("overrides, key", BAD_CONFIGS, ids=[k for _, k in BAD_CONFIGS])
def test_bad_config_raises_value_error_naming_the_key(spec, overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_model(small_config(**overrides), spec)


def test_group_default_needs_a_user_field(spec):
    from dynamic_ctr.spec import FeatureSpec

    anonymous = FeatureSpec(spec.fields)  # no user_field
    with pytest.raises(ValueError, match="apg.condition.fields"):
        build_model(small_config(apg={"condition": {"mode": "group"}}), anonymous)
    model = build_model(
        small_config(apg={"condition": {"mode": "group", "fields": ["item"]}}), anonymous
    )
    assert model.config["apg"]["condition"]["fields"] == ["item"]


def test_per_layer_rank(spec):
    model = build_model(small_config(apg={"rank": [3, 2]}), spec)
    assert [layer.cfg.rank for layer in model.dense.layers] == [3, 2]


# --- seeding and checkpoints ---------------------------------------------------------

ROUND_TRIP_CONFIGS = [
    small_config(family="dcnv2", batch_norm=True),
    small_config(family="deepfm", apg={"version": "v5", "stack": 3}),
    small_config(
        family="dcn",
        apg={
            "version": "v3",
            "generated_bias": True,
            "condition": {"mode": "mix", "aggregation": "output"},
        },
    ),
]


@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS, ids=lambda c: c["family"])
def test_rebuild_from_config_and_load_state_dict(spec, big_batch, config):
    model = perturb(build_model(config, spec))
    model.train()
    model(big_batch)  # moves BatchNorm running stats off their init
    model.eval()
    rebuilt = build_model(json.loads(json.dumps(model.config)), model.spec)
    assert not torch.allclose(rebuilt.eval()(big_batch), model(big_batch))  # differs before loading
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(big_batch), model(big_batch), rtol=0, atol=0)
    assert rebuilt.config == model.config


def test_seeded_builds_are_identical_and_seed_matters(spec, batch):
    config = small_config(
        apg={"version": "v5", "condition": {"mode": "mix", "combine": "attention"}}
    )
    a, b = build_model(config, spec), build_model(config, spec)
    c = build_model({**config, "seed": 1}, spec)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert torch.equal(a(batch), b(batch))


def test_build_does_not_touch_global_rng(spec):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(small_config(apg=APG_V4), spec)
    assert torch.equal(torch.rand(3), expected)


def test_count_parameters(spec):
    model = build_model(small_config(family="dnn", hidden_units=[8]), spec)
    # table (10+8+4+6)*4 + Linear(16, 8) + head Linear(8, 1)
    assert count_parameters(model) == 28 * 4 + (16 * 8 + 8) + (8 + 1)


def test_models_import_without_kedro_or_pandas():
    code = (
        "import sys, dynamic_ctr.models; "
        "bad = [m for m in ('kedro', 'pandas') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
