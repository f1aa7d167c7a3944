"""Resumable training (``train(..., checkpoint_dir=...)``) and studies that survive
``kill -9``: real runs in child processes killed with SIGKILL, resumed, and compared
bit for bit with uninterrupted runs; damaged, forged and foreign resume states refused.

The children build real models (``dynamic_ctr.models.build_model``) on the same small
synthetic splits as the other training tests, handed over as a safetensors file, and
hang at a chosen point (mid-epoch, after a checkpoint) until they are killed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import safetensors.torch
import torch

from dynamic_ctr.models import build_model
from dynamic_ctr.training import TensorData, TrainConfig, tensors_from_columns, train
from dynamic_ctr.training.checkpoint import CheckpointError
from dynamic_ctr.training.device import flush_denormals
from dynamic_ctr.training.resume import MANIFEST_NAME, read_manifest
from dynamic_ctr.training.tuning import StudyConfig, tune

PROJECT = Path(__file__).resolve().parents[2]
TIMING = {"seconds", "samples_per_s"}
MODEL = {"family": "dnn", "embedding_dim": 4, "hidden_units": [16, 8], "dropout": 0.2, "seed": 0}
CFG = TrainConfig(lr=0.02, batch_size=64, max_epochs=4, patience=4, progress=False, log_every=5, seed=11)


def _without_timing(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def _assert_same_run(a, b):
    assert _without_timing(a.history) == _without_timing(b.history)
    assert (a.best_epoch, a.best_val_auc) == (b.best_epoch, b.best_val_auc)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


class _Crash(Exception):
    """Raised from ``on_epoch_end``: an in-process stand-in for a kill after a checkpoint."""


def _crash_after(epoch):
    def on_epoch_end(e, _auc):
        if e == epoch:
            raise _Crash

    return on_epoch_end


@pytest.fixture(autouse=True)
def _flush_denormals():
    flush_denormals()  # as in the children (and after any validation): one arithmetic mode


@pytest.fixture
def domain_spec(spec):
    """The training tests' spec with ``ctx`` as the domain field (STAR, AdaSparse, MAML)."""
    fields = tuple(dataclasses.replace(f, source="domain") if f.name == "ctx" else f for f in spec.fields)
    return dataclasses.replace(spec, fields=fields, domain_field="ctx")


# ------------------------------------------------------------------ child processes

CHILD = r"""
import json, sys, time
from pathlib import Path
import safetensors.torch, torch
from dynamic_ctr.models import build_model
from dynamic_ctr.spec import FeatureSpec
from dynamic_ctr.training import TensorData, TrainConfig, train
from dynamic_ctr.training.device import flush_denormals

torch.set_num_threads(1)
flush_denormals()
job = json.loads(Path(sys.argv[1]).read_text())
t = safetensors.torch.load_file(job["data"])
train_data, valid_data = TensorData(t["train_x"], t["train_y"]), TensorData(t["valid_x"], t["valid_y"])
spec = FeatureSpec.from_dict(job["spec"])
marker = Path(job["marker"])
armed = {"forwards": None}


def hang_if_armed(model):
    if armed["forwards"] is None and job["kind"] == "study" and Path(job["arm_when"]).exists():
        armed["forwards"] = 0
    if armed["forwards"] is not None and model.training:
        armed["forwards"] += 1
        if armed["forwards"] == 3:  # mid-epoch: some steps of the next epoch taken
            marker.write_text(str(time.time()))
            time.sleep(600)  # until SIGKILL


def builder(config, spec):
    model = build_model(config, spec)
    forward = model.forward

    def hanging_forward(x):
        hang_if_armed(model)
        return forward(x)

    model.forward = hanging_forward
    return model


if job["kind"] == "train":
    def arm(epoch, _auc):
        if epoch == job["hang_after_epoch"]:
            armed["forwards"] = 0

    torch.manual_seed(0)
    train(builder(job["model"], spec), train_data, valid_data, TrainConfig(**job["train"]),
          on_epoch_end=arm, checkpoint_dir=job["checkpoint_dir"])
else:
    from dynamic_ctr.training.tuning import StudyConfig, tune
    tune(job["base"], job["space"], spec, train_data, valid_data, StudyConfig(**job["study"]), builder)
marker.write_text("finished without hanging")
"""


