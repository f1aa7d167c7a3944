"""Train a planned suite outside Kedro, for a machine that has torch and Optuna but no Kedro.

A GPU machine lent for a few minutes has neither the project's Kedro install nor its data
root. This script carries what the training nodes need and runs what they run:

``export`` (here, after ``kedro run``) copies the latest model input (train and
validation Parquet, the feature spec) and the suites' plans out of ``data/`` into one
folder. ``train`` (there, or here for the CPU reference) runs, for every ready variant of
each plan, what ``pipelines/training/nodes.train_variant`` runs on one process: the Optuna
study of :func:`dynamic_ctr.training.tuning.tune` with the planned budget, search space and
seeds, then the best configuration again under every further seed, and reports the wall
time per variant. Studies live in a fresh SQLite file under ``--work`` (as the pipeline's
do under ``data/06_models``), so every run tunes from scratch. ``compare`` prints two
runs' wall times side by side.

Usage::

    kedro run                                                   # once, for the model input and plans
    python benchmarks/suite_on_device.py export --to .gpu/suite
    python benchmarks/suite_on_device.py train --from .gpu/suite --device cpu --out cpu.json
    python benchmarks/suite_on_device.py train --from .gpu/suite --device cuda --out cuda.json
    python benchmarks/suite_on_device.py compare cpu.json cuda.json

Needs torch, pandas, pyarrow and Optuna (no Kedro).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DATASET = "movielens_latest"
SUITES = ("apg", "dynint")


def latest(path: Path) -> Path:
    """The newest version of a Kedro versioned dataset ``path/<version>/<name>``."""
    versions = sorted(p for p in path.iterdir() if (p / path.name).is_file()) if path.is_dir() else []
    if not versions:
        raise SystemExit(f"{path}: no version written yet; run `kedro run` first")
    return versions[-1] / path.name


def export(to: Path, suites: list[str], data: Path = ROOT / "data") -> None:
    to.mkdir(parents=True, exist_ok=True)
    model_input = data / "05_model_input" / DATASET
    for name in ("train.parquet", "valid.parquet", "feature_spec.json"):
        shutil.copyfile(latest(model_input / name), to / name)
    for suite in suites:
        shutil.copyfile(latest(data / "06_models" / DATASET / suite / "suite_plan.json"), to / f"{suite}_plan.json")
    print(f"exported model input and the plans of {suites} to {to}")


def train_suites(source: Path, device_name: str, suites: list[str], only: list[str], work: Path,
                 on_row=lambda rows: None) -> list[dict]:
    import pandas as pd
    import torch

    from dynamic_ctr.spec import FeatureSpec
    from dynamic_ctr.training import resolve_device, tensors_from_columns
    from dynamic_ctr.training.tuning import StudyConfig, further_seeds, in_process_fitter, tune

    spec = FeatureSpec.from_dict(json.loads((source / "feature_spec.json").read_text()))
    device = resolve_device(device_name)
    columns = [*spec.index_columns, spec.label]
    frames = {s: pd.read_parquet(source / f"{s}.parquet", columns=columns) for s in ("train", "valid")}
    valid = tensors_from_columns({c: frames["valid"][c].to_numpy() for c in columns}, spec, device)
    rows = []
    for suite in suites:
        plan = json.loads((source / f"{suite}_plan.json").read_text())
        for name, entry in plan["variants"].items():
            if entry["status"] != "ready" or (only and name not in only):
                continue
            frame = frames["train"].iloc[: int(entry["train_rows"])] if entry.get("train_rows") else frames["train"]
            t0 = time.perf_counter()
            train = tensors_from_columns({c: frame[c].to_numpy() for c in columns}, spec, device)
            study = {**entry["study"], "storage": f"sqlite:///{work / 'optuna.db'}",
                     "checkpoint_dir": str(work / "checkpoints")}
            fitter = in_process_fitter(spec, train, valid)
            result = tune({"model": entry["model"], "train": entry["train"]}, entry["search_space"], spec, train,
                          valid, StudyConfig(study_name=f"{suite}.{name}", **study), fitter=fitter)
            seeds = further_seeds(fitter, result.best_config, entry["seeds"][1:])
            seed_aucs = [result.best_value, *(run.best_val_auc for run in seeds.values())]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            row = {"suite": suite, "variant": name, "device": str(device), "seconds": seconds,
                   "trials": entry["study"]["n_trials"], "seeds": len(entry["seeds"]),
                   "best_val_auc": result.best_value, "seed_val_aucs": seed_aucs,
                   "cuda_graphs": entry["train"].get("cuda_graphs", "off")}
            rows.append(row)
            on_row(rows)  # written after every variant: a run cut short keeps what finished
            print(f"{suite:8s} {name:24s} {seconds:7.1f} s  best val AUC {result.best_value:.4f}  "
                  f"({row['trials']} trials, {row['seeds']} seeds)", flush=True)
    return rows


def compare(a: Path, b: Path) -> None:
    left, right = (json.loads(p.read_text()) for p in (a, b))
    times = {(r["suite"], r["variant"]): r for r in right["variants"]}
    print(f"{'variant':34s} {left['device']:>10s} {right['device']:>10s}  ratio  (wall seconds: tuning + seeds)")
    total = [0.0, 0.0]
    for r in left["variants"]:
        other = times.get((r["suite"], r["variant"]))
        if other is None:
            continue
        total[0] += r["seconds"]
        total[1] += other["seconds"]
        print(f"{r['suite'] + '.' + r['variant']:34s} {r['seconds']:10.1f} {other['seconds']:10.1f}  "
              f"{r['seconds'] / other['seconds']:5.2f}x")
    print(f"{'total':34s} {total[0]:10.1f} {total[1]:10.1f}  {total[0] / max(total[1], 1e-9):5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export")
    p.add_argument("--to", type=Path, required=True)
    p.add_argument("--suites", default=",".join(SUITES))
    p.add_argument("--data", type=Path, default=ROOT / "data", help="the project's data folder (Kedro's outputs)")
    p = sub.add_parser("train")
    p.add_argument("--from", dest="source", type=Path, required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--suites", default=",".join(SUITES))
    p.add_argument("--variants", default="", help="comma-separated variant names (default: every ready one)")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("compare")
    p.add_argument("left", type=Path)
    p.add_argument("right", type=Path)
    args = parser.parse_args()
    if args.command == "export":
        export(args.to, args.suites.split(","), args.data)
    elif args.command == "compare":
        compare(args.left, args.right)
    else:
        import os
        import platform

        import torch

        machine = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else (
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} threads")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()

        def write(rows: list[dict]) -> None:
            summary = {"device": rows[0]["device"] if rows else args.device, "machine": machine,
                       "torch": torch.__version__, "seconds": time.perf_counter() - t0, "variants": rows}
            args.out.write_text(json.dumps(summary, indent=1))

        with tempfile.TemporaryDirectory() as work:
            rows = train_suites(args.source, args.device, args.suites.split(","),
                                [v for v in args.variants.split(",") if v], Path(work), write)
        write(rows)
        print(f"total {time.perf_counter() - t0:.0f} s on {machine}; written {args.out}")


if __name__ == "__main__":
    main()
