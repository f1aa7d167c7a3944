"""Multi-domain models: training-step time against the DNN backbone as domains grow, and
AdaSparse's pruned serving form against its masked model.

Contenders (``build_model`` families on one synthetic spec: F = 8 categorical fields,
D = 16, E = 128, hidden [128, 64, 32], the domain a field of P + 2 values; AdaSparse §4.1.2):

  dnn         the DNN backbone (the floor)
  star        STAR: partitioned normalisation, shared o per-domain weights, auxiliary net
  star-bmm    the same in its per-sample form (``matmul_form = "per_sample"``: one bmm over
              every row's own gathered weights, instead of the grouped GEMM over the
              batch's present domains)
  mmoe        MMoE, 4 experts [128, 64], one gate and one [32] tower per domain
  apg         DNN + APG v4 (K = 4), group-wise on the domain embedding
  adasparse   DNN + AdaSparse (binarization, pruner on [e_d; h^l], eq. 3)
  adasparse-domain  the same with the pruner on e_d alone
  eq2-floor   the DNN with eq. 2 alone: its layers' inputs times factors from one linear
              map of e_d, once per distinct domain (found from the ids), gathered per row; no
              formulation, regulariser or schedules: the least that a trainable pruner on
              e_d adds to the DNN (``DomainFactorFloor``)

Each at P = 10, 100 and 1,000 domains, batch 1024, domain ids drawn from a Zipf(1.1) law
over the P domains (a long tail, as real partitions have). A step = forward + BCE +
the model's penalty + backward + the training loop's optimiser (``make_optimizer``: Adam,
foreach; STAR's per-domain rows lazily by ``LazyAdam``). Times are medians over ``--repeats``
interleaved rounds (every contender one timed block per round, in a fresh random order),
ratios paired per round (``benchmarks/_machine.py``).

Serving: a binarised AdaSparse DNN with the pruner on ``e_d`` alone, its factors set so
that 25% of every layer's input neurons are zero for the served domain (the paper's
sparsity boundary [0.15, 0.25]); inference (eval, no grad) on 1024 rows of that domain,
the masked model (pruner computed, factors multiplied) against the pruned serving form
(``AdaSparseTower.pruned_for_domain``: the zeroed neurons' rows and columns cut out),
checked equal first.

STAR also runs at the largest P on batches drawn from the smallest P's number of domains
(the most frequent ones): as many domains a batch as at the smallest P, many more stored.
Optimiser: STAR's per-domain rows at the largest P, the sparse gradients of one real batch,
one step of ``torch.optim.SparseAdam`` against the training loop's ``LazyAdam`` (the
same update rule, on the batch's rows only).

Targets: STAR at 1,000 domains within 2x its time at 10; AdaSparse within 1.3x of the
backbone at every P; the pruned form at least 1.15x faster than the masked model.

Needs torch only; from a source checkout::

    python benchmarks/multidomain_step.py
    python benchmarks/multidomain_step.py --domains 10,1000 --repeats 5
    python benchmarks/multidomain_step.py --device cuda   # on a GPU (gpu_session.sh, stage multidomain)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _machine import add_quiet_arguments, interleaved_rounds  # noqa: E402
from apg_table5 import calibrate, fmt, machine_line, median, paired_ratio, spread, timed  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dynamic_ctr.models import build_model  # noqa: E402
from dynamic_ctr.spec import FeatureSpec, FieldSpec  # noqa: E402
from dynamic_ctr.training.device import flush_denormals  # noqa: E402
from dynamic_ctr.training.loop import LAZY_ROLE, TrainConfig, make_optimizer, parameter_roles  # noqa: E402
from dynamic_ctr.training.optimizers import LazyAdam  # noqa: E402

HIDDEN = [128, 64, 32]
CONTENDERS = {
    "dnn": {"family": "dnn"},
    "star": {"family": "star", "star": {"aux_hidden": [32]}},
    "star-bmm": {"family": "star", "star": {"aux_hidden": [32]}},  # matmul_form "per_sample"
    "mmoe": {"family": "mmoe", "mmoe": {"num_experts": 4, "expert_units": [128, 64], "tower_units": [32]}},
    "apg": {"family": "dnn", "apg": {"version": "v4", "rank": 4, "condition": {"mode": "group", "fields": ["domain"]}}},
    "adasparse": {"family": "dnn", "adasparse": {"formulation": "binarization"}},
    "adasparse-domain": {"family": "dnn", "adasparse": {"formulation": "binarization", "pruner_input": "domain"}},
    "eq2-floor": {"family": "dnn"},  # its tower wrapped in DomainFactorFloor
}


class DomainFactorFloor(nn.Module):
    """Eq. 2 with the least a trainable, domain-only pruner computes, around a DNN's
    ``MLPTower``: ``h^{l+1} = act(W^l (h^l o pi^l(d)))``, ``pi(d) = W e_d + b`` for all
    layers at once, computed once per distinct domain of the batch (found from the domain
    ids, set by the model's forward pre-hook) and gathered per row, as ``AdaSparseTower``
    with ``pruner_input="domain"`` does. No formulation (sigmoid, threshold, straight-through),
    no regulariser, no schedules, no search for distinct rows of ``e_d``. ``W = 0, b = 1``
    at the start, so the outputs are the DNN's."""

    def __init__(self, tower: nn.Module, domain_field: int, embedding_dim: int) -> None:
        super().__init__()
        self.tower, self.domain_field = tower, domain_field
        self.widths = [linear.in_features for linear in tower.linears]
        self.pruner = nn.Linear(embedding_dim, sum(self.widths))
        nn.init.zeros_(self.pruner.weight)
        nn.init.ones_(self.pruner.bias)
        self.domain_ids: torch.Tensor | None = None

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        _, inverse = torch.unique(self.domain_ids, return_inverse=True)
        first = torch.empty(int(inverse.max()) + 1, dtype=torch.long, device=h.device).scatter_(
            0, inverse, torch.arange(len(h), device=h.device)
        )
        rows = emb[:, self.domain_field].detach().index_select(0, first)  # (U, D): e_d per distinct domain
        factors = self.pruner(rows).index_select(0, inverse).split(self.widths, dim=1)
        for linear, act, pi in zip(self.tower.linears, self.tower.acts, factors):
            h = act(linear(h * pi))
        return h


def make_spec(domains: int) -> FeatureSpec:
    fields = [FieldSpec(f"f{i}", "categorical", vocab_size=1000) for i in range(7)]
    fields.append(FieldSpec("domain", "categorical", vocab_size=domains + 2, source="domain"))
    return FeatureSpec(tuple(fields), domain_field="domain")


def make_batch(
    spec: FeatureSpec,
    domains: int,
    batch: int,
    gen: torch.Generator,
    present: int | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch whose domain ids follow Zipf(1.1) over the P domains (over the ``present``
    most frequent ones only, if given), drawn on the CPU (the same rows on every device)
    and moved to ``device``."""
    x = torch.randint(2, 1000, (batch, len(spec.fields)), generator=gen)
    zipf = 1.0 / torch.arange(1, (present or domains) + 1, dtype=torch.float64) ** 1.1
    x[:, -1] = 2 + torch.multinomial(zipf, batch, replacement=True, generator=gen)
    y = torch.randint(0, 2, (batch,), generator=gen).float()
    return x.to(device), y.to(device)


@dataclass
class Case:
    name: str
    domains: int
    step: object
    n: int = 1
    ms: list[float] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int]:
        return self.name, self.domains


def make_case(
    name: str, domains: int, args: argparse.Namespace, device: torch.device, present: int | None = None
) -> Case:
    """``name``'s training step at P = ``domains``; ``present`` limits the batch to that
    many distinct domains (the case is then named ``<name>@<present>``)."""
    spec = make_spec(domains)
    gen = torch.Generator().manual_seed(present or domains)
    x, y = make_batch(spec, domains, args.batch, gen, present, device)
    model = build_model({**CONTENDERS[name], "embedding_dim": 16, "hidden_units": HIDDEN, "seed": 0}, spec)
    model = model.to(device).train()
    if name == "star-bmm":
        model.net.matmul_form = "per_sample"
    if name == "eq2-floor":
        with torch.no_grad():
            plain = model(x)
        model.dense = floor = DomainFactorFloor(model.dense, len(spec.fields) - 1, 16).to(device)
        model.register_forward_pre_hook(lambda _, inputs: setattr(floor, "domain_ids", inputs[0][:, -1]))
        with torch.no_grad():  # factors of 1: the DNN's own outputs
            assert torch.equal(model(x), plain), "eq2-floor at its initial factors differs from the DNN"
    optimizer = make_optimizer(model, TrainConfig(lr=1e-3), device)  # as training does
    penalty = getattr(model, "penalty", None)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        extra = penalty() if callable(penalty) else None
        (loss if extra is None else loss + extra).backward()
        optimizer.step()

    case = Case(name if present is None else f"{name}@{present}", domains, step)
    case.n = calibrate(step, device, args.min_block_ms)
    return case


def distinct_domains(domains: int, batch: int) -> int:
    """Distinct domains in the benchmark's batch at P = ``domains`` (the K of STAR's cost)."""
    spec = make_spec(domains)
    x, _ = make_batch(spec, domains, batch, torch.Generator().manual_seed(domains))
    return int(x[:, -1].unique().numel())


def optimiser_cases(domains: int, args: argparse.Namespace, device: torch.device) -> tuple[Case, Case]:
    """One step of SparseAdam and of LazyAdam on STAR's per-domain rows, with the sparse
    gradients of one batch (the same gradients every step)."""
    spec = make_spec(domains)
    x, y = make_batch(spec, domains, args.batch, torch.Generator().manual_seed(domains), device=device)
    model = build_model({**CONTENDERS["star"], "embedding_dim": 16, "hidden_units": HIDDEN, "seed": 0}, spec)
    model = model.to(device).train()
    nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
    roles = parameter_roles(model)
    lazy = [p for p in model.parameters() if roles.get(id(p)) == LAZY_ROLE]
    assert lazy and all(p.grad.is_sparse for p in lazy)

    def stepper(optimizer: torch.optim.Optimizer):
        def run() -> None:
            optimizer.step()  # grads stay: both coalesce a copy and never write them
        return run

    cases = (Case("sparseadam", domains, stepper(torch.optim.SparseAdam(lazy, lr=1e-3))),
             Case("lazyadam", domains, stepper(LazyAdam(lazy, lr=1e-3))))
    for c in cases:
        c.n = calibrate(c.step, device, args.min_block_ms)
    return cases


def serving_cases(args: argparse.Namespace, device: torch.device) -> tuple[Case, Case]:
    """The masked and the pruned AdaSparse model of one domain at 25% sparsity."""
    spec = make_spec(100)
    model = build_model({"family": "dnn", "embedding_dim": 16, "hidden_units": HIDDEN, "seed": 0,
                         "adasparse": {"formulation": "binarization", "pruner_input": "domain"}}, spec)
    model = model.to(device).eval()
    tower = model.dense
    with torch.no_grad():
        tower.alpha.fill_(5.0)  # annealed: the paper's upper limit
        gen = torch.Generator().manual_seed(7)
        for pruner in tower.pruners:  # factors 0 for a fixed random quarter of each layer's inputs
            width = pruner.out_features
            pruned = torch.randperm(width, generator=gen)[: width // 4]
            pruner.weight.zero_()
            pruner.bias.fill_(10.0)
            pruner.bias[pruned] = -10.0
    x, _ = make_batch(spec, 1, args.batch, torch.Generator().manual_seed(1), device=device)  # one domain: id 2
    x[:, -1] = 2
    e_d = tower.domain_embedding(model.embedding(x[:1]))[0]
    served = copy.deepcopy(model)
    served.dense = tower.pruned_for_domain(e_d)
    with torch.no_grad():
        diff = (served(x) - model(x)).abs().max().item()
        sparsity = tower.sparsity(model.embedding(x).flatten(1), model.embedding(x))
    assert diff <= 1e-5, f"pruned serving form differs from the masked model by {diff}"
    print(f"serving check: pruned == masked (max abs logit diff {diff:.2e}); sparsity per layer {[round(s, 3) for s in sparsity]}")

    def infer(m: nn.Module):
        def run() -> None:
            with torch.no_grad():
                m(x)
        return run

    cases = (Case("masked", 0, infer(model)), Case("pruned", 0, infer(served)))
    for c in cases:
        c.n = calibrate(c.step, device, args.min_block_ms)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: every model, batch and optimiser on the GPU")
    parser.add_argument("--domains", default="10,100,1000", help="comma-separated P")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help=f"comma-separated subset of {', '.join(CONTENDERS)} (dnn, the floor, is always run)")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds")
    parser.add_argument("--min-block-ms", type=float, default=200.0, help="minimum length of a timed block")
    add_quiet_arguments(parser, "round", timeout=10.0, budget=30.0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    flush_denormals()  # as the pipeline's training and evaluation do (see its docstring)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    sizes = [int(v) for v in args.domains.split(",") if v.strip()]
    names = ["dnn", *(n for n in CONTENDERS if n != "dnn" and n in args.contenders.split(","))]
    unknown = set(args.contenders.split(",")) - set(CONTENDERS)
    if unknown:
        parser.error(f"--contenders: unknown {sorted(unknown)}; choose from {sorted(CONTENDERS)}")
    t_start = time.perf_counter()
    print(machine_line(device))
    print(f"F=8, D=16, hidden {HIDDEN}, batch {args.batch}, Zipf(1.1) domains, step = forward + BCE + penalty + "
          f"backward + make_optimizer's step, {args.repeats} interleaved rounds")
    cases = [make_case(name, p, args, device) for p in sizes for name in names]
    cases += serving_cases(args, device)
    if "star" in names:
        cases += optimiser_cases(max(sizes), args, device)
        if max(sizes) > min(sizes):  # the largest P, batches holding as many domains as the smallest P's
            cases.append(make_case("star", max(sizes), args, device, present=min(sizes)))
    rounds, shares, discarded = interleaved_rounds(args, cases, lambda c: timed(c.step, c.n, device), key=lambda c: c.key)
    for got in rounds:
        for c in cases:
            c.ms.append(got[c.key])
    by_key = {c.key: c for c in cases}

    print("\n| P | model | ms / step | spread | x DNN |\n|---|---|---|---|---|")
    for p in sizes:
        floor = by_key[("dnn", p)]
        for name in names:
            c = by_key[(name, p)]
            print(f"| {p:,} | {name} | {median(c.ms):.1f} | {fmt(spread(c.ms), '.0%')} | {paired_ratio(c.ms, floor.ms):.2f} |")
    print("\ndistinct domains in the batch: " + ", ".join(f"P={p:,}: {distinct_domains(p, args.batch)}" for p in sizes))
    if "star" in names and max(sizes) > min(sizes):
        same = by_key[(f"star@{min(sizes)}", max(sizes))]
        print(f"STAR at P={max(sizes):,} on batches of the {min(sizes)} most frequent domains (as many as at P={min(sizes):,}): "
              f"{median(same.ms):.1f} ms, {paired_ratio(same.ms, by_key[('star', min(sizes))].ms):.2f}x its time at P={min(sizes):,}")
    if "star" in names:
        sparse, lazy = by_key[("sparseadam", max(sizes))], by_key[("lazyadam", max(sizes))]
        print(f"STAR's per-domain rows at P={max(sizes):,}, one optimiser step: SparseAdam {median(sparse.ms):.1f} ms, "
              f"LazyAdam {median(lazy.ms):.1f} ms ({paired_ratio(sparse.ms, lazy.ms):.1f}x faster)")
    masked, pruned = by_key[("masked", 0)], by_key[("pruned", 0)]
    print(f"\nserving one domain, {args.batch} rows: masked {median(masked.ms):.2f} ms, pruned {median(pruned.ms):.2f} ms")
    print(f"other processes' CPU share during the kept rounds: max {max(shares):.0%}; {discarded} disturbed round(s) repeated")

    print(f"\nTargets (total run {time.perf_counter() - t_start:.0f}s):")
    if {10, 1000} <= set(sizes) and "star" in names:
        r = paired_ratio(by_key[("star", 1000)].ms, by_key[("star", 10)].ms)
        print(f"  STAR at 1,000 domains <= 2x its time at 10: {r:.2f}x -> {'met' if r <= 2 else 'NOT met'}")
    for p in sizes:
        for name in ("adasparse", "adasparse-domain"):
            if name not in names:
                continue
            r = paired_ratio(by_key[(name, p)].ms, by_key[("dnn", p)].ms)
            print(f"  [P={p}] {name} <= 1.3x the DNN backbone: {r:.2f}x -> {'met' if r <= 1.3 else 'NOT met'}")
        if "eq2-floor" in names:  # not a target: what eq. 2 alone costs, measured in the same rounds
            r = paired_ratio(by_key[("eq2-floor", p)].ms, by_key[("dnn", p)].ms)
            print(f"  [P={p}] (floor) eq. 2 alone, domain-only factors gathered per row: {r:.2f}x the DNN backbone")
    speedup = paired_ratio(masked.ms, pruned.ms)
    print(f"  pruned serving form >= 1.15x faster than the masked model: {speedup:.2f}x -> {'met' if speedup >= 1.15 else 'NOT met'}")


if __name__ == "__main__":
    main()
