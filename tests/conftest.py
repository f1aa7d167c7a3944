"""Fixtures shared by every test folder: the project root and the external data root.

``DYNAMIC_CTR_DATA_ROOT`` points at the data sets that may not be shipped (MovieLens
100K, the Criteo and Avazu samples). Tests that need it are skipped when it is unset
or missing, unless ``DYNAMIC_CTR_REQUIRE_DATA_ROOT=1`` (as in CI), where they fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run where torch sees a GPU and are skipped elsewhere (CI)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def real_splits(small_train_encoded):
    """``(spec, train, valid)`` TensorData on the CPU: the shipped MovieLens training split,
    its last 10,000 rows (latest in time) held out for validation."""
    from dynamic_ctr.training import tensors_from_columns

    spec, frame = small_train_encoded
    cols = [*spec.index_columns, spec.label]
    fit, held = frame.iloc[:-10_000], frame.iloc[-10_000:]
    to_tensors = lambda f: tensors_from_columns({c: f[c].to_numpy() for c in cols}, spec, "cpu")
    return spec, to_tensors(fit), to_tensors(held)


@pytest.fixture(scope="session")
def project_root() -> Path:
    """The repository root (holds ``conf/``, ``data/``, ``src/``)."""
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def small_train_encoded():
    """``(feature spec, encoded training frame)`` of the shipped MovieLens latest-small
    data (70,585 rows), split and encoded as the pipeline does."""
    from dynamic_ctr.data.adapters import movielens_latest
    from dynamic_ctr.data.encoder import EncoderParams, FeatureEncoder, aggregate_item_lists
    from dynamic_ctr.data.raw import RawFileConfig, read_raw
    from dynamic_ctr.data.split import SplitParams, split_frame

    small = PROJECT_ROOT / "data/01_raw/ml-latest-small"
    files = {k: read_raw(RawFileConfig(filepath=str(small / f"{k}.csv"))) for k in ("ratings", "movies", "tags")}
    result = movielens_latest(files, {})
    train_rows, valid, test = split_frame(result.table, SplitParams(), result.schema.time_key)
    train_rows, _, _ = aggregate_item_lists(train_rows, [valid, test], result.schema)
    encoder = FeatureEncoder.fit(train_rows, result.schema, EncoderParams())
    frame, _ = encoder.transform(train_rows)
    return encoder.feature_spec(), frame


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The external data root from ``DYNAMIC_CTR_DATA_ROOT`` (read only)."""
    value = os.environ.get("DYNAMIC_CTR_DATA_ROOT", "").strip()
    problem = None
    root = None
    if not value:
        problem = "DYNAMIC_CTR_DATA_ROOT is not set"
    else:
        root = Path(value).expanduser()
        if not root.is_absolute() and not root.is_dir():
            root = PROJECT_ROOT / root  # CI gives it relative to the project root
        if not root.is_dir():
            problem = f"DYNAMIC_CTR_DATA_ROOT={value!r} is not a directory"
    if problem is not None:
        if os.environ.get("DYNAMIC_CTR_REQUIRE_DATA_ROOT") == "1":
            pytest.fail(f"{problem}, and DYNAMIC_CTR_REQUIRE_DATA_ROOT=1 requires the external data sets")
        pytest.skip(f"{problem}: the external data sets (MovieLens-100K, Criteo, Avazu samples) are not at hand")
    assert root is not None
    return root.resolve()


@pytest.fixture
def single_thread():
    """Torch on one thread for the duration of a test: tiny modules run fastest (and
    steadiest on a shared machine) that way."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
