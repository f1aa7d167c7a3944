from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from dynamic_ctr.training import (
    NonFiniteLossError,
    TrainConfig,
    auc,
    evaluate,
    make_optimizer,
    tensors_from_columns,
    train,
)

FAST = TrainConfig(lr=0.02, batch_size=128, max_epochs=4, patience=2, progress=False, log_every=5)
TIMING = {"seconds", "samples_per_s"}


def _without_timing(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def test_learns_a_learnable_problem_close_to_the_oracle(splits, builder, spec):
    train_data, valid_data, valid_prob = splits
    torch.manual_seed(0)
    result = train(builder({"dim": 4, "hidden": 8}, spec), train_data, valid_data, FAST)
    oracle = auc(valid_data.y, valid_prob)  # AUC of the true click probabilities
    assert oracle > 0.8  # the problem is learnable...
    assert result.best_val_auc > 0.75  # ...and is learnt: well above 0.5
    assert result.best_val_auc > oracle - 0.05
    assert [h["epoch"] for h in result.history] == list(range(1, len(result.history) + 1))
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert all(h["samples_per_s"] > 0 for h in result.history)


def test_two_seeded_runs_are_identical(splits, builder, spec):
    train_data, valid_data, _ = splits
    cfg = dataclasses.replace(FAST, max_epochs=3)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = builder(
            {"dim": 4, "hidden": 8, "dropout": 0.2}, spec
        )  # dropout uses the seeded global RNG
        runs.append(train(model, train_data, valid_data, cfg))
    a, b = runs
    assert _without_timing(a.history) == _without_timing(b.history)
    for (ka, va), (kb, vb) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb)
    # and the seed matters: a different shuffling/dropout seed changes the run
    torch.manual_seed(0)
    c = train(
        builder({"dim": 4, "hidden": 8, "dropout": 0.2}, spec),
        train_data,
        valid_data,
        dataclasses.replace(cfg, seed=7),
    )
    assert _without_timing(c.history) != _without_timing(a.history)


def test_early_stopping_restores_the_best_epoch(spec, builder, columns_factory):
    # validation clicks are the opposite of the training concept: the better the fit,
    # the worse the validation AUC, so the best epoch is an early one and training
    # continues past it for `patience` epochs.
    train_data = tensors_from_columns(columns_factory(3000, seed=1)[0], spec)
    valid_data = tensors_from_columns(columns_factory(1500, seed=2, flip=True)[0], spec)
    cfg = dataclasses.replace(FAST, max_epochs=10, patience=2)
    torch.manual_seed(0)
    result = train(builder({"dim": 4, "hidden": 8}, spec), train_data, valid_data, cfg)
    aucs = [h["val_auc"] for h in result.history]
    assert result.best_epoch == int(np.argmax(aucs)) + 1
    assert result.best_val_auc == max(aucs)
    assert len(result.history) == result.best_epoch + cfg.patience < cfg.max_epochs  # stopped early
    assert aucs[-1] < result.best_val_auc  # the final epoch's weights were worse...
    # (this also proves the kept best state is a copy: an alias would score like the last epoch)
    restored = auc(valid_data.y, evaluate(result.model, valid_data))
    assert restored == pytest.approx(
        result.best_val_auc, abs=1e-12
    )  # ...and were replaced by the best ones


class _NanAfter(nn.Module):
    """Wraps a model; training-mode forward returns NaN from call ``start`` on."""

    def __init__(self, inner: nn.Module, start: int) -> None:
        super().__init__()
        self.inner, self.start, self.calls = inner, start, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.start:
                return out * float("nan")
        return out


