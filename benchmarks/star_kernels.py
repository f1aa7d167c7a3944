"""STAR's costs at many domains, piece by piece: the evidence behind ``LazyAdam.in_place_from``
and behind not adopting a size-class ``bmm`` for STAR's per-domain products
(docs/benchmarks.md §6).

On one Zipf(1.1) batch of 1024 rows over P domains (the K distinct domains of
``benchmarks/multidomain_step.py``'s batch), hidden [128, 64, 32] on a 128-wide input:

1. ``LazyAdam``, one step on K sparse rows of each width in ``--row-widths``: rows updated in
   place (one fused-kernel tensor per row) against gathered into a buffer and written back.
2. STAR's four layers' products, forward and both backward products (``x``'s and the
   per-domain weights' gradients), three forms: torch's grouped GEMM (what STAR runs on the
   CPU); one ``bmm`` per size class of domains (rows padded to the next power of two) with
   each class's weights gathered; the same with the weights already laid out class by class
   (each class's matrices a view). All three are checked equal first.
3. With ``--profile``: one STAR training step at P under torch's profiler, its costliest
   operators per step.

Medians of ``--repeats`` timed calls. Needs torch only; from a source checkout::

    python benchmarks/star_kernels.py
    python benchmarks/star_kernels.py --domains 1000 --row-widths 2048,4096,16384 --profile
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from dynamic_ctr.models.star import DomainGroups, _GroupedMatmul, group_domains  # noqa: E402
from dynamic_ctr.training.optimizers import LazyAdam  # noqa: E402

LAYERS = [(128, 128), (64, 128), (32, 64), (1, 32)]  # (N, M): hidden [128, 64, 32] and the logit


def median_ms(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def zipf_domains(domains: int, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(domains)
    zipf = 1.0 / torch.arange(1, domains + 1, dtype=torch.float64) ** 1.1
    return torch.multinomial(zipf, batch, replacement=True, generator=gen)


# ------------------------------------------------------------------ 1. LazyAdam


def lazy_adam_ms(rows: torch.Tensor, domains: int, width: int, in_place: bool, repeats: int) -> float:
    """One step of LazyAdam over ``rows`` of a (P, width) table, with both moments live."""
    table = torch.nn.Parameter(torch.ones(domains, width))
    values = torch.randn(len(rows), width, generator=torch.Generator().manual_seed(width))
    table.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, table.shape, is_coalesced=True, check_invariants=True)
    opt = LazyAdam([table], lr=1e-3)
    opt.in_place_from = 0 if in_place else width + 1
    return median_ms(opt.step, repeats)


# ------------------------------------------------------------------ 2. the per-domain products


class SizeClasses:
    """The batch's domains in classes of sizes (2^(j-1), 2^j]: ``order`` (K,) lists the
    present domains class by class; per class, its slice of ``order`` and the padded row
    index matrix (K_j, 2^j) into the domain-sorted batch (padding -> row B, zeros)."""

    def __init__(self, groups: DomainGroups, batch: int) -> None:
        counts = groups.counts
        size_class = torch.ceil(torch.log2(counts.double())).long()
        self.order = torch.argsort(size_class, stable=True)  # ids order within a class
        starts = groups.offsets.long() - counts
        self.classes = []
        first = 0
        for j, k_j in zip(*torch.unique_consecutive(size_class[self.order], return_counts=True), strict=True):
            members = self.order[first : first + int(k_j)]
            width = torch.arange(1 << int(j))
            rows = torch.where(width < counts[members, None], starts[members, None] + width, batch)
            self.classes.append((first, first + int(k_j), rows))
            first += int(k_j)


def size_class_products(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, plan: SizeClasses,
                        laid_out: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward ``(B, N)``, ``x``'s gradient ``(B, M)`` and the weights' gradient ``(K, N, M)``
    (in class order when ``laid_out``, else in ``weight``'s order), one ``bmm`` per class.
    ``weight`` is in class order when ``laid_out`` (each class a view), else in ids order
    (each class gathered)."""
    b, m = x.shape
    xp = torch.cat([x, x.new_zeros(1, m)])
    gp = torch.cat([grad, grad.new_zeros(1, grad.shape[1])])
    out = x.new_empty(b + 1, weight.shape[1])
    grad_x = x.new_empty(b + 1, m)
    grad_w = torch.empty_like(weight)
    for first, last, rows in plan.classes:
        w = weight[first:last] if laid_out else weight.index_select(0, plan.order[first:last])
        x_j, g_j = xp[rows], gp[rows]  # (K_j, S, M), (K_j, S, N)
        out.index_copy_(0, rows.flatten(), torch.bmm(x_j, w.transpose(1, 2)).flatten(0, 1))
        grad_x.index_copy_(0, rows.flatten(), torch.bmm(g_j, w).flatten(0, 1))
        gw = torch.bmm(g_j.transpose(1, 2), x_j)
        if laid_out:
            grad_w[first:last] = gw
        else:
            grad_w.index_copy_(0, plan.order[first:last], gw)
    return out[:b], grad_x[:b], grad_w


