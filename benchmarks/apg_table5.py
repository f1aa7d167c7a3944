"""APG efficiency: time and memory of the dense tower per APG version.

The set-up is the NeurIPS version's Table 5 (input width 393, K = 4, three hidden
layers from [64,32,16] to [1024,512,256]); the versions cover both papers' version
tables (NeurIPS Table 3 / KDD Table 5, which number them differently; see below).

What is measured: the hidden-layer stack alone (the *dense tower*), not a whole CTR
model. The tower is built by ``dynamic_ctr.models.builder.build_dense`` exactly as
``build_model`` builds it inside a backbone, with input width E = 393 (a one-field
FeatureSpec with ``embedding_dim=393``, so that ``resolve_config`` checks the ranks
against the real layer widths). Input ``h`` is a random ``(B, 393)`` float tensor;
the condition is self-wise (z = each layer's own input), K = 4, B = 1024.

Versions (ours = ``apg.version``, numbered as the NeurIPS version's Table 3; the
last column is the KDD version's Table 5 row computing the same thing):

  name        ours                                                       KDD Table 5
  base        static MLP tower (Linear -> ReLU per layer)                Base
  v1          generated full W_i                                         v1
  v2          generated U_i, S_i, V_i; W_i = U_i S_i V_i reconstructed   none (NeurIPS v2)
  v3          generated U_i, S_i, V_i; decomposed U_i(S_i(V_i x))        v4
  v4-rec      shared U, V, generated S_i; W_i = U S_i V reconstructed    v2
              (v4 with ``apg.reconstruct``: v4's function and parameters)
  v4          shared U, V, generated S_i (K x K); decomposed U(S_i(V x)) v3
  v5          v4 with over-parameterised U = U^l U^r, V = V^l V^r        v6 (Table 6)
              (P = 32)
  v5-fold     fold_model(v5): the factors multiplied out (a v4 layer)
  v5J3        v5 with stack J = 3 factors per shared matrix              App. F
  v5J3-fold   fold_model(v5J3)

The KDD version's v2 -> v3 step (reconstructed vs decomposed, same parameters) is
v4-rec -> v4 here; the NeurIPS version's v2 -> v3 step is v2 -> v3.

Per version and width:

  train   ms per batch of forward + backward + Adam step (loss = mean(out^2));
  infer   ms per batch of forward under ``torch.no_grad()`` in eval mode;
  x base  median over rounds of the paired ratio to the base tower of the same round;
  hid MB  ``hidden_memory_bytes`` (analytic: per-layer outputs, generator activations,
          generated parameters and feed-forward intermediates; see models.inspection);
  pk trn  measured peak of bytes allocated during one training step above what was
          allocated before it (parameters, Adam state, input excluded), i.e. the
          activations autograd keeps plus the gradients and temporaries;
  pk inf  the same for one no_grad forward (temporaries only: nothing is kept).

  Measured peak on CPU: the running sum of the allocation/free events recorded by
  ``torch.profiler`` with ``profile_memory=True`` (CPU allocator, every tensor); on
  CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

Timing: every (version, width) gets a warm-up, then ``--repeats`` rounds; in each
round every version runs one timed block of n iterations (n chosen in warm-up so that
a block lasts >= ``--min-block-ms``), versions in a fresh random order each round.
Reported: median over rounds of the per-iteration time, and median of the paired
per-round ratio to base. ``spread`` is the interquartile range / median of the
per-iteration times.

v1, v2 and v4-rec materialise a (B, M, N) tensor per layer; a (version, width) whose analytic
hidden memory exceeds ``--max-hidden-mb`` is skipped (printed as "skip") to keep the
default run within a few minutes on 2 CPU cores.

Other processes: before each round the script waits (up to ``--quiet-timeout`` s)
until other processes use less than ``--quiet`` of the machine's CPU (/proc/stat minus
this process), and repeats a round during which they used more than ``--max-other``
(up to ``--retries`` times, within ``--wait-budget`` s per tower). With 2 cores and 2
torch threads one other busy process slows every parallel region down by an order of
magnitude. The shares seen are printed under the table.

``--profile base,v4`` prints torch.profiler's top operators of 50 training steps of
each version at the first tower of ``--widths`` instead of the table.

Needs torch only (no Kedro, no pandas); runs from a source checkout::

    python benchmarks/apg_table5.py                       # CPU, all widths
    python benchmarks/apg_table5.py --device cuda --max-hidden-mb 8192
    python benchmarks/apg_table5.py --widths 256,128,64 --amp --repeats 30
    python benchmarks/apg_table5.py --widths 64,32,16 --profile base,v4
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _machine import add_quiet_arguments, interleaved_rounds, wait_quiet  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from dynamic_ctr.models import fold_model, hidden_memory_bytes  # noqa: E402
from dynamic_ctr.models.builder import build_dense  # noqa: E402
from dynamic_ctr.models.config import resolve_config  # noqa: E402
from dynamic_ctr.spec import FeatureSpec, FieldSpec  # noqa: E402

DEFAULT_WIDTHS = "64,32,16;128,64,32;256,128,64;512,256,128;1024,512,256"
VERSIONS = ("base", "v1", "v2", "v3", "v4-rec", "v4", "v5", "v5-fold", "v5J3", "v5J3-fold")


# ----------------------------------------------------------------------------- contention
# The same helpers as in train_throughput.py (kept here so this script needs torch only).


class Tower(nn.Module):
    """A dense tower as a model: ``h (B, E) -> (B, H_last)``, self-wise condition.

    ``dense`` is the attribute ``hidden_memory_bytes`` reads; ``fold_model`` folds
    the APG layers inside it.
    """

    def __init__(self, dense: nn.Module) -> None:
        super().__init__()
        self.dense = dense

    def forward(self, h: Tensor) -> Tensor:
        return self.dense(h, h.unsqueeze(1))  # emb (B, 1, E) is unused by self-wise APG


def apg_config(version: str, rank: int) -> dict | None:
    if version == "base":
        return None
    name = version.removesuffix("-fold")
    if name == "v5J3":
        return {"version": "v5", "rank": rank, "width": 32, "stack": 3, "condition": {"mode": "self"}}
    if name == "v4-rec":  # the KDD version's v2: v4 with W_i reconstructed
        return {"version": "v4", "rank": rank, "reconstruct": True, "condition": {"mode": "self"}}
    return {"version": name, "rank": rank, "width": 32, "condition": {"mode": "self"}}


def build_tower(version: str, widths: list[int], in_dim: int, rank: int) -> Tower:
    spec = FeatureSpec((FieldSpec("x", "categorical", 2),))  # F = 1, so E = embedding_dim
    config = {
        "family": "dnn",
        "embedding_dim": in_dim,
        "hidden_units": widths,
        "apg": apg_config(version, rank),
        "seed": 0,
    }
    cfg = resolve_config(config, spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        tower = Tower(build_dense(cfg, spec, in_dim))
    if version.endswith("-fold"):
        tower = fold_model(tower)
    return tower


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


@dataclass
class Case:
    version: str
    tower: Tower
    optimizer: torch.optim.Optimizer
    train_n: int = 1
    infer_n: int = 1
    train_ms: list[float] = field(default_factory=list)
    infer_ms: list[float] = field(default_factory=list)
    hidden_mb: float = 0.0
    peak_train_mb: float = math.nan
    peak_infer_mb: float = math.nan
    params: int = 0


def make_steps(case: Case, x: Tensor, amp: bool, device: torch.device):
    tower, opt = case.tower, case.optimizer
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if amp
        else (lambda: torch.autocast(device.type, enabled=False))
    )

    def train_step() -> None:
        tower.train()
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = tower(x)  # (B, H)
        loss = out.float().square().mean()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def infer_step() -> None:
        tower.eval()
        with autocast():
            tower(x)

    return train_step, infer_step


def timed(fn: Callable[[], None], n: int, device: torch.device) -> float:
    """Milliseconds per call of ``fn``, over a block of ``n`` calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / n


