"""Deployment folding (APG KDD §3.2.4, "No Additional Inference Latency and Memory Cost";
DynInt §3.5: DGP's and DWP's instance-independent factors precomputed; STAR: shared and
domain-specific weights multiplied out per domain).

``fold_model`` returns a new module whose over-parameterised shared matrices are
multiplied out once (``V = V^1 ... V^J``, ``U = U^1 ... U^J``: a v5 layer becomes the
v4 layer with the same output) and whose dropout is removed; it is in eval mode.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from dynamic_ctr.models.apg import APGLinear
from dynamic_ctr.models.config import parse_config
from dynamic_ctr.models.dynint import PolynomialInteraction
from dynamic_ctr.models.star import StarNetwork

__all__ = ["fold_apg_linear", "fold_model"]


def fold_apg_linear(layer: APGLinear) -> APGLinear:
    """A v4 :class:`APGLinear` computing what the v5 ``layer`` computes.

    The generator and bias are copied; ``V_factors``/``U_factors`` become their
    single products. Non-v5 layers are returned as a copy.
    """
    if layer.cfg.apg.version != "v5":
        return copy.deepcopy(layer)
    apg = dataclasses.replace(layer.cfg.apg, version="v4", stack=1)
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the global RNG
        folded = APGLinear(dataclasses.replace(layer.cfg, apg=apg))
    with torch.no_grad():
        v, u = layer.shared_matrices()  # (M, K), (K, N)
        folded.V_factors[0].copy_(v)
        folded.U_factors[0].copy_(u)
        folded.generator.load_state_dict(layer.generator.state_dict())
        if layer.bias is not None:
            folded.bias.copy_(layer.bias)
    return folded.to(device=v.device, dtype=v.dtype)


def fold_model(model: nn.Module) -> nn.Module:
    """Deployment form of ``model``; ``model`` itself is left untouched.

    Returns:
        A deep copy in eval mode with every v5 ``APGLinear`` folded to v4 and every
        ``nn.Dropout`` replaced by ``nn.Identity``. Its forward equals the eval-mode
        forward of ``model``. When ``model`` has a ``config``, the copy's config is
        the same with ``folded=True``, ``dropout=0`` and ``apg.version="v4"`` (for
        v5), so ``build_model(folded.config, spec)`` rebuilds the folded structure
        and loads ``folded.state_dict()``.
    """
    folded = copy.deepcopy(model)
    for module in list(folded.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(module, name, nn.Identity())
            elif isinstance(child, APGLinear) and child.cfg.apg.version == "v5":
                setattr(module, name, fold_apg_linear(child))
            elif isinstance(child, PolynomialInteraction) and child.mode in ("dgp", "dwp"):
                setattr(module, name, child.fold())  # DynInt: instance-independent parts precomputed
            elif isinstance(child, StarNetwork):
                setattr(module, name, child.fold())  # STAR: W_shared o W_d per domain
    folded.eval()
    config = getattr(model, "config", None)
    if config is not None:
        cfg = parse_config(config)
        apg = cfg.apg
        if apg is not None and apg.version == "v5":
            apg = dataclasses.replace(apg, version="v4", stack=1)
        folded.config = dataclasses.replace(cfg, apg=apg, dropout=0.0, folded=True).to_dict()
    return folded
