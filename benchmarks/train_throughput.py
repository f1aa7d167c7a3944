"""Training throughput on the default data (MovieLens latest-small, encoded train split).

Contenders, all with embedding 16, hidden units (256, 128, 64), batch 1024, Adam lr 0.005,
no weight decay / L2, the same fields (categorical fields one embedding each, ``genres``
and ``tags`` mean-pooled over their non-pad slots):

  ours_wdl          ``dynamic_ctr.training.train`` on ``build_model({"family": "wdl"})``
  ours_apg          the same with APG v4 (shared U, V, generated S_i, K=4, one-layer
                    generator, self-wise condition)
  deepctr_wdl       DeepCTR-Torch 0.3.0 ``WDL`` (SparseFeat per categorical field,
                    VarLenSparseFeat mean pooling for genres/tags, l2 regularisation
                    set to 0 like ours), ``model.fit(..., verbose=0)``
  ceiling           a bare PyTorch loop written here: one ``nn.EmbeddingBag`` over all
                    fields (offsets, per-sample weights doing the mean pooling, one extra
                    column for the wide weights) + the same MLP + Adam, on the same
                    in-memory tensors, shuffled like ``train`` does
  ours_wdl_bf16     ours_wdl with ``TrainConfig(amp=True, amp_dtype="bfloat16")``
  ours_apg_bf16     ours_apg likewise

``--contenders interaction`` runs the interaction backbones instead, each against
DeepCTR-Torch 0.3.0's own model with the same fields, embedding 16, hidden units
(256, 128, 64) (the DNN part), layer settings, batch and optimiser, L2 0:

  ours_pnn / deepctr_pnn              PNN* (inner and kernel outer products, kernel mat)
  ours_xdeepfm / deepctr_xdeepfm      CIN (128, 128), split half, no CIN activation
                                      (DeepCTR ``cin_activation="linear"``, eq. 6), DNN,
                                      first-order term
  ours_autoint / deepctr_autoint      AutoInt: 3 interacting layers, 2 heads, width 16,
                                      residual, unscaled scores, no DNN, no first-order
                                      term (DeepCTR given no linear feature columns)
  ours_autoint_plus / deepctr_autoint_plus   the same with the DNN in parallel (AutoInt+)
  ours_fibinet / deepctr_fibinet      SENET (reduction 3), bilinear field_interaction
                                      ("interaction"), DNN on the combination layer,
                                      first-order term

Measurement: after an untimed warm-up of every contender, ``--rounds`` rounds; in each
round every contender (in a fresh random order) trains a freshly built model for
``--epochs`` epochs with seed ``2024 + round``. Throughput = training rows processed /
seconds spent in the training steps (validation excluded: ``train``'s own
``samples_per_s``, the wall time of DeepCTR's ``fit`` without validation data, the step
loop of the ceiling). Reported: median over rounds, and the median of the paired
per-round ratios. Validation AUC after the last epoch is reported for every contender,
and bf16 vs float32 AUC per round (same seed) for ours.

Other processes: with 2 cores and 2 torch threads, one other busy process slows
torch's parallel regions down by an order of magnitude, so before each run the script
waits (up to ``--quiet-timeout`` s) until other processes use less than ``--quiet``
of the machine's CPU (from /proc/stat minus this process), and a run during which they
used more than ``--max-other`` is repeated (up to ``--retries`` times), all within
``--wait-budget`` seconds in total; after that, runs are kept as they come. The table
shows the largest other-process share during a kept run of each contender.

Data: the latest version of ``data/05_model_input/movielens_latest/{train,valid}.parquet``
and ``feature_spec.json`` present in all three; if absent, they are computed here from
``data/01_raw/ml-latest-small`` with ``dynamic_ctr.data`` (read_raw, the
movielens_latest adapter, split_frame, aggregate_item_lists, FeatureEncoder; no domain
field then). Reading either needs pandas. DeepCTR-Torch is the optional ``bench``
extra (``pip install deepctr-torch==0.3.0 --no-deps``: its declared dependencies torch,
tqdm and scikit-learn are project dependencies already, and the ``requests`` it imports
undeclared comes with Kedro); ``--skip-deepctr`` runs without it. On import it starts a
thread asking PyPI for a newer version; the script waits for it before timing.

``--profile ours_wdl,ours_apg,ceiling`` prints torch.profiler's top operators of 30
training steps of each instead of the rounds.

``--device cuda`` measures on a GPU instead, with the data resident on the device and
the levers (fused/foreach Adam, CUDA graphs of the whole step, torch.compile) each on and
off, at batch 1024 and 8192 in float32 and bf16: see ``benchmarks/_step_throughput.py``.
``--device cpu --harness`` runs that harness's eager cells on the CPU (a smoke test).

Usage::

    python benchmarks/train_throughput.py                 # 2 threads, 9 rounds x 2 epochs
    python benchmarks/train_throughput.py --quiet 0.2 --rounds 5
    python benchmarks/train_throughput.py --profile ours_wdl,ceiling
    python benchmarks/train_throughput.py --contenders interaction --rounds 5
    python benchmarks/train_throughput.py --profile ours_pnn,ours_fibinet
    python benchmarks/train_throughput.py --device cuda --out results/   # on a GPU machine
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import random
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
from _machine import OtherCPU, add_quiet_arguments, wait_quiet  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from dynamic_ctr.models import build_model  # noqa: E402
from dynamic_ctr.spec import PAD_INDEX, FeatureSpec  # noqa: E402
from dynamic_ctr.training import (  # noqa: E402
    TensorData,
    TrainConfig,
    auc,
    evaluate,
    make_generator,
    tensors_from_columns,
    train,
)

MODEL_INPUT = ROOT / "data/05_model_input/movielens_latest"
RAW = ROOT / "data/01_raw/ml-latest-small"
EMB, HIDDEN, BATCH, LR = 16, (256, 128, 64), 1024, 0.005
APG = {"version": "v4", "rank": 4, "generator_layers": 1, "condition": {"mode": "self"}}
CONTENDERS = ("ours_wdl", "ours_apg", "deepctr_wdl", "ceiling", "ours_wdl_bf16", "ours_apg_bf16")
# The interaction backbones: our config and DeepCTR-Torch's model with the same settings.
CIN_SIZES, ATT_LAYERS, ATT_HEADS, SENET_REDUCTION = (128, 128), 3, 2, 3
AUTOINT = {"attention_layers": ATT_LAYERS, "attention_heads": ATT_HEADS, "attention_dim": EMB, "attention_residual": True}
INTERACTION_MODELS = {
    "pnn": {"family": "pnn", "pnn": {"product": "both", "kernel": "mat"}},
    "xdeepfm": {"family": "xdeepfm", "xdeepfm": {"cin_layer_sizes": list(CIN_SIZES), "cin_split_half": True}},
    "autoint": {"family": "autoint", "dnn": False, "autoint": AUTOINT},
    "autoint_plus": {"family": "autoint", "autoint": AUTOINT},
    "fibinet": {"family": "fibinet", "fibinet": {"senet_reduction": SENET_REDUCTION, "bilinear_type": "field_interaction"}},
}
INTERACTION = tuple(f"{who}_{m}" for m in INTERACTION_MODELS for who in ("ours", "deepctr"))


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- data


def _latest_common_version() -> str | None:
    names = ("train.parquet", "valid.parquet", "feature_spec.json")
    versions = None
    for n in names:
        d = MODEL_INPUT / n
        found = {p.name for p in d.iterdir() if (p / n).is_file()} if d.is_dir() else set()
        versions = found if versions is None else versions & found
    return max(versions) if versions else None


def load_data() -> tuple[FeatureSpec, dict[str, np.ndarray], dict[str, np.ndarray], str]:
    """Index columns and labels of the train and validation splits, and the spec."""
    import pandas as pd

    version = _latest_common_version()
    if version is not None:
        spec_path = MODEL_INPUT / "feature_spec.json" / version / "feature_spec.json"
        spec = FeatureSpec.from_dict(json.loads(spec_path.read_text()))
        frames = [pd.read_parquet(MODEL_INPUT / f"{s}.parquet" / version / f"{s}.parquet") for s in ("train", "valid")]
        source = f"{MODEL_INPUT.relative_to(ROOT)} version {version}"
    else:
        from dynamic_ctr.data.adapters import movielens_latest
        from dynamic_ctr.data.encoder import EncoderParams, FeatureEncoder, aggregate_item_lists
        from dynamic_ctr.data.raw import RawFileConfig, read_raw
        from dynamic_ctr.data.split import SplitParams, split_frame

        raw = {
            name: read_raw(RawFileConfig(filepath=str(RAW / f"{name}.csv"), optional=name == "tags"))
            for name in ("ratings", "movies", "tags")
        }
        result = movielens_latest(raw, {"label_threshold": 4.0})
        tr, va, te = split_frame(result.table, SplitParams(), result.schema.time_key)
        tr, (va, te), _ = aggregate_item_lists(tr, [va, te], result.schema)
        encoder = FeatureEncoder.fit(tr, result.schema, EncoderParams(max_len={"genres": 6, "tags": 10}))
        spec = encoder.feature_spec()
        frames = [encoder.transform(f)[0] for f in (tr, va)]
        source = f"computed from {RAW.relative_to(ROOT)} (no domain field)"
    cols = [*spec.index_columns, spec.label]
    train_cols, valid_cols = ({c: f[c].to_numpy() for c in cols} for f in frames)
    return spec, train_cols, valid_cols, source


# ----------------------------------------------------------------------------- ceiling


class Ceiling(nn.Module):
    """Bare WDL: one EmbeddingBag (D deep columns + 1 wide column) over all fields.

    Each (row, field) is a bag: categorical slots have weight 1, sequence slots
    ``mask / count`` (mean over non-pad slots, zero for an all-pad row).
    """

    def __init__(self, spec: FeatureSpec, dim: int, hidden: tuple[int, ...], scatter_backward: bool = False) -> None:
        super().__init__()
        self.scatter_backward = scatter_backward  # the weight gradient of models/embedding.py's _ScatterBag
        fields = (*spec.categorical, *spec.sequences)
        starts = np.cumsum([0] + [f.vocab_size for f in fields])[:-1]
        slot_offsets, slot_field = [], []
        for i, f in enumerate(fields):
            slot_offsets += [int(starts[i])] * f.max_len
            slot_field += [i] * f.max_len
        self.register_buffer("offsets", torch.tensor(slot_offsets))  # (S,)
        seq_mask = torch.tensor([fields[j].kind == "sequence" for j in slot_field])
        self.register_buffer("seq_slots", seq_mask)  # (S,) bool
        self.register_buffer("slot_field", torch.tensor(slot_field))  # (S,)
        self.num_fields, self.num_slots, self.dim = len(fields), len(slot_offsets), dim
        bag_starts = [slot_field.index(i) for i in range(len(fields))]
        self.register_buffer("bag_starts", torch.tensor(bag_starts))  # (F,)
        self.table = nn.EmbeddingBag(int(sum(f.vocab_size for f in fields)), dim + 1, mode="sum")
        nn.init.normal_(self.table.weight, std=1e-4)
        dims = [len(fields) * dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(dims[-1], 1))
        self.bias = nn.Parameter(torch.zeros(()))
        self._bag_offsets: dict[int, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:  # x (B, S) in spec.index_columns order
        b = x.shape[0]
        if b not in self._bag_offsets:
            rows = torch.arange(b, device=x.device).unsqueeze(1) * self.num_slots
            self._bag_offsets[b] = (rows + self.bag_starts).reshape(-1)  # (B*F,)
        nonpad = (x != PAD_INDEX).float()  # (B, S)
        counts = torch.zeros(b, self.num_fields, device=x.device).index_add_(1, self.slot_field, nonpad)
        per_slot = counts.index_select(1, self.slot_field).clamp_min(1.0)  # (B, S)
        weights = torch.where(self.seq_slots, nonpad / per_slot, 1.0)  # (B, S)
        rows, weights = (x + self.offsets).reshape(-1), weights.reshape(-1)
        if self.scatter_backward:
            from dynamic_ctr.models.embedding import _ScatterBag

            bags = (torch.arange(b, device=x.device).unsqueeze(1) * self.num_fields + self.slot_field).reshape(-1)
            out = _ScatterBag.apply(self.table.weight, rows, self._bag_offsets[b], weights, bags)
        else:
            out = self.table(rows, self._bag_offsets[b], per_sample_weights=weights)
        out = out.view(b, self.num_fields, self.dim + 1)  # (B, F, D+1)
        deep = self.mlp(out[..., : self.dim].reshape(b, -1)).squeeze(1)  # (B,)
        return deep + out[..., self.dim].sum(1) + self.bias


def ceiling_train(model: Ceiling, data: TensorData, epochs: int, seed: int) -> float:
    """Train ``epochs`` epochs; returns the seconds spent in the steps."""
    opt = torch.optim.Adam(model.parameters(), lr=LR, foreach=True)
    gen = make_generator(seed, data.device)
    n = len(data)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, BATCH):
            idx = perm[start : start + BATCH]
            xb, yb = data.x.index_select(0, idx), data.y.index_select(0, idx)
            loss = F.binary_cross_entropy_with_logits(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- DeepCTR


def deepctr_inputs(spec: FeatureSpec, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {f.name: cols[f.name] for f in spec.categorical}
    for f in spec.sequences:
        out[f.name] = np.stack([cols[c] for c in f.columns], axis=1)  # (N, max_len)
    return out


def deepctr_model(spec: FeatureSpec, seed: int, kind: str = "wdl", device: str = "cpu"):
    from deepctr_torch import models
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat

    columns = [SparseFeat(f.name, vocabulary_size=f.vocab_size, embedding_dim=EMB) for f in spec.categorical]
    columns += [
        VarLenSparseFeat(SparseFeat(f.name, vocabulary_size=f.vocab_size, embedding_dim=EMB), maxlen=f.max_len, combiner="mean")
        for f in spec.sequences
    ]
    common = {"l2_reg_embedding": 0.0, "seed": seed, "task": "binary", "device": device}
    if kind == "wdl":
        model = models.WDL(columns, columns, dnn_hidden_units=HIDDEN, l2_reg_linear=0.0, l2_reg_dnn=0.0, **common)
    elif kind == "pnn":
        model = models.PNN(columns, dnn_hidden_units=HIDDEN, l2_reg_dnn=0.0, use_inner=True, use_outter=True,
                           kernel_type="mat", **common)
    elif kind == "xdeepfm":
        model = models.xDeepFM(columns, columns, dnn_hidden_units=HIDDEN, cin_layer_size=CIN_SIZES, cin_split_half=True,
                               cin_activation="linear", l2_reg_linear=0.0, l2_reg_dnn=0.0, l2_reg_cin=0.0, **common)
    elif kind in ("autoint", "autoint_plus"):
        # no linear feature columns: AutoInt (eq. 9) has no first-order term
        model = models.AutoInt([], columns, att_layer_num=ATT_LAYERS, att_head_num=ATT_HEADS, att_res=True,
                               dnn_hidden_units=HIDDEN if kind == "autoint_plus" else (), l2_reg_dnn=0.0, **common)
    elif kind == "fibinet":
        model = models.FiBiNET(columns, columns, bilinear_type="interaction", reduction_ratio=SENET_REDUCTION,
                               dnn_hidden_units=HIDDEN, l2_reg_linear=0.0, l2_reg_dnn=0.0, **common)
    else:
        raise ValueError(f"unknown DeepCTR model {kind!r}")
    model.compile(torch.optim.Adam(model.parameters(), lr=LR), "binary_crossentropy")
    return model


# ----------------------------------------------------------------------------- runs


def make_runners(spec, train_cols, valid_cols, tr: TensorData, va: TensorData, epochs: int):
    """name -> run(seed, data) -> (rows processed / step seconds, validation AUC)."""

    def ours(model_cfg: dict, amp: bool) -> Callable[[int, TensorData], tuple[float, float]]:
        def run(seed: int, data: TensorData) -> tuple[float, float]:
            model = build_model({**model_cfg, "seed": seed}, spec)
            cfg = TrainConfig(lr=LR, batch_size=BATCH, max_epochs=epochs, patience=epochs, seed=seed,
                              progress=False, amp=amp, amp_dtype="bfloat16")
            result = train(model, data, va, cfg)
            seconds = sum(len(data) / h["samples_per_s"] for h in result.history)
            return len(data) * len(result.history) / seconds, result.history[-1]["val_auc"]

        return run

    wdl = {"family": "wdl", "embedding_dim": EMB, "hidden_units": list(HIDDEN)}
    apg = {**wdl, "apg": APG}
    runners = {
        "ours_wdl": ours(wdl, False),
        "ours_apg": ours(apg, False),
        "ours_wdl_bf16": ours(wdl, True),
        "ours_apg_bf16": ours(apg, True),
    }
    for kind, settings in INTERACTION_MODELS.items():
        runners[f"ours_{kind}"] = ours({"embedding_dim": EMB, "hidden_units": list(HIDDEN), **settings}, False)

    def ceiling(seed: int, data: TensorData) -> tuple[float, float]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Ceiling(spec, EMB, HIDDEN)
        seconds = ceiling_train(model, data, epochs, seed)
        return len(data) * epochs / seconds, auc(va.y, evaluate(model, va, 4 * BATCH))

    runners["ceiling"] = ceiling

    threads = set(threading.enumerate())
    try:
        # importing deepctr_torch starts a thread asking PyPI for a newer version (and
        # printing when offline): let it finish, silently, before anything is timed
        with contextlib.redirect_stdout(io.StringIO()):
            import deepctr_torch  # noqa: F401

            for t in set(threading.enumerate()) - threads:
                t.join(timeout=15)
    except ImportError:
        return runners
    x_train, x_valid = deepctr_inputs(spec, train_cols), deepctr_inputs(spec, valid_cols)
    y_train = train_cols[spec.label].astype(np.float32)

    def deepctr(kind: str) -> Callable[[int, TensorData], tuple[float, float]]:
        def run(seed: int, data: TensorData) -> tuple[float, float]:
            n = len(data)
            xs = {k: v[:n] for k, v in x_train.items()}
            with contextlib.redirect_stdout(io.StringIO()):  # fit prints the device and a header
                model = deepctr_model(spec, seed, kind)
                t0 = time.perf_counter()
                model.fit(xs, y_train[:n], batch_size=BATCH, epochs=epochs, verbose=0)
                seconds = time.perf_counter() - t0
                probs = model.predict(dict(x_valid), batch_size=4 * BATCH).ravel()
            return n * epochs / seconds, auc(valid_cols[spec.label], probs)

        return run

    for kind in ("wdl", *INTERACTION_MODELS):
        runners[f"deepctr_{kind}"] = deepctr(kind)
    return runners


def profile_steps(name: str, spec: FeatureSpec, tr: TensorData, steps: int = 30, rows: int = 12) -> None:
    """Print torch.profiler's top operators (self CPU time) over ``steps`` training steps."""
    from torch.profiler import ProfilerActivity, profile

    from dynamic_ctr.training import make_optimizer

    if name == "ceiling":
        model: nn.Module = Ceiling(spec, EMB, HIDDEN)
        opt = torch.optim.Adam(model.parameters(), lr=LR, foreach=True)
    elif name in ("ours_wdl", "ours_apg"):
        cfg = {"family": "wdl", "embedding_dim": EMB, "hidden_units": list(HIDDEN)}
        model = build_model({**cfg, "apg": APG} if name == "ours_apg" else cfg, spec)
        opt = make_optimizer(model, TrainConfig(lr=LR), torch.device("cpu"))
    elif name.removeprefix("ours_") in INTERACTION_MODELS:
        settings = INTERACTION_MODELS[name.removeprefix("ours_")]
        model = build_model({"embedding_dim": EMB, "hidden_units": list(HIDDEN), **settings}, spec)
        opt = make_optimizer(model, TrainConfig(lr=LR), torch.device("cpu"))
    else:
        ours = ", ".join(f"ours_{k}" for k in INTERACTION_MODELS)
        raise SystemExit(f"--profile: {name!r} is not one of ours_wdl, ours_apg, ceiling, {ours}")
    xb, yb = tr.x[:BATCH], tr.y[:BATCH]

    def step() -> None:
        loss = F.binary_cross_entropy_with_logits(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(10):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    ms = (time.perf_counter() - t0) / steps * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(f"\nprofile {name}: {ms:.2f} ms per training step (forward + backward + Adam, batch {BATCH}, "
          f"outside the profiler); top operators by self CPU time over {steps} steps:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="comma-separated contenders, or 'interaction' for the interaction backbones "
                             "against DeepCTR-Torch's")
    parser.add_argument("--skip-deepctr", action="store_true")
    add_quiet_arguments(parser, "run", timeout=15.0, budget=120.0)
    parser.add_argument("--profile", default="",
                        help="comma-separated contenders (ours_wdl, ours_apg, ceiling, ours_<interaction model>) "
                             "to profile instead of the rounds")
    gpu = parser.add_argument_group("--device cuda (benchmarks/_step_throughput.py)")
    gpu.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    gpu.add_argument("--harness", action="store_true", help="with --device cpu: the device harness's eager cells")
    gpu.add_argument("--batches", default="1024,8192")
    gpu.add_argument("--compile", default="wdl_apg,bare", help="contenders also measured under torch.compile")
    gpu.add_argument("--budget-s", type=float, default=300.0, help="stop starting cells after this many seconds")
    gpu.add_argument("--blocks", type=int, default=5)
    gpu.add_argument("--block-ms", type=float, default=30.0)
    gpu.add_argument("--no-train-loop", dest="train_loop", action="store_false",
                     help="skip timing train() itself with cuda_graphs off and on")
    gpu.add_argument("--no-profile-steps", dest="profile_steps", action="store_false",
                     help="skip the torch.profiler summary of the WDL+APG step")
    gpu.add_argument("--out", type=Path, default=None, help="folder for throughput.jsonl, train_loop.json, profile.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)

    spec, train_cols, valid_cols, source = load_data()
    if args.device == "cuda" or args.harness:
        import _step_throughput

        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available")
        if args.contenders == ",".join(CONTENDERS):
            args.contenders = "default"
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
        _step_throughput.run(args, spec, train_cols, valid_cols, source, args.out)
        return
    tr = tensors_from_columns(train_cols, spec, "cpu", group_columns=[])
    va = tensors_from_columns(valid_cols, spec, "cpu", group_columns=[])
    if args.profile:
        for name in args.profile.split(","):
            wait_quiet(args.quiet, args.quiet_timeout)
            profile_steps(name, spec, tr)
        return
    runners = make_runners(spec, train_cols, valid_cols, tr, va, args.epochs)
    names = list(INTERACTION) if args.contenders == "interaction" else [c for c in args.contenders.split(",") if c]
    unknown = [n for n in names if n not in runners and not n.startswith("deepctr_")]
    if unknown:
        raise SystemExit(f"--contenders: unknown {unknown}; known: {sorted(runners)} or 'interaction'")
    if args.skip_deepctr or "deepctr_wdl" not in runners:
        if any(n.startswith("deepctr_") for n in names) and not args.skip_deepctr:
            print("deepctr-torch is not installed: pip install deepctr-torch==0.3.0 --no-deps")
        names = [n for n in names if not n.startswith("deepctr_")]

    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"data: {source}: train {len(tr):,} rows, valid {len(va):,} rows, {len(spec.fields)} fields, "
          f"{spec.num_slots} slots")
    print(f"runs: {args.rounds} rounds x {args.epochs} epochs, batch {BATCH}, Adam lr {LR}, emb {EMB}, "
          f"hidden {list(HIDDEN)}")
    if any(n.removeprefix("ours_").removeprefix("deepctr_") in INTERACTION_MODELS for n in names):
        print(f"interaction settings: PNN inner + outer (kernel mat); CIN {list(CIN_SIZES)} split half, linear; "
              f"AutoInt {ATT_LAYERS} layers x {ATT_HEADS} heads, width {EMB}, residual; FiBiNET SENET r={SENET_REDUCTION}, "
              "bilinear field_interaction")

    t_start = time.perf_counter()
    warm = TensorData(tr.x[: 8 * BATCH], tr.y[: 8 * BATCH])
    for n in names:  # untimed warm-up (first-call allocations, lazy library init)
        runners[n](0, warm)

    tput: dict[str, list[float]] = {n: [] for n in names}
    aucs: dict[str, list[float]] = {n: [] for n in names}
    shares: dict[str, list[float]] = {n: [] for n in names}
    discarded = 0
    other = OtherCPU()
    deadline = time.perf_counter() + args.wait_budget
    rng = random.Random(0)
    for r in range(args.rounds):
        order = list(names)
        rng.shuffle(order)
        for n in order:
            for attempt in range(args.retries + 1):
                patient = time.perf_counter() < deadline
                if patient:
                    wait_quiet(args.quiet, min(args.quiet_timeout, deadline - time.perf_counter()))
                probe = OtherCPU()
                sps, val_auc = runners[n](2024 + r, tr)
                share = probe.share()
                if not (share > args.max_other and patient and attempt < args.retries):
                    break
                discarded += 1
            tput[n].append(sps)
            aucs[n].append(val_auc)
            shares[n].append(share)
    other_share = other.share()

    print(f"\n{'contender':>14s} {'samples/s':>10s} {'min':>9s} {'max':>9s} {'val AUC':>8s} {'other CPU':>9s}"
          f"   (median of {args.rounds} rounds; other CPU: largest share during a kept run)")
    for n in names:
        print(f"{n:>14s} {statistics.median(tput[n]):10,.0f} {min(tput[n]):9,.0f} {max(tput[n]):9,.0f} "
              f"{statistics.median(aucs[n]):8.4f} {max(shares[n]):9.0%}")

    def ratio(a: str, b: str) -> float:
        if a not in tput or b not in tput:
            return math.nan
        return statistics.median(x / y for x, y in zip(tput[a], tput[b]))

    print(f"\nother processes used {other_share:.0%} of the machine's CPU during the rounds; "
          f"{discarded} disturbed run(s) repeated (total run {time.perf_counter() - t_start:.0f}s)")
    print("ratios (median of paired per-round ratios):")
    checks = [
        ("ours_wdl", "ceiling", 0.8, "ours WDL / ceiling"),
        ("ours_apg", "deepctr_wdl", 2.0, "ours WDL+APG / DeepCTR WDL"),
        ("ceiling", "deepctr_wdl", None, "ceiling / DeepCTR WDL"),
        ("ours_wdl", "deepctr_wdl", None, "ours WDL / DeepCTR WDL"),
        ("ours_apg", "ours_wdl", None, "ours WDL+APG / ours WDL"),
        ("ours_wdl_bf16", "ours_wdl", None, "ours WDL bf16 / float32"),
        ("ours_apg_bf16", "ours_apg", None, "ours WDL+APG bf16 / float32"),
    ]
    for kind, label in (("pnn", "PNN"), ("xdeepfm", "xDeepFM"), ("autoint", "AutoInt"),
                        ("autoint_plus", "AutoInt+"), ("fibinet", "FiBiNET")):
        checks.append((f"ours_{kind}", f"deepctr_{kind}", 1.5, f"ours {label} / DeepCTR {label}"))
    for a, b, target, label in checks:
        v = ratio(a, b)
        if math.isnan(v):
            continue
        verdict = "" if target is None else (f"  target >= {target}: " + ("met" if v >= target else f"NOT met, {v / target - 1:+.1%} from target"))
        print(f"  {label:30s} {v:6.3f}{verdict}")
    for bf, fp in (("ours_wdl_bf16", "ours_wdl"), ("ours_apg_bf16", "ours_apg")):
        if bf in aucs and fp in aucs:
            diffs = [a - b for a, b in zip(aucs[bf], aucs[fp])]
            worst = max(diffs, key=abs)
            ok = "within 0.001: bf16 can be offered" if max(abs(d) for d in diffs) <= 0.001 else "NOT within 0.001"
            print(f"  AUC {bf} - {fp}: median {statistics.median(diffs):+.4f}, largest {worst:+.4f} -> {ok}")


if __name__ == "__main__":
    main()
