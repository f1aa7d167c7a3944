"""DynInt: memory and time of the factorised dynamic parameters against their direct forms.

DynInt-DGP and DynInt-DWP (``dynamic_ctr.models.dynint``) never build the per-instance
``(B, R, R)`` matrix of eqs. (5)-(6): DGP computes ``U (sigma^(i) o (V^T X_0))`` and DWP
``sum_p diag(u~_p) W diag(v~_p) X_0`` by row/column broadcasting (§3.5.1-3.5.2). §3.5.3
claims that this cuts the memory of the instance-aware parameter matrix by 99% (DGP) and
80% (DWP) at K = F/10. This script measures it, one training step at a time.

Contenders (``PolynomialInteraction`` of 3 PIN layers on ``x0 (B, F, D)``, same generators,
same readout, same loss; only the layers' ``mix`` = ``W^(i) X_0`` differs):

  xdeepint      mode "static": ``W X_0`` with a shared W (the floor)
  dgp           the project's ``GeneratedPINLayer``: ``U (sigma o (V^T X_0))``
  dgp-direct    :class:`DirectGeneratedPINLayer`: ``W_i = U diag(sigma_i) V^T`` built per
                instance (``(B, R, R)``), then ``bmm(W_i, X_0)``
  dwp           the project's ``WeightedPINLayer`` as it trains: the smaller of its two
                exact forms (factorised when K d <= R, else direct)
  dwp-factorised  the same layer held to eq. (10), ``sum_p u~_p o (W (v~_p o X_0))``
  dwp-direct    the same layer held to ``G_i = sum_p u~_p v~_p^T`` built per instance
                (one ``(B, R, K) x (B, K, R)`` bmm), ``W_i = G_i o W``, then ``bmm(W_i, X_0)``

The DGP direct layer subclasses the project's layer and overrides ``mix`` only, so it has
the same parameters and generator; the direct network is the factorised one with its
layers swapped and the state dict copied. DWP's two forms are the project's own
(``WeightedPINLayer.mix_factorised`` / ``mix_direct``). Before timing, the script asserts (float64, batch 8,
random non-trivial parameters so that every instance gets its own sigma / u~, v~) that
the two forms give the same logits, the same penalty and the same gradients.

A training step is forward + loss (BCE on random labels + 1e-4 * ``penalty()``) +
backward + Adam (foreach). ``x0`` requires grad (it stands for the embeddings' output).

Columns (MB = MiB; the three "saved" columns are counted with
``torch.autograd.graph.saved_tensors_hooks`` over one forward: the storages of the tensors
autograd saves for backward, each storage once, parameters and ``x0`` excluded; they are
deterministic and machine independent):

  dyn MB    the instance-aware parameters the L ``mix`` calls keep for backward: saved
            tensors that do not depend on X_0 through autograd (``sigma``, ``u~``/``v~``,
            a built ``W_i``/``G_i``, ``U diag(sigma_i)``). The scope of §3.5.3's claim.
  mix MB    everything the L ``mix`` calls (``W^(i) X_0``) keep for backward: ``dyn`` plus
            the X_0-dependent intermediates of the computation paradigm.
  saved MB  the same over the whole forward (generators, PIN residuals, penalty, readout).
  peak MB   measured peak of bytes allocated during one training step above what was
            allocated before it (torch.profiler CPU allocation events; saved activations,
            gradients and temporaries; parameters, Adam state and input excluded).
  ms        milliseconds per training step, median over ``--repeats`` interleaved rounds
            (every contender one timed block per round, in a fresh random order).
  x xDI     median paired per-round time ratio to xDeepInt (same round).
  paper     §3.5.3's analytic reduction at this B, R, K: DGP
            ``1 - (B K^2 + 2 R K) / (B R^2)``, DWP ``1 - (2 B R K + R^2) / (B R^2)``.

Ratios factorised / direct (memory and paired time) are printed per (h, K) under the table,
then the three targets per h: DGP memory reduction >= 95% and DWP >= 75% at K = 4 (the
paper's K = F/10 for F = 39), DGP step time <= 1.5x xDeepInt's at K = 4. Each memory target
is judged on every memory column: the paper's scope (``dyn``) and what a training step
really holds (``mix``, ``saved``, ``peak``).

Needs torch only (no Kedro, no pandas); runs from a source checkout::

    python benchmarks/dynint_memory.py                    # F=39, D=16, h=1, K=4,8,16, B=4096
    python benchmarks/dynint_memory.py --subspaces 2,4 --ranks 4 --repeats 5   # sub-spaces
    python benchmarks/dynint_memory.py --threads 1 --quiet 0.6 --max-other 0.6  # one busy neighbour

The default run takes about 1.5 minutes on 2 CPU cores (the factorised DWP at K = 16 alone
about 3.6 s a step).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _machine import add_quiet_arguments, interleaved_rounds  # noqa: E402
from apg_table5 import fmt, machine_line, median, paired_ratio, peak_bytes, spread, timed  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from dynamic_ctr.models.dynint import (  # noqa: E402
    GeneratedPINLayer,
    PolynomialInteraction,
)

CONTENDERS = ("xdeepint", "dgp", "dgp-direct", "dwp", "dwp-factorised", "dwp-direct")
FACTORISED = {"dgp": "dgp", "dwp": "dwp-factorised"}  # the factorised contender of each mode
PENALTY_RATE = 1e-4
MEMORY = {  # measured memory columns and what they cover
    "dyn": "instance-aware parameters kept for backward, the paper's scope",
    "mix": "everything W^(i) X_0 keeps for backward",
    "saved": "the whole forward's saved activations",
    "peak": "measured peak of the training step",
}


class DirectGeneratedPINLayer(GeneratedPINLayer):
    """DGP, direct form: ``W_i = U diag(sigma_i) V^T`` built per instance, then applied.

    Same parameters, generator and output as :class:`GeneratedPINLayer`.
    """

    def mix(self, x0: Tensor, generated: dict[str, Tensor]) -> Tensor:
        us = self.U * generated["sigma"].unsqueeze(1)  # (B, R, K): U diag(sigma_i)
        w = torch.matmul(us, self.V.t())  # (B, R, R): W_i
        return torch.bmm(w, x0)  # (B, R, d)


DIRECT = {"dgp": DirectGeneratedPINLayer}


def build(name: str, args: argparse.Namespace, subspaces: int, rank: int) -> PolynomialInteraction:
    """Contender ``name``; the factorised and direct forms of a mode share their weights."""
    mode = "static" if name == "xdeepint" else name.split("-")[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = PolynomialInteraction(
            args.fields, args.dim, layers=args.layers, subspaces=subspaces, mode=mode,
            rank=rank, reduction=args.reduction,
        )
    if mode == "dwp" and name != "dwp":  # hold the layer to one of its two exact forms
        for layer in net.layers:
            layer.factorised = name == "dwp-factorised"
    elif name.endswith("-direct"):
        rows, width = args.fields * subspaces, args.dim // subspaces
        for i, layer in enumerate(net.layers):
            direct = DIRECT[mode](rows, width, rank, args.reduction)
            direct.load_state_dict(layer.state_dict())
            net.layers[i] = direct
    return net


def loss_fn(net: PolynomialInteraction, x0: Tensor, y: Tensor) -> Tensor:
    logits = net(x0)
    return nn.functional.binary_cross_entropy_with_logits(logits, y) + PENALTY_RATE * net.penalty()


def check_equal(args: argparse.Namespace, subspaces: int, rank: int) -> None:
    """Assert: direct and factorised forms give the same logits, penalty and gradients."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, args.fields, args.dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=gen).double()
    for mode in ("dgp", "dwp"):
        fact = build(FACTORISED[mode], args, subspaces, rank).double()
        with torch.no_grad():  # non-trivial values: every instance its own sigma / u~, v~
            for p in fact.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        direct = build(mode + "-direct", args, subspaces, rank).double()
        direct.load_state_dict(fact.state_dict())
        results = []
        for net in (fact, direct):
            xi = x.clone().requires_grad_(True)
            logits = net(xi)
            penalty = net.penalty()
            loss = nn.functional.binary_cross_entropy_with_logits(logits, y) + penalty
            grads = torch.autograd.grad(loss, [xi, *net.parameters()])
            results.append((logits.detach(), penalty.detach(), grads))
        (l1, p1, g1), (l2, p2, g2) = results
        assert logits.shape == (8,)
        assert torch.allclose(l1, l2, rtol=1e-10, atol=1e-10), f"{mode} h={subspaces} K={rank}: logits differ"
        assert torch.allclose(p1, p2, rtol=1e-10, atol=1e-10), f"{mode} h={subspaces} K={rank}: penalty differs"
        for a, b in zip(g1, g2, strict=True):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-10), f"{mode} h={subspaces} K={rank}: gradients differ"
        assert l1.std() > 1e-3, "degenerate check: all logits equal"


