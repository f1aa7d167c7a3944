"""Shared fixtures for the training tests: a tiny stand-in model and synthetic data.

The stand-in keeps these tests independent of ``dynamic_ctr.models``: it honours
the model contract (``forward(x (B, S) int64) -> (B,)`` logits, ``.config``,
``.spec``) and nothing else.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

try:
    import dynamic_ctr.spec  # noqa: F401
except ModuleNotFoundError:  # project not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from dynamic_ctr.spec import FeatureSpec, FieldSpec  # noqa: E402

N_USERS, N_ITEMS, N_CTX, TAG_VOCAB = 60, 40, 4, 12


class TinyCTR(nn.Module):
    """Per-slot embeddings (one table with slot offsets) -> MLP -> logit.

    Config keys: ``dim`` (embedding size), ``hidden`` (MLP width), ``dropout``.
    """

    def __init__(self, config: dict[str, Any], spec: FeatureSpec) -> None:
        super().__init__()
        self.config = dict(config)
        self.spec = spec
        dim, hidden = int(config.get("dim", 4)), int(config.get("hidden", 8))
        vocab = [f.vocab_size for f in spec.categorical] + [
            f.vocab_size for f in spec.sequences for _ in range(f.max_len)
        ]
        self.register_buffer(
            "offsets", torch.tensor(np.cumsum([0, *vocab[:-1]]), dtype=torch.int64)
        )
        self.embedding = nn.Embedding(sum(vocab), dim)
        self.mlp = nn.Sequential(
            nn.Linear(len(vocab) * dim, hidden),
            nn.ReLU(),
            nn.Dropout(float(config.get("dropout", 0.0))),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S)`` int64 -> logits ``(B,)``."""
        e = self.embedding(x + self.offsets)  # (B, S, D)
        return self.mlp(e.flatten(1)).squeeze(-1)  # (B,)


def build_tiny(config: dict[str, Any], spec: FeatureSpec) -> TinyCTR:
    return TinyCTR(config, spec)


@pytest.fixture
def spec() -> FeatureSpec:
    return FeatureSpec(
        fields=(
            FieldSpec("user", "categorical", N_USERS + 2, source="user"),
            FieldSpec("item", "categorical", N_ITEMS + 2, source="item"),
            FieldSpec("ctx", "categorical", N_CTX + 2),
            FieldSpec("tags", "sequence", TAG_VOCAB + 2, max_len=3, source="item"),
        ),
        user_field="user",
        item_field="item",
    )


def make_columns(
    n: int, seed: int, *, flip: bool = False
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A learnable click table: P(click) = sigmoid(user effect + item effect - 0.5).

    The effects are fixed (seed 0) so every split shares one ground truth; ``seed``
    only draws rows and clicks. ``flip=True`` swaps the clicks (a split whose
    concept is the opposite of the training one).

    Returns:
        ``(columns, true_probability)``.
    """
    truth = np.random.default_rng(0)
    user_w, item_w = truth.normal(0, 1.5, N_USERS), truth.normal(0, 1.5, N_ITEMS)
    rng = np.random.default_rng(seed)
    u, i = rng.integers(0, N_USERS, n), rng.integers(0, N_ITEMS, n)
    prob = 1.0 / (1.0 + np.exp(-(user_w[u] + item_w[i] - 0.5)))
    label = (rng.random(n) < prob).astype(np.float32)
    if flip:
        label = 1.0 - label
    lens = rng.integers(0, 4, n)
    tags = rng.integers(2, TAG_VOCAB + 2, (n, 3)) * (np.arange(3) < lens[:, None])  # 0 = padding
    columns = {
        "user": u + 2,
        "item": i + 2,
        "ctx": rng.integers(2, N_CTX + 2, n),
        "tags__0": tags[:, 0],
        "tags__1": tags[:, 1],
        "tags__2": tags[:, 2],
        "tags__len": lens,
        "label": label,
    }
    return columns, prob


@pytest.fixture
def builder():
    """``builder(config, spec) -> TinyCTR`` (the ``build_model`` contract)."""
    return build_tiny


@pytest.fixture
def columns_factory():
    """``columns_factory(n, seed, flip=False) -> (columns, true_probability)``."""
    return make_columns


@pytest.fixture
def splits(spec):
    """``(train, valid, valid_true_probability)``: 3000/1500 rows on CPU."""
    from dynamic_ctr.training import tensors_from_columns

    train_cols, _ = make_columns(3000, seed=1)
    valid_cols, valid_prob = make_columns(1500, seed=2)
    return (
        tensors_from_columns(train_cols, spec),
        tensors_from_columns(valid_cols, spec),
        valid_prob,
    )


@pytest.fixture(autouse=True)
def _single_thread(single_thread):
    """Tiny models run fastest (and steadiest on a shared machine) on one thread."""
    yield
