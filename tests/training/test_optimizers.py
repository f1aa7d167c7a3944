"""FTRL and GroupFTRL against plain NumPy references, pytorch-optimizer, and each other;
LazyAdam against torch.optim.SparseAdam."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from dynamic_ctr.training.optimizers import FTRL, GroupFTRL, LazyAdam

HP = {"lr": 0.5, "beta": 1.0, "l1": 0.3, "l2": 0.1}


# --------------------------------------------------------------------------- references
def ref_ftrl_step(w, z, n, g, lr, beta, l1, l2):
    """McMahan et al. 2013, Algorithm 1, one coordinate at a time (in place)."""
    for i in np.ndindex(w.shape):
        sigma = (math.sqrt(n[i] + g[i] ** 2) - math.sqrt(n[i])) / lr
        z[i] += g[i] - sigma * w[i]
        n[i] += g[i] ** 2
        if z[i] == 0 and n[i] == 0:  # never received a non-zero gradient: keep w
            continue
        if abs(z[i]) <= l1:
            w[i] = 0.0
        else:
            w[i] = -(z[i] - math.copysign(l1, z[i])) / ((beta + math.sqrt(n[i])) / lr + l2)


def ref_group_ftrl_step(w, z, n, g, lr, beta, l1, l2):
    """Group-lasso FTRL, one row (group) at a time, coordinates in loops (in place)."""
    rows, d = w.shape
    for r in range(rows):
        for j in range(d):
            sigma = (math.sqrt(n[r, j] + g[r, j] ** 2) - math.sqrt(n[r, j])) / lr
            z[r, j] += g[r, j] - sigma * w[r, j]
            n[r, j] += g[r, j] ** 2
        if all(z[r, j] == 0 and n[r, j] == 0 for j in range(d)):
            continue
        norm = math.sqrt(sum(z[r, j] ** 2 for j in range(d)))
        threshold = l1 * math.sqrt(d)
        for j in range(d):
            if norm <= threshold:
                w[r, j] = 0.0
            else:
                den = (beta + math.sqrt(n[r, j])) / lr + l2
                w[r, j] = -(1 - threshold / norm) * z[r, j] / den


def _run(opt_cls, params, grads_per_step, **hp):
    opt = opt_cls(params, **hp)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return opt


def _random_problem(seed, shapes, steps=5):
    rng = np.random.default_rng(seed)
    w0 = [rng.normal(0, 0.5, s) for s in shapes]
    # gradients of varied scale per step, some coordinates exactly zero at times
    grads = []
    for _ in range(steps):
        gs = []
        for s in shapes:
            g = rng.normal(0, 1.0, s) * rng.uniform(0.1, 2.0)
            g[rng.random(s) < 0.15] = 0.0
            gs.append(g)
        grads.append(gs)
    return w0, grads


# --------------------------------------------------------------------------- vs NumPy
def test_ftrl_matches_numpy_reference():
    shapes = [(4, 3), (5,)]
    w0, grads = _random_problem(0, shapes)
    hp = {**HP, "l1": 1.0}  # large enough for some exact zeros
    params = [nn.Parameter(torch.tensor(w, dtype=torch.float64)) for w in w0]
    opt = _run(FTRL, params, [[torch.tensor(g) for g in gs] for gs in grads], **hp)

    for k, p in enumerate(params):
        w, z, n = w0[k].copy(), np.zeros(shapes[k]), np.zeros(shapes[k])
        for gs in grads:
            ref_ftrl_step(w, z, n, gs[k], **hp)
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=0, atol=1e-6)
        np.testing.assert_allclose(opt.state[p]["z"].numpy(), z, rtol=0, atol=1e-6)
        np.testing.assert_allclose(opt.state[p]["n"].numpy(), n, rtol=0, atol=1e-6)
        # the test is not vacuous: weights moved, and some but not all are L1 zeros
        assert not np.allclose(w, w0[k])
    all_w = np.concatenate([p.detach().numpy().ravel() for p in params])
    assert 0 < (all_w == 0).sum() < all_w.size


def test_group_ftrl_matches_numpy_reference():
    shapes = [(6, 4), (5,)]  # a table and a 1-d parameter (per-coordinate fallback)
    w0, grads = _random_problem(1, shapes)
    hp = {**HP, "l1": 0.6}
    params = [nn.Parameter(torch.tensor(w, dtype=torch.float64)) for w in w0]
    opt = _run(GroupFTRL, params, [[torch.tensor(g) for g in gs] for gs in grads], **hp)

    w, z, n = w0[0].copy(), np.zeros(shapes[0]), np.zeros(shapes[0])
    for gs in grads:
        ref_group_ftrl_step(w, z, n, gs[0], **hp)
    np.testing.assert_allclose(params[0].detach().numpy(), w, rtol=0, atol=1e-6)
    np.testing.assert_allclose(opt.state[params[0]]["z"].numpy(), z, rtol=0, atol=1e-6)
    np.testing.assert_allclose(opt.state[params[0]]["n"].numpy(), n, rtol=0, atol=1e-6)
    # group and per-coordinate rules give different answers here
    w_coord, zc, nc = w0[0].copy(), np.zeros(shapes[0]), np.zeros(shapes[0])
    for gs in grads:
        ref_ftrl_step(w_coord, zc, nc, gs[0], **hp)
    assert not np.allclose(w, w_coord, atol=1e-3)

    b, zb, nb = w0[1].copy(), np.zeros(shapes[1]), np.zeros(shapes[1])
    for gs in grads:
        ref_ftrl_step(b, zb, nb, gs[1], **hp)
    np.testing.assert_allclose(params[1].detach().numpy(), b, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- exact zeros
def test_ftrl_l1_gives_exact_zeros_where_abs_z_le_l1():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(8, 5, dtype=torch.float64))
    opt = FTRL([p], lr=0.5, beta=1.0, l1=1.5, l2=0.0)
    scale = torch.linspace(0.05, 2.0, 8, dtype=torch.float64)[:, None]  # weak ... strong rows
    for _ in range(5):
        p.grad = torch.randn(8, 5, dtype=torch.float64) * scale + scale
        opt.step()
    z = opt.state[p]["z"]
    w = p.detach()
    small = z.abs() <= 1.5
    assert 0 < small.sum() < small.numel()
    assert torch.equal(w[small], torch.zeros_like(w[small]))  # exactly 0.0
    assert (w[~small] != 0).all()


def test_group_ftrl_zeroes_whole_rows():
    torch.manual_seed(0)
    rows, d, l1 = 8, 5, 1.0
    p = nn.Parameter(torch.randn(rows, d, dtype=torch.float64) * 0.1)
    opt = GroupFTRL([p], lr=0.5, beta=1.0, l1=l1, l2=0.0)
    scale = torch.linspace(0.05, 2.0, rows, dtype=torch.float64)[:, None]
    for _ in range(5):
        g = torch.randn(rows, d, dtype=torch.float64) * scale + scale
        # rows 0 and 1: one strong column, the rest ~0 -> |z_0| > l1 but ||z|| < l1 sqrt(d)
        g[:2] = 0.01 * torch.randn(2, d, dtype=torch.float64)
        g[:2, 0] += 0.35
        p.grad = g
        opt.step()
    z = opt.state[p]["z"]
    norm = torch.linalg.vector_norm(z, dim=1)
    dropped = norm <= l1 * math.sqrt(d)
    assert dropped.tolist() == [True, True] + [False] * (rows - 2)
    w = p.detach()
    assert torch.equal(w[:2], torch.zeros(2, d, dtype=torch.float64))  # whole rows exactly 0.0
    assert (w[2:] != 0).all()  # kept rows have no zero entries
    # per-coordinate FTRL would have kept the strong column of the zeroed rows
    assert (z[:2, 0].abs() > l1).all()


# --------------------------------------------------------------------------- sparse == dense
@pytest.mark.parametrize("opt_cls", [FTRL, GroupFTRL])
def test_sparse_and_dense_gradients_agree(opt_cls):
    vocab, dim, steps = 30, 4, 6
    torch.manual_seed(0)
    sparse = nn.Embedding(vocab, dim, sparse=True, dtype=torch.float64)
    dense = nn.Embedding(vocab, dim, sparse=False, dtype=torch.float64)
    dense.weight.data.copy_(sparse.weight.data)
    w0 = sparse.weight.detach().clone()
    hp = {"lr": 0.3, "beta": 1.0, "l1": 0.05, "l2": 0.01}
    opt_s, opt_d = opt_cls(sparse.parameters(), **hp), opt_cls(dense.parameters(), **hp)

    gen = torch.Generator().manual_seed(1)
    touched = torch.zeros(vocab, dtype=torch.bool)
    first_touch = {}
    for step in range(steps):
        # indices < 25 only (rows 25.. never touched); repeats make an uncoalesced grad
        x = torch.randint(0, 25 if step else 10, (8, 3), generator=gen)
        y = torch.randn(8, dim, generator=gen, dtype=torch.float64)
        for emb, opt in ((sparse, opt_s), (dense, opt_d)):
            opt.zero_grad(set_to_none=True)
            loss = ((emb(x).sum(dim=1) - y) ** 2).sum()
            loss.backward()
            opt.step()
        assert sparse.weight.grad.is_sparse and not dense.weight.grad.is_sparse
        for i in x.unique().tolist():
            first_touch.setdefault(i, step)
        touched[x.unique()] = True

    assert any(s > 0 for s in first_touch.values())  # rows first touched after step 1
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(opt_s.state[sparse.weight]["z"], opt_d.state[dense.weight]["z"])
    torch.testing.assert_close(opt_s.state[sparse.weight]["n"], opt_d.state[dense.weight]["n"])
    # never-touched rows: weights and state untouched
    assert not touched[25:].any()
    assert torch.equal(sparse.weight[~touched], w0[~touched])
    assert (opt_s.state[sparse.weight]["n"][~touched] == 0).all()
    assert not torch.allclose(sparse.weight[touched], w0[touched])


def test_group_ftrl_sparse_coordinate_listed_gradient():
    """A COO gradient with sparse_dim=2 updates whole touched rows, like its dense form."""
    torch.manual_seed(0)
    w0 = torch.randn(6, 3, dtype=torch.float64)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt_a, opt_b = GroupFTRL([a], l1=0.2), GroupFTRL([b], l1=0.2)
    idx = torch.tensor([[1, 1, 4], [0, 2, 1]])
    vals = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    for _ in range(3):
        a.grad = torch.sparse_coo_tensor(idx, vals, (6, 3), check_invariants=True)
        b.grad = a.grad.to_dense()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.equal(a.detach()[[0, 2, 3, 5]], w0[[0, 2, 3, 5]])


# --------------------------------------------------------------------------- the sqrt bug
def test_sqrt_bug():
    """sigma = (sqrt(n + g^2) - sqrt(n)) / alpha, not sqrt(n + g^2) / alpha - sqrt(n).

    Two public PyTorch FTRL ports use the latter. Both agree at n = 0 (step 1) or
    alpha = 1, so this takes two steps with alpha = 0.5 and a non-zero weight.
    """
    alpha, beta, w0, g1, g2 = 0.5, 1.0, 0.7, 0.6, -0.8

    def two_steps(sigma_fn):
        w, z, n = w0, 0.0, 0.0
        for g in (g1, g2):
            z += g - sigma_fn(n, g) * w
            n += g * g
            w = -z / ((beta + math.sqrt(n)) / alpha)
        return w

    correct = two_steps(lambda n, g: (math.sqrt(n + g * g) - math.sqrt(n)) / alpha)
    buggy = two_steps(lambda n, g: math.sqrt(n + g * g) / alpha - math.sqrt(n))
    assert correct == pytest.approx(0.275)  # worked by hand: z = -1.1, den = 4
    assert abs(correct - buggy) > 1e-2

    for opt_cls in (FTRL, GroupFTRL):
        p = nn.Parameter(torch.tensor([[w0]], dtype=torch.float64))
        grads = [[torch.tensor([[g]], dtype=torch.float64)] for g in (g1, g2)]
        _run(opt_cls, [p], grads, lr=alpha, beta=beta)
        assert p.item() == pytest.approx(correct, abs=1e-12)


# --------------------------------------------------------------------------- pytorch-optimizer
@pytest.mark.parametrize("foreach", [False, True])
def test_ftrl_matches_pytorch_optimizer(foreach):
    """pytorch-optimizer's FTRL (4.x) implements the same Algorithm 1.

    Mapping: lr = alpha, beta = beta, lambda_1 = l1, lambda_2 = l2, lr_power = -0.5
    (its sigma is (n_new^-lr_power - n^-lr_power) / lr; its denominator always uses
    sqrt(n)). Its defaults differ (lr=1e-3, beta=0), so all are passed. Where it
    differs: a coordinate that has only seen zero gradients is set to 0 by it and
    kept at its initial value by ours; with non-zero gradients, or w0 = 0, the two
    agree exactly. It also rejects sparse gradients.
    """
    po = pytest.importorskip("pytorch_optimizer")
    shapes = [(5, 4), (7,)]
    rng = np.random.default_rng(3)
    w0 = [rng.normal(0, 0.5, s) for s in shapes]
    grads = [[rng.normal(0, 1.0, s) for s in shapes] for _ in range(6)]  # non-zero a.s.
    hp = {"lr": 0.4, "beta": 0.5, "l1": 0.4, "l2": 0.2}

    ours = [nn.Parameter(torch.tensor(w)) for w in w0]
    theirs = [nn.Parameter(torch.tensor(w)) for w in w0]
    _run(FTRL, ours, [[torch.tensor(g) for g in gs] for gs in grads], **hp)
    _run(
        po.FTRL,
        theirs,
        [[torch.tensor(g) for g in gs] for gs in grads],
        lr=hp["lr"],
        beta=hp["beta"],
        lambda_1=hp["l1"],
        lambda_2=hp["l2"],
        lr_power=-0.5,
        foreach=foreach,
    )
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    all_w = torch.cat([p.detach().ravel() for p in ours])
    assert 0 < (all_w == 0).sum() < all_w.numel()  # L1 branch exercised on both sides


# --------------------------------------------------------------------------- hyper-parameters
@pytest.mark.parametrize("opt_cls", [FTRL, GroupFTRL])
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": 0.0}, "alpha"),
        ({"lr": -0.1}, "alpha"),
        ({"lr": float("nan")}, "alpha"),
        ({"beta": -1.0}, "beta"),
        ({"l1": -0.1}, "l1"),
        ({"l2": -1e-3}, "l2"),
    ],
)
def test_bad_hyper_parameters_raise(opt_cls, kwargs, name):
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=name):
        opt_cls([p], **kwargs)
    with pytest.raises(ValueError, match=name):  # per-group values are checked too
        opt_cls([{"params": [p], **kwargs}])


def test_bad_hyper_parameters_all_named():
    with pytest.raises(ValueError) as err:
        FTRL([nn.Parameter(torch.zeros(1))], lr=-1, beta=-1, l1=-1, l2=-1)
    for name in ("alpha", "beta", "l1", "l2"):
        assert name in str(err.value)


def test_float32_embedding_trains_and_stays_finite():
    """Plain use: float32 embedding, beta=0, l2=0 (zero-denominator guard), loss falls."""
    torch.manual_seed(0)
    for opt_cls, sparse in [(c, s) for c in (FTRL, GroupFTRL) for s in (True, False)]:
        emb = nn.Embedding(50, 8, sparse=sparse)
        opt = opt_cls(emb.parameters(), lr=0.1, beta=0.0, l1=0.0, l2=0.0)
        x = torch.randint(0, 50, (64, 2))
        y = torch.randn(64)
        losses = []
        for _ in range(20):
            opt.zero_grad()
            loss = ((emb(x).sum(dim=(1, 2)) - y) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert torch.isfinite(emb.weight).all()
        assert losses[-1] < 0.5 * losses[0]


# --------------------------------------------------------------------------- LazyAdam


def _sparse_steps(opt_cls, steps: int = 6, **kwargs) -> tuple[list[torch.Tensor], dict]:
    """Two row-sparse parameters (an embedding table read with duplicate and missing ids,
    a (P, N * M) matrix read one row per id, as STAR's), trained a few steps."""
    torch.manual_seed(0)
    table = nn.Parameter(torch.randn(10, 4, dtype=torch.float64))
    rows = nn.Parameter(torch.randn(7, 6, dtype=torch.float64))
    opt = opt_cls([table, rows], **kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        ids = torch.randint(0, 6, (9,), generator=gen)  # duplicates; ids 6-9 never read
        picked = torch.unique(torch.randint(0, 7, (3,), generator=gen))
        loss = nn.functional.embedding(ids, table, sparse=True).square().sum()
        loss = loss + (nn.functional.embedding(picked, rows, sparse=True) * (step + 1)).sin().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return [table.detach(), rows.detach()], opt.state_dict()


@pytest.mark.parametrize("in_place_from", [0, 10**9], ids=["rows-in-place", "rows-gathered"])
def test_lazy_adam_equals_sparse_adam(in_place_from, monkeypatch):
    monkeypatch.setattr(LazyAdam, "in_place_from", in_place_from)
    kwargs = {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6}
    ours, ours_state = _sparse_steps(LazyAdam, **kwargs)
    torchs, torch_state = _sparse_steps(torch.optim.SparseAdam, **kwargs)
    for a, b in zip(ours, torchs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for key, state in torch_state["state"].items():  # same state, same names
        assert ours_state["state"][key]["step"] == state["step"]
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours_state["state"][key][name], state[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("in_place_from", [0, 10**9], ids=["rows-in-place", "rows-gathered"])
@pytest.mark.parametrize("flagged", [True, False])
def test_lazy_adam_reads_distinct_ascending_rows_without_coalescing(flagged, in_place_from, monkeypatch):
    """STAR's per-domain rows arrive distinct and ascending (autograd drops the coalesced
    flag): they are read as they are; only other gradients are coalesced. Row counts that
    grow and shrink between steps reuse the scratch buffer, which is not state."""
    monkeypatch.setattr(LazyAdam, "in_place_from", in_place_from)
    coalesced = []
    original = torch.Tensor.coalesce
    monkeypatch.setattr(torch.Tensor, "coalesce", lambda t: coalesced.append(t._nnz()) or original(t))
    torch.manual_seed(0)
    w0 = torch.randn(9, 2, 3, dtype=torch.float64)  # rows of any shape
    ours, torchs = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt, reference = LazyAdam([ours], lr=0.1, eps=1e-5), torch.optim.SparseAdam([torchs], lr=0.1, eps=1e-5)
    steps = ([4], [0, 2, 7, 8], [1, 2], [0, 1, 2, 3, 4, 5], [3, 1, 3])  # the last: unordered, repeated
    for step, rows in enumerate(steps):
        ids = torch.tensor(rows)
        values = torch.randn(len(rows), 2, 3, dtype=torch.float64) * (step + 1)
        flag = flagged and step < len(steps) - 1 or None  # a flag only where it is true
        ours.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), values, w0.shape, is_coalesced=flag, check_invariants=True)
        torchs.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), values, w0.shape, check_invariants=True)
        opt.step()
        coalesced_by_us = list(coalesced)
        reference.step()
        torch.testing.assert_close(ours.detach(), torchs.detach(), rtol=1e-12, atol=1e-12)
        assert coalesced_by_us == ([3] if step == len(steps) - 1 else []), step
        coalesced.clear()
    assert set(opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert torch.equal(ours.detach()[6], w0[6])  # never listed


@pytest.mark.parametrize("opt_cls", [FTRL, GroupFTRL])
def test_ftrl_reads_distinct_ascending_rows_without_coalescing(opt_cls, monkeypatch):
    """The FTRL optimisers share LazyAdam's reading of sparse gradients: rows already
    distinct and ascending are not sorted again, and the update equals the dense one."""
    coalesced = []
    original = torch.Tensor.coalesce
    monkeypatch.setattr(torch.Tensor, "coalesce", lambda t: coalesced.append(t._nnz()) or original(t))
    torch.manual_seed(0)
    w0 = torch.randn(6, 3, dtype=torch.float64)
    sparse, dense = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt_s, opt_d = opt_cls([sparse], **HP), opt_cls([dense], **HP)
    for rows in ([1, 4], [0, 1, 5], [2, 4, 2]):  # the last: unordered, repeated
        ids = torch.tensor(rows)
        values = torch.randn(len(rows), 3, dtype=torch.float64)
        sparse.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), values, w0.shape, check_invariants=True)
        dense.grad = sparse.grad.to_dense()
        coalesced.clear()
        opt_s.step()
        assert coalesced == ([3] if rows == [2, 4, 2] else []), rows
        opt_d.step()
        torch.testing.assert_close(sparse.detach(), dense.detach(), rtol=0, atol=1e-12)


