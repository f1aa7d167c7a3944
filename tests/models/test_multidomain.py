"""The multi-domain families through ``build_model``: STAR, MMoE and AdaSparse towers on
the backbones, their configs, folding round trips and the penalty hook."""

from __future__ import annotations

import pytest
import torch
from modelkit import perturb, small_config

from dynamic_ctr.models import build_model, count_parameters, fold_model
from dynamic_ctr.models.adasparse import AdaSparseTower
from dynamic_ctr.spec import FeatureSpec

pytestmark = pytest.mark.usefixtures("single_thread")

ADASPARSE = {"formulation": "binarization"}
MODELS = [
    small_config(family="star"),
    small_config(family="mmoe", mmoe={"num_experts": 3, "expert_units": [8], "tower_units": [4]}),
    small_config(family="dnn", adasparse=ADASPARSE),
    small_config(family="dcnv2", adasparse={"formulation": "fusion", "pruner_input": "domain"}),
    small_config(family="wdl", adasparse={"formulation": "scaling"}, dropout=0.2, batch_norm=True),
    small_config(family="maml", maml={"inner_lr": 0.3}),
    small_config(family="maml", maml={"inner_lr": 0.3, "fast_weights": "tower"}),
]
IDS = ["star", "mmoe", "dnn_adasparse", "dcnv2_adasparse", "wdl_adasparse", "maml", "maml_tower"]


