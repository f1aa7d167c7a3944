"""Test helpers for tests/models (imported by the tests and conftest)."""

from __future__ import annotations

import torch
from torch import nn

from dynamic_ctr.spec import FeatureSpec


def random_batch(spec: FeatureSpec, batch_size: int, seed: int = 0) -> torch.Tensor:
    """``(B, S)`` indices with some pad slots in the sequence fields."""
    g = torch.Generator().manual_seed(seed)
    cols = []
    for f in spec.categorical:
        cols.append(torch.randint(1, f.vocab_size, (batch_size, 1), generator=g))
    for f in spec.sequences:
        seq = torch.randint(0, f.vocab_size, (batch_size, f.max_len), generator=g)
        seq[:, 0] = torch.randint(2, f.vocab_size, (batch_size,), generator=g)  # never all pad
        cols.append(seq)
    return torch.cat(cols, dim=1)


def perturb(
    model: nn.Module, seed: int = 0, scale: float = 0.3, table_scale: float = 1.0
) -> nn.Module:
    """Add noise to every parameter (embedding tables: ``table_scale``) so outputs
    depend visibly on inputs and weights; equality tests then mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.add_(noise * (table_scale if "table" in name else scale))
    return model


def small_config(**overrides: object) -> dict:
    cfg = {"family": "wdl", "embedding_dim": 4, "hidden_units": [12, 8]}
    cfg.update(overrides)
    return cfg
