"""Folding nodes: each trained variant in its deployment form, checked on the test split."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from dynamic_ctr.models import count_parameters, fold_model, hidden_memory_bytes
from dynamic_ctr.models.adasparse import AdaSparseTower
from dynamic_ctr.pipelines.training.nodes import frame_to_tensors
from dynamic_ctr.spec import FeatureSpec
from dynamic_ctr.training.metrics import evaluate


class FoldingMismatchError(RuntimeError):
    """The folded model does not predict what the trained model predicts."""


@torch.no_grad()
def _latency_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    model(x)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _hidden_mb(model: nn.Module, batch_size: int) -> float | None:
    try:
        return hidden_memory_bytes(model, batch_size) / 2**20
    except ValueError:  # a backbone without a measurable dense tower
        return None


@torch.no_grad()
def adasparse_record(model: nn.Module, x: torch.Tensor, spec: FeatureSpec, params: dict[str, Any]) -> dict[str, Any] | None:
    """What an AdaSparse tower does on the test rows ``x``: the share of zero factors per
    layer, overall and per domain, and each domain's mean factors (AdaSparse Figure 3a);
    with ``pruner_input: domain``, also each domain's pruned serving form, checked
    against the masked model on that domain's rows, and the latency of both.

    Returns None for a model without an AdaSparse tower.

    Raises:
        FoldingMismatchError: a pruned form predicts differently (above the tolerance).
    """
    tower = getattr(model, "dense", None)
    if not isinstance(tower, AdaSparseTower):
        return None
    emb = model.embedding(x)  # (B, F, D): every backbone feeds its tower emb.flatten(1)
    factors = tower.factors(emb.flatten(1), emb)  # per layer (B, N_l)
    slot = list(spec.index_columns).index(model.config["domain_field"])
    domains = x[:, slot]
    record: dict[str, Any] = {
        "formulation": tower.formulation, "pruner_input": tower.pruner_input,
        "sparsity_by_layer": [float((pi == 0).double().mean()) for pi in factors],
        "domains": {},
    }
    sizes = torch.bincount(domains)
    for d in torch.nonzero(sizes).flatten().tolist():
        rows = domains == d
        record["domains"][str(d)] = {
            "rows": int(sizes[d]),
            "sparsity_by_layer": [float((pi[rows] == 0).double().mean()) for pi in factors],
            "mean_factors": [pi[rows].mean(0).tolist() for pi in factors],
        }
    if tower.pruner_input != "domain":
        return record
    probe = copy.deepcopy(model).eval()  # the model with one domain's pruned tower swapped in
    largest = int(torch.argmax(sizes))
    for d, entry in record["domains"].items():
        rows = domains == int(d)
        probe.dense = tower.pruned_for_domain(tower.domain_embedding(emb[rows][:1])[0])
        diff = float((torch.sigmoid(probe(x[rows])) - torch.sigmoid(model(x[rows]))).abs().max())
        if not diff <= params["tolerance"]:
            raise FoldingMismatchError(f"domain {d}: the pruned serving form differs from the masked model by {diff:.3g}")
        entry |= {"pruned_max_abs_diff": diff, "pruned_parameters": count_parameters(probe.dense)}
        if int(d) == largest:  # latency on the largest domain's rows: serving one domain at a time
            batch = x[rows][: params["latency_batch"]]
            record["pruned_latency"] = {
                "domain": largest, "rows": len(batch), "masked_ms": _latency_ms(model, batch, params["latency_repeats"]),
                "pruned_ms": _latency_ms(probe, batch, params["latency_repeats"]),
            }
    record["pruned_max_abs_diff"] = max(e["pruned_max_abs_diff"] for e in record["domains"].values())
    return record


def fold_variant(
    trained: dict[str, nn.Module], test_frame: pd.DataFrame, feature_spec: dict[str, Any], params: dict[str, Any]
) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Fold every seed's model and verify it on the whole test split.

    Returns the folded models and the check: per seed the max abs difference of the
    predicted probabilities (folded vs trained, eval mode, float32), and parameter
    counts, hidden-layer memory and latency (median of ``latency_repeats`` forward
    passes of ``latency_batch`` test rows on the CPU) before and after; for an AdaSparse
    model also the first seed's :func:`adasparse_record`.

    Raises:
        FoldingMismatchError: a difference above ``params['tolerance']``.
    """
    if not trained:  # not applicable to this data set: nothing to fold
        return {}, {"status": "not_applicable"}
    spec = FeatureSpec.from_dict(feature_spec)
    test = frame_to_tensors(test_frame, spec, "cpu")
    batch = test.x[: params["latency_batch"]]
    folded_bundle: dict[str, nn.Module] = {}
    seeds: dict[str, Any] = {}
    for name, model in trained.items():
        model = model.eval()
        folded = fold_model(model)
        before, after = evaluate(model, test), evaluate(folded, test)
        diff = float(np.max(np.abs(before - after)))
        if not diff <= params["tolerance"]:
            raise FoldingMismatchError(
                f"{name}: folded and trained predictions differ by {diff:.3g} on the test split "
                f"(tolerance {params['tolerance']:g})"
            )
        seeds[name] = {
            "max_abs_diff": diff,
            "parameters": count_parameters(model),
            "folded_parameters": count_parameters(folded),
            "hidden_memory_mb": _hidden_mb(model, params["latency_batch"]),
            "folded_hidden_memory_mb": _hidden_mb(folded, params["latency_batch"]),
            "latency_ms": _latency_ms(model, batch, params["latency_repeats"]),
            "folded_latency_ms": _latency_ms(folded, batch, params["latency_repeats"]),
        }
        folded_bundle[name] = folded
    first = next(iter(seeds.values()))
    check = {
        "status": "folded",
        "max_abs_diff": max(s["max_abs_diff"] for s in seeds.values()),
        "tolerance": params["tolerance"],
        "test_rows": len(test),
        "latency_batch": params["latency_batch"],
        **{k: first[k] for k in ("parameters", "folded_parameters", "hidden_memory_mb", "folded_hidden_memory_mb")},
        "latency_ms": statistics.median(s["latency_ms"] for s in seeds.values()),
        "folded_latency_ms": statistics.median(s["folded_latency_ms"] for s in seeds.values()),
        "seeds": seeds,
    }
    adasparse = adasparse_record(next(iter(trained.values())), test.x, spec, params)
    if adasparse is not None:  # the first seed's learned structure
        check["adasparse"] = adasparse
    return folded_bundle, check


