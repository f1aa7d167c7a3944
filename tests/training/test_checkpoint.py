from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from dynamic_ctr.spec import FeatureSpec
from dynamic_ctr.training import load_checkpoint, read_config, save_checkpoint
from dynamic_ctr.training.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError


@pytest.fixture
def model(builder, spec):
    torch.manual_seed(3)
    m = builder({"dim": 3, "hidden": 5, "dropout": 0.1}, spec)
    with torch.no_grad():  # move away from the init so a fresh build would differ
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    return m.eval()


def _x(spec, n=16):
    torch.manual_seed(0)
    return torch.stack([torch.randint(0, 5, (n,)) for _ in spec.index_columns], dim=1)


def test_round_trip_gives_identical_outputs_and_leaves_no_temp_dirs(tmp_path, model, builder, spec):
    target = tmp_path / "models" / "apg"
    assert save_checkpoint(model, target) == target
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["apg"]  # no temp siblings

    config = json.loads((target / CONFIG_NAME).read_text())
    weights = (target / WEIGHTS_NAME).read_bytes()
    assert config == {
        "format_version": 1,
        "model": model.config,
        "spec": spec.to_dict(),
        "weights": {"file": WEIGHTS_NAME, "sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights)},
    }
    assert FeatureSpec.from_dict(config["spec"]) == spec

    loaded = load_checkpoint(target, builder=builder)
    assert not loaded.training
    x = _x(spec)
    assert torch.equal(loaded(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_weights_are_plain_safetensors(tmp_path, model):
    save_checkpoint(model, tmp_path / "ckpt")
    tensors = safetensors.torch.load_file(str(tmp_path / "ckpt" / WEIGHTS_NAME))
    assert tensors.keys() == model.state_dict().keys()


def test_overwrite_replaces_an_existing_checkpoint(tmp_path, model, builder, spec):
    target = tmp_path / "ckpt"
    save_checkpoint(builder({"dim": 3, "hidden": 5}, spec), target)
    save_checkpoint(model, target)
    x = _x(spec)
    assert torch.equal(load_checkpoint(target, builder=builder)(x), model(x))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def _failing_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as f:  # leave a half-written file behind, then fail
        f.write(b"\x00" * 10)
    raise OSError("disk full")


def test_failure_mid_save_leaves_no_partial_checkpoint(tmp_path, model, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_save_keeps_the_previous_checkpoint(tmp_path, model, builder, spec):
    target = tmp_path / "ckpt"
    save_checkpoint(model, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    mp = pytest.MonkeyPatch()
    mp.setattr(safetensors.torch, "save_file", _failing_save_file)
    try:
        with pytest.raises(OSError):
            save_checkpoint(builder({"dim": 3, "hidden": 5}, spec), target)
    finally:
        mp.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path, model):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_checkpoint(model, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_model_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config"):
        save_checkpoint(torch.nn.Linear(2, 1), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_load_checks_format_version_and_strict_keys(tmp_path, model, builder, spec):
    target = tmp_path / "ckpt"
    save_checkpoint(model, target)
    # a builder that makes a differently-shaped model: strict loading must fail
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_checkpoint(target, builder=lambda cfg, s: builder({**cfg, "hidden": 7}, s))
    config = json.loads((target / CONFIG_NAME).read_text())
    config["format_version"] = 2
    (target / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version"):
        read_config(target)


# ------------------------------------------------------------ integrity


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("flip_a_byte", r"SHA-256 [0-9a-f]{64} does not match .* \(corrupted or tampered with\)"),
        ("truncate", r"bytes, but .*config\.json records \d+ \(truncated or replaced\)"),
        ("swap", r"bytes, but .*config\.json records|does not match"),  # another checkpoint's weights
    ],
)
def test_tampered_or_truncated_weights_are_refused_naming_the_file(tmp_path, model, builder, spec, damage, match):
    target = tmp_path / "ckpt"
    save_checkpoint(model, target)
    weights = target / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    if damage == "flip_a_byte":
        data[-5] ^= 0x01  # in the tensor payload: still a well-formed safetensors file
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        save_checkpoint(builder({"dim": 3, "hidden": 6}, spec), tmp_path / "other")
        data = bytearray((tmp_path / "other" / WEIGHTS_NAME).read_bytes())
    weights.write_bytes(bytes(data))
    built = []
    with pytest.raises(CheckpointError, match=match) as error:
        load_checkpoint(target, builder=lambda cfg, s: built.append(cfg) or builder(cfg, s))
    assert str(weights) in str(error.value)
    assert built == []  # refused before any model is built or any tensor parsed
    assert isinstance(error.value, ValueError)


def test_checkpoints_without_a_recorded_hash_still_load_with_a_warning(tmp_path, model, builder, spec, caplog):
    target = tmp_path / "ckpt"
    save_checkpoint(model, target)
    config = json.loads((target / CONFIG_NAME).read_text())
    del config["weights"]  # as written before hashes were recorded
    (target / CONFIG_NAME).write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="dynamic_ctr.training.checkpoint"):
        loaded = load_checkpoint(target, builder=builder)
    assert "without an integrity check" in caplog.text
    x = _x(spec)
    assert torch.equal(loaded(x), model(x))
    weights = target / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-20])  # truncated: the parser still refuses it
    with pytest.raises(CheckpointError, match=f"{weights}: not a readable safetensors file"):
        load_checkpoint(target, builder=builder)


@pytest.mark.parametrize(
    ("config_text", "match"),
    [
        ('{"format_version": 1, "model": {', "not valid JSON"),
        ('{"format_version": 1, "model": {}, "spec": {}, "weights": {"sha256": "abc"}}', "malformed 'weights' entry"),
    ],
)
def test_a_damaged_config_is_refused_naming_it(tmp_path, model, config_text, match):
    target = tmp_path / "ckpt"
    save_checkpoint(model, target)
    (target / CONFIG_NAME).write_text(config_text)
    with pytest.raises(CheckpointError, match=match) as error:
        load_checkpoint(target)
    assert str(target / CONFIG_NAME) in str(error.value)


def test_torch_load_is_only_ever_called_with_weights_only():
    """Nothing in the project may unpickle arbitrary objects: every ``torch.load`` call
    passes ``weights_only=True`` (a literal, so it cannot be switched off by a variable)."""
    root = Path(__file__).resolve().parents[2]
    calls = []
    for path in sorted([*(root / "src").rglob("*.py"), *(root / "benchmarks").rglob("*.py"), *(root / "tests").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                owner = node.func.value
                if isinstance(owner, ast.Name) and owner.id == "torch":
                    safe = any(
                        k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                        for k in node.keywords
                    )
                    calls.append((f"{path.relative_to(root)}:{node.lineno}", safe))
    assert calls, "expected at least the resume state's torch.load"
    assert [where for where, safe in calls if not safe] == []
    assert not any("pickle" in line for p in (root / "src").rglob("*.py") for line in p.read_text().splitlines()
                   if line.lstrip().startswith(("import pickle", "from pickle", "import dill", "import cloudpickle")))
