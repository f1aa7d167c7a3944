"""Device choice and seeding.

Resolve the device once at the start of a run and pass the resulting
``torch.device`` around; nothing in ``training/`` looks at ``torch.cuda`` on its own.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["flush_denormals", "make_generator", "resolve_device", "seed_everything"]


def flush_denormals() -> None:
    """Round denormal floats to zero on the CPU, for the rest of the process.

    Values below float32's normal range (1.2e-38) arise in these models (a sigmoid of a
    very negative logit, products of near-zero embeddings) and x86 CPUs process them
    tens of times slower (an AdaSparse tower's forward on CPU slowed by more than an
    order of magnitude when they appeared). Results change only below 1.2e-38. Called by
    :func:`resolve_device` and :func:`~dynamic_ctr.training.metrics.evaluate`.
    """
    torch.set_flush_denormal(True)


def resolve_device(name: str = "auto") -> torch.device:
    """The device to train on.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU) or any ``torch.device``
            string (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    Raises:
        ValueError: ``name`` is not a device string, or names CUDA on a machine
            without it.
    """
    flush_denormals()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name=} is not a valid torch device string") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name=} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name=}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all CUDA devices too).

    Runs stay bit-identical on CPU. On CUDA, embedding backward uses atomic adds, so
    runs are reproducible only up to floating point summation order (on an H200 one
    seed's eager and graphed runs of WDL+APG, 276 steps at batch 8192, ended 0.005 apart
    in validation AUC; with PyTorch's sorted backward the pair agreed to 4 decimals,
    docs/benchmarks.md); ``torch.use_deterministic_algorithms(True)`` trades speed for
    that sorted backward.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"{seed=} must be a non-negative int")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device (lazily)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded ``torch.Generator`` living on ``device`` (for on-device ``randperm``).

    The same seed gives the same permutation on every run on one device type, but
    CPU and CUDA generators produce different streams.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"{seed=} must be a non-negative int")
    return torch.Generator(device=torch.device(device)).manual_seed(seed)
