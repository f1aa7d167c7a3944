"""How many epochs §4.1.4's FTRL / group-lasso FTRL need against Adam (DynInt-DGP).

Trains DynInt-DGP (3 PIN layers, h = 4, K = 16, r = 4, D = 16) on the encoded MovieLens
latest-small splits that ``kedro run`` writes (the newest versions under
``data/05_model_input/movielens_latest``), one seed, batch 1024, up to 10 epochs with
patience 2, and prints the validation AUC after every epoch:

* Adam at lr 0.005 (the suite's default optimiser);
* G-FTRL for the embedding table and FTRL for the PIN (generators: Adam 0.001) at
  alpha in {0.02, 0.05, 0.1, 0.3} and beta in {1, 0.1}.

It is the evidence behind the ``dynint`` suite keeping Adam as its default (the README and
``conf/base/parameters_dynint.yml``). Run after ``kedro run``, from the repository root::

    python benchmarks/optimiser_steps.py
"""

from __future__ import annotations

import glob
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from dynamic_ctr.pipelines.training.nodes import frame_to_tensors  # noqa: E402
from dynamic_ctr.spec import FeatureSpec  # noqa: E402
from dynamic_ctr.training.tuning import fit  # noqa: E402

ROOT = Path("data/05_model_input/movielens_latest")
MODEL = {"family": "xdeepint", "embedding_dim": 16,
         "dynint": {"mode": "dgp", "layers": 3, "subspaces": 4, "rank": 16, "reduction": 4, "orthogonal_rate": 0.0}}


def newest(name: str) -> str:
    versions = sorted(glob.glob(str(ROOT / name / "*" / name)))
    if not versions:
        raise SystemExit(f"no {ROOT / name}: run `kedro run` first")
    return versions[-1]


def main() -> None:
    spec = FeatureSpec.from_dict(json.loads(Path(newest("feature_spec.json")).read_text()))
    train = frame_to_tensors(pd.read_parquet(newest("train.parquet")), spec, "cpu")
    valid = frame_to_tensors(pd.read_parquet(newest("valid.parquet")), spec, "cpu")
    runs = {"adam lr 0.005": {"lr": 0.005}}
    for lr, beta in itertools.product([0.02, 0.05, 0.1, 0.3], [1.0, 0.1]):
        runs[f"gftrl/ftrl alpha {lr} beta {beta}"] = {"lr": 0.001, "group_optimizers": {
            "embedding": {"optimizer": "gftrl", "lr": lr, "beta": beta},
            "interaction": {"optimizer": "ftrl", "lr": lr, "beta": beta}}}
    print(f"DynInt-DGP on {len(train):,} training rows, batch 1024, seed 2024; validation AUC per epoch\n")
    print("| optimiser | best | epochs | validation AUC per epoch |\n|---|---|---|---|")
    for name, train_cfg in runs.items():
        config = {"model": MODEL, "train": {"batch_size": 1024, "max_epochs": 10, "patience": 2, "seed": 2024,
                                            "progress": False, **train_cfg}}
        history = fit(config, spec, train, valid).history
        aucs = [h["val_auc"] for h in history]
        print(f"| {name} | {max(aucs):.4f} | {len(aucs)} | {' '.join(f'{a:.4f}' for a in aucs)} |", flush=True)


if __name__ == "__main__":
    main()
