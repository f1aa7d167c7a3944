"""AdaSparse (models.adasparse): the three weighting-factor formulations on hand-made
logits, the straight-through gradients, the alpha / lambda_hat schedules and their state,
the sparsity-controlled regulariser, the per-domain pruned serving tower, domain
awareness, stop-gradient, a few training steps and argument checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from modelkit import perturb

from dynamic_ctr.models.adasparse import (
    FORMULATIONS,
    AdaSparseTower,
    PrunedAdaSparseTower,
    weighting_factors,
)

B, E_IN, F, D = 6, 10, 3, 4
DOMAIN = 2  # the domain-aware field's index on the F axis

pytestmark = pytest.mark.usefixtures("single_thread")


def _tower(**overrides) -> AdaSparseTower:
    kwargs = {"in_dim": E_IN, "hidden_units": [8, 6], "domain_fields": [DOMAIN], "embedding_dim": D}
    kwargs.update(overrides)
    torch.manual_seed(0)
    return AdaSparseTower(**kwargs)


def _inputs(batch: int = B, seed: int = 1, in_dim: int = E_IN, domain: torch.Tensor | None = None):
    """``h (B, in_dim)``, ``emb (B, F, D)``; ``domain (D,)`` puts every row in that domain."""
    g = torch.Generator().manual_seed(seed)
    h, emb = torch.randn(batch, in_dim, generator=g), torch.randn(batch, F, D, generator=g)
    if domain is not None:
        emb[:, DOMAIN] = domain
    return h, emb


def _set_pruner_logits(tower: AdaSparseTower, logits: list[torch.Tensor]) -> None:
    """Make every pruner emit the constant logits ``v^l`` (zero weights, bias ``v^l``)."""
    with torch.no_grad():
        for pruner, v in zip(tower.pruners, logits):
            pruner.weight.zero_()
            pruner.bias.copy_(v)


# ------------------------------------------------------------------ formulations


@pytest.mark.parametrize("pruner_input", ["domain_and_hidden", "domain"])
def test_builds_on_the_meta_device_with_the_same_parameters(pruner_input):
    """The report counts parameters on models built on the meta device (no memory)."""
    with torch.device("meta"):
        meta = _tower(pruner_input=pruner_input)
    real = _tower(pruner_input=pruner_input)
    assert all(p.is_meta for p in meta.parameters())
    assert [p.shape for p in meta.parameters()] == [p.shape for p in real.parameters()]
    assert meta.state_dict().keys() == real.state_dict().keys()


def test_factors_on_hand_made_logits():
    v = torch.tensor([-200.0, -4.0, -1.0, -0.2, 0.0, 0.3, 2.0])
    s1, s5 = torch.sigmoid(v), torch.sigmoid(5 * v)
    # binarization: step(sigma(alpha v) - 0.25); logit(0.25) = -1.0986
    binary1 = weighting_factors(v, "binarization", alpha=1.0, epsilon=0.25)
    assert binary1.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    binary5 = weighting_factors(v, "binarization", alpha=5.0, epsilon=0.25)
    assert binary5.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # sigma(-1) = 0.269 > 0.25
    assert weighting_factors(v, "binarization", alpha=5.0, epsilon=0.3).tolist() == [0, 0, 0, 0, 1, 1, 1]
    # scaling: beta sigma(v), no threshold, no alpha
    scaling = weighting_factors(v, "scaling", alpha=5.0, beta=2.0, epsilon=0.25)
    assert torch.equal(scaling, 2.0 * s1)
    assert scaling[4] == 1.0 and scaling[1] == pytest.approx(2 / (1 + math.exp(4)))
    assert (scaling[1:] > 0).all()  # small factors stay: nothing is cut below epsilon
    # fusion: beta sigma(alpha v) where it exceeds epsilon, else exactly 0
    fusion = weighting_factors(v, "fusion", alpha=5.0, beta=2.0, epsilon=0.25)
    assert fusion[:3].tolist() == [0.0, 0.0, 0.0]  # 2 sigma(-5) = 0.013 < 0.25 is cut
    assert torch.equal(fusion[3:], 2.0 * s5[3:])  # 2 sigma(-1) = 0.538 kept as is
    assert fusion[4] == 1.0
    for pi in (binary1, binary5, scaling, fusion):
        assert (pi >= 0).all() and not torch.signbit(pi).any()  # never negated, no -0.0
    assert set(binary5.tolist()) == {0.0, 1.0}
    dense = torch.linspace(-10, 10, 2001)
    for alpha in (0.1, 0.7, 5.0):  # exactly {0, 1}, also where the STE's s - sg(s) is added
        assert set(weighting_factors(dense, "binarization", alpha=alpha).unique().tolist()) <= {0.0, 1.0}
        fused = weighting_factors(dense, "fusion", alpha=alpha)
        kept = 2.0 * torch.sigmoid(alpha * dense) > 0.25
        assert torch.equal(fused, torch.where(kept, 2.0 * torch.sigmoid(alpha * dense), 0.0))
    with pytest.raises(ValueError, match="formulation"):
        weighting_factors(v, "sign")


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_the_tower_applies_its_pruner_through_the_formulation(formulation):
    tower = _tower(formulation=formulation, alpha_start=2.0, alpha_max=2.0, in_dim=4, hidden_units=[3, 2])
    logits = [torch.tensor([-3.0, -0.5, 0.0, 1.0]), torch.tensor([-2.0, 0.2, 4.0])]
    _set_pruner_logits(tower, logits)
    h, emb = _inputs(in_dim=4)
    factors = tower.factors(h, emb)
    for pi, v in zip(factors, logits):
        assert pi.shape == (B, len(v))
        expected = weighting_factors(v, formulation, alpha=2.0, beta=2.0, epsilon=0.25)
        assert torch.equal(pi, expected.expand(B, -1))
    # pi multiplies the layer INPUT (eq. 2): output = act(W (h o pi^0)) ... by hand
    with torch.no_grad():
        x = h
        for linear, pi in zip(tower.linears, factors):
            x = torch.relu(linear(x * pi))
        torch.testing.assert_close(tower.eval()(h, emb), x)
    zeros = [float((pi == 0).float().mean()) for pi in factors]
    assert tower.sparsity(h, emb) == pytest.approx(zeros)
    if formulation != "scaling":
        assert tower.sparsity(h, emb)[0] > 0


def test_straight_through_gradients():
    v = torch.tensor([-3.0, -0.5, 0.0, 1.5], requires_grad=True)
    alpha, beta = 2.0, 2.0
    s = torch.sigmoid(alpha * v.detach())
    ds = alpha * s * (1 - s)  # d sigma(alpha v) / dv
    (grad,) = torch.autograd.grad(weighting_factors(v, "binarization", alpha=alpha).sum(), v)
    torch.testing.assert_close(grad, ds)  # the step's gradient is that of sigma(alpha v)
    (grad,) = torch.autograd.grad(weighting_factors(v, "fusion", alpha=alpha, beta=beta).sum(), v)
    keep = (beta * s > 0.25).float()
    torch.testing.assert_close(grad, beta * ds * keep + beta * s * ds)  # product rule + STE
    assert grad[0] > 0  # a pruned neuron (2 sigma(-6) < 0.25) still gets a gradient


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("pruner_input", ["domain_and_hidden", "domain"])
def test_gradients_reach_the_pruners(formulation, pruner_input):
    tower = _tower(formulation=formulation, pruner_input=pruner_input, r_min=0.9, r_max=0.95)
    h, emb = _inputs()
    out = tower.train()(h, emb)
    # outside [0.9, 0.95]: nothing pruned at alpha_start (r = 0), scaling's r is about 0.5
    assert tower.penalty() > 0
    out.square().sum().backward()
    for name, p in tower.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    tower.zero_grad()
    tower(h, emb)
    tower.penalty().backward()  # the regulariser alone reaches the pruners through pi
    for pruner in tower.pruners:
        assert pruner.weight.grad.abs().sum() > 0 and pruner.bias.grad.abs().sum() > 0


# ------------------------------------------------------------------ schedules


def test_alpha_anneals_geometrically_in_training_only_and_is_saved():
    tower = _tower(formulation="fusion", alpha_start=0.1, alpha_max=5.0, anneal_steps=4)
    h, emb = _inputs()
    assert tower.alpha.item() == pytest.approx(0.1) and tower.step.item() == 0
    tower.eval()
    before = tower(h, emb)
    for _ in range(3):
        tower(h, emb)
    tower.factors(h, emb), tower.sparsity(h, emb)
    assert tower.step.item() == 0 and tower.alpha.item() == pytest.approx(0.1)  # eval: still
    tower.train()
    with torch.no_grad():
        first = tower(h, emb)
    torch.testing.assert_close(first, before)  # the forward at step t uses alpha_t
    assert not torch.allclose(tower.eval()(h, emb), before)  # then alpha moved
    tower.train()
    seen = [tower.alpha.item()]
    for _ in range(5):
        tower(h, emb)
        seen.append(tower.alpha.item())
    expected = [0.1 * 50 ** (min(t, 4) / 4) for t in range(1, 7)]
    assert seen == pytest.approx(expected, rel=1e-6)  # 0.266, 0.707, 1.88, 5, 5, 5
    assert tower.step.item() == 6
    # state dict: alpha, the step and lambda_hat come back in a fresh tower
    state = tower.state_dict()
    assert {"alpha", "step", "lambda_hat"} <= set(state)
    fresh = _tower(formulation="fusion", alpha_start=0.1, alpha_max=5.0, anneal_steps=4)
    assert fresh.alpha.item() == pytest.approx(0.1)
    fresh.load_state_dict(state)
    assert fresh.step.item() == 6 and fresh.alpha.item() == pytest.approx(5.0)
    assert fresh.lambda_hat.item() == tower.lambda_hat.item()
    torch.testing.assert_close(fresh.eval()(h, emb), tower.eval()(h, emb))


def test_lambda_hat_grows_linearly_with_training_steps_up_to_its_cap():
    tower = _tower(lambda_start=0.01, lambda_growth=0.02, lambda_max=0.08)
    h, emb = _inputs()
    values = [tower.lambda_hat.item()]
    for _ in range(5):
        tower.train()(h, emb)
        values.append(tower.lambda_hat.item())
    assert values == pytest.approx([0.01, 0.03, 0.05, 0.07, 0.08, 0.08])
    tower.eval()(h, emb)
    assert tower.lambda_hat.item() == pytest.approx(0.08) and tower.step.item() == 5


# ------------------------------------------------------------------ regulariser


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_regulariser_is_zero_inside_the_boundary_and_grows_outside(formulation):
    """Pruner logits of +-30 cut exactly k_l of the N_l = 20 input neurons of each layer,
    so the sparsity ratio is r^l = k_l / 20 (scaling: 1 - mean(pi / beta), the same)."""

    def penalty(k0: int, k1: int, lambda_start: float = 0.5) -> tuple[float, AdaSparseTower]:
        tower = _tower(in_dim=20, hidden_units=[20, 5], formulation=formulation,
                       r_min=0.15, r_max=0.25, lambda_start=lambda_start)
        _set_pruner_logits(tower, [torch.tensor([-30.0] * k + [30.0] * (20 - k)) for k in (k0, k1)])
        tower.train()(*_inputs(in_dim=20))
        return tower.penalty(), tower

    value, tower = penalty(4, 4)  # r = (0.2, 0.2): inside
    assert value.item() == 0.0
    value.backward()
    assert all(p.bias.grad.abs().sum() == 0 for p in tower.pruners)  # lambda^l = 0: no pull
    # one layer outside: R_s = (1/L) lambda_hat |r^l - r|^2 with r = 0.2
    for k0, ratio in [(0, 0.0), (2, 0.1), (10, 0.5)]:
        assert penalty(k0, 4)[0].item() == pytest.approx(0.5 * (ratio - 0.2) ** 2 / 2, rel=1e-5)
    below = [penalty(k, 4)[0].item() for k in (2, 1, 0)]  # r = 0.1, 0.05, 0: farther below
    above = [penalty(k, 4)[0].item() for k in (6, 8, 12)]  # r = 0.3, 0.4, 0.6: farther above
    assert 0 < below[0] < below[1] < below[2]
    assert 0 < above[0] < above[1] < above[2]
    both = penalty(0, 12)[0].item()
    assert both == pytest.approx(0.5 * (0.2**2 + 0.4**2) / 2, rel=1e-5)
    assert penalty(0, 4, lambda_start=1.0)[0].item() == pytest.approx(2 * below[2], rel=1e-5)
    # the gradient pulls the ratio back: too sparse -> raise the logits of pruned neurons
    value, tower = penalty(12, 4)
    value.backward()
    assert tower.pruners[0].bias.grad[:12].max() < 0  # gradient descent raises them


def test_penalty_is_zero_before_training_forwards_and_in_eval():
    tower = _tower(r_min=0.5, r_max=0.6)
    h, emb = _inputs()
    assert tower.penalty().item() == 0.0
    tower.eval()(h, emb)
    assert tower.penalty().item() == 0.0
    tower.train()(h, emb)
    assert tower.penalty().item() > 0
    assert tower.eval().penalty().item() == 0.0
    assert tower.train().penalty().item() > 0  # still the last training forward's
    copied = copy.deepcopy(tower)  # a copy neither fails on the graph nor inherits it
    assert copied.penalty().item() == 0.0


# ------------------------------------------------------------------ serving form


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_pruned_for_domain_matches_the_masked_tower(formulation, batch_norm):
    tower = _tower(formulation=formulation, pruner_input="domain", batch_norm=batch_norm,
                   dropout=0.2, alpha_start=5.0, alpha_max=5.0, hidden_units=[12, 8, 6])
    perturb(tower, seed=3, scale=0.3)
    with torch.no_grad():
        for pruner in tower.pruners:  # cut some 30-50 % of the neurons at alpha = 5
            pruner.bias.copy_(torch.randn(pruner.bias.shape, generator=torch.Generator().manual_seed(7)))
        tower.train()
        for seed in range(3):  # BatchNorm running statistics away from (0, 1)
            h, emb = _inputs(batch=32, seed=seed)
            tower(h * 2 + 1, emb)
    tower.eval()
    domain = torch.randn(D, generator=torch.Generator().manual_seed(11))
    h, emb = _inputs(batch=16, seed=5, domain=domain)
    e_d = tower.domain_embedding(emb)[0]
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    pruned = tower.pruned_for_domain(e_d)
    assert isinstance(pruned, PrunedAdaSparseTower) and not pruned.training
    assert pruned.out_dim == tower.out_dim == 6
    with torch.no_grad():
        expected = tower(h, emb)
        torch.testing.assert_close(pruned(h), expected, rtol=0, atol=1e-5)
    assert expected.abs().max() > 0.1
    for k, v in tower.state_dict().items():
        assert torch.equal(v, before[k]), k
    # parameters: the main network's, minus the cut rows and columns
    factors = [pi[0] for pi in tower.factors(h, emb)]
    kept = [int((pi != 0).sum()) for pi in factors] + [tower.out_dim]
    per_unit = 3 if batch_norm else 1  # bias (+ BatchNorm weight and bias) per output row
    expected_count = sum(kept[i + 1] * (kept[i] + per_unit) for i in range(3))
    main = sum(p.numel() for m in (tower.linears, tower.acts) for p in m.parameters())
    assert sum(p.numel() for p in pruned.parameters()) == expected_count
    if formulation == "scaling":  # no factor is ever exactly 0: nothing to cut
        assert expected_count == main
    else:
        assert 0 < min(tower.sparsity(h, emb)[1:]) and max(tower.sparsity(h, emb)) < 1
        assert expected_count < main
        assert pruned.activation_numel(16) < tower.activation_numel(16)
    # another domain gets another structure
    other = tower.pruned_for_domain(-e_d)
    if formulation != "scaling":
        assert [lin.in_features for lin in other.linears] != [lin.in_features for lin in pruned.linears]


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_domain_pruners_run_once_per_domain_with_the_per_row_values(formulation):
    """pruner_input="domain" computes pi per distinct domain of the batch and gathers it;
    the factors and the regulariser equal a row-by-row computation, also when two
    domains collide on the projection (the exact fallback) and when e_d needs a gradient
    (every row its own pruner)."""
    domains = torch.randn(4, D, generator=torch.Generator().manual_seed(3))
    sizes = [1, 2, 5, 8]  # unequal: the regulariser must weight each domain by its rows

    def build(**kw) -> AdaSparseTower:
        tower = perturb(_tower(formulation=formulation, pruner_input="domain", alpha_start=5.0,
                               alpha_max=5.0, r_min=0.9, r_max=0.95, hidden_units=[8, 6], **kw),
                        seed=4, scale=1.0)
        return tower

    h, emb = _inputs(batch=sum(sizes), seed=9)
    emb[:, DOMAIN] = torch.cat([d.expand(n, D) for d, n in zip(domains, sizes)])
    emb = emb[torch.randperm(len(emb), generator=torch.Generator().manual_seed(1))]
    tower = build()
    e_d = tower.domain_embedding(emb)

    def per_row(tower: AdaSparseTower) -> tuple[list[torch.Tensor], torch.Tensor]:
        factors, retained = [], []
        for pruner in tower.pruners:
            rows = [weighting_factors(pruner(e[None]), formulation, alpha=tower.alpha, beta=tower.beta,
                                      epsilon=tower.epsilon)[0] for e in e_d]
            pi = torch.stack(rows)
            factors.append(pi)
            keep = pi / tower.beta if formulation == "scaling" else (pi > 0).to(pi.dtype)
            retained.append(keep.mean())
        return factors, tower.regulariser(torch.stack(retained), tower.lambda_hat)

    with torch.no_grad():
        expected, expected_penalty = per_row(tower)
    for pi, want in zip(tower.factors(h, emb), expected, strict=True):
        torch.testing.assert_close(pi, want, rtol=1e-6, atol=1e-6)
    rows, inverse, counts = tower._distinct_domains(e_d)
    assert sorted(counts.tolist()) == sorted(sizes) and torch.equal(rows[inverse], e_d)
    tower.train()(h, emb)
    torch.testing.assert_close(tower.penalty().detach(), expected_penalty, rtol=1e-5, atol=1e-7)
    assert expected_penalty > 0

    collided = build()
    collided._probe.zero_()  # every domain on one key: the check falls back to unique(dim=0)
    rows, inverse, counts = collided._distinct_domains(e_d)
    assert sorted(counts.tolist()) == sorted(sizes) and torch.equal(rows[inverse], e_d)
    for pi, want in zip(collided.factors(h, emb), expected, strict=True):
        torch.testing.assert_close(pi, want, rtol=1e-6, atol=1e-6)

    halved = build().to(torch.bfloat16)  # the probe buffer is cast too; keys stay float64
    assert halved.factors(h.bfloat16(), emb.bfloat16())[0].shape == expected[0].shape

    grad_path = build(stop_gradient=False)  # training with e_d in the graph: per row
    emb_leaf = emb.clone().requires_grad_(True)
    grad_path.train()(h, emb_leaf).sum().backward()
    torch.testing.assert_close(grad_path.penalty().detach(), expected_penalty, rtol=1e-5, atol=1e-7)
    assert emb_leaf.grad[:, DOMAIN].abs().sum() > 0


def test_pruned_for_domain_needs_domain_only_pruners():
    tower = _tower(pruner_input="domain_and_hidden")
    with pytest.raises(ValueError, match="pruner_input"):
        tower.pruned_for_domain(torch.zeros(D))
    with pytest.raises(ValueError, match="e_d"):
        _tower(pruner_input="domain").pruned_for_domain(torch.zeros(D + 1))


# ------------------------------------------------------------------ domain awareness, training


@pytest.mark.parametrize("fields", [[2], [0, 1], [1, 2], (1, 2), [2, 0], [0, 2]])
def test_domain_embedding_concatenates_the_fields_in_their_order(fields):
    """Adjacent fields in increasing order are read as a view of ``emb``, the others by
    indexing: both give the fields' embeddings concatenated in ``domain_fields`` order."""
    tower = _tower(domain_fields=fields)
    _, emb = _inputs()
    e_d = tower.domain_embedding(emb)
    assert torch.equal(e_d, torch.cat([emb[:, f] for f in fields], dim=1))
    adjacent = list(fields) == list(range(fields[0], fields[0] + len(fields)))  # a list or a tuple
    assert (e_d.data_ptr() == emb[:, fields[0]].data_ptr()) == adjacent  # a view exactly when adjacent


