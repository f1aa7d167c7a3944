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


# ----------------------------------------------------------------------------- on a GPU

APG_WDL = {"family": "wdl", "embedding_dim": 16, "hidden_units": [64, 32],
           "apg": {"version": "v4", "rank": 4, "condition": {"mode": "self"}}}


def _train_on_cuda(real_splits, **overrides):
    from dynamic_ctr.models import build_model
    from dynamic_ctr.training import TrainConfig, train

    spec, tr, va = real_splits
    cfg = TrainConfig(**{"lr": 0.005, "batch_size": 1024, "max_epochs": 2, "patience": 2, "progress": False,
                         **overrides})
    model = build_model({**APG_WDL, "seed": 7}, spec)
    return spec, va, train(model, tr.to("cuda"), va.to("cuda"), cfg)


@pytest.mark.cuda
def test_cuda_training_keeps_the_model_the_data_and_adams_state_on_the_gpu(real_splits):
    from dynamic_ctr.training import TrainConfig, make_optimizer

    assert resolve_device("auto").type == "cuda"
    _, _, result = _train_on_cuda(real_splits, max_epochs=1)
    assert {p.device.type for p in result.model.parameters()} == {"cuda"}
    assert {b.device.type for b in result.model.buffers()} <= {"cuda"}
    opt = make_optimizer(result.model, TrainConfig(), torch.device("cuda"))
    assert all(g.get("fused") for g in opt.param_groups)  # the fused CUDA kernel, not foreach
    loss = result.model(torch.ones(8, result.model.spec.num_slots, dtype=torch.int64, device="cuda")).sum()
    loss.backward()
    opt.step()
    assert {t.device.type for s in opt.state.values() for t in s.values() if torch.is_tensor(t)} == {"cuda"}


@pytest.mark.cuda
def test_a_model_trained_on_the_gpu_loads_and_scores_identically_on_the_cpu(real_splits, tmp_path):
    from dynamic_ctr.training import evaluate, load_checkpoint, save_checkpoint

    _, va, result = _train_on_cuda(real_splits, max_epochs=1)
    gpu_model = result.model.eval()
    on_gpu = evaluate(gpu_model, va.to("cuda"), 4096)
    save_checkpoint(gpu_model, tmp_path / "ckpt")
    cpu_model = load_checkpoint(tmp_path / "ckpt", device="cpu")
    for (name, a), (_, b) in zip(gpu_model.state_dict().items(), cpu_model.state_dict().items(), strict=True):
        assert b.device.type == "cpu"
        assert torch.equal(a.cpu(), b), name  # bit for bit
    on_cpu = evaluate(cpu_model, va, 4096)
    assert np.array_equal(on_cpu, evaluate(gpu_model.to("cpu"), va, 4096))  # the same weights, the same device
    np.testing.assert_allclose(on_cpu, on_gpu, rtol=0, atol=1e-5)  # GPU vs CPU kernels
