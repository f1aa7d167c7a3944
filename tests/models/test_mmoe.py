"""MMoE (models.mmoe): per-domain gates and towers against a per-row loop reference,
softmax gates, routing (a domain's parameters move only its rows), training on a tiny
problem, parameter counts, cost independent of the number of domains, argument errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from modelkit import perturb
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dynamic_ctr.models.mmoe import MMoENetwork
from dynamic_ctr.training.loop import TrainConfig, make_optimizer

IN, P, X, EXPERTS, TOWER = 6, 7, 3, (5, 4), (3,)

pytestmark = pytest.mark.usefixtures("single_thread")


def _net(dtype=torch.float64, num_domains: int = P, noise: bool = True, **kwargs) -> MMoENetwork:
    torch.manual_seed(0)
    kwargs = {"num_experts": X, "expert_units": EXPERTS, "tower_units": TOWER} | kwargs
    net = MMoENetwork(IN, num_domains, **kwargs)
    return (perturb(net) if noise else net).to(dtype)


# every index works: padding 0, __other__ 1, the last one; repeated and absent domains
DOMAINS = [3, 0, 6, 3, 1, 0, 3, 2, 6, 1, 3]


def _inputs(domain: list[int], dtype=torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(domain), IN, generator=g).to(dtype), torch.tensor(domain)


def _reference(net: MMoENetwork, h, domain) -> tuple[torch.Tensor, torch.Tensor]:
    """Row by row: each expert as its own stack of ``Linear -> ReLU``, the row's domain's
    gate ``softmax(W_g x + b_g)`` and tower (ReLU on hidden layers, linear logit).
    Returns the logits ``(B,)`` and the gates ``(B, X)``."""
    logits, gates = [], []
    for x, d in zip(h, domain.tolist()):
        outputs = []
        for i in range(net.num_experts):
            e = x
            for w, b in zip(net.expert_weights, net.expert_biases):
                e = torch.relu(w[i] @ e + b[i])
            outputs.append(e)
        gate = torch.softmax(net.gate_weight[d] @ x + net.gate_bias[d], dim=0)  # (X,)
        t = sum(g * e for g, e in zip(gate, outputs))
        last = len(net.tower_weights) - 1
        for j, (w, b) in enumerate(zip(net.tower_weights, net.tower_biases)):
            t = w[d] @ t + b[d]
            if j < last:
                t = torch.relu(t)
        logits.append(t[0])
        gates.append(gate)
    return torch.stack(logits), torch.stack(gates)


@pytest.mark.parametrize("tower_units", [TOWER, (), (4, 3)])
def test_each_row_uses_its_domains_gate_and_tower(tower_units):
    net = _net(tower_units=tower_units).eval()
    h, domain = _inputs(DOMAINS)
    logits, gates = _reference(net, h, domain)
    got = net(h, domain)
    assert got.shape == (len(DOMAINS),)
    torch.testing.assert_close(got, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.gates(h, domain), gates, rtol=1e-12, atol=1e-12)
    assert (net(h, (domain + 1) % P) - got).abs().min() > 1e-6  # the domain matters
    assert (got < 0).any() and (got > 0).any()  # linear logit


def test_gates_are_softmax_over_the_experts():
    net = _net()
    h, domain = _inputs(DOMAINS)
    gates = net.gates(h * 4, domain)
    assert gates.shape == (len(DOMAINS), X)
    assert (gates >= 0).all()
    torch.testing.assert_close(gates.sum(1), torch.ones(len(DOMAINS), dtype=gates.dtype))
    assert (gates.max(1).values - gates.min(1).values).min() > 1e-3  # not all uniform


@pytest.mark.parametrize("part", ["gate_weight", "gate_bias", "tower_weights.0", "tower_biases.1"])
def test_a_domains_parameters_move_only_its_rows(part):
    net = _net().eval()
    h, domain = _inputs(DOMAINS)
    before = net(h, domain).detach()
    with torch.no_grad():
        param = net.get_parameter(part)
        g = torch.Generator().manual_seed(2)
        param[3] += torch.randn(param[3].shape, generator=g, dtype=param.dtype)
    after = net(h, domain).detach()
    mine = domain == 3
    torch.testing.assert_close(after[~mine], before[~mine], rtol=0, atol=0)
    assert (after[mine] - before[mine]).abs().min() > 1e-6


def test_gradients_reach_shared_experts_and_only_present_domains():
    """The gates' and towers' gradients are row-sparse, list the batch's rows only, and
    equal the row-by-row reference's dense gradients; the experts' are dense."""
    net = _net()
    present = [0, 2, 5, 5, 2]
    h, domain = _inputs(present)
    net(h, domain).square().sum().backward()
    got = {name: p.grad for name, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    _reference(net, h, domain)[0].square().sum().backward()
    per_domain = {id(p) for p in net.parameter_roles()["domain"]}
    for name, p in net.named_parameters():
        assert got[name] is not None, name
        if name.startswith(("gate_", "tower_")):
            assert id(p) in per_domain and p.shape[0] == P
            assert got[name].is_sparse and got[name].sparse_dim() == 1, name
            assert set(got[name].coalesce().indices()[0].tolist()) == set(present), name
            dense = got[name].to_dense()
            for d in range(P):
                assert (dense[d].abs().sum() > 0) == (d in present), (name, d)
        else:
            assert id(p) not in per_domain and not got[name].is_sparse
            assert got[name].abs().sum() > 0, name
            dense = got[name]
        torch.testing.assert_close(dense, p.grad, rtol=1e-10, atol=1e-12)


def test_without_lazy_domains_the_gradients_are_dense_and_equal():
    """``lazy_domains=False``: the same outputs, dense gradients equal to the sparse ones
    summed out, and no ``domain`` role (plain Adam, DDP and CUDA graphs take them)."""
    lazy, dense = _net(), _net(lazy_domains=False)
    h, domain = _inputs(DOMAINS)
    torch.testing.assert_close(dense(h, domain), lazy(h, domain), rtol=0, atol=0)
    lazy(h, domain).square().sum().backward()
    dense(h, domain).square().sum().backward()
    assert dense.parameter_roles() == {} and lazy.parameter_roles()["domain"]
    for (name, p), q in zip(lazy.named_parameters(), dense.parameters()):
        assert not q.grad.is_sparse, name
        torch.testing.assert_close(p.grad.to_dense() if p.grad.is_sparse else p.grad, q.grad, rtol=1e-12, atol=1e-12)


def test_a_few_adam_steps_lower_the_loss():
    """Tiny problem whose label rule differs by domain (the sign of one input flips)."""
    g = torch.Generator().manual_seed(3)
    b = 96
    h = torch.randn(b, IN, generator=g)
    domain = torch.randint(0, 4, (b,), generator=g)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])[domain]
    y = ((sign * h[:, 0] + 0.5 * h[:, 1]) > 0).float()
    torch.manual_seed(0)
    net = MMoENetwork(IN, 4, num_experts=3, expert_units=(16, 8), tower_units=(4,), dropout=0.1)
    opt = make_optimizer(net, TrainConfig(lr=0.01), torch.device("cpu"))  # LazyAdam for the domains' rows
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(h, domain), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_parameter_counts_by_part_grow_with_the_domains():
    counts = {p: _net(num_domains=p, noise=False).parameter_count_by_part() for p in (2, 200)}
    dims_e, dims_t = [IN, *EXPERTS], [EXPERTS[-1], *TOWER, 1]
    experts = X * sum(m * n + n for m, n in itertools.pairwise(dims_e))
    tower = sum(m * n + n for m, n in itertools.pairwise(dims_t))
    for p, parts in counts.items():
        assert parts == {"experts": experts, "gates": p * X * (IN + 1), "towers": p * tower}
        net = _net(num_domains=p, noise=False)
        assert sum(parts.values()) == sum(q.numel() for q in net.parameters())


class _ShapeLog(TorchDispatchMode):
    """Records the output shape of every tensor-creating aten op run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.overloadpacket.__name__.endswith("_"):
            tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            self.log += [(str(func), tuple(t.shape)) for t in tensors]
        return out