def test_factors_are_domain_aware():
    tower = perturb(_tower(formulation="scaling"), seed=2)
    h, emb = _inputs(batch=2)
    h[1] = h[0]
    emb[1] = emb[0]
    emb[1, DOMAIN] = emb[0, DOMAIN] + 1.0  # only the domain differs
    for pi in tower.factors(h, emb):
        assert (pi[0] - pi[1]).abs().max() > 1e-3
    # domain-only pruners: the same domain gives the same factors whatever the instance
    tower = perturb(_tower(formulation="scaling", pruner_input="domain"), seed=2)
    h, emb = _inputs(batch=4, domain=torch.ones(D))
    for pi in tower.factors(h, emb):
        assert torch.equal(pi, pi[:1].expand_as(pi))
    # binarization with domain_fields given: two domains prune differently
    tower = perturb(_tower(alpha_start=5.0, alpha_max=5.0, hidden_units=[16]), seed=4, scale=1.0)
    h, emb = _inputs(batch=2)
    h[1], emb[1] = h[0], emb[0]
    emb[1, DOMAIN] = -emb[0, DOMAIN] * 3
    (pi,) = tower.factors(h, emb)
    assert set(pi.unique().tolist()) == {0.0, 1.0} and not torch.equal(pi[0], pi[1])


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_stop_gradient_keeps_the_pruner_from_the_embeddings(stop_gradient):
    tower = _tower(formulation="fusion", stop_gradient=stop_gradient, r_min=0.5, r_max=0.6)
    h, emb = _inputs()
    emb.requires_grad_(True)  # h does not depend on emb: the pruner is emb's only path
    out = tower.train()(h, emb)
    grad = torch.autograd.grad(out.sum() + tower.penalty(), emb, allow_unused=True)[0]
    if stop_gradient:
        assert grad is None
    else:
        assert grad[:, DOMAIN].abs().sum() > 0
        assert grad[:, [0, 1]].abs().sum() == 0  # only the domain-aware field is read


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_trains_on_a_tiny_multi_domain_problem(formulation):
    """Two domains with opposite labelling rules; tower + logistic head, Adam, BCE + R_s."""
    g = torch.Generator().manual_seed(0)
    n = 128
    domains = torch.randint(0, 2, (n,), generator=g)
    emb = torch.randn(n, F, D, generator=g)
    emb[:, DOMAIN] = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])[domains]
    h = emb.flatten(1)
    score = h[:, :D].sum(1)
    y = ((score > 0) == (domains == 0)).float()
    tower = _tower(in_dim=F * D, hidden_units=[16, 8], formulation=formulation, anneal_steps=20)
    head = torch.nn.Linear(tower.out_dim, 1)
    optimizer = torch.optim.Adam([*tower.parameters(), *head.parameters()], lr=1e-2)
    losses = []
    for _ in range(40):
        logits = head(tower.train()(h, emb)).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + tower.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0]
    assert tower.alpha.item() == pytest.approx(5.0)  # annealed to alpha_max over 20 steps


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"in_dim": 0}, "in_dim"),
        ({"hidden_units": []}, "hidden_units"),
        ({"hidden_units": [8, 0]}, "hidden_units"),
        ({"domain_fields": []}, "domain_fields"),
        ({"domain_fields": [-1]}, "domain_fields"),
        ({"domain_fields": [1, 1]}, "domain_fields"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"formulation": "sign"}, "formulation"),
        ({"pruner_input": "hidden"}, "pruner_input"),
        ({"beta": 0.5}, "beta"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": 1.0}, "epsilon"),  # binarization: sigma(.) <= 1 would cut everything
        ({"formulation": "fusion", "epsilon": 2.0}, "epsilon"),
        ({"alpha_start": 0.0}, "alpha_start"),
        ({"alpha_max": 0.05}, "alpha_max"),
        ({"anneal_steps": 0}, "anneal_steps"),
        ({"r_min": -0.1}, "r_min"),
        ({"r_max": 0.1}, "r_max"),
        ({"r_max": 1.5}, "r_max"),
        ({"lambda_start": -1.0}, "lambda_start"),
        ({"lambda_growth": -1e-3}, "lambda_growth"),
        ({"lambda_max": 0.001}, "lambda_max"),
        ({"dropout": 1.0}, "dropout"),
        ({"batch_norm": 1}, "batch_norm"),
        ({"stop_gradient": "yes"}, "stop_gradient"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _tower(**kwargs)


def test_input_shapes_are_checked():
    tower = _tower()
    h, emb = _inputs()
    with pytest.raises(ValueError, match="emb"):
        tower(h, emb[:, :DOMAIN])  # the domain field is missing
    with pytest.raises(ValueError, match="emb"):
        tower(h, torch.randn(B, F, D + 1))
    with pytest.raises(ValueError, match="h must be"):
        tower(h[:, :-1], emb)
    assert tower.step.item() == 0


@pytest.mark.parametrize("layer", [0, 1])
def test_pruned_for_domain_survives_a_fully_cut_layer(layer):
    tower = _tower(formulation="fusion", pruner_input="domain", batch_norm=True).eval()
    _set_pruner_logits(tower, [torch.full((n,), 1.0) for n in (E_IN, 8)])
    with torch.no_grad():
        tower.pruners[layer].bias.fill_(-100.0)  # every input neuron of this layer is cut
    h, emb = _inputs(domain=torch.ones(D))
    pruned = tower.pruned_for_domain(tower.domain_embedding(emb)[0])
    assert pruned.linears[layer].in_features == 0
    with torch.no_grad():
        torch.testing.assert_close(pruned(h), tower(h, emb), rtol=0, atol=1e-6)