def grouped_products(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
                     groups: DomainGroups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    out = _GroupedMatmul.apply(x, weight, groups.offsets)
    grad_x, grad_w = torch.autograd.grad(out, [x, weight], grad)
    return out.detach(), grad_x, grad_w


def products(groups: DomainGroups, batch: int, repeats: int) -> dict[str, float]:
    plan = SizeClasses(groups, batch)
    k = len(groups.sizes)
    gen = torch.Generator().manual_seed(0)
    total = {"grouped GEMM": 0.0, "size classes, weights gathered": 0.0, "size classes, weights laid out": 0.0}
    for n, m in LAYERS:
        x, grad = torch.randn(batch, m, generator=gen), torch.randn(batch, n, generator=gen)
        weight = torch.randn(k, n, m, generator=gen)
        laid_out = weight[plan.order].contiguous()
        reference = grouped_products(x, weight, grad, groups)
        for got, w_order in ((size_class_products(x, weight, grad, plan, False), None),
                             (size_class_products(x, laid_out, grad, plan, True), plan.order)):
            got = (*got[:2], got[2] if w_order is None else torch.empty_like(got[2]).index_copy_(0, w_order, got[2]))
            for a, b in zip(got, reference, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        total["grouped GEMM"] += median_ms(partial(grouped_products, x, weight, grad, groups), repeats)
        total["size classes, weights gathered"] += median_ms(
            partial(size_class_products, x, weight, grad, plan, False), repeats)
        total["size classes, weights laid out"] += median_ms(
            partial(size_class_products, x, laid_out, grad, plan, True), repeats)
    return total


# ------------------------------------------------------------------ 3. a profiled STAR step


def profile_star_step(domains: int, batch: int, steps: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import multidomain_step as md  # the benchmark's own STAR case

    case = md.make_case("star", domains, argparse.Namespace(batch=batch, min_block_ms=1.0), torch.device("cpu"))
    for _ in range(3):
        case.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            case.step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    print(f"\nSTAR training step at P={domains:,} under the profiler: {total:.1f} ms of operator time a step")
    print("| operator | ms / step (self) | calls / step |\n|---|---|---|")
    for e in events[:8]:
        print(f"| {e.key} | {e.self_cpu_time_total / steps / 1e3:.1f} | {e.count / steps:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", type=int, default=1000, help="P")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--row-widths", default="2048,4096,16384", help="LazyAdam's row widths (numbers per row)")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--profile", action="store_true", help="also profile one STAR training step")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    groups = group_domains(zipf_domains(args.domains, args.batch))
    k = len(groups.sizes)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; P={args.domains:,}, batch {args.batch}: "
          f"K={k} distinct domains")

    print("\n| row width | LazyAdam in place (ms) | gathered (ms) |\n|---|---|---|")
    for width in (int(w) for w in args.row_widths.split(",") if w.strip()):
        in_place = lazy_adam_ms(groups.ids, args.domains, width, True, args.repeats)
        gathered = lazy_adam_ms(groups.ids, args.domains, width, False, args.repeats)
        print(f"| {width:,} | {in_place:.2f} | {gathered:.2f} |")

    print(f"\nSTAR's products, layers {LAYERS} (N, M), forward + both backward products, summed over the layers:")
    print("| form | ms |\n|---|---|")
    for name, ms in products(groups, args.batch, args.repeats).items():
        print(f"| {name} | {ms:.1f} |")
    if args.profile:
        profile_star_step(args.domains, args.batch, steps=10)


if __name__ == "__main__":
    main()