def _start_child(tmp_path: Path, job: dict, train_data: TensorData, valid_data: TensorData, spec) -> subprocess.Popen:
    data = tmp_path / "data.safetensors"
    safetensors.torch.save_file(
        {"train_x": train_data.x, "train_y": train_data.y, "valid_x": valid_data.x, "valid_y": valid_data.y}, str(data)
    )
    job = {**job, "data": str(data), "spec": spec.to_dict(), "marker": str(tmp_path / "hanging")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "child.py").write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, str(tmp_path / "child.py"), str(tmp_path / "job.json")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _kill_when_hanging(child: subprocess.Popen, marker: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if child.poll() is not None:
            raise AssertionError(f"child exited ({child.returncode}) before hanging:\n{child.stdout.read().decode()}")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"child did not reach its hang point in {timeout}s")
        time.sleep(0.02)
    assert marker.read_text() != "finished without hanging"
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    child.stdout.close()


# ------------------------------------------------------------------ kill -9 during training


def test_kill_9_mid_epoch_resumes_bit_identical_to_an_uninterrupted_run(tmp_path, splits, spec):
    train_data, valid_data, _ = splits
    checkpoint = tmp_path / "run"
    child = _start_child(
        tmp_path,
        {"kind": "train", "model": MODEL, "train": dataclasses.asdict(CFG), "checkpoint_dir": str(checkpoint), "hang_after_epoch": 2},
        train_data, valid_data, spec,
    )  # fmt: skip
    _kill_when_hanging(child, tmp_path / "hanging")  # killed in epoch 3, after epoch 2's checkpoint
    manifest = read_manifest(checkpoint)
    assert manifest["epoch"] == 2 and not manifest["stopped"]
    assert sorted(p.name for p in checkpoint.iterdir()) == [MANIFEST_NAME, "state-000002.pt"]

    seen = []
    torch.manual_seed(0)
    resumed = train(build_model(MODEL, spec), train_data, valid_data, CFG, checkpoint_dir=checkpoint,
                    on_epoch_end=lambda e, a: seen.append(e))  # fmt: skip
    torch.manual_seed(0)
    reference = train(build_model(MODEL, spec), train_data, valid_data, CFG)
    assert resumed.resumed_from_epoch == 2 and reference.resumed_from_epoch == 0
    assert seen == [1, 2, 3, 4]  # the restored epochs are replayed to the callback, then 3 and 4 run
    _assert_same_run(resumed, reference)  # dropout, shuffling, Adam moments: all carried over
    assert read_manifest(checkpoint)["stopped"] is True

    # a finished run's state: the result again, without a single training step
    again = train(build_model(MODEL, spec), train_data, valid_data, CFG, checkpoint_dir=checkpoint)
    assert again.resumed_from_epoch == 4
    _assert_same_run(again, reference)


ROLE_CASES = {
    # FTRL / group-lasso FTRL state (z, n) next to Adam: a CombinedOptimizer
    "wdl_gftrl_embedding": ({"family": "wdl", "embedding_dim": 4, "hidden_units": [8], "dropout": 0.1},
                            {"embedding": {"optimizer": "gftrl", "lr": 0.05, "l1": 1e-3}}),
    # AdaSparse: the annealed alpha / lambda and the step counter are buffers
    "adasparse_annealed": ({"family": "dnn", "embedding_dim": 4, "hidden_units": [8],
                            "adasparse": {"formulation": "binarization", "anneal_steps": 60}}, None),
    # STAR: per-domain parameters with sparse gradients under SparseAdam
    "star_sparse_adam": ({"family": "star", "embedding_dim": 4, "hidden_units": [8]}, None),
    # MAML: adapt() before every validation writes the adapted heads (buffers)
    "maml_adapt": ({"family": "maml", "embedding_dim": 4, "hidden_units": [8], "maml": {"inner_lr": 0.3}}, None),
    # MAML with the whole tower adapted: a tower per domain in buffers
    "maml_tower_adapt": ({"family": "maml", "embedding_dim": 4, "hidden_units": [8],
                          "maml": {"inner_lr": 0.1, "fast_weights": "tower"}}, None),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ROLE_CASES))