@pytest.mark.parametrize("config", MODELS, ids=IDS)
def test_builds_trains_folds_and_rebuilds(spec, big_batch, config):
    model = perturb(build_model(config, spec))
    assert model.config["domain_field"] == "domain"  # the spec's domain field by default
    model.train()
    y = torch.randint(0, 2, (big_batch.shape[0],)).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(big_batch), y)
    penalty = model.penalty() if hasattr(model, "penalty") else None
    if config.get("adasparse"):  # the tower's sparsity regulariser reaches the loss through the backbone
        assert isinstance(model.dense, AdaSparseTower) and penalty is not None and penalty.ndim == 0
        loss = loss + penalty
    loss.backward()
    grads = [p.grad.coalesce().values() if p.grad.is_sparse else p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    model.eval()
    folded = fold_model(model)
    torch.testing.assert_close(folded(big_batch), model(big_batch), rtol=1e-5, atol=1e-6)
    rebuilt = build_model(folded.config, spec)
    rebuilt.load_state_dict(folded.state_dict())
    torch.testing.assert_close(rebuilt(big_batch), model(big_batch), rtol=1e-5, atol=1e-6)


def test_the_domain_decides_star_and_mmoe(spec):
    """Same row, another domain id: another prediction (the domain-specific parts act)."""
    for config in MODELS[:2]:
        model = perturb(build_model(config, spec)).eval()
        x = torch.tensor([[2, 3, 2, 2, 3, 0, 0]])
        other = x.clone()
        other[0, 2] = 3  # the domain slot (categorical fields first)
        assert not torch.allclose(model(x), model(other)), config["family"]


def test_a_fine_domain_partition_is_any_categorical_field(spec):
    """APG Table 6's fine grain: one set of domain parameters per item."""
    coarse = build_model(small_config(family="star"), spec)
    fine = build_model(small_config(family="star", domain_field="item"), spec)
    assert fine.num_domains == spec["item"].vocab_size != coarse.num_domains
    assert count_parameters(fine) > count_parameters(coarse)


@pytest.mark.parametrize("overrides, message", [
    ({"family": "star", "domain_field": "genres"}, "domain_field='genres' must be a categorical field"),
    ({"family": "mmoe", "domain_field": "nope"}, "domain_field='nope'"),
    ({"adasparse": {"fields": ["nope"]}}, r"adasparse.fields: no field\(s\) \['nope'\]"),
    ({"adasparse": {"formulation": "binary"}}, "adasparse.formulation"),
    ({"adasparse": {"r_min": 0.3, "r_max": 0.2}}, "adasparse.r_max"),
    ({"adasparse": {"beta": 0.5}}, "adasparse.beta"),
    ({"adasparse": {}, "apg": {"version": "v4"}}, "either APG or AdaSparse"),
    ({"family": "star", "adasparse": {}}, "adasparse: family 'star'"),
    ({"family": "wdl", "star": {}}, "only family 'star'"),
    ({"family": "mmoe", "mmoe": {"num_experts": 0}}, "mmoe.num_experts"),
    ({"family": "mmoe", "mmoe": {"lazy_domains": "yes"}}, "mmoe.lazy_domains"),
    ({"family": "maml", "maml": {"inner_lr": 0}}, "maml.inner_lr"),
])
def test_bad_multidomain_configs_name_the_key(spec, overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model(small_config(**overrides), spec)


def test_a_spec_without_domains_needs_a_domain_field_named(spec):
    plain = FeatureSpec(spec.fields, user_field="user", item_field="item")  # no domain_field
    with pytest.raises(ValueError, match="the spec has no domain field"):
        build_model(small_config(family="star"), plain)
    assert build_model(small_config(family="star", domain_field="item"), plain).num_domains == 8


def test_star_domains_absent_from_a_batch_keep_their_weights(spec):
    """STAR's per-domain parameters get sparse gradients and lazy updates (LazyAdam):
    a step moves the batch's domains only, whatever the momentum; the shared ones move."""
    from dynamic_ctr.training.loop import TrainConfig, clip_grad_norm, make_optimizer
    from dynamic_ctr.training.optimizers import LazyAdam

    model = build_model(small_config(family="star"), spec).train()
    optimizer = make_optimizer(model, TrainConfig(lr=0.01), torch.device("cpu"))
    assert isinstance(optimizer.optimizers["domain"], LazyAdam)
    layer = model.net.layers[0]
    x = torch.tensor([[2, 3, 2, 2, 3, 0, 0], [4, 5, 3, 1, 0, 0, 0]])  # domains 2 and 3 only
    for step in range(3):
        before = layer.domain_weight.detach().clone()
        shared = layer.weight.detach().clone()
        optimizer.zero_grad()
        model(x if step != 1 else x[:1]).sum().backward()  # step 1: domain 2 alone
        assert layer.domain_weight.grad.is_sparse
        assert clip_grad_norm(model.parameters(), 1e-3) > 1e-3  # clipping takes sparse gradients
        optimizer.step()
        moved = (layer.domain_weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
        assert moved == ([2] if step == 1 else [2, 3])  # domain 3 keeps its weights in step 1
        assert not torch.equal(layer.weight.detach(), shared)


def _maml(spec, inner_lr=0.5):
    return perturb(build_model(small_config(family="maml", maml={"inner_lr": inner_lr}), spec)).double()


def test_maml_meta_loss_is_first_order_maml_on_the_head_per_domain(spec, big_batch):
    """Against a loop: per domain, one SGD step on its support rows' mean BCE (autograd),
    then the query rows' BCE at the adapted head; first-order: the head's gradient is the
    query loss's gradient at the adapted weights."""
    model = _maml(spec).train()
    y = torch.randint(0, 2, (big_batch.shape[0],), generator=torch.Generator().manual_seed(0)).double()
    loss = model.meta_loss(big_batch, y)
    (grad_w,) = torch.autograd.grad(loss, [model.head.weight])

    z, domain = model.features(big_batch)
    z = z.detach()
    w, b = model.head.weight.detach()[0], model.head.bias.detach()[0]
    support = torch.arange(len(y)) % 2 == 0
    adapted_w, adapted_b = {}, {}
    for d in domain.unique().tolist():
        rows = support & (domain == d)
        ww, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
        if rows.any():
            inner = torch.nn.functional.binary_cross_entropy_with_logits(z[rows] @ ww + bb, y[rows])
            gw, gb = torch.autograd.grad(inner, [ww, bb])
        else:
            gw, gb = torch.zeros_like(w), torch.zeros(())
        adapted_w[d], adapted_b[d] = (w - 0.5 * gw).requires_grad_(), (b - 0.5 * gb)
    query = (~support).nonzero().flatten().tolist()
    logits = torch.stack([z[i] @ adapted_w[int(domain[i])] + adapted_b[int(domain[i])] for i in query])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[query])
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-10, atol=1e-12)
    fast = torch.autograd.grad(expected, [adapted_w[d] for d in adapted_w])  # dL/dw' per domain
    torch.testing.assert_close(grad_w[0], sum(fast), rtol=1e-8, atol=1e-12)


def test_maml_adapts_each_domain_head_on_its_rows_and_serves_it(spec, big_batch):
    from dynamic_ctr.training.batching import TensorData

    model = _maml(spec, inner_lr=1.0).eval()
    y = torch.randint(0, 2, (big_batch.shape[0],), generator=torch.Generator().manual_seed(1)).double()
    shared = model(big_batch)
    model.adapt(TensorData(big_batch, y))
    z, domain = model.features(big_batch)
    w, b = model.head.weight[0].detach(), model.head.bias[0].detach()
    for d in range(model.num_domains):
        rows = domain == d
        if not rows.any():  # no rows: the shared head
            torch.testing.assert_close(model.adapted_weight[d], w)
            continue
        ww, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
        inner = torch.nn.functional.binary_cross_entropy_with_logits(z[rows].detach() @ ww + bb, y[rows])
        gw, gb = torch.autograd.grad(inner, [ww, bb])
        torch.testing.assert_close(model.adapted_weight[d], w - gw, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model.adapted_bias[d], b - gb, rtol=1e-10, atol=1e-12)
    served = model(big_batch)
    assert not torch.allclose(served, shared)  # evaluation reads each row's domain head
    torch.testing.assert_close(served, (z * model.adapted_weight[domain]).sum(1) + model.adapted_bias[domain])


def test_maml_trains_through_the_loop_and_validates_adapted(spec, big_batch):
    from dynamic_ctr.training.batching import TensorData
    from dynamic_ctr.training.loop import TrainConfig, train

    y = torch.randint(0, 2, (big_batch.shape[0],), generator=torch.Generator().manual_seed(2)).float()
    data = TensorData(big_batch, y)
    model = build_model(small_config(family="maml"), spec)
    result = train(model, data, data, TrainConfig(max_epochs=2, batch_size=16, progress=False))
    assert bool(result.model.adapted) and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in result.history)