def test_nan_loss_raises_naming_epoch_step_and_last_finite_loss(splits, builder, spec):
    train_data, valid_data, _ = splits
    steps = -(-len(train_data) // FAST.batch_size)  # 24 steps per epoch
    model = _NanAfter(builder({}, spec), start=steps + 3)  # epoch 2, step 3 (inside a log window)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 3 \(last finite loss: \d+\.\d+\)"):
        train(model, train_data, valid_data, FAST)


def test_diverging_learning_rate_raises(splits, builder, spec):
    train_data, valid_data, _ = splits
    with pytest.raises(NonFiniteLossError, match="epoch 1"):
        train(builder({}, spec), train_data, valid_data, dataclasses.replace(FAST, lr=1e30))


def test_on_epoch_end_sees_each_epoch_and_its_exceptions_propagate(splits, builder, spec):
    train_data, valid_data, _ = splits
    seen = []

    class Stop(Exception):
        pass

    def callback(epoch: int, val_auc: float) -> None:
        seen.append((epoch, val_auc))
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train(builder({}, spec), train_data, valid_data, FAST, on_epoch_end=callback)
    assert [e for e, _ in seen] == [1, 2]
    assert all(0.0 <= v <= 1.0 for _, v in seen)


def test_bfloat16_autocast_on_cpu_trains(splits, builder, spec):
    train_data, valid_data, _ = splits
    cfg = dataclasses.replace(FAST, amp=True, amp_dtype="bfloat16", max_epochs=2, grad_clip=1.0)
    torch.manual_seed(0)
    result = train(builder({}, spec), train_data, valid_data, cfg)
    assert result.best_val_auc > 0.7


def test_float16_autocast_is_refused_on_cpu(splits, builder, spec):
    train_data, valid_data, _ = splits
    with pytest.raises(ValueError, match="amp_dtype"):
        train(
            builder({}, spec),
            train_data,
            valid_data,
            dataclasses.replace(FAST, amp=True, amp_dtype="float16"),
        )


def test_optimizer_groups_apply_weight_decay_by_parameter_kind(builder, spec):
    model = builder({}, spec)
    opt = make_optimizer(
        model, TrainConfig(weight_decay=0.1, embedding_weight_decay=0.01), torch.device("cpu")
    )
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_decay[0.01] == {id(model.embedding.weight)}
    assert by_decay[0.1] == {id(model.mlp[0].weight), id(model.mlp[3].weight)}
    assert by_decay[0.0] == {id(model.mlp[0].bias), id(model.mlp[3].bias)}


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"patience": 0}, "patience"),
        ({"amp_dtype": "float8"}, "amp_dtype"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_train_config_rejects_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TrainConfig(**kwargs)


def test_train_config_from_dict_names_unknown_keys():
    assert TrainConfig.from_dict({"lr": 0.1}).lr == 0.1
    with pytest.raises(ValueError, match="'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_a_model_supplied_penalty_is_added_to_the_loss(splits, builder, spec):
    """``model.penalty()`` (read after each forward) joins the loss: a penalty on the
    output bias pulls it to where the penalty wants it, which the data alone would not."""
    from dynamic_ctr.training import TrainConfig, train

    train_data, valid_data, _ = splits

    def run(with_penalty: bool):
        torch.manual_seed(0)
        model = builder({"dim": 4, "hidden": 8}, spec)
        head = model.mlp[-1]
        if with_penalty:
            model.penalty = lambda: 10.0 * (head.bias - 3.0).pow(2).sum()
        cfg = TrainConfig(lr=0.05, batch_size=256, max_epochs=2, patience=2, progress=False)
        result = train(model, train_data, valid_data, cfg)
        return head.bias.item(), result.history[0]["train_loss"]

    free_bias, free_loss = run(False)
    pulled_bias, pulled_loss = run(True)
    assert pulled_bias > free_bias + 0.5  # pulled up toward 3 (Adam moves it ~lr per step)
    assert pulled_loss > free_loss  # the logged training loss includes the penalty


def test_group_optimizers_give_each_role_its_own_optimiser(spec):
    """DynInt §4.1.4: G-FTRL for the embedding table, FTRL for the PIN, Adam for the
    generators; a role without parameters, or FTRL options on Adam, are refused."""
    from dynamic_ctr.models import build_model
    from dynamic_ctr.training.optimizers import FTRL, CombinedOptimizer, GroupFTRL

    model = build_model({"family": "xdeepint", "embedding_dim": 4, "dynint": {"mode": "dgp", "rank": 2}}, spec)
    cfg = TrainConfig(group_optimizers={
        "embedding": {"optimizer": "gftrl", "lr": 0.05, "l1": 0.01},
        "interaction": {"optimizer": "ftrl", "lr": 0.05},
        "generator": {"optimizer": "adam", "lr": 0.001},
    })
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, CombinedOptimizer) and set(opt.optimizers) == {"embedding", "interaction", "generator"}
    assert isinstance(opt.optimizers["embedding"], GroupFTRL) and isinstance(opt.optimizers["interaction"], FTRL)
    assert opt.optimizers["generator"].param_groups[0]["lr"] == 0.001
    covered = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(covered) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    x = torch.randint(0, 2, (8, spec.num_slots))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.grad is not None and p.grad.any())
    wdl = build_model({"family": "wdl", "hidden_units": [8]}, spec)
    with pytest.raises(ValueError, match=r"role\(s\) \['interaction'\]"):
        make_optimizer(wdl, TrainConfig(group_optimizers={"interaction": {"optimizer": "ftrl"}}), torch.device("cpu"))
    with pytest.raises(ValueError, match="FTRL's, not Adam's"):
        TrainConfig(group_optimizers={"embedding": {"optimizer": "adam", "l1": 0.1}})
    with pytest.raises(ValueError, match="needs optimizer in"):
        TrainConfig(group_optimizers={"embedding": {"optimizer": "sgd"}})


