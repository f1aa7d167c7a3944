"""Step throughput with the data resident on the device: ``train_throughput.py --device cuda``.

Every contender trains on the same encoded MovieLens rows, copied to the device once; each
step gathers its batch with ``index_select`` from an on-device permutation (no host
transfer), then runs forward, binary cross-entropy (plus the model's penalty), backward and
Adam. Contenders (embedding 16, hidden units (256, 128, 64), Adam lr 0.005):

  bare         the bare PyTorch WDL of ``train_throughput.Ceiling`` (one EmbeddingBag + MLP)
  bare_scatter the same with ``models/embedding.py``'s scatter-add weight gradient, the
               ceiling for ours on CUDA (PyTorch's own embedding-bag backward is slow
               on a hot row: docs/benchmarks.md section 11)
  wdl          ours, ``build_model({"family": "wdl"})``
  wdl_apg      ours, WDL + APG v4 (self-wise, K=4, one-layer generator)
  dcnv2_apg    ours, DCNv2 (3 cross layers) + APG v4 on the tower
  xdeepint     ours, xDeepInt (3 PIN layers, 4 sub-spaces)
  dynint_dgp   ours, DynInt-DGP (3 layers, 4 sub-spaces, rank 16, orthogonal penalty)
  deepctr_wdl  DeepCTR-Torch 0.3.0's WDL on its own float input matrix (when installed)

Levers, each on and off in the same run (the full matrix, in this order, while the time
budget lasts):

  optimiser    torch.optim.Adam ``fused=True`` vs ``foreach=True``
  graph        the whole step replayed from one CUDA graph
               (:class:`dynamic_ctr.training.graphs.GraphedStep`, what ``train`` uses with
               ``cuda_graphs``) vs eager launches
  compile      ``torch.compile(model)`` (default mode) vs eager; its compile time is
               reported apart from the steady-state rate

Settings: batch 1024 and 8192, float32 and bf16 autocast. Timing: CUDA events around
blocks of steps (each >= ``--block-ms``), after a warm-up (and after the capture or the
compilation); samples/s = batch x steps / block time, median over ``--blocks`` blocks,
spread = interquartile range / median.

Also: ``train()`` itself (the project's loop: shuffling, loss bookkeeping, per-epoch
validation excluded from its samples/s) on WDL+APG at batch 8192 bf16 with
``cuda_graphs`` off and on; and a ``torch.profiler`` summary (kernel launches per step, GPU
time per step, top kernels) of the WDL+APG step, eager and graphed.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynamic_ctr.models import build_model
from dynamic_ctr.training import TensorData, TrainConfig, train
from dynamic_ctr.training.graphs import GraphedStep

EMB, HIDDEN, LR = 16, (256, 128, 64), 0.005
APG = {"version": "v4", "rank": 4, "generator_layers": 1, "condition": {"mode": "self"}}
PIN = {"layers": 3, "subspaces": 4, "reduction": 4}
MODELS = {
    "wdl": {"family": "wdl", "embedding_dim": EMB, "hidden_units": list(HIDDEN)},
    "wdl_apg": {"family": "wdl", "embedding_dim": EMB, "hidden_units": list(HIDDEN), "apg": APG},
    "dcnv2_apg": {"family": "dcnv2", "embedding_dim": EMB, "hidden_units": list(HIDDEN), "cross_layers": 3, "apg": APG},
    "xdeepint": {"family": "xdeepint", "embedding_dim": EMB,
                 "dynint": {"mode": "static", "rank": 4, "orthogonal_rate": 0.0, **PIN}},
    "dynint_dgp": {"family": "xdeepint", "embedding_dim": EMB,
                   "dynint": {"mode": "dgp", "rank": 16, "orthogonal_rate": 1e-3, **PIN}},
}
CONTENDERS = ("bare", "bare_scatter", *MODELS, "deepctr_wdl")


class Contender:
    """A model, its input matrix on the device and its loss."""

    def __init__(self, name: str, spec, data: TensorData, deepctr_x: Tensor | None, device: torch.device) -> None:
        from train_throughput import Ceiling, deepctr_model

        torch.manual_seed(0)
        self.name, self.x, self.y = name, data.x, data.y
        self.penalty: Callable[[], Tensor | None] | None = None
        self.probabilities = False
        if name in ("bare", "bare_scatter"):
            self.model: nn.Module = Ceiling(spec, EMB, HIDDEN, scatter_backward=name == "bare_scatter").to(device)
        elif name == "deepctr_wdl":
            with contextlib.redirect_stdout(io.StringIO()):
                self.model = deepctr_model(spec, 0, "wdl", device=str(device)).to(device)
            self.x, self.probabilities = deepctr_x, True  # DeepCTR's forward returns sigmoid outputs
        else:
            self.model = build_model({**MODELS[name], "seed": 0}, spec).to(device)
            penalty = getattr(self.model, "penalty", None)
            self.penalty = penalty if callable(penalty) else None
        self.model.train()

    def loss_fn(self, forward: Callable[[Tensor], Tensor], dtype: torch.dtype | None, device: torch.device):
        def loss(xb: Tensor, yb: Tensor) -> Tensor:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=False):
                out = forward(xb)
            out = out.float().reshape(-1)
            value = F.binary_cross_entropy(out, yb) if self.probabilities else F.binary_cross_entropy_with_logits(out, yb)
            extra = self.penalty() if self.penalty is not None else None
            return value if extra is None else value + extra.float()

        return loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(contender: Contender, dtype: torch.dtype | None, optimiser: str, graph: bool, compiled: bool,
              device: torch.device) -> Callable[[Tensor, Tensor], Tensor]:
    """``step(xb, yb) -> loss``: one training step of the contender with the given levers."""
    model = contender.model
    forward = torch.compile(model) if compiled else model
    kernel = {"fused": True} if optimiser == "fused" else {"foreach": True}
    opt = torch.optim.Adam(model.parameters(), lr=LR, capturable=graph, **kernel)
    loss_fn = contender.loss_fn(forward, dtype, device)
    if graph:
        return GraphedStep(loss_fn, opt)

    def step(xb: Tensor, yb: Tensor) -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(xb, yb)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def measure_cell(contender: Contender, batch: int, dtype: torch.dtype | None, optimiser: str, graph: bool,
                 compiled: bool, device: torch.device, blocks: int, block_ms: float) -> dict:
    """One (contender, batch, precision, levers) cell: steady-state samples/s."""
    step = make_step(contender, dtype, optimiser, graph, compiled, device)

    n = contender.x.shape[0]
    per_epoch = n // batch
    gen = torch.Generator(device=device).manual_seed(0)
    state = {"perm": torch.randperm(n, device=device, generator=gen), "i": 0}

    def one() -> Tensor:
        if state["i"] == per_epoch:
            state["perm"], state["i"] = torch.randperm(n, device=device, generator=gen), 0
        idx = state["perm"][state["i"] * batch : (state["i"] + 1) * batch]
        state["i"] += 1
        return step(contender.x.index_select(0, idx), contender.y.index_select(0, idx))

    t0 = time.perf_counter()
    loss = one()  # the first step: compilation, lazy initialisation
    _sync(device)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = 0
    while warm < 8 or time.perf_counter() - t0 < 0.3:  # capture (after 3 warm-up steps) and steady state
        loss = one()
        warm += 1
    _sync(device)
    per_step = (time.perf_counter() - t0) / warm
    k = max(5, int(block_ms / 1e3 / max(per_step, 1e-6)))
    rates = []
    for _ in range(blocks):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(k):
                loss = one()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            for _ in range(k):
                loss = one()
            seconds = time.perf_counter() - t
        rates.append(batch * k / seconds)
    final = float(loss)
    q = np.percentile(rates, [25, 75])
    return {
        "samples_per_s": statistics.median(rates), "spread": float((q[1] - q[0]) / statistics.median(rates)),
        "ms_per_step": batch / statistics.median(rates) * 1e3, "steps_per_block": k,
        "first_step_s": first_s, "final_loss": final, "finite": bool(np.isfinite(final)),
        "captured": bool(getattr(step, "captured", False)),
        "capture_error": repr(step.failure) if graph and step.failure is not None else None,
    }


def plan_cells(contenders: list[str], batches: list[int], graphs: bool, compile_names: list[str]) -> list[dict]:
    """The lever matrix in priority order: fused Adam eager / graphed for every contender at
    the largest batch; torch.compile (eager and graphed) on a few contenders there in bf16;
    the same fused matrix at the other batches; foreach Adam at the largest batch."""
    precisions = ["float32", "bfloat16"]
    modes = [False, True] if graphs else [False]
    top, rest = max(batches), sorted(set(batches) - {max(batches)}, reverse=True)

    def cell(c: str, b: int, p: str, opt: str, g: bool, comp: bool = False) -> dict:
        return {"contender": c, "batch": b, "precision": p, "optimiser": opt, "graph": g, "compile": comp}

    cells = [cell(c, top, p, "fused", g) for p in precisions for c in contenders for g in modes]
    cells += [cell(c, top, "bfloat16", "fused", g, True) for c in compile_names if c in contenders for g in modes]
    cells += [cell(c, b, p, "fused", g) for b in rest for p in precisions for c in contenders for g in modes]
    cells += [cell(c, top, p, "foreach", g) for p in precisions for c in contenders for g in modes]
    return cells


def profile_summary(contender: Contender, batch: int, dtype: torch.dtype | None, graph: bool,
                    device: torch.device, steps: int = 20) -> dict:
    """torch.profiler over ``steps`` steps: launches, GPU time per step, top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step = make_step(contender, dtype, "fused", graph, False, device)
    x, y = contender.x[:batch], contender.y[:batch]
    for _ in range(10):
        step(x, y)
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(x, y)
        _sync(device)
    events = prof.events()
    # the profiler lists its own ranges (Optimizer.step#Adam.step) with the CUDA kernels
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and "#" not in e.name
               and not e.name.startswith(("Optimizer.", "ProfilerStep"))]
    launches = [e for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                "cuLaunchKernelEx")]
    graph_launches = [e for e in events if e.name == "cudaGraphLaunch"]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.device_time if hasattr(e, "device_time") else e.cuda_time)
    total_us = sum(sum(v) for v in by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:12]
    return {
        "graph": graph, "steps": steps,
        "kernels_per_step": len(kernels) / steps,
        "kernel_launch_calls_per_step": len(launches) / steps,
        "graph_launches_per_step": len(graph_launches) / steps,
        "gpu_kernel_us_per_step": total_us / steps,
        "top_kernels": [{"name": n[:90], "count_per_step": len(v) / steps, "us_per_step": sum(v) / steps,
                         "mean_us": sum(v) / len(v)} for n, v in top],
    }