# ----------------------------------------------------------- MAML, the whole tower adapted

TOWER = {"inner_lr": 0.5, "fast_weights": "tower"}


def _maml_tower(spec, inner_lr=0.5):
    config = small_config(family="maml", maml={**TOWER, "inner_lr": inner_lr})
    return perturb(build_model(config, spec)).double()


def _functional_logits(model, h, params):
    """The tower and head at ``params`` (weights then biases, as ``_fast_parameters``)."""
    n = len(params) // 2
    acts = [*model.dense.acts, None]
    for weight, bias, act in zip(params[:n], params[n:], acts, strict=True):
        h = h @ weight.T + bias
        h = act(h) if act is not None else h
    return h.squeeze(1)


def _one_domain_only_in_the_query(spec, batch):
    """The batch with domain 0 on row 1 (a query row) alone."""
    x = batch.clone()
    slot = 2  # the domain slot (categorical fields first)
    x[x[:, slot] == 0, slot] = 1
    x[1, slot] = 0
    return x


def test_maml_tower_meta_loss_is_first_order_maml_per_domain(spec, big_batch):
    """Against a loop: per domain, one SGD step of every linear map of the tower and the head
    on its support rows' mean BCE (autograd), then its query rows' BCE at the adapted maps;
    a domain without support rows keeps the shared maps; first order: each shared map's
    gradient is the sum over domains of the query loss's gradient at that domain's maps."""
    model = _maml_tower(spec).train()
    x = _one_domain_only_in_the_query(spec, big_batch)
    y = torch.randint(0, 2, (x.shape[0],), generator=torch.Generator().manual_seed(0)).double()
    loss = model.meta_loss(x, y)
    shared = model._fast_parameters()
    grads = torch.autograd.grad(loss, shared)

    h = model.embedding(x).flatten(1).detach()
    domain = x[:, model.domain_index]
    support = torch.arange(len(y)) % 2 == 0
    theta = [p.detach() for p in shared]
    per_domain, total = {}, 0.0
    for d in domain[~support].unique().tolist():
        rows = support & (domain == d)
        if rows.any():
            leaves = [t.clone().requires_grad_() for t in theta]
            inner = torch.nn.functional.binary_cross_entropy_with_logits(_functional_logits(model, h[rows], leaves), y[rows])
            steps = torch.autograd.grad(inner, leaves)
        else:
            assert d == 0  # the query-only domain
            steps = [torch.zeros_like(t) for t in theta]
        per_domain[d] = [(t - 0.5 * s).requires_grad_() for t, s in zip(theta, steps, strict=True)]
        q = ~support & (domain == d)
        logits = _functional_logits(model, h[q], per_domain[d])
        total = total + torch.nn.functional.binary_cross_entropy_with_logits(logits, y[q], reduction="sum")
    expected = total / int((~support).sum())
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-10, atol=1e-12)
    fast = [torch.autograd.grad(expected, per_domain[d], retain_graph=True) for d in per_domain]
    for i, grad in enumerate(grads):
        torch.testing.assert_close(grad, sum(f[i] for f in fast), rtol=1e-8, atol=1e-12)
    (g_emb,) = torch.autograd.grad(model.meta_loss(x, y), [next(model.embedding.parameters())])
    assert g_emb.abs().sum() > 0  # the embeddings learn through the query rows' h