def test_resume_is_bit_identical_for_other_optimisers_and_model_schedules(case, splits, domain_spec, tmp_path):
    train_data, valid_data, _ = splits
    model_cfg, groups = ROLE_CASES[case]
    cfg = dataclasses.replace(CFG, batch_size=256, max_epochs=3, patience=3, group_optimizers=groups)

    def run(**kwargs):
        torch.manual_seed(0)
        return train(build_model({**model_cfg, "seed": 0}, domain_spec), train_data, valid_data, cfg, **kwargs)

    with pytest.raises(_Crash):
        run(checkpoint_dir=tmp_path, on_epoch_end=_crash_after(1))
    resumed = run(checkpoint_dir=tmp_path)
    assert resumed.resumed_from_epoch == 1
    _assert_same_run(resumed, run())


def test_resume_keeps_the_early_stopping_state(spec, columns_factory, tmp_path):
    # validation clicks oppose the training concept: the AUC peaks at an early epoch and
    # a run with patience 2 stops two epochs later; resumed after the first epoch without
    # improvement (one left of its patience), it must stop at the same epoch
    train_data = tensors_from_columns(columns_factory(3000, seed=1)[0], spec)
    valid_data = tensors_from_columns(columns_factory(1500, seed=2, flip=True)[0], spec)
    cfg = dataclasses.replace(CFG, batch_size=128, max_epochs=8, patience=2)

    def run(**kwargs):
        torch.manual_seed(0)
        return train(build_model(MODEL, spec), train_data, valid_data, cfg, **kwargs)

    reference = run()
    assert len(reference.history) == reference.best_epoch + cfg.patience < cfg.max_epochs  # stops early
    with pytest.raises(_Crash):
        run(checkpoint_dir=tmp_path, on_epoch_end=_crash_after(reference.best_epoch + 1))
    resumed = run(checkpoint_dir=tmp_path)
    _assert_same_run(resumed, reference)
    assert read_manifest(tmp_path)["stopped"] is True


def test_a_write_killed_midway_leaves_the_previous_state_resumable(splits, spec, tmp_path):
    train_data, valid_data, _ = splits
    cfg = dataclasses.replace(CFG, batch_size=256, max_epochs=2)
    with pytest.raises(_Crash):
        torch.manual_seed(0)
        train(build_model(MODEL, spec), train_data, valid_data, cfg, checkpoint_dir=tmp_path, on_epoch_end=_crash_after(1))
    # what a kill during epoch 2's save can leave: a temporary and a new state file not
    # yet named by the manifest (the manifest is replaced last)
    (tmp_path / ".state-000002.pt.tmp-4242").write_bytes(b"\x80half a pickle")
    (tmp_path / "state-000002.pt").write_bytes(b"complete, but the manifest was not replaced yet")
    torch.manual_seed(0)
    resumed = train(build_model(MODEL, spec), train_data, valid_data, cfg, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_epoch == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME, "state-000002.pt"]  # cleaned up
    assert read_manifest(tmp_path)["epoch"] == 2


# ------------------------------------------------------------------ refused states


@pytest.fixture
def one_epoch_state(splits, spec, tmp_path):
    """A resume directory holding the state after epoch 1 of a 2-epoch run."""
    train_data, valid_data, _ = splits
    cfg = dataclasses.replace(CFG, batch_size=256, max_epochs=2)
    with pytest.raises(_Crash):
        torch.manual_seed(0)
        train(build_model(MODEL, spec), train_data, valid_data, cfg, checkpoint_dir=tmp_path, on_epoch_end=_crash_after(1))

    def resume(model_cfg=MODEL, **changes):
        return train(build_model(model_cfg, spec), train_data, valid_data, dataclasses.replace(cfg, **changes), checkpoint_dir=tmp_path)

    return tmp_path, tmp_path / "state-000001.pt", resume


def _forbid_torch_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called on a file that failed its checks")

    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate"])