def train_loop_rates(spec, data: TensorData, valid: TensorData, device: torch.device, repeat: int) -> list[dict]:
    """``train()`` on WDL+APG, batch 8192 bf16, cuda_graphs off and on (the data tiled
    ``repeat`` times so that an epoch holds enough steps to time)."""
    tiled = TensorData(data.x.repeat(repeat, 1), data.y.repeat(repeat))
    out = []
    for graphs in ("off", "on"):
        cfg = TrainConfig(lr=LR, batch_size=8192, max_epochs=2, patience=2, seed=2024, progress=False, amp=True,
                          amp_dtype="bfloat16", cuda_graphs=graphs)
        result = train(build_model({**MODELS["wdl_apg"], "seed": 2024}, spec), tiled, valid, cfg)
        last = result.history[-1]
        out.append({"cuda_graphs": graphs, "captured": result.cuda_graph, "rows_per_epoch": len(tiled),
                    "samples_per_s_epoch2": last["samples_per_s"], "val_auc": last["val_auc"]})
    return out


def run(args, spec, train_cols: dict, valid_cols: dict, source: str, out_dir: Path | None) -> None:
    from train_throughput import deepctr_inputs

    from dynamic_ctr.training import tensors_from_columns

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    tr = tensors_from_columns(train_cols, spec, device, group_columns=[])
    va = tensors_from_columns(valid_cols, spec, device, group_columns=[])
    names = [c for c in (args.contenders.split(",") if args.contenders != "default" else CONTENDERS) if c]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown:
        raise SystemExit(f"--contenders: unknown {unknown}; with --device {args.device}: {list(CONTENDERS)}")
    deepctr_x = None
    if "deepctr_wdl" in names:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                import deepctr_torch  # noqa: F401
        except ImportError:
            print("deepctr-torch is not installed: deepctr_wdl left out")
            names.remove("deepctr_wdl")
        else:
            inputs = deepctr_inputs(spec, train_cols)
            deepctr_x = torch.from_numpy(
                np.concatenate([np.asarray(v).reshape(len(tr), -1) for v in inputs.values()], axis=1).astype(np.float32)
            ).to(device)
    batches = [int(b) for b in args.batches.split(",")]
    compile_names = [c for c in args.compile.split(",") if c] if cuda else []
    cells = plan_cells(names, batches, graphs=cuda, compile_names=compile_names)
    dtypes = {"float32": None, "bfloat16": torch.bfloat16}
    gpu = torch.cuda.get_device_name(device) if cuda else "none"
    print(f"device: {device} ({gpu}), torch {torch.__version__}; data: {source}: train {len(tr):,} rows "
          f"resident on the device; {len(cells)} cells planned, budget {args.budget_s:.0f}s", flush=True)
    results, t_start = [], time.perf_counter()
    log = (out_dir / "throughput.jsonl").open("w") if out_dir else None
    for cell in cells:
        if time.perf_counter() - t_start > args.budget_s:
            print(f"budget spent: {len(cells) - len(results)} cell(s) not run (from {cell})")
            break
        contender = Contender(cell["contender"], spec, tr, deepctr_x, device)
        try:
            row = {**cell, **measure_cell(contender, cell["batch"], dtypes[cell["precision"]], cell["optimiser"],
                                          cell["graph"], cell["compile"], device, args.blocks, args.block_ms)}
        except Exception as e:  # noqa: BLE001 - one failing cell must not lose the others
            row = {**cell, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        results.append(row)
        if log:
            log.write(json.dumps(row) + "\n")
            log.flush()
        levers = f"{cell['optimiser']:7s} {'graph' if cell['graph'] else 'eager':5s} {'compile' if cell['compile'] else '':7s}"
        if "error" in row:
            print(f"{cell['contender']:>12s} b{cell['batch']:<5d} {cell['precision']:8s} {levers} ERROR {row['error'][:150]}", flush=True)
        else:
            note = "" if not cell["graph"] or row["captured"] else f"  capture failed: {row['capture_error'][:100]}"
            print(f"{cell['contender']:>12s} b{cell['batch']:<5d} {cell['precision']:8s} {levers} "
                  f"{row['samples_per_s'] / 1e6:8.3f} M/s {row['ms_per_step']:7.3f} ms/step spread {row['spread']:.0%} "
                  f"first step {row['first_step_s']:.1f}s{note}", flush=True)
        del contender
        if cuda:
            torch.cuda.empty_cache()
    summarise(results, batches)
    if cuda and args.train_loop:
        loop = train_loop_rates(spec, tr, va, device, repeat=16)
        print("\ntrain() on WDL+APG, batch 8192, bf16 (data tiled x16, epoch 2's training-step rate):")
        for r in loop:
            print(f"  cuda_graphs={r['cuda_graphs']:3s} captured={r['captured']!s:5s} "
                  f"{r['samples_per_s_epoch2'] / 1e6:.3f} M samples/s, val AUC {r['val_auc']:.4f}")
        if out_dir:
            (out_dir / "train_loop.json").write_text(json.dumps(loop, indent=1))
    if cuda and args.profile_steps:
        profiles = []
        for graph in (False, True):
            contender = Contender("wdl_apg", spec, tr, None, device)
            p = profile_summary(contender, 8192, torch.bfloat16, graph, device)
            profiles.append(p)
            print(f"\nprofile WDL+APG b8192 bf16 {'graphed' if graph else 'eager'}: {p['kernels_per_step']:.0f} kernels/step, "
                  f"{p['kernel_launch_calls_per_step']:.0f} launch calls/step, {p['graph_launches_per_step']:.0f} graph "
                  f"launches/step, GPU kernel time {p['gpu_kernel_us_per_step']:.0f} us/step")
            for k in p["top_kernels"][:8]:
                print(f"    {k['us_per_step']:7.1f} us/step  x{k['count_per_step']:4.1f}  {k['name'][:80]}")
        if out_dir:
            (out_dir / "profile.json").write_text(json.dumps(profiles, indent=1))


def summarise(results: list[dict], batches: list[int]) -> None:
    ok = [r for r in results if "error" not in r and r["finite"]]
    if not ok:
        return
    print("\nbest lever setting per contender (M samples/s; x bare = against the best bare step of that setting):")
    for b in sorted(batches):
        for p in ("float32", "bfloat16"):
            rows = [r for r in ok if r["batch"] == b and r["precision"] == p]
            best: dict[str, dict] = {}
            for r in rows:
                if r["contender"] not in best or r["samples_per_s"] > best[r["contender"]]["samples_per_s"]:
                    best[r["contender"]] = r
            bare = best.get("bare", {}).get("samples_per_s")
            for c, r in best.items():
                eager = [x["samples_per_s"] for x in rows if x["contender"] == c and not x["graph"] and not x["compile"]
                         and x["optimiser"] == "fused"]
                gain = f"  graph/eager {r['samples_per_s'] / eager[0]:.2f}x" if eager and r["graph"] else ""
                levers = f"{r['optimiser']}{'+graph' if r['graph'] else ''}{'+compile' if r['compile'] else ''}"
                vs = f"{r['samples_per_s'] / bare:5.2f}x bare" if bare else ""
                print(f"  b{b:<5d} {p:8s} {c:>12s} {r['samples_per_s'] / 1e6:8.3f}  {levers:22s} {vs}{gain}")
    target = [r for r in ok if r["contender"] == "wdl_apg" and r["batch"] == 8192 and r["precision"] == "bfloat16"]
    if target:
        t = max(r["samples_per_s"] for r in target)
        print(f"\ntarget WDL+APG b8192 bf16: {t / 1e6:.2f} M samples/s (>= 10: {'met' if t >= 1e7 else 'NOT met'})")
    for name in ("bare", "bare_scatter"):
        bare = [r for r in ok if r["contender"] == name and r["batch"] == 8192 and r["precision"] == "bfloat16"]
        if target and bare:
            c = max(r["samples_per_s"] for r in bare)
            print(f"  {t / c:.2f}x the best {name} step, {c / 1e6:.2f} M/s (>= 0.9: {'met' if t >= 0.9 * c else 'NOT met'})")
