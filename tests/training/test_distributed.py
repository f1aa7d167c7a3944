"""Data-parallel training (``dynamic_ctr.training.distributed``): the sharding rules in
process, then two gloo processes on the CPU (``torch.multiprocessing`` and ``torchrun``)
training WDL on the shipped tiny MovieLens data against a single-process run.

**Tolerance.** Two ranks compute each gradient as two half-batch sums that the gloo
all-reduce adds, where one process sums the whole batch in one kernel: the same terms
in another order, so each step agrees to float32 rounding (~1e-7 relative) and Adam's
normalised steps carry the difference on. After the 28 steps here the largest weight
difference was 3e-6; ``ATOL = 1e-4`` leaves room for other CPUs' kernels. Real mistakes
are far larger: without the loss weights of the uneven last batch (44 + 43 rows) the
weights moved by 3e-2, without the gradient average by 0.5. Between the ranks there is
no tolerance: the all-reduce hands every rank the same bits, so the replicas are
``torch.equal``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from dynamic_ctr.models import build_model
from dynamic_ctr.spec import FeatureSpec, FieldSpec
from dynamic_ctr.training import (
    TensorData,
    TrainConfig,
    batches,
    load_checkpoint,
    make_generator,
    train,
)
from dynamic_ctr.training.device import seed_everything
from dynamic_ctr.training.distributed import (
    LocalRanks,
    RankFailure,
    World,
    distributed,
    init_from_env,
    is_main,
    load_split,
    shard,
)

PROJECT = Path(__file__).resolve().parents[2]
VERSION = "2026-01-01T00.00.00.000Z"
#: WDL on 3415 training rows: 13 global batches of 256 and a last one of 87 rows (44 + 43
#: on two ranks: the uneven case), 2 epochs = 28 steps.
CONFIG: dict[str, Any] = {
    "model": {"family": "wdl", "embedding_dim": 8, "hidden_units": [16, 8]},
    "train": {
        "lr": 0.01,
        "batch_size": 256,
        "max_epochs": 2,
        "patience": 5,
        "seed": 7,
        "progress": False,
    },
}
ATOL = 1e-4
TIMEOUT_S = 120


# ---------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped tiny MovieLens data, split and encoded, written as the pipeline does:
    ``<dir>/{train,valid}.parquet/<version>/...`` and ``<dir>/feature_spec.json/<version>/...``."""
    from dynamic_ctr.data.adapters import movielens_latest
    from dynamic_ctr.data.encoder import EncoderParams, FeatureEncoder, aggregate_item_lists
    from dynamic_ctr.data.raw import RawFileConfig, read_raw
    from dynamic_ctr.data.split import SplitParams, split_frame

    raw = PROJECT / "data/01_raw/ml-latest-tiny"
    files = {
        k: read_raw(RawFileConfig(filepath=str(raw / f"{k}.csv")))
        for k in ("ratings", "movies", "tags")
    }
    table = movielens_latest(files, {})
    train_frame, valid_frame, test_frame = split_frame(
        table.table, SplitParams(), table.schema.time_key
    )
    train_frame, (valid_frame, _), _ = aggregate_item_lists(
        train_frame, [valid_frame, test_frame], table.schema
    )
    encoder = FeatureEncoder.fit(train_frame, table.schema, EncoderParams())
    root = tmp_path_factory.mktemp("model_input") / "tiny"
    for name, frame in (("train.parquet", train_frame), ("valid.parquet", valid_frame)):
        (root / name / VERSION).mkdir(parents=True)
        encoder.transform(frame)[0].to_parquet(root / name / VERSION / name)
    (root / "feature_spec.json" / VERSION).mkdir(parents=True)
    spec_file = root / "feature_spec.json" / VERSION / "feature_spec.json"
    spec_file.write_text(json.dumps(encoder.feature_spec().to_dict()))
    return root


def _run(split: Path, world: World | None = None) -> dict[str, Any]:
    """Train ``CONFIG`` on ``split`` as the entry point does; weights and history."""
    spec, tr, va, _ = load_split(split)
    cfg = TrainConfig.from_dict(CONFIG["train"])
    seed_everything(cfg.seed)
    model = build_model({**CONFIG["model"], "seed": cfg.seed}, spec)
    result = train(model, tr, va, cfg, world=world)
    state = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    return {"state": state, "history": result.history, "best_epoch": result.best_epoch}


@pytest.fixture(scope="module")
def reference(split_dir: Path) -> dict[str, Any]:
    """One process, the same global batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(split_dir)
    finally:
        torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world_size: int, port: int, split: str, out: str) -> None:
    """One rank, joined through torchrun's environment variables."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    with distributed("cpu") as world:
        assert (world.rank, world.size, world.backend, is_main()) == (
            rank,
            world_size,
            "gloo",
            rank == 0,
        )
        torch.save(_run(Path(split), world), Path(out) / f"rank{rank}.pt")


