"""STAR (models.star): per-domain weights against a per-domain loop reference, PN's
per-domain statistics (training, running, eval), registered domain parameters and their
gradients, the linear logit, folding, cost independent of the number of domains, and
argument errors."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from modelkit import perturb
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dynamic_ctr.models import star
from dynamic_ctr.models.star import (
    GROUPED_MAX_DOMAINS,
    FoldedStarNetwork,
    StarLinear,
    StarNetwork,
    group_domains,
    grouped_kernel_fits,
)

IN, HIDDEN, P, A = 5, (4, 3), 7, 3
FORMS = ("auto", "grouped", "per_sample")

pytestmark = pytest.mark.usefixtures("single_thread")


def _net(
    dtype=torch.float64, num_domains: int = P, noise: bool = True, seed: int = 0, **kwargs
) -> StarNetwork:
    """A seeded network; ``noise`` perturbs every parameter (``W_p`` then differs from 1,
    ``gamma_p`` from 1, ...) and sets distinct running statistics per domain."""
    torch.manual_seed(seed)
    net = StarNetwork(IN, HIDDEN, num_domains, A, aux_hidden=(4,), **kwargs)
    if noise:
        perturb(net, seed=seed)
        if net.norm is not None:
            g = torch.Generator().manual_seed(seed + 1)
            net.norm.running_mean.copy_(torch.randn(num_domains, IN, generator=g))
            net.norm.running_var.copy_(torch.rand(num_domains, IN, generator=g) * 2 + 0.2)
    return net.to(dtype)


def _inputs(domain: list[int], dtype=torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    b = len(domain)
    h = torch.randn(b, IN, generator=g) * 1.5 + 0.5
    return h.to(dtype), torch.tensor(domain), torch.randn(b, A, generator=g).to(dtype)


# every index works: padding 0, __other__ 1, the last one; repeated, single and absent domains
DOMAINS = [3, 0, 6, 3, 1, 0, 3, 2, 6, 1, 3]


def _reference(net: StarNetwork, h, domain, emb, stats=None) -> torch.Tensor:
    """Per domain in a Python loop: PN with ``stats[d] = (mean, var)`` (eval: the running
    ones), ``W_shared * W_d`` and ``b_shared + b_d`` built for that domain and applied to
    its rows, ReLU on hidden layers only, plus the auxiliary logit."""
    out = torch.empty(h.shape[0], dtype=h.dtype)
    last = len(net.layers) - 1
    for d in sorted(set(domain.tolist())):
        rows = domain == d
        x = h[rows]
        if net.norm is not None:
            pn = net.norm
            mean, var = stats[d] if stats is not None else (pn.running_mean[d], pn.running_var[d])
            x = (x - mean) / torch.sqrt(var + pn.eps)
            x = x * (pn.weight * pn.domain_weight[d]) + (pn.bias + pn.domain_bias[d])
        for i, layer in enumerate(net.layers):
            w = layer.weight * layer.domain_weight[d].view_as(layer.weight)  # (N, M): this domain's W*
            x = x @ w.t() + (layer.bias + layer.domain_bias[d])
            if i < last:
                x = torch.relu(x)
        out[rows] = x[:, 0]
    return out + net.aux(emb)[:, 0]


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("form", FORMS)
def test_eval_uses_each_samples_own_domain_weights(form, norm):
    net = _net(norm=norm).eval()
    net.matmul_form = form
    h, domain, emb = _inputs(DOMAINS)
    got = net(h, domain, emb)
    assert got.shape == (len(DOMAINS),)
    torch.testing.assert_close(got, _reference(net, h, domain, emb), rtol=1e-12, atol=1e-12)
    assert net.use_grouped(group_domains(domain)) is (form != "per_sample")
    # the domains matter: the same rows under other domains give other logits
    shifted = (domain + 1) % P
    assert (net(h, shifted, emb) - got).abs().min() > 1e-6


def test_auto_form_groups_on_cpu_and_few_domains_elsewhere():
    net = _net(num_domains=GROUPED_MAX_DOMAINS + 5).eval()
    domain = list(range(GROUPED_MAX_DOMAINS + 5)) * 2
    h, d, emb = _inputs(domain)
    assert net.use_grouped(group_domains(d))  # CPU: always grouped
    torch.testing.assert_close(net(h, d, emb), _reference(net, h, d, emb), rtol=1e-12, atol=1e-12)
    for k, grouped in ((GROUPED_MAX_DOMAINS, True), (GROUPED_MAX_DOMAINS + 1, False)):
        on_device = group_domains(torch.arange(k))._replace(ids=torch.empty(k, device="meta"))
        assert net.use_grouped(on_device) is grouped


def test_fresh_domains_all_equal_the_shared_network():
    """Init ``W_p = 1``, ``b_p = 0``, ``gamma_p = 1``, ``beta_p = 0``: every domain starts
    as the shared network (the aux input held fixed)."""
    net = _net(noise=False).eval()
    h, _, emb = _inputs([0] * 4)
    logits = [net(h, torch.full((4,), d), emb) for d in range(P)]
    for other in logits[1:]:
        torch.testing.assert_close(other, logits[0], rtol=0, atol=0)


@pytest.mark.parametrize("form", ["grouped", "per_sample"])
def test_eval_prediction_does_not_depend_on_the_batch(form):
    net = _net().eval()
    net.matmul_form = form
    h, domain, emb = _inputs(DOMAINS)
    together = net(h, domain, emb)
    for i in range(len(DOMAINS)):
        alone = net(h[i : i + 1], domain[i : i + 1], emb[i : i + 1])
        torch.testing.assert_close(alone, together[i : i + 1], rtol=1e-13, atol=1e-13)


def _batch_stats(h, domain, running_mean, running_var):
    """Per domain: the biased mean/variance of its rows, or its running stats if it has
    a single row."""
    stats = {}
    for d in set(domain.tolist()):
        rows = h[domain == d]
        if rows.shape[0] >= 2:
            stats[d] = (rows.mean(0), rows.var(0, unbiased=False))
        else:
            stats[d] = (running_mean[d].clone(), running_var[d].clone())
    return stats


@pytest.mark.parametrize("form", ["grouped", "per_sample"])
def test_training_pn_uses_each_domains_own_batch_statistics(form):
    net = _net().train()
    net.matmul_form = form
    h, domain, emb = _inputs(DOMAINS)  # domain 2 has one row: running statistics
    stats = _batch_stats(h, domain, net.norm.running_mean, net.norm.running_var)
    reference = _reference(net, h, domain, emb, stats)
    torch.testing.assert_close(net(h, domain, emb), reference, rtol=1e-12, atol=1e-12)


def test_training_pn_of_a_domain_ignores_the_other_domains_rows():
    net = _net().train()
    h, domain, emb = _inputs(DOMAINS)
    mine = domain == 3
    changed = h.clone()
    # not an affine map of the other domains' rows: their own PN would undo that
    other = torch.randn(int((~mine).sum()), IN, generator=torch.Generator().manual_seed(5), dtype=h.dtype)
    changed[~mine] = other * 3.0 - 1.0
    for module in (net.norm, net):  # PN alone, and the whole training forward
        args = (domain,) if module is net.norm else (domain, emb)
        before = copy.deepcopy(module)(h, *args)
        after = copy.deepcopy(module)(changed, *args)
        torch.testing.assert_close(after[mine], before[mine], rtol=0, atol=0)
        assert (after[~mine] - before[~mine]).abs().max() > 0.1  # the change did reach others
    # a plain BatchNorm over the mixed batch would move domain 3's rows
    bn = torch.nn.BatchNorm1d(IN).double().train()
    assert (bn(changed)[mine] - bn(h)[mine]).abs().max() > 0.1


def test_running_statistics_update_per_domain_in_training_only():
    net = _net()
    pn = net.norm
    h, domain, emb = _inputs(DOMAINS)
    mean0, var0 = pn.running_mean.clone(), pn.running_var.clone()
    net.eval()(h, domain, emb)
    assert torch.equal(pn.running_mean, mean0) and torch.equal(pn.running_var, var0)
    net.train()(h, domain, emb)
    m = pn.momentum
    for d in range(P):
        rows = h[domain == d]
        if rows.shape[0] >= 2:  # updated with this domain's rows only
            torch.testing.assert_close(pn.running_mean[d], (1 - m) * mean0[d] + m * rows.mean(0))
            unbiased = rows.var(0, unbiased=True)
            torch.testing.assert_close(pn.running_var[d], (1 - m) * var0[d] + m * unbiased)
        else:  # absent (4, 5) or a single row (2): untouched
            assert torch.equal(pn.running_mean[d], mean0[d]) and torch.equal(pn.running_var[d], var0[d])
    assert {d for d in range(P) if not torch.equal(pn.running_mean[d], mean0[d])} == {0, 1, 3, 6}


def test_every_domains_weights_are_registered_and_trained_only_by_its_rows():
    net = _net()
    dims = [IN, *HIDDEN, 1]
    specific = P * sum(n * m + n for m, n in itertools.pairwise(dims))
    parts = net.parameter_count_by_part()
    assert parts["specific"] == specific
    assert parts["shared"] == sum(n * m + n for m, n in itertools.pairwise(dims))
    assert parts["norm"] == 2 * IN + 2 * P * IN
    assert parts["aux"] == (A * 4 + 4) + (4 + 1)
    assert sum(parts.values()) == sum(p.numel() for p in net.parameters())
    names = dict(net.named_parameters())
    for i, (m, n) in enumerate(itertools.pairwise(dims)):
        assert names[f"layers.{i}.domain_weight"].shape == (P, n * m)  # row p: W_p flattened
        assert names[f"layers.{i}.domain_bias"].shape == (P, n)
    present = [0, 2, 5, 5, 2, 2]
    h, domain, emb = _inputs(present)
    net.train()(h, domain, emb).square().sum().backward()
    per_domain = [(name, p) for name, p in names.items() if p.shape[0] == P and p.ndim >= 2]
    assert len(per_domain) == 2 * len(net.layers) + 2  # FCN W_p, b_p per layer; PN gamma_p, beta_p
    for name, p in per_domain:
        for d in range(P):
            assert p.grad.is_sparse  # only the batch's domains: lazy updates
            touched = p.grad.to_dense()[d].abs().sum() > 0
            assert touched == (d in present), (name, d)
    for name in ("layers.0.weight", "layers.0.bias", "norm.weight", "norm.bias", "aux.0.weight"):
        assert names[name].grad.abs().sum() > 0, name


def test_domain_weight_gradients_list_each_batch_domain_once_in_order():
    """The FCN's W_p, b_p gradients list each present domain once, ascending (the lazy
    optimiser reads them without another sort), with the values of a dense gradient."""
    net = _net().train()
    h, domain, emb = _inputs([5, 0, 2, 5, 2, 2])
    net(h, domain, emb).square().sum().backward()
    sparse = {name: p.grad for name, p in net.named_parameters() if name.startswith("layers.") and "domain" in name}
    dense = _net().train()
    for layer in dense.layers:  # the same network with dense W_p, b_p reads
        layer.composite = lambda ids, layer=layer: (
            layer.weight * layer.domain_weight[ids].view(-1, layer.out_dim, layer.in_dim),
            layer.bias + layer.domain_bias[ids],
        )
    dense(h, domain, emb).square().sum().backward()
    for name, p in dense.named_parameters():
        if name in sparse:
            assert sparse[name]._indices().tolist() == [[0, 2, 5]], name
            torch.testing.assert_close(sparse[name].to_dense(), p.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(star._GROUPED_MM is None, reason="torch < 2.9 has no grouped GEMM kernel")
@pytest.mark.parametrize("widths", [(16, (8, 4)), (5, (3, 2))])  # aligned rows; rows padded to 16 bytes
def test_grouped_kernel_equals_the_per_domain_loop(widths, monkeypatch):
    """float32 on the CPU: one grouped-GEMM kernel per layer (forward, and both products of
    the backward) gives the per-domain loop's logits and gradients."""
    in_dim, hidden = widths
    domain = torch.tensor([3, 0, 6, 3, 1, 0, 3, 2, 6, 1, 3, 3, 5])
    runs = []
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(star, "_GROUPED_MM", None)
        torch.manual_seed(0)
        net = StarNetwork(in_dim, hidden, P, A, aux_hidden=(4,))
        perturb(net, seed=0)
        net.matmul_form = "grouped"
        gen = torch.Generator().manual_seed(1)
        h = torch.randn(len(domain), in_dim, generator=gen).requires_grad_()
        emb = torch.randn(len(domain), A, generator=gen)
        assert grouped_kernel_fits(h, net.layers[0].weight) is kernel
        logits = net.train()(h, domain, emb)
        (logits * torch.linspace(-1, 1, len(domain))).sum().backward()
        grads = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad) for n, p in net.named_parameters()}
        runs.append((logits.detach(), h.grad, grads))
    (logits, h_grad, grads), (loop_logits, loop_h_grad, loop_grads) = runs
    torch.testing.assert_close(logits, loop_logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h_grad, loop_h_grad, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, loop_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not grouped_kernel_fits(h.double(), net.layers[0].weight.double())  # float64: the loop


def test_the_logit_is_linear_no_relu_at_the_end():
    net = _net().eval()
    h, domain, emb = _inputs(DOMAINS)
    with torch.no_grad():
        net.layers[-1].bias.fill_(-50.0)  # a ReLU'd logit could not go below the aux logit
    main = net.main_logit(h, domain)
    assert (main < -10).all()
    torch.testing.assert_close(net(h, domain, emb), main + net.aux(emb)[:, 0])
    logits = _net().eval()(h, domain, emb)
    assert (logits < 0).any() and (logits > 0).any()


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("form", ["grouped", "per_sample"])
def test_fold_keeps_the_eval_logits(form, norm):
    net = _net(torch.float32, norm=norm).eval()
    net.matmul_form = form
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = net.fold()
    assert isinstance(folded, FoldedStarNetwork) and not folded.training
    assert list(folded.parameters()) == []  # everything is a buffer
    assert not any(isinstance(m, StarLinear) for m in folded.modules())
    stored = sum(folded.numel_by_part().values())
    assert stored == sum(b.numel() for b in folded.buffers())
    assert stored < sum(p.numel() for p in net.parameters()) + sum(b.numel() for b in net.buffers())
    h, domain, emb = _inputs(DOMAINS, torch.float32)
    with torch.no_grad():
        expected = net(h, domain, emb)
        torch.testing.assert_close(folded(h, domain, emb), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(folded.train()(h, domain, emb), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(folded.fold()(h, domain, emb), expected, rtol=0, atol=1e-6)
    assert expected.abs().max() > 0.1  # the comparison is not between near-zeros
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


class _ShapeLog(TorchDispatchMode):
    """Records ``(op, output shape)`` of every aten op run inside it that creates a
    tensor (an in-place op returns its existing target: the running statistics'
    ``index_copy_`` writes K rows of a ``(P, E_in)`` buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__.endswith("_"):
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.log.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("form", ["grouped", "per_sample"])
@pytest.mark.parametrize("training", [False, True])
def test_forward_work_grows_with_the_batch_not_with_the_domains(form, training):
    """Every tensor a forward creates has the same shape at P = 13 and P = 1000: nothing
    is computed per domain of the table, only per row or per domain of the batch."""
    domain = [0, 1, 5, 5, 11, 3, 3, 3]
    b, k = len(domain), len(set(domain))
    logs = {}
    for num_domains in (13, 1000):  # 13: no layer's N * M (the flattened W_p rows) equals it
        net = _net(torch.float32, num_domains=num_domains).train(training)
        net.matmul_form = form
        h, d, emb = _inputs(domain, torch.float32)
        with _ShapeLog() as shapes:
            net(h, d, emb)
        logs[num_domains] = shapes.log
    assert logs[13] == logs[1000]
    sizes = {shape for _, shape in logs[1000]}
    assert not any(1000 in shape or 13 in shape for shape in sizes)
    dims = [IN, *HIDDEN, 1]
    for m, n in itertools.pairwise(dims):
        assert (k, n, m) in sizes  # the present domains' W_p o W
        assert ((b, n, m) in sizes) is (form == "per_sample")  # gathered per sample for one bmm


def test_inputs_are_checked():
    net = _net()
    h, domain, emb = _inputs([0, 1, 2])
    for bad in (torch.tensor([0, 1, P]), torch.tensor([0, -1, 2])):
        with pytest.raises(ValueError, match="domain ids"):
            net(h, bad, emb)
    with pytest.raises(ValueError, match="domain must be"):
        net(h, domain.double(), emb)
    with pytest.raises(ValueError, match="h must be"):
        net(h[:, :-1], domain, emb)
    with pytest.raises(ValueError, match="domain_emb must be"):
        net(h, domain, emb[:2])
    net.matmul_form = "loop"
    with pytest.raises(ValueError, match="matmul_form"):
        net(h, domain, emb)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"in_dim": 0}, "in_dim"),
        ({"num_domains": 0}, "num_domains"),
        ({"domain_dim": 0}, "domain_dim"),
        ({"hidden_units": (4, 0)}, "hidden_units"),
        ({"hidden_units": (4.5,)}, "hidden_units"),
        ({"aux_hidden": (-1,)}, "aux_hidden"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"momentum": 0.0}, "momentum"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, name):
    args = {"in_dim": IN, "hidden_units": HIDDEN, "num_domains": P, "domain_dim": A} | kwargs
    with pytest.raises(ValueError, match=name):
        StarNetwork(args.pop("in_dim"), args.pop("hidden_units"), args.pop("num_domains"),
                    args.pop("domain_dim"), **args)


def test_no_hidden_layers_and_dropout_work():
    net = StarNetwork(IN, (), P, A, aux_hidden=(), dropout=0.5).double()
    h, domain, emb = _inputs(DOMAINS)
    net.eval()
    expected = _reference(net, h, domain, emb)
    torch.testing.assert_close(net(h, domain, emb), expected, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(_net(dropout=0.5).train()(h, domain, emb)).all()