def test_a_tampered_or_truncated_resume_state_is_refused_without_being_parsed(one_epoch_state, monkeypatch, damage):
    _, state_file, resume = one_epoch_state
    data = bytearray(state_file.read_bytes())
    if damage == "flip_a_byte":
        data[len(data) // 2] ^= 0x01
        match = "SHA-256 .* does not match .*corrupted or tampered with"
    else:
        data = data[: len(data) - 100]
        match = "truncated or replaced"
    state_file.write_bytes(bytes(data))
    _forbid_torch_load(monkeypatch)
    with pytest.raises(CheckpointError, match=match) as error:
        resume()
    assert str(state_file) in str(error.value)


def test_a_forged_manifest_cannot_make_loading_run_code(one_epoch_state, tmp_path_factory):
    directory, state_file, resume = one_epoch_state
    witness = tmp_path_factory.mktemp("witness") / "code_ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (witness,))

    torch.save({"epoch": 1, "payload": Payload()}, state_file)  # a pickle that runs code when loaded
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["sha256"], manifest["bytes"] = _sha256(state_file), state_file.stat().st_size  # forged to match
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="cannot be read as a resume state") as error:
        resume()
    assert str(state_file) in str(error.value) and not witness.exists()


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_damaged_manifest_is_refused_naming_it(one_epoch_state):
    directory, _, resume = one_epoch_state
    manifest = directory / MANIFEST_NAME
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(CheckpointError, match=f"{manifest}: not valid JSON"):
        resume()
    manifest.write_text(json.dumps({"format_version": 1, "kind": "dynamic_ctr.resume", "epoch": 1, "state_file": "../x.pt"}))
    with pytest.raises(CheckpointError, match="not a valid resume manifest: .*state_file='../x.pt'"):
        resume()


def test_the_state_of_another_config_is_refused_not_resumed(one_epoch_state):
    directory, _, resume = one_epoch_state
    with pytest.raises(CheckpointError, match=r"another training run \(differs in: train_config\.lr \(0\.02 vs 0\.03\)") as error:
        resume(lr=0.03)
    assert str(directory / MANIFEST_NAME) in str(error.value) and f"Delete {directory}" in str(error.value)
    with pytest.raises(CheckpointError, match=r"model\.config\.hidden_units"):
        resume({**MODEL, "hidden_units": [16, 4]})
    with pytest.raises(CheckpointError, match=r"train_config\.seed"):
        resume(seed=12)
    resume(progress=True, log_every=1)  # display settings do not change the run: resumed


# ------------------------------------------------------------------ kill -9 during a study

LRS = [0.05, 0.03, 0.02]
STUDY_SPACE = {"train.lr": {"type": "categorical", "choices": LRS}}
STUDY_BASE = {"model": {**MODEL, "dropout": 0.1}, "train": {**dataclasses.asdict(CFG), "batch_size": 128, "max_epochs": 3, "lr": 0.05}}


def _study_cfg(tmp_path: Path, name: str) -> StudyConfig:
    return StudyConfig(
        study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}", n_trials=len(LRS), n_startup_trials=len(LRS),
        pruner="none", checkpoint_dir=str(tmp_path / "checkpoints"), heartbeat_interval=1, grace_period=2,
    )  # fmt: skip


def _queue(cfg: StudyConfig) -> None:
    study = optuna.create_study(storage=cfg.storage, study_name=cfg.study_name, direction="maximize")
    for lr in LRS:
        study.enqueue_trial({"train.lr": lr})