def test_forward_work_grows_with_the_batch_not_with_the_domains():
    domain = [0, 1, 5, 5, 7, 3, 3]
    logs = {}
    for num_domains in (8, 1000):
        net = _net(torch.float32, num_domains=num_domains).train()
        h, d = _inputs(domain, torch.float32)
        with _ShapeLog() as shapes:
            net(h, d)
        logs[num_domains] = shapes.log
    assert logs[8] == logs[1000]
    sizes = {shape for _, shape in logs[1000]}
    assert not any(1000 in shape for shape in sizes)
    assert (len(domain), X, IN) in sizes  # each row's own gate, gathered


def test_inputs_are_checked():
    net = _net()
    h, domain = _inputs([0, 1, 2])
    for bad in (torch.tensor([0, 1, P]), torch.tensor([0, -1, 2])):
        with pytest.raises(ValueError, match="domain ids"):
            net(h, bad)
    with pytest.raises(ValueError, match="domain must be"):
        net(h, domain[:2])
    with pytest.raises(ValueError, match="h must be"):
        net(h[:, :-1], domain)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"in_dim": 0}, "in_dim"),
        ({"num_domains": 0}, "num_domains"),
        ({"num_experts": 0}, "num_experts"),
        ({"expert_units": ()}, "expert_units"),
        ({"expert_units": (4, 0)}, "expert_units"),
        ({"tower_units": (-2,)}, "tower_units"),
        ({"tower_units": ("8",)}, "tower_units"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, name):
    args = {"in_dim": IN, "num_domains": P} | kwargs
    with pytest.raises(ValueError, match=name):
        MMoENetwork(args.pop("in_dim"), args.pop("num_domains"), **args)