def test_clip_grad_norm_scales_dense_and_sparse_gradients_like_torch():
    from dynamic_ctr.training.loop import clip_grad_norm

    table = torch.nn.Parameter(torch.randn(6, 3))
    weight = torch.nn.Parameter(torch.randn(4))
    (torch.nn.functional.embedding(torch.tensor([1, 4, 4]), table, sparse=True).sum() * 3 + (weight**2).sum()).backward()
    dense = [table.grad.to_dense().clone(), weight.grad.clone()]
    total = torch.sqrt(sum(g.square().sum() for g in dense))
    assert torch.isclose(clip_grad_norm([table, weight], 1e9), total)  # below the bound: unchanged
    torch.testing.assert_close(table.grad.to_dense(), dense[0])
    assert torch.isclose(clip_grad_norm([table, weight], 0.5), total)
    clipped = torch.sqrt(table.grad.to_dense().square().sum() + weight.grad.square().sum())
    assert torch.isclose(clipped, torch.tensor(0.5), atol=1e-5)
    torch.testing.assert_close(weight.grad, dense[1] * 0.5 / total, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- CUDA graphs


def test_cuda_graphs_on_are_refused_before_training_where_they_cannot_run(splits, builder, spec):
    tr, va, _ = splits
    with pytest.raises(ValueError, match="cuda_graphs='on': CUDA graphs need a CUDA device, not cpu"):
        train(builder({"dim": 4}, spec), tr, va, dataclasses.replace(FAST, cuda_graphs="on"))
    with pytest.raises(ValueError, match="cuda_graphs"):
        TrainConfig(cuda_graphs="yes")
    result = train(builder({"dim": 4}, spec), tr, va, dataclasses.replace(FAST, cuda_graphs="auto", max_epochs=1))
    assert result.cuda_graph is False  # auto on the CPU: eager steps


def test_graph_refusal_names_what_cannot_be_captured(builder, spec):
    from dynamic_ctr.training.graphs import graph_refusal
    from dynamic_ctr.training.optimizers import CombinedOptimizer

    cuda = torch.device("cuda")
    model = builder({"dim": 4}, spec)
    plain = torch.optim.Adam(model.parameters(), lr=0.01)
    capturable = torch.optim.Adam(model.parameters(), lr=0.01, capturable=True)
    kw = {"fp16_scaling": False, "ddp": False, "custom_loss": False}
    assert graph_refusal(cuda, capturable, **kw) is None
    assert "capturable=True" in graph_refusal(cuda, plain, **kw)
    assert "CombinedOptimizer" in graph_refusal(cuda, CombinedOptimizer({"a": capturable}), **kw)
    assert "float16" in graph_refusal(cuda, capturable, **{**kw, "fp16_scaling": True})
    assert "data-parallel" in graph_refusal(cuda, capturable, **{**kw, "ddp": True})
    assert "meta_loss" in graph_refusal(cuda, capturable, **{**kw, "custom_loss": True})


GPU_MODELS = {
    "wdl_apg": {"family": "wdl", "embedding_dim": 16, "hidden_units": [64, 32], "dropout": 0.1,
                "apg": {"version": "v4", "rank": 4, "condition": {"mode": "self"}}},
    "dcnv2_apg_bn": {"family": "dcnv2", "embedding_dim": 16, "hidden_units": [64, 32], "batch_norm": True,
                     "apg": {"version": "v4", "rank": 4, "condition": {"mode": "self"}}},
    "dynint_dgp": {"family": "xdeepint", "embedding_dim": 16,
                   "dynint": {"mode": "dgp", "layers": 2, "subspaces": 4, "rank": 8, "orthogonal_rate": 1e-3}},
}


def _gpu_run(real_splits, config, **overrides):
    from dynamic_ctr.models import build_model

    spec, tr, va = real_splits
    cfg = TrainConfig(**{"lr": 0.005, "batch_size": 1024, "max_epochs": 2, "patience": 2, "progress": False,
                         "seed": 11, **overrides})
    return train(build_model({**config, "seed": 5}, spec), tr.to("cuda"), va.to("cuda"), cfg)


@pytest.mark.cuda
@pytest.mark.parametrize("name", GPU_MODELS)
def test_cuda_graph_steps_train_like_eager_steps(real_splits, name):
    eager = _gpu_run(real_splits, GPU_MODELS[name], cuda_graphs="off", grad_clip=100.0)
    graphed = _gpu_run(real_splits, GPU_MODELS[name], cuda_graphs="on", grad_clip=100.0)  # clipping captured too
    assert eager.cuda_graph is False and graphed.cuda_graph is True
    # the same kernels in the same order; embedding backward's atomic adds differ in order
    for e, g in zip(eager.history, graphed.history, strict=True):
        assert g["train_loss"] == pytest.approx(e["train_loss"], rel=2e-3)
        assert g["val_auc"] == pytest.approx(e["val_auc"], abs=2e-3)


@pytest.mark.cuda
def test_bf16_autocast_on_cuda_keeps_the_validation_auc_within_0_001_of_float32(real_splits):
    fp32 = _gpu_run(real_splits, GPU_MODELS["wdl_apg"])
    bf16 = _gpu_run(real_splits, GPU_MODELS["wdl_apg"], amp=True, amp_dtype="bfloat16")
    assert abs(bf16.best_val_auc - fp32.best_val_auc) <= 0.001, (bf16.best_val_auc, fp32.best_val_auc)


class _HostSync(nn.Module):
    """Reads a value back to the host in every forward, which a CUDA graph cannot capture."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        self.last_max = int(x.max())  # a host sync
        return self.inner(x)


@pytest.mark.cuda
def test_a_failed_capture_trains_on_eagerly_and_loses_no_batch(splits, builder, spec):
    tr, va = splits[0].to("cuda"), splits[1].to("cuda")
    runs = []
    for mode in ("off", "on"):
        torch.manual_seed(0)
        model = _HostSync(builder({"dim": 4}, spec))
        runs.append(train(model, tr, va, dataclasses.replace(FAST, max_epochs=2, cuda_graphs=mode)))
    eager, fallback = runs
    assert fallback.cuda_graph is False
    for e, f in zip(eager.history, fallback.history, strict=True):
        assert f["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4)
        assert f["val_auc"] == pytest.approx(e["val_auc"], abs=1e-4)