def calibrate(fn: Callable[[], None], device: torch.device, min_block_ms: float) -> int:
    """Warm up ``fn`` and return the block length n with n calls >= ``min_block_ms``."""
    fn()
    fn()
    ms = min(timed(fn, 1, device) for _ in range(3))
    return max(1, math.ceil(min_block_ms / max(ms, 1e-3)))


def run_width(widths: list[int], args: argparse.Namespace, device: torch.device) -> list[Case]:
    x = torch.randn(args.batch, args.in_dim, generator=torch.Generator().manual_seed(0)).to(device)
    cases: list[Case] = []
    for version in args.versions:
        tower = build_tower(version, widths, args.in_dim, args.rank).to(device)
        hidden = hidden_memory_bytes(tower, args.batch) / 2**20
        if hidden > args.max_hidden_mb:
            case = Case(version, tower, None)  # type: ignore[arg-type]
            case.hidden_mb = hidden
            case.params = sum(p.numel() for p in tower.parameters())
            cases.append(case)
            continue
        opt_kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
        opt = torch.optim.Adam(tower.parameters(), lr=1e-3, **opt_kwargs)
        case = Case(version, tower, opt, hidden_mb=hidden)
        case.params = sum(p.numel() for p in tower.parameters())
        cases.append(case)

    active = [c for c in cases if c.optimizer is not None]
    steps = {c.version: make_steps(c, x, args.amp, device) for c in active}
    for c in active:
        train_step, infer_step = steps[c.version]
        c.train_n = calibrate(train_step, device, args.min_block_ms)
        c.infer_n = calibrate(infer_step, device, args.min_block_ms)
        if not args.no_memory:
            c.optimizer.zero_grad(set_to_none=True)  # free the last step's gradients before measuring
            c.peak_train_mb = peak_bytes(train_step, device) / 2**20
            c.peak_infer_mb = peak_bytes(infer_step, device) / 2**20

    def measure(c: Case) -> tuple[float, float]:
        train_step, infer_step = steps[c.version]
        return timed(train_step, c.train_n, device), timed(infer_step, c.infer_n, device)

    rounds, shares, discarded = interleaved_rounds(args, active, measure, key=lambda c: c.version)
    for got in rounds:
        for c in active:
            c.train_ms.append(got[c.version][0])
            c.infer_ms.append(got[c.version][1])
    args.contention.append({"discarded": discarded, "other": shares})
    for c in cases:  # free the optimizer state before the next width
        c.optimizer = None  # type: ignore[assignment]
    return cases