def select_deployment(deployment: dict[str, Any], *, suite: str, **artifacts: Any) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """The suite's deployable model: the folded model of the variant named by
    ``deployment[suite]``, or with ``best`` (the default), of the trained variant with
    the highest validation AUC (its first seed).

    ``artifacts`` holds ``<variant>__folded`` and ``<variant>__summary`` per variant.
    """
    summaries = {
        k[: -len("__summary")]: v for k, v in artifacts.items() if k.endswith("__summary") and v.get("status") == "trained"
    }
    if not summaries:
        raise ValueError("no variant of the suite was trained, so none can be deployed")
    configured = choice = (deployment or {}).get(suite, "best")
    if choice == "best":
        choice = max(summaries, key=lambda v: summaries[v]["best_value"])
    if choice not in summaries:
        raise ValueError(f"parameter deployment.{suite}={choice!r} is not a trained variant of the suite; trained: {sorted(summaries)}")
    bundle = artifacts[f"{choice}__folded"]
    seed_key = next(iter(bundle))
    record = {
        "variant": choice,
        "model": seed_key,
        "validation_auc": summaries[choice]["best_value"],
        "suite": suite,
        "selected_by": "parameter" if configured != "best" else "best validation AUC",
    }
    return {"model": bundle[seed_key]}, record
