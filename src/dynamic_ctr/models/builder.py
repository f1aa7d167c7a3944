"""``build_model``: a config dict and a feature spec in, a seeded ``nn.Module`` out."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dynamic_ctr.models.adasparse import AdaSparseTower
from dynamic_ctr.models.apg import APGTower
from dynamic_ctr.models.backbones import BACKBONES
from dynamic_ctr.models.config import ModelConfig, dense_towers, resolve_config, tower_config
from dynamic_ctr.models.dynint import XDeepInt
from dynamic_ctr.models.embedding import field_order
from dynamic_ctr.models.layers import MLPTower
from dynamic_ctr.models.multidomain import MAML, STAR, MMoE
from dynamic_ctr.spec import FeatureSpec

__all__ = ["MODELS", "build_dense", "build_model", "build_towers"]

#: Every model family: the backbones around a dense tower, xDeepInt/DynInt, and the
#: multi-domain networks.
MODELS = {**BACKBONES, "xdeepint": XDeepInt, "star": STAR, "mmoe": MMoE, "maml": MAML}


def build_dense(cfg: ModelConfig, spec: FeatureSpec, in_dim: int) -> nn.Module:
    """The dense tower of ``cfg``: static MLP, APG when ``cfg.apg`` is set, AdaSparse's
    pruned tower when ``cfg.adasparse`` is."""
    if cfg.apg is not None:
        return APGTower(cfg, spec, in_dim)
    if cfg.adasparse is not None:
        a = cfg.adasparse
        order = field_order(spec)
        return AdaSparseTower(
            in_dim, cfg.hidden_units, [order.index(f) for f in a.fields], cfg.embedding_dim,
            formulation=a.formulation, pruner_input=a.pruner_input, beta=a.beta, epsilon=a.epsilon,
            alpha_start=a.alpha_start, alpha_max=a.alpha_max, anneal_steps=a.anneal_steps, r_min=a.r_min,
            r_max=a.r_max, lambda_start=a.lambda_start, lambda_growth=a.lambda_growth, lambda_max=a.lambda_max,
            dropout=cfg.dropout, batch_norm=cfg.batch_norm, stop_gradient=a.stop_gradient,
        )
    return MLPTower(cfg, in_dim)


def build_towers(cfg: ModelConfig, spec: FeatureSpec) -> list[nn.Module]:
    """Every dense tower ``cfg``'s family asks for (``config.dense_towers``), each built
    by :func:`build_dense` on its own input width and widths: none (no tower, or
    ``dnn: false``), one, or FinalMLP's two streams."""
    return [
        build_dense(tower_config(cfg, i), spec, in_dim) for i, (in_dim, _) in enumerate(dense_towers(cfg, spec))
    ]


def build_model(config: dict[str, Any] | ModelConfig, spec: FeatureSpec) -> nn.Module:
    """Build a CTR model, ``forward(x (B, S)) -> (B,)`` logits.

    Args:
        config: plain dict (see the ``models`` package docstring); unknown keys or
            bad values raise ``ValueError`` naming the key.
        spec: the feature spec the input follows.

    Returns:
        The backbone module, with ``model.config`` (the normalized dict; rebuild with
        ``build_model(model.config, model.spec)``) and ``model.spec``. Parameters are
        initialised from ``config["seed"]`` without touching the global RNG. A
        ``folded`` config gives an eval-mode model.
    """
    if not isinstance(spec, FeatureSpec):
        raise ValueError(f"spec must be a FeatureSpec, got {type(spec).__name__}")  # noqa: TRY004
    cfg = resolve_config(config, spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        towers = build_towers(cfg, spec)
        # one tower is injected as is, FinalMLP's two as a tuple
        dense = None if not towers else towers[0] if len(towers) == 1 else tuple(towers)
        model = MODELS[cfg.family](cfg, spec, dense)
    model.config = cfg.to_dict()
    model.spec = spec
    if cfg.folded:
        model.eval()
    return model