def profile_versions(widths: list[int], args: argparse.Namespace, device: torch.device) -> None:
    """Print torch.profiler's top operators of 50 training steps per version in ``--profile``."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(args.batch, args.in_dim, generator=torch.Generator().manual_seed(0)).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for version in args.profile:
        tower = build_tower(version, widths, args.in_dim, args.rank).to(device)
        opt_kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
        case = Case(version, tower, torch.optim.Adam(tower.parameters(), lr=1e-3, **opt_kwargs))
        train_step, _ = make_steps(case, x, args.amp, device)
        calibrate(train_step, device, args.min_block_ms)
        ms = statistics.median(timed(train_step, 10, device) for _ in range(5))
        with profile(activities=activities) as prof:
            for _ in range(50):
                train_step()
            sync(device)
        print(f"\nprofile {version} {widths}: {ms:.3f} ms per training step (outside the profiler); "
              "top operators by self CPU time over 50 steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def spread(xs: list[float]) -> float:
    if len(xs) < 4:
        return math.nan
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / statistics.median(xs)


def paired_ratio(a: list[float], b: list[float]) -> float:
    if not a or not b:
        return math.nan
    return statistics.median(x / y for x, y in zip(a, b))


def fmt(v: float, spec: str) -> str:
    return "-" if math.isnan(v) else format(v, spec)


def machine_line(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (
        f"machine: {cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads{gpu}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--widths", default=DEFAULT_WIDTHS, help="';'-separated towers, e.g. '64,32,16;256,128,64'")
    parser.add_argument("--versions", default=",".join(VERSIONS))
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (>= 20 recommended)")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--in-dim", type=int, default=393)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast for the forward")
    parser.add_argument("--min-block-ms", type=float, default=20.0, help="minimum length of a timed block")
    parser.add_argument("--max-hidden-mb", type=float, default=300.0, help="skip cases above this analytic hidden memory")
    parser.add_argument("--no-memory", action="store_true", help="skip the measured peak memory")
    add_quiet_arguments(parser, "round", timeout=10.0, budget=30.0)
    parser.add_argument("--profile", default="",
                        help="comma-separated versions to profile (training step, first tower of --widths) instead of the table")
    args = parser.parse_args()
    args.versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    args.contention = []
    unknown = sorted(set(args.versions) - set(VERSIONS))
    if unknown:
        parser.error(f"unknown versions {unknown}; known: {', '.join(VERSIONS)}")
    if "base" not in args.versions:
        args.versions.insert(0, "base")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    device = torch.device(args.device)
    towers = [[int(w) for w in t.split(",")] for t in args.widths.split(";") if t.strip()]

    print(machine_line(device))
    if args.profile:
        args.profile = [v.strip() for v in args.profile.split(",") if v.strip()]
        bad = sorted(set(args.profile) - set(VERSIONS))
        if bad:
            parser.error(f"--profile: unknown versions {bad}")
        wait_quiet(args.quiet, args.quiet_timeout)
        profile_versions(towers[0], args, device)
        return
    print(
        f"dense tower only, E={args.in_dim}, K={args.rank}, B={args.batch}, self-wise, "
        f"{'bf16 autocast' if args.amp else 'float32'}, {args.repeats} interleaved rounds, "
        f"memory peak: {'off' if args.no_memory else ('cuda max_memory_allocated' if device.type == 'cuda' else 'torch.profiler CPU allocation events')}"
    )
    t_start = time.perf_counter()
    summary: list[tuple[list[int], dict[str, Case]]] = []
    header = (
        f"{'widths':>14s} {'version':>9s} {'params':>9s} {'train ms':>9s} {'x base':>7s} {'spread':>6s} "
        f"{'infer ms':>9s} {'x base':>7s} {'spread':>6s} {'hid MB':>8s} {'pk trn MB':>9s} {'pk inf MB':>9s}"
    )
    print(header)
    for widths in towers:
        cases = {c.version: c for c in run_width(widths, args, device)}
        base = cases["base"]
        for v in args.versions:
            c = cases[v]
            label = ",".join(map(str, widths)) if v == "base" else ""
            if not c.train_ms:
                print(
                    f"{label:>14s} {v:>9s} {c.params:9d} {'skip':>9s} {'':>7s} {'':>6s} {'skip':>9s} "
                    f"{'':>7s} {'':>6s} {c.hidden_mb:8.1f} {'-':>9s} {'-':>9s}"
                )
                continue
            print(
                f"{label:>14s} {v:>9s} {c.params:9d} {median(c.train_ms):9.3f} "
                f"{paired_ratio(c.train_ms, base.train_ms):7.2f} {fmt(spread(c.train_ms), '6.0%')} "
                f"{median(c.infer_ms):9.3f} {paired_ratio(c.infer_ms, base.infer_ms):7.2f} "
                f"{fmt(spread(c.infer_ms), '6.0%')} {c.hidden_mb:8.1f} "
                f"{fmt(c.peak_train_mb, '9.1f')} {fmt(c.peak_infer_mb, '9.1f')}"
            )
        sys.stdout.flush()
        summary.append((widths, cases))

    discarded = sum(c["discarded"] for c in args.contention)
    shares = [v for c in args.contention for v in c["other"] if not math.isnan(v)]
    if shares:
        print(
            f"\nother processes' CPU share during the kept rounds: median {statistics.median(shares):.0%}, "
            f"max {max(shares):.0%}; {discarded} disturbed round(s) repeated"
        )
    print(f"\nTargets (total run {time.perf_counter() - t_start:.0f}s):")
    for widths, cases in summary:
        w = ",".join(map(str, widths))
        base, v4 = cases["base"], cases.get("v4")
        if v4 is not None and v4.train_ms:
            rt = paired_ratio(v4.train_ms, base.train_ms)
            ri = paired_ratio(v4.infer_ms, base.infer_ms)
            ok = "met" if rt <= 1.2 and ri <= 1.2 else "NOT met"
            print(f"  [{w}] v4 / base <= 1.2: train {rt:.2f}x, infer {ri:.2f}x -> {ok}")
        rec = cases.get("v4-rec")
        if rec is not None and rec.train_ms and v4 is not None and v4.train_ms:
            print(
                f"  [{w}] decomposed feed-forward (KDD v2 -> v3: v4-rec -> v4, same parameters): "
                f"v4-rec / v4 train {paired_ratio(rec.train_ms, v4.train_ms):.2f}x, "
                f"infer {paired_ratio(rec.infer_ms, v4.infer_ms):.2f}x (information, no target)"
            )
        for folded in ("v5-fold", "v5J3-fold"):
            c = cases.get(folded)
            if c is None or v4 is None or not c.infer_ms or not v4.infer_ms:
                continue
            ri = paired_ratio(c.infer_ms, v4.infer_ms)
            unfolded = cases.get(folded.removesuffix("-fold"))
            ru = paired_ratio(unfolded.infer_ms, v4.infer_ms) if unfolded and unfolded.infer_ms else math.nan
            verdict = "met" if ri <= 1.05 else "NOT met"
            print(
                f"  [{w}] {folded} / v4 inference {ri:.2f}x (unfolded {fmt(ru, '.2f')}x) "
                f"-> {verdict} (no slower = within 5%)"
            )


if __name__ == "__main__":
    main()
