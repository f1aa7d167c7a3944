"""fold_model: deployment form equals the eval-mode model, with fewer parameters."""

from __future__ import annotations

import json

import pytest
import torch
from modelkit import perturb, small_config
from torch import nn

from dynamic_ctr.models import build_model, count_parameters, fold_model
from dynamic_ctr.models.apg import APGLinear
from dynamic_ctr.models.folding import fold_apg_linear

FOLDABLE = {
    "v5": {"version": "v5", "width": 32},
    "v5-stack3": {"version": "v5", "width": 16, "stack": 3},
    "v5-group-genbias": {"version": "v5", "generated_bias": True, "condition": {"mode": "group"}},
    "v5-mix-output": {
        "version": "v5",
        "stack": 3,
        "condition": {"mode": "mix", "aggregation": "output", "combine": "attention"},
    },
}


def _trained_like(config: dict, spec, x: torch.Tensor) -> nn.Module:
    """A model off its init, BatchNorm statistics included, left in train mode."""
    model = perturb(build_model(config, spec), scale=0.1, table_scale=0.5)
    model.train()
    with torch.no_grad():
        model(x)
    return model


@pytest.mark.parametrize("apg", FOLDABLE.values(), ids=FOLDABLE.keys())
def test_folded_equals_unfolded_eval_forward(spec, big_batch, apg):
    config = small_config(family="deepfm", dropout=0.3, batch_norm=True, apg=apg)
    model = _trained_like(config, spec, big_batch)
    folded = fold_model(model)
    assert model.training  # input untouched
    assert not folded.training
    model.eval()
    expected = model(big_batch)
    assert expected.std() > 0.1
    torch.testing.assert_close(folded(big_batch), expected, rtol=0, atol=1e-5)
    assert count_parameters(folded) < count_parameters(model)
    for layer in folded.dense.layers:
        assert layer.cfg.apg.version == "v4" and len(layer.V_factors) == len(layer.U_factors) == 1
    for layer in model.dense.layers:  # the original keeps its factors
        assert len(layer.V_factors) == max(2, apg.get("stack", 1))
    assert not any(isinstance(m, nn.Dropout) for m in folded.modules())
    assert any(isinstance(m, nn.Dropout) for m in model.modules())


def test_stacked_factors_fold_into_one_matrix(spec, big_batch):
    model = _trained_like(small_config(apg=FOLDABLE["v5-stack3"]), spec, big_batch)
    layer = model.dense.layers[0]
    assert len(layer.V_factors) == 3
    folded = fold_apg_linear(layer)
    v = layer.V_factors[0] @ layer.V_factors[1] @ layer.V_factors[2]
    torch.testing.assert_close(folded.V_factors[0], v)
    # 3 factors (E=16 -> P=16 -> P -> K=4) per side vs one (E x K) matrix
    assert sum(p.numel() for p in folded.parameters()) < sum(p.numel() for p in layer.parameters())


@pytest.mark.parametrize("apg", FOLDABLE.values(), ids=FOLDABLE.keys())
def test_folded_config_rebuilds_and_loads(spec, big_batch, apg):
    model = _trained_like(
        small_config(family="dcn", dropout=0.2, batch_norm=True, apg=apg), spec, big_batch
    )
    folded = fold_model(model)
    config = json.loads(json.dumps(folded.config))
    assert config["folded"] is True and config["dropout"] == 0.0
    assert config["apg"]["version"] == "v4" and config["apg"]["stack"] == 1
    assert model.config["apg"]["version"] == "v5"  # the original's config is untouched
    rebuilt = build_model(config, folded.spec)
    assert not rebuilt.training
    assert set(rebuilt.state_dict()) == set(folded.state_dict())
    rebuilt.load_state_dict(folded.state_dict())
    torch.testing.assert_close(rebuilt(big_batch), folded(big_batch), rtol=0, atol=0)


@pytest.mark.parametrize("apg", [None, {"version": "v4"}, {"version": "v2"}])
def test_models_without_factors_fold_to_an_eval_copy(spec, big_batch, apg):
    model = _trained_like(small_config(dropout=0.5, apg=apg), spec, big_batch)
    folded = fold_model(model)
    assert folded is not model and not folded.training and model.training
    assert count_parameters(folded) == count_parameters(model)
    model.eval()
    torch.testing.assert_close(folded(big_batch), model(big_batch), rtol=0, atol=0)
    with torch.no_grad():
        next(folded.parameters()).add_(1.0)  # a deep copy: the original does not move
    assert not torch.allclose(folded(big_batch), model(big_batch))


def test_fold_without_config_still_folds(spec, big_batch):
    model = _trained_like(small_config(apg=FOLDABLE["v5"]), spec, big_batch)
    del model.config
    folded = fold_model(model)
    assert not hasattr(folded, "config")
    assert all(isinstance(m, APGLinear) and len(m.V_factors) == 1 for m in folded.dense.layers)


@pytest.mark.cuda
@pytest.mark.parametrize("apg", FOLDABLE.values(), ids=FOLDABLE.keys())
def test_folding_on_the_gpu_matches_folding_on_the_cpu(spec, big_batch, apg):
    model = _trained_like(small_config(family="deepfm", dropout=0.3, batch_norm=True, apg=apg), spec, big_batch)
    on_cpu = fold_model(model)
    on_gpu = fold_model(model.to("cuda"))
    assert {p.device.type for p in on_gpu.parameters()} == {"cuda"}
    folded_cpu, folded_gpu = on_cpu.state_dict(), on_gpu.state_dict()
    assert folded_cpu.keys() == folded_gpu.keys()
    for name, value in folded_cpu.items():
        torch.testing.assert_close(folded_gpu[name].cpu(), value, rtol=0, atol=1e-5, msg=name)
    torch.testing.assert_close(on_gpu(big_batch.to("cuda")).cpu(), on_cpu(big_batch), rtol=0, atol=1e-5)