def test_lazy_adam_leaves_unread_rows_alone():
    torch.manual_seed(0)
    table = nn.Parameter(torch.randn(5, 3))
    before = table.detach().clone()
    opt = LazyAdam([table], lr=0.1)
    nn.functional.embedding(torch.tensor([1, 3, 3]), table, sparse=True).sum().backward()
    opt.step()
    moved = (table.detach() != before).any(dim=1)
    assert moved.tolist() == [False, True, False, True, False]
    assert opt.state[table]["exp_avg"][[0, 2, 4]].abs().sum() == 0


def test_lazy_adam_resumes_from_its_state_dict():
    def train(table: nn.Parameter, opt: LazyAdam, steps: range) -> None:
        for step in steps:
            ids = torch.tensor([step % 4, (step + 1) % 4, 1])
            opt.zero_grad(set_to_none=True)
            (nn.functional.embedding(ids, table, sparse=True) * step).cos().sum().backward()
            opt.step()

    torch.manual_seed(0)
    table = nn.Parameter(torch.randn(4, 2, dtype=torch.float64))
    opt = LazyAdam([table], lr=0.1)
    train(table, opt, range(3))
    saved_weights, saved_state = table.detach().clone(), copy.deepcopy(opt.state_dict())
    train(table, opt, range(3, 6))  # uninterrupted
    resumed = nn.Parameter(saved_weights)
    again = LazyAdam([resumed], lr=0.1)
    again.load_state_dict(saved_state)
    train(resumed, again, range(3, 6))  # after a restart
    torch.testing.assert_close(resumed.detach(), table.detach(), rtol=0, atol=0)
    assert again.state[resumed]["step"] == 6


def test_lazy_adam_rejects_dense_gradients_and_bad_values():
    p = nn.Parameter(torch.ones(3, 2))
    (p * 2).sum().backward()
    with pytest.raises(RuntimeError, match=r"shape \(3, 2\) got a dense gradient"):
        LazyAdam([p]).step()
    with pytest.raises(ValueError, match=r"lr=0 must be a positive.*betas=\(0.9, 1.0\).*eps=inf must be"):
        LazyAdam([p], lr=0, betas=(0.9, 1.0), eps=math.inf)