@contextmanager
def saved_bytes(net: nn.Module, x0: Tensor) -> Iterator[dict[str, int]]:
    """Bytes of the storages autograd saves for backward inside the block.

    Fills ``{"dyn": .., "mix": .., "total": ..}``: ``total`` every saved storage, ``mix``
    those first saved inside a layer's ``mix``, ``dyn`` the part of ``mix`` that does
    not depend on ``x0`` through autograd: the instance-aware parameters and their
    factors (``sigma``, ``u~``/``v~``, a built ``W_i`` or ``G_i``), computed from the
    generators' gradient-blocked input and the shared weights only. Each storage counts
    once (where it was first saved); storages of ``net``'s parameters and of ``x0`` do
    not count.
    """
    skip = {p.untyped_storage().data_ptr() for p in [*net.parameters(), x0]}
    seen: dict[int, tuple[int, str]] = {}
    scope = ["other"]
    reaches: dict[object, bool] = {}  # autograd node -> does it lead back to x0?

    def from_x0(node: object) -> bool:
        stack, order = [node], []
        while stack:  # iterative DFS, results memoised per node
            n = stack.pop()
            if n is None or n in reaches:
                continue
            if getattr(n, "variable", None) is not None:  # AccumulateGrad of a leaf
                reaches[n] = n.variable is x0
                continue
            order.append(n)
            stack.extend(child for child, _ in n.next_functions)
        for n in reversed(order):
            reaches[n] = any(reaches.get(child, False) for child, _ in n.next_functions if child is not None)
        return reaches.get(node, False) if node is not None else False

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key and key not in skip and key not in seen:
            kind = scope[-1]
            if kind == "mix" and not from_x0(t.grad_fn):
                kind = "dyn"
            seen[key] = (storage.nbytes(), kind)
        return t

    def scoped(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def wrapper(*a, **k) -> Tensor:
            scope.append("mix")
            try:
                return fn(*a, **k)
            finally:
                scope.pop()
        return wrapper

    result: dict[str, int] = {}
    for layer in net.layers:  # instance attribute shadows the class's mix; removed below
        layer.mix = scoped(layer.mix)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield result
    finally:
        for layer in net.layers:
            del layer.mix
    result["dyn"] = sum(n for n, s in seen.values() if s == "dyn")
    result["mix"] = result["dyn"] + sum(n for n, s in seen.values() if s == "mix")
    result["total"] = sum(n for n, _ in seen.values())


@dataclass
class Case:
    name: str
    subspaces: int
    rank: int
    net: PolynomialInteraction
    step: Callable[[], None]
    params: int
    n: int = 1
    dyn_mb: float = math.nan
    mix_mb: float = math.nan
    saved_mb: float = math.nan
    peak_mb: float = math.nan
    ms: list[float] = field(default_factory=list)

    @property
    def key(self) -> tuple[int, int, str]:
        return (self.subspaces, self.rank, self.name)


def make_case(name: str, args: argparse.Namespace, subspaces: int, rank: int, x0: Tensor, y: Tensor) -> Case:
    net = build(name, args, subspaces, rank)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, foreach=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        x0.grad = None
        loss_fn(net, x0, y).backward()
        opt.step()

    case = Case(name, subspaces, rank, net, step, sum(p.numel() for p in net.parameters()))
    with saved_bytes(net, x0) as got:
        loss = loss_fn(net, x0, y)
    del loss  # frees the graph
    case.dyn_mb, case.mix_mb, case.saved_mb = (got[k] / 2**20 for k in ("dyn", "mix", "total"))
    step()  # warm-up; Adam's state exists after it
    case.n = max(1, math.ceil(args.min_block_ms / max(timed(step, 1, torch.device("cpu")), 1e-3)))
    opt.zero_grad(set_to_none=True)
    x0.grad = None
    case.peak_mb = peak_bytes(step, torch.device("cpu")) / 2**20
    return case


def paper_reduction(mode: str, batch: int, rows: int, rank: int) -> float:
    direct = batch * rows * rows
    if mode == "dgp":
        return 1 - (batch * rank * rank + 2 * rows * rank) / direct
    return 1 - (2 * batch * rows * rank + rows * rows) / direct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--fields", type=int, default=39, help="F (Criteo: 39)")
    parser.add_argument("--dim", type=int, default=16, help="D")
    parser.add_argument("--layers", type=int, default=3, help="PIN layers L")
    parser.add_argument("--subspaces", default="1", help="comma-separated h (sub-spaces; R = F*h rows of width D/h)")
    parser.add_argument("--ranks", default="4,8,16", help="comma-separated K")
    parser.add_argument("--reduction", type=int, default=4, help="generators' reduction ratio r")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds")
    parser.add_argument("--min-block-ms", type=float, default=100.0, help="minimum length of a timed block")
    add_quiet_arguments(parser, "round", timeout=10.0, budget=30.0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hs = [int(v) for v in args.subspaces.split(",") if v.strip()]
    ranks = [int(v) for v in args.ranks.split(",") if v.strip()]
    for h in hs:
        if args.dim % h:
            parser.error(f"--subspaces {h} must divide --dim {args.dim}")
        bad = [k for k in ranks if not 1 <= k <= args.fields * h]
        if bad:
            parser.error(f"--ranks {bad} out of [1, F*h = {args.fields * h}]")
    t_start = time.perf_counter()
    device = torch.device("cpu")
    print(machine_line(device))
    print(
        f"PolynomialInteraction, F={args.fields}, D={args.dim}, L={args.layers}, r={args.reduction}, "
        f"B={args.batch}, float32, step = forward + BCE + {PENALTY_RATE:g} * penalty + backward + Adam, "
        f"{args.repeats} interleaved rounds"
    )

    for h in hs:
        for k in ranks:
            check_equal(args, h, k)
    print(f"check: direct == factorised (logits, penalty, gradients; float64, B=8) for h in {hs}, K in {ranks}: ok")

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, args.fields, args.dim, generator=gen).requires_grad_(True)
    y = torch.randint(0, 2, (args.batch,), generator=gen).float()
    cases: list[Case] = []
    for h in hs:
        cases.append(make_case("xdeepint", args, h, 0, x0, y))
        for k in ranks:
            for name in CONTENDERS[1:]:
                cases.append(make_case(name, args, h, k, x0, y))
    by_key = {c.key: c for c in cases}

    rounds, shares, discarded = interleaved_rounds(args, cases, lambda c: timed(c.step, c.n, device), key=lambda c: c.key)
    for got in rounds:
        for c in cases:
            c.ms.append(got[c.key])

    print(
        "\n| h | K | model | params | dyn MB | mix MB | saved MB | peak MB | ms | spread | x xDI |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for c in cases:
        floor = by_key[(c.subspaces, 0, "xdeepint")]
        print(
            f"| {c.subspaces} | {c.rank or '-'} | {c.name} | {c.params:,} | {c.dyn_mb:.2f} | {c.mix_mb:.2f} | "
            f"{c.saved_mb:.1f} | {c.peak_mb:.1f} | {median(c.ms):.1f} | {fmt(spread(c.ms), '.0%')} | "
            f"{paired_ratio(c.ms, floor.ms):.2f} |"
        )
    valid = [s for s in shares if not math.isnan(s)]
    if valid:
        print(
            f"\nother processes' CPU share during the kept rounds: median {statistics.median(valid):.0%}, "
            f"max {max(valid):.0%}; {discarded} disturbed round(s) repeated"
        )

    print(
        "\nfactorised / direct: memory ratio (change), paired time ratio; paper = §3.5.3's analytic "
        "reduction of the instance-aware parameter storage\n\n"
        "| h | K | mode | paper | dyn MB | mix MB | saved MB | peak MB | time |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    ratios: dict[tuple[int, int, str], dict[str, float]] = {}
    for h in hs:
        for k in ranks:
            for mode in ("dgp", "dwp"):
                f, d = by_key[(h, k, FACTORISED[mode])], by_key[(h, k, mode + "-direct")]
                r = {m: getattr(f, f"{m}_mb") / getattr(d, f"{m}_mb") for m in MEMORY}
                r["time"] = paired_ratio(f.ms, d.ms)
                ratios[(h, k, mode)] = r
                paper = paper_reduction(mode, args.batch, args.fields * h, k)
                cells = " | ".join(f"{r[m]:.3f} ({r[m] - 1:+.1%})" for m in MEMORY)
                print(f"| {h} | {k} | {mode} | -{paper:.1%} | {cells} | {r['time']:.2f}x |")

    print(f"\nTargets (total run {time.perf_counter() - t_start:.0f}s):")
    if 4 not in ranks:
        print("  K = 4 not in --ranks: targets not evaluated")
        return
    for h in hs:
        for mode, target in (("dgp", 0.95), ("dwp", 0.75)):
            r = ratios[(h, 4, mode)]
            if mode == "dwp":
                chosen = "factorised" if build("dwp", args, h, 4).layers[0].factorised else "direct"
                print(f"  [h={h} K=4] dwp trains in its {chosen} form (K d {'<=' if chosen == 'factorised' else '>'} R)")
            for m in MEMORY:
                red = 1 - r[m]
                print(f"  [h={h} K=4] {mode} memory reduction >= {target:.0%} ({MEMORY[m]}): {red:.1%} -> "
                      f"{'met' if red >= target else 'NOT met'}")
        rt = paired_ratio(by_key[(h, 4, "dgp")].ms, by_key[(h, 0, "xdeepint")].ms)
        print(f"  [h={h} K=4] dgp step time <= 1.5x xDeepInt: {rt:.2f}x -> {'met' if rt <= 1.5 else 'NOT met'}")

if __name__ == "__main__":
    main()