def _numbers(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """A history without its timings."""
    return [{k: v for k, v in h.items() if k not in ("seconds", "samples_per_s")} for h in history]


def _assert_close(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert state.keys() == expected.keys()
    worst = max((state[k].float() - expected[k].float()).abs().max().item() for k in state)
    assert worst <= ATOL, (
        f"largest weight difference to the single-process run: {worst:.3g} > {ATOL}"
    )


# ---------------------------------------------------------------------- sharding, in process


def test_shard_is_contiguous_covers_every_row_and_differs_by_at_most_one() -> None:
    data = TensorData(
        x=torch.arange(14).view(7, 2), y=torch.ones(7), groups={"user": torch.arange(7)}
    )
    parts = [shard(data, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [3, 2, 2]
    assert torch.equal(torch.cat([p.x for p in parts]), data.x)
    assert torch.equal(torch.cat([p.groups["user"] for p in parts]), data.groups["user"])
    assert [len(shard(data, r, 8)) for r in range(8)] == [1] * 7 + [0]
    with pytest.raises(ValueError, match="rank"):
        shard(data, 3, 3)


@pytest.mark.parametrize(
    ("n", "batch_size", "world_size"), [(23, 6, 2), (23, 6, 3), (20, 4, 4), (26, 8, 4)]
)
def test_rank_batches_make_up_the_single_process_batches(
    n: int, batch_size: int, world_size: int
) -> None:
    """Per step, the ranks' slices are the single-process batch in order, and the loss
    weights make DDP's average of the ranks' mean losses the mean over the batch."""
    data = TensorData(
        x=torch.arange(n).view(n, 1), y=torch.rand(n, generator=torch.Generator().manual_seed(0))
    )
    ranks = [
        list(World(rank=r, size=world_size).batches(data, batch_size, make_generator(5)))
        for r in range(world_size)
    ]
    single = list(batches(data, batch_size, shuffle=True, generator=make_generator(5)))
    kept = [b for b in single if len(b[1]) >= world_size]  # a last batch smaller than W is skipped
    assert len(kept) == World(size=world_size).num_batches(n, batch_size) == len(ranks[0])
    assert len(single) - len(kept) == (0 < n % batch_size < world_size)
    for step, (xb, yb) in enumerate(kept):
        parts = [ranks[r][step] for r in range(world_size)]
        assert torch.equal(torch.cat([p[0] for p in parts]), xb)
        assert all(p[2] == len(yb) / world_size for p in parts)
        weighted = [p[1].mean() * (len(p[1]) / p[2]) for p in parts]  # the loop's loss scaling
        assert torch.stack(weighted).mean().item() == pytest.approx(yb.mean().item(), rel=1e-6)


def test_without_torchrun_the_world_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with distributed("cpu") as world:
        assert (world.rank, world.size, world.backend, world.is_main) == (0, 1, None, True)
        assert not torch.distributed.is_initialized() and is_main()
    monkeypatch.setenv("WORLD_SIZE", "2")  # RANK missing
    with pytest.raises(ValueError, match="torchrun environment"):
        init_from_env("cpu")


def test_a_world_of_one_is_the_single_process_run(splits, builder, spec) -> None:
    train_data, valid_data, _ = splits
    cfg = TrainConfig(batch_size=256, max_epochs=2, progress=False)
    torch.manual_seed(0)  # the stand-in model initialises from the global generator
    a = train(builder({}, spec), train_data, valid_data, cfg)
    torch.manual_seed(0)
    b = train(builder({}, spec), train_data, valid_data, cfg, world=World())
    assert all(torch.equal(a.model.state_dict()[k], v) for k, v in b.model.state_dict().items())
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]


def test_refused_before_any_communication(splits, builder, spec, tmp_path: Path) -> None:
    """No process group exists here: each refusal must come before the first collective."""
    train_data, valid_data, _ = splits
    world = World(rank=0, size=2)
    cfg = TrainConfig(batch_size=256, max_epochs=1, progress=False)
    domain_spec = FeatureSpec(
        fields=(
            FieldSpec("user", "categorical", 10, source="user"),
            FieldSpec("item", "categorical", 8, source="item"),
            FieldSpec("domain", "categorical", 4, source="domain"),
        ),
        user_field="user", item_field="item", domain_field="domain",
    )  # fmt: skip
    small = {"embedding_dim": 4, "hidden_units": [8]}
    with pytest.raises(ValueError, match=r"model MAML defines meta_loss and adapt"):
        train(
            build_model({"family": "maml", **small}, domain_spec),
            train_data,
            valid_data,
            cfg,
            world=world,
        )
    with pytest.raises(ValueError, match=r"model STAR has parameters with sparse gradients"):
        train(
            build_model({"family": "star", **small}, domain_spec),
            train_data,
            valid_data,
            cfg,
            world=world,
        )
    with pytest.raises(ValueError, match=r"model MMoE has parameters with sparse gradients.*mmoe.lazy_domains"):
        train(build_model({"family": "mmoe", **small}, domain_spec), train_data, valid_data, cfg, world=world)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train(builder({}, spec), train_data, valid_data, cfg, world=world, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="divisible by the world size 2"):
        train(builder({}, spec), train_data, valid_data, TrainConfig(batch_size=255), world=world)


def test_load_split_reads_the_newest_version_all_files_share(
    split_dir: Path, tmp_path: Path
) -> None:
    import shutil

    import pandas as pd

    root = tmp_path / "tiny"
    shutil.copytree(split_dir, root)
    newer = "2026-02-01T00.00.00.000Z"  # a newer version of the training split only
    (root / "train.parquet" / newer).mkdir()
    (root / "train.parquet" / newer / "train.parquet").write_bytes(b"not read")
    spec, tr, va, paths = load_split(root)
    assert paths["train.parquet"] == root / "train.parquet" / VERSION / "train.parquet"
    frame = pd.read_parquet(paths["train.parquet"])
    assert torch.equal(tr.x, torch.tensor(frame[list(spec.index_columns)].to_numpy()))
    assert torch.equal(tr.y, torch.tensor(frame[spec.label].to_numpy(dtype="float32")))
    assert len(va) == len(pd.read_parquet(paths["valid.parquet"])) > 0
    with pytest.raises(FileNotFoundError, match="not in every one"):
        load_split(root, version=newer)


# ---------------------------------------------------------------------- two gloo processes


def test_two_gloo_ranks_are_identical_and_match_one_process(
    split_dir: Path, reference: dict[str, Any], tmp_path: Path
) -> None:
    last = len(load_split(split_dir)[1]) % CONFIG["train"]["batch_size"]
    assert last >= 2 and last % 2 == 1, "the data should end in an uneven last global batch"
    context = mp.start_processes(
        _spawned,
        args=(2, _free_port(), str(split_dir), str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two ranks did not finish within {TIMEOUT_S}s")
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))

    assert rank0["state"].keys() == rank1["state"].keys()
    assert all(torch.equal(v, rank1["state"][k]) for k, v in rank0["state"].items()), (
        "replicas differ"
    )
    assert _numbers(rank0["history"]) == _numbers(
        rank1["history"]
    )  # the same early-stopping inputs
    _assert_close(rank0["state"], reference["state"])
    assert rank0["best_epoch"] == reference["best_epoch"]
    for got, want in zip(rank0["history"], reference["history"], strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-5)
        assert got["val_auc"] == pytest.approx(want["val_auc"], abs=1e-4)


def test_torchrun_entry_point_writes_model_and_metrics_from_rank_0(
    split_dir: Path, reference: dict[str, Any], tmp_path: Path
) -> None:
    config, out = tmp_path / "wdl.json", tmp_path / "out"
    config.write_text(json.dumps(CONFIG))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "dynamic_ctr.training.distributed",
        "--config", str(config), "--data", str(split_dir), "--out", str(out), "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT / "src")}
    # its own session: on a timeout the whole group (torchrun and both ranks) is killed
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    ) as launched:  # fmt: skip
        try:
            _, stderr = launched.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(launched.pid, signal.SIGKILL)
            launched.communicate()
            pytest.fail(f"torchrun did not finish within {TIMEOUT_S}s")
    assert launched.returncode == 0, stderr[-4000:]

    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["written_by_rank"] == 0
    assert (metrics["world_size"], metrics["backend"], metrics["rank_batch_size"]) == (
        2,
        "gloo",
        128,
    )
    assert len(metrics["history"]) == 2 and metrics["best_epoch"] == reference["best_epoch"]
    assert metrics["data"]["train.parquet"].endswith(f"{VERSION}/train.parquet")
    model = load_checkpoint(out / "model")
    _assert_close(model.state_dict(), reference["state"])
    lines = stderr.splitlines()
    assert any(line.startswith("[rank 0]") and "wrote" in line for line in lines)
    assert not any(line.startswith("[rank 1]") and " INFO: " in line for line in lines)


# ---------------------------------------------------------------------- ranks started by the training node


@pytest.fixture(scope="module")
def ranks(split_dir: Path):
    """Two gloo ranks of the training node's kind, on the split in memory, kept for the
    module's tests (started by their first ``fit``)."""
    spec, tr, va, _ = load_split(split_dir)
    with LocalRanks(2, "cpu", spec, tr, va) as started:
        yield started


def test_local_ranks_train_as_one_process_and_stop_when_the_callback_says(
    ranks: LocalRanks, reference: dict[str, Any]
) -> None:
    """The node's ranks: rank 0's model equals the single-process run within ``ATOL``; an
    Optuna-style pruning raised by the callback here stops every rank (the next config
    trains on the same ranks); a rank's error reaches the caller, with its rank."""
    import optuna

    seen: list[tuple[int, float]] = []
    result = ranks.fit(CONFIG, lambda epoch, auc: seen.append((epoch, auc)), None)
    _assert_close(result.model.state_dict(), reference["state"])
    assert result.best_epoch == reference["best_epoch"]
    assert seen == [(h["epoch"], h["val_auc"]) for h in result.history]
    assert [h["val_auc"] for h in result.history] == pytest.approx([h["val_auc"] for h in reference["history"]], abs=1e-4)

    def prune(epoch: int, auc: float) -> None:
        raise optuna.TrialPruned(f"epoch {epoch}")

    with pytest.raises(optuna.TrialPruned, match="epoch 1"):
        ranks.fit(CONFIG, prune, None)
    processes = list(ranks._processes or [])
    again = ranks.fit(CONFIG, None, None)  # the same ranks, the same result
    assert ranks._processes == processes
    assert all(torch.equal(v, result.model.state_dict()[k]) for k, v in again.model.state_dict().items())

    with pytest.raises(ValueError, match="family=.nope. must be one of") as error:
        ranks.fit({**CONFIG, "model": {**CONFIG["model"], "family": "nope"}}, None, None)
    assert "raised on rank" in "".join(getattr(error.value, "__notes__", []))
    with pytest.raises(ValueError, match="checkpoint_dir"):
        ranks.fit(CONFIG, None, "somewhere")


def test_a_rank_killed_mid_run_stops_the_fit_and_the_next_fit_starts_fresh_ranks(
    ranks: LocalRanks, reference: dict[str, Any]
) -> None:
    def kill_rank_1(epoch: int, auc: float) -> None:
        os.kill(ranks._processes[1].pid, signal.SIGKILL)

    started = time.monotonic()
    with pytest.raises(RankFailure, match=r"(killed|ended) during training: .*rank 1 exited with code -9 \(SIGKILL\)"):
        ranks.fit(CONFIG, kill_rank_1, None)
    assert time.monotonic() - started < TIMEOUT_S and ranks._processes is None  # every rank ended
    result = ranks.fit(CONFIG, None, None)
    _assert_close(result.model.state_dict(), reference["state"])


def test_local_ranks_read_their_own_row_groups(split_dir: Path, tmp_path: Path) -> None:
    """A split read by row group: each of the two ranks reads only its own row groups
    (their shards are checked in tests/training/test_row_groups.py) and the model learns."""
    import pyarrow.parquet as pq

    from dynamic_ctr.training.batching import RowGroupData

    spec, _, va, paths = load_split(split_dir)
    rows = tmp_path / "train.parquet"
    pq.write_table(pq.read_table(paths["train.parquet"]), rows, row_group_size=200)
    data = RowGroupData((str(rows),), spec, buffer_rows=1000)
    config = {**CONFIG, "train": {**CONFIG["train"], "batch_size": 64, "max_epochs": 3}}
    with LocalRanks(2, "cpu", spec, data, va) as row_ranks:
        result = row_ranks.fit(config, None, None)
    assert result.history[-1]["val_auc"] > 0.6
    assert result.history[-1]["samples_per_s"] > 0


def test_torchrun_entry_point_reads_its_own_row_groups_from_a_parts_folder(split_dir: Path, tmp_path: Path) -> None:
    """``--row-groups``: on a split whose training table is a folder of Parquet parts (as
    the streaming environments write it), two ranks read their own row groups and learn."""
    import shutil

    import pyarrow.parquet as pq

    data = tmp_path / "data"
    shutil.copytree(split_dir, data)
    single = data / "train.parquet" / VERSION / "train.parquet"
    table = pq.read_table(single)
    single.unlink()
    single.mkdir()
    half = len(table) // 2
    for i, part in enumerate((table.slice(0, half), table.slice(half))):
        pq.write_table(part, single / f"part-{i:05d}.parquet", row_group_size=200)
    (single / "_manifest.json").write_text(json.dumps({"parts": ["part-00000.parquet", "part-00001.parquet"], "rows": len(table)}))
    config, out = tmp_path / "wdl.json", tmp_path / "out"
    config.write_text(json.dumps({**CONFIG, "train": {**CONFIG["train"], "batch_size": 64, "max_epochs": 3}}))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "dynamic_ctr.training.distributed", "--config", str(config), "--data", str(data),
        "--out", str(out), "--device", "cpu", "--row-groups", "1000",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT / "src")}
    launched = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert launched.returncode == 0, launched.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_rows"] == len(table) and metrics["data"]["train.parquet"].endswith(f"{VERSION}/train.parquet")
    assert metrics["history"][-1]["val_auc"] > 0.6