def test_maml_tower_adapts_each_domain_on_its_rows_and_serves_it(spec, big_batch):
    from dynamic_ctr.training.batching import TensorData

    model = _maml_tower(spec, inner_lr=1.0).eval()
    x = big_batch.clone()
    x[x[:, 2] == 3, 2] = 2  # domain 3: no rows
    y = torch.randint(0, 2, (x.shape[0],), generator=torch.Generator().manual_seed(1)).double()
    shared_logits = model(x)
    model.adapt(TensorData(x, y), batch_size=24)  # in chunks: sums over chunks, then the mean
    h, domain = model.embedding(x).flatten(1).detach(), x[:, model.domain_index]
    theta = [p.detach() for p in model._fast_parameters()]
    n = len(theta) // 2
    buffers = [getattr(model, f"adapted_weight_{i}") for i in range(n)] + [
        getattr(model, f"adapted_bias_{i}") for i in range(n)
    ]
    expected_logits = torch.empty_like(shared_logits)
    for d in range(model.num_domains):
        rows = domain == d
        if not rows.any():
            for buffer, t in zip(buffers, theta, strict=True):
                torch.testing.assert_close(buffer[d], t)  # the shared maps
            continue
        leaves = [t.clone().requires_grad_() for t in theta]
        inner = torch.nn.functional.binary_cross_entropy_with_logits(_functional_logits(model, h[rows], leaves), y[rows])
        adapted = [t - s for t, s in zip(theta, torch.autograd.grad(inner, leaves), strict=True)]
        for buffer, a in zip(buffers, adapted, strict=True):
            torch.testing.assert_close(buffer[d], a, rtol=1e-10, atol=1e-12)
        expected_logits[rows] = _functional_logits(model, h[rows], adapted)
    served = model(x)
    assert not torch.allclose(served, shared_logits)
    torch.testing.assert_close(served, expected_logits, rtol=1e-10, atol=1e-12)


def test_maml_tower_trains_through_the_loop_and_round_trips(spec, big_batch, tmp_path):
    from dynamic_ctr.training.batching import TensorData
    from dynamic_ctr.training.loop import TrainConfig, train

    y = torch.randint(0, 2, (big_batch.shape[0],), generator=torch.Generator().manual_seed(2)).float()
    data = TensorData(big_batch, y)
    config = small_config(family="maml", maml=TOWER)
    result = train(build_model(config, spec), data, data, TrainConfig(max_epochs=2, batch_size=16, progress=False))
    model = result.model.eval()
    assert bool(model.adapted) and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in result.history)
    rebuilt = build_model(model.config, spec)
    rebuilt.load_state_dict(model.state_dict())  # the per-domain towers are saved with the model
    torch.testing.assert_close(rebuilt.eval()(big_batch), model(big_batch))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"maml": {"fast_weights": "all"}}, "maml.fast_weights"),
        ({"maml": TOWER, "batch_norm": True}, "batch_norm"),
        ({"maml": TOWER, "apg": {"version": "v4", "rank": 2}}, "with apg the tower is not one"),
        ({"maml": TOWER, "adasparse": ADASPARSE}, "with adasparse the tower is not one"),
    ],
)
def test_maml_tower_settings_fail_in_the_config(spec, config, message):
    """Checked by the config (so the suite's planning stops before any training)."""
    from dynamic_ctr.models.config import resolve_config

    with pytest.raises(ValueError, match=message):
        resolve_config(small_config(family="maml", **config), spec)
