"""Shared fixtures: a tiny feature spec and input batches."""

from __future__ import annotations

import pytest
import torch
from modelkit import random_batch

from dynamic_ctr.spec import FeatureSpec, FieldSpec


@pytest.fixture
def spec() -> FeatureSpec:
    """user, item, domain (categorical) + genres (sequence, max_len 4): F=4, S=7."""
    return FeatureSpec(
        fields=(
            FieldSpec("user", "categorical", vocab_size=10, source="user"),
            FieldSpec("item", "categorical", vocab_size=8, source="item"),
            FieldSpec("domain", "categorical", vocab_size=4, source="domain"),
            FieldSpec("genres", "sequence", vocab_size=6, max_len=4, source="item"),
        ),
        user_field="user",
        item_field="item",
        domain_field="domain",
    )


@pytest.fixture
def batch(spec: FeatureSpec) -> torch.Tensor:
    return random_batch(spec, 3)


@pytest.fixture
def big_batch(spec: FeatureSpec) -> torch.Tensor:
    return random_batch(spec, 64, seed=1)
