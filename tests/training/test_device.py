from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dynamic_ctr.training import make_generator, resolve_device, seed_everything


@pytest.mark.parametrize(("available", "expected"), [(False, "cpu"), (True, "cuda")])
def test_auto_picks_cuda_only_when_available(monkeypatch, available, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert resolve_device("auto").type == expected


def test_explicit_devices(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="'gpu0'"):
        resolve_device("gpu0")


def test_seed_everything_reseeds_python_numpy_and_torch():
    def draws():
        return random.random(), np.random.rand(), torch.rand(()).item()

    seed_everything(5)
    a = draws()
    seed_everything(5)
    assert draws() == a
    seed_everything(6)
    assert draws() != a
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)


def test_make_generator_is_seeded():
    a = torch.randperm(50, generator=make_generator(3))
    assert torch.equal(a, torch.randperm(50, generator=make_generator(3)))
    assert not torch.equal(a, torch.randperm(50, generator=make_generator(4)))