def test_kill_9_during_a_study_fails_the_trial_and_retries_it_from_its_checkpoint(tmp_path, splits, spec):
    train_data, valid_data, _ = splits
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    killed.mkdir(), clean.mkdir()
    cfg = _study_cfg(killed, "s")
    _queue(cfg)
    trial_1 = Path(cfg.checkpoint_dir) / "s" / "trial_1"
    child = _start_child(
        killed,
        {"kind": "study", "base": STUDY_BASE, "space": STUDY_SPACE, "study": dataclasses.asdict(cfg),
         "arm_when": str(trial_1 / MANIFEST_NAME)},
        train_data, valid_data, spec,
    )  # fmt: skip
    _kill_when_hanging(child, killed / "hanging")  # in trial 1's epoch 2
    before = optuna.load_study(study_name="s", storage=cfg.storage).trials
    assert [t.state.name for t in before] == ["COMPLETE", "RUNNING", "WAITING"]
    assert read_manifest(trial_1)["epoch"] == 1
    assert not (Path(cfg.checkpoint_dir) / "s" / "trial_0").exists()  # deleted when trial 0 completed

    result = tune(STUDY_BASE, STUDY_SPACE, spec, train_data, valid_data, cfg)  # waits for the heartbeat to go stale
    trials = result.study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]  # FAIL, not RUNNING
    retry = trials[3]
    assert retry.params == trials[1].params and retry.user_attrs["retry_of"] == 1
    assert retry.user_attrs["resumed_from_epoch"] >= 1
    finished = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["train.lr"] for t in finished) == sorted(LRS)  # n_trials in all, none twice
    assert (trials[0].value, trials[0].datetime_complete) == (before[0].value, before[0].datetime_complete)  # kept
    assert not any(Path(cfg.checkpoint_dir).rglob("*.pt"))  # finished trials leave no resume state

    reference_cfg = _study_cfg(clean, "s")
    _queue(reference_cfg)
    reference = tune(STUDY_BASE, STUDY_SPACE, spec, train_data, valid_data, reference_cfg)
    by_lr = {t.params["train.lr"]: t for t in reference.study.trials}
    for t in finished:  # every trial, the resumed one included, exactly as uninterrupted
        assert t.value == by_lr[t.params["train.lr"]].value
        assert t.intermediate_values == by_lr[t.params["train.lr"]].intermediate_values  # epochs 1.. reported
    assert result.best_value == reference.best_value and result.best_params == reference.best_params


# ------------------------------------------------------------------ the training node's seeds


def test_train_variant_resumes_its_seeds_and_deletes_their_state(tmp_path, spec, columns_factory, monkeypatch):
    pytest.importorskip("kedro", reason="the training node's package needs Kedro (a GPU machine may lack it)")
    from dynamic_ctr.pipelines.training import nodes
    from dynamic_ctr.training import tuning

    frames = [pd.DataFrame(columns_factory(n, seed=s)[0]) for n, s in ((1500, 1), (800, 2))]
    study = {k: v for k, v in dataclasses.asdict(_study_cfg(tmp_path, "unused")).items() if k != "study_name"}
    entry = {
        "status": "ready", "compare_to": None, "train_rows": None, "budget": {},
        "model": {k: v for k, v in MODEL.items() if k != "seed"},
        "train": {**dataclasses.asdict(CFG), "batch_size": 256, "max_epochs": 2},
        "study": {**study, "n_trials": 1}, "seeds": [5, 6, 7], "search_space": STUDY_SPACE,
    }  # fmt: skip
    plan = {"variants": {"v": entry}}
    fits = []
    real_fit = tuning.fit

    def crashing_fit(config, *args, **kwargs):
        result = real_fit(config, *args, **kwargs)
        directory = kwargs.get("checkpoint_dir")
        if directory is None or not Path(directory).name.startswith("seed_"):
            return result  # a tuning trial
        fits.append((config["train"]["seed"], result.resumed_from_epoch, directory))
        if config["train"]["seed"] == 7 and len(fits) == 2:
            raise _Crash  # killed after seed 7's last epoch, before the node returned
        return result

    monkeypatch.setattr(tuning, "fit", crashing_fit)
    with pytest.raises(_Crash):
        nodes.train_variant(*frames, spec.to_dict(), plan, "cpu", variant_name="v")
    seed_dirs = [Path(d) for _, _, d in fits]
    assert [d.name for d in seed_dirs] == ["seed_6", "seed_7"] and all(read_manifest(d)["stopped"] for d in seed_dirs)

    models, summary, _, _ = nodes.train_variant(*frames, spec.to_dict(), plan, "cpu", variant_name="v")
    assert [(s, r) for s, r, _ in fits[2:]] == [(6, 2), (7, 2)]  # both resumed from their final state: no retraining
    assert not (Path(entry["study"]["checkpoint_dir"]) / summary["study_name"]).exists()  # deleted when done
    again = real_fit({**summary["best_config"], "train": {**summary["best_config"]["train"], "seed": 7}}, spec, *[
        nodes.frame_to_tensors(f, spec, "cpu") for f in frames])  # fmt: skip
    for k, v in again.model.state_dict().items():
        assert torch.equal(models["seed_7"].state_dict()[k], v)
