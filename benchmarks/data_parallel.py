"""Data-parallel training in the training node: the ranks' throughput against one process.

One WDL config (the `apg` suite's base: embedding 16, hidden [256, 128, 64]) trained for
``--epochs`` epochs at global batch ``--batch`` on the encoded training split of the
default data (MovieLens latest-small, 70,585 rows; validation on its 8,000 validation
rows), by the three ways this machine can run it:

- ``one process``: :func:`dynamic_ctr.training.tuning.fit` here, torch's default threads
  (the CPU's cores), the single-process path of the training node;
- ``one process, 1 thread``: the same with one torch thread (the floor a rank starts from);
- ``W ranks``: :class:`dynamic_ctr.training.distributed.LocalRanks` (``--ranks``, gloo,
  ``cores // W`` threads each), the node's path with ``training.data_parallel.ranks=W``.
  The ranks are started once per round by a first fit; the second fit on the warm ranks
  is timed (start-up = first fit's wall time - second's, printed apart), as the node
  starts them once for all the trials and seeds of a variant.

Measured per run: training samples per second (the history's ``samples_per_s``: training
steps only, validation left out, averaged over the epochs) and the wall time of the fit.
Rounds are interleaved in a fresh random order each, ratios paired per round; a round
disturbed by other processes is repeated (``benchmarks/_machine.py``). Each run checks
that the validation AUC is above 0.6.

From the repository root::

    python benchmarks/data_parallel.py
    python benchmarks/data_parallel.py --ranks 2 --repeats 5 --batch 4096
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _machine import add_quiet_arguments, interleaved_rounds  # noqa: E402
from apg_table5 import fmt, machine_line, median, paired_ratio, spread  # noqa: E402
import torch  # noqa: E402

CONTENDERS = ("one process", "one process, 1 thread", "ranks")


def encoded_splits():
    """``(spec, train, valid)`` of MovieLens latest-small, encoded as the pipeline does."""
    from dynamic_ctr.data.adapters import movielens_latest
    from dynamic_ctr.data.encoder import EncoderParams, FeatureEncoder, aggregate_item_lists
    from dynamic_ctr.data.raw import RawFileConfig, read_raw
    from dynamic_ctr.data.split import SplitParams, split_frame
    from dynamic_ctr.pipelines.training.nodes import frame_to_tensors

    small = ROOT / "data/01_raw/ml-latest-small"
    files = {k: read_raw(RawFileConfig(filepath=str(small / f"{k}.csv"))) for k in ("ratings", "movies", "tags")}
    result = movielens_latest(files, {})
    train, valid, test = split_frame(result.table, SplitParams(), result.schema.time_key)
    train, (valid, _), _ = aggregate_item_lists(train, [valid, test], result.schema)
    encoder = FeatureEncoder.fit(train, result.schema, EncoderParams())
    spec = encoder.feature_spec()
    return spec, *(frame_to_tensors(encoder.transform(f)[0], spec, "cpu") for f in (train, valid))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1024, help="global batch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    add_quiet_arguments(parser, "round", timeout=120, budget=900)
    args = parser.parse_args()

    from dynamic_ctr.training.distributed import LocalRanks
    from dynamic_ctr.training.tuning import fit

    spec, train, valid = encoded_splits()
    config = {
        "model": {"family": "wdl", "embedding_dim": 16, "hidden_units": [256, 128, 64], "dropout": 0.0},
        "train": {"lr": 0.005, "batch_size": args.batch, "max_epochs": args.epochs, "patience": args.epochs,
                  "seed": 2024, "progress": False},
    }  # fmt: skip
    threads = torch.get_num_threads()
    startups: list[float] = []

    def measure(name: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        if name == "ranks":
            with LocalRanks(args.ranks, "cpu", spec, train, valid) as ranks:
                ranks.fit(config, None, None)  # starts the ranks (spawn, imports, process group)
                started = time.perf_counter()
                result = ranks.fit(config, None, None)  # the timed one, on warm ranks
                wall = time.perf_counter() - started
                startups.append((started - t0) - wall)
        else:
            torch.set_num_threads(1 if name.endswith("1 thread") else threads)
            try:
                result = fit(config, spec, train, valid)
            finally:
                torch.set_num_threads(threads)
            wall = time.perf_counter() - t0
        assert result.best_val_auc > 0.6, (name, result.best_val_auc)
        return median([h["samples_per_s"] for h in result.history]), wall

    rounds, shares, discarded = interleaved_rounds(args, CONTENDERS, measure, key=lambda n: n)
    print(machine_line(torch.device("cpu")))
    print(f"WDL [256, 128, 64], {len(train):,} training rows, global batch {args.batch}, {args.epochs} epochs; "
          f"{args.repeats} rounds ({discarded} disturbed rounds repeated; others' CPU share per round: "
          f"{', '.join(fmt(s, '.2f') for s in shares)}); torch threads of one process: {threads}")  # fmt: skip
    print(f"{'contender':<26}{'samples/s (median)':>20}{'spread':>9}{'fit s':>8}{'x one process':>15}")
    base = [r["one process"][0] for r in rounds]
    for name in CONTENDERS:
        label = f"{args.ranks} ranks ({max(1, (os.cpu_count() or 1) // args.ranks)} thread(s) each)" if name == "ranks" else name
        rates = [r[name][0] for r in rounds]
        walls = [r[name][1] for r in rounds]
        print(f"{label:<26}{median(rates):>20,.0f}{fmt(spread(rates), '.1%'):>9}{median(walls):>8.1f}{paired_ratio(rates, base):>15.2f}")
    print(f"ranks' start-up (spawn, imports, process group): median {median(startups):.1f} s")


if __name__ == "__main__":
    main()
