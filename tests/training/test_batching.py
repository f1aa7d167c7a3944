from __future__ import annotations

import numpy as np
import pytest
import torch

from dynamic_ctr.training import (
    TensorData,
    batches,
    make_generator,
    num_batches,
    tensors_from_columns,
)


def _ids_data(n: int) -> TensorData:
    """Rows whose single slot is the row id, labels = id parity."""
    ids = torch.arange(n)
    return TensorData(x=ids[:, None].clone(), y=(ids % 2).float())


def test_tensors_from_columns_stacks_index_columns_in_spec_order(spec, columns_factory):
    cols, _ = columns_factory(50, seed=3)
    data = tensors_from_columns(cols, spec)
    assert data.x.shape == (50, spec.num_slots) and data.x.dtype == torch.int64
    assert data.y.dtype == torch.float32 and data.y.shape == (50,)
    for j, name in enumerate(spec.index_columns):
        np.testing.assert_array_equal(data.x[:, j].numpy(), cols[name])
    np.testing.assert_array_equal(data.y.numpy(), cols["label"])
    # user_field is the default group key
    assert list(data.groups) == ["user"]
    np.testing.assert_array_equal(data.groups["user"].numpy(), cols["user"])


def test_tensors_from_columns_copies_read_only_columns(spec, columns_factory):
    """Arrow-backed columns are read-only: the tensors get their own memory, so an
    in-place write is defined and leaves the columns as they were."""
    cols, _ = columns_factory(20, seed=4)
    frozen = {}
    for name, values in cols.items():
        values = np.array(values)
        values.flags.writeable = False
        frozen[name] = values
    data = tensors_from_columns(frozen, spec)
    data.y.add_(1.0)
    data.groups["user"].add_(1)
    np.testing.assert_array_equal(frozen["label"], cols["label"])
    np.testing.assert_array_equal(frozen["user"], cols["user"])


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda c: c.pop("tags__1"), "tags__1"),
        (lambda c: c.__setitem__("item", c["item"] + 1000), "'item'"),
        (lambda c: c.__setitem__("ctx", c["ctx"] - 10), "'ctx'"),
        (lambda c: c.__setitem__("label", c["label"] * 2), "label"),
        (lambda c: c.__setitem__("user", c["user"][:-1]), "user"),
    ],
)
def test_tensors_from_columns_rejects_bad_tables(spec, columns_factory, mutate, match):
    cols, _ = columns_factory(20, seed=3)
    mutate(cols)
    with pytest.raises(ValueError, match=match):
        tensors_from_columns(cols, spec)


@pytest.mark.parametrize(("n", "batch_size"), [(103, 10), (100, 10), (5, 64)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_every_row_exactly_once(n, batch_size, shuffle):
    data = _ids_data(n)
    gen = make_generator(7)
    for _ in range(2):  # two epochs from the same generator
        seen = []
        count = 0
        for xb, yb in batches(data, batch_size, shuffle=shuffle, generator=gen):
            assert xb.shape[0] == yb.shape[0] <= batch_size
            np.testing.assert_array_equal(
                yb.numpy(), (xb[:, 0] % 2).float().numpy()
            )  # rows stay aligned
            seen.append(xb[:, 0])
            count += 1
        assert count == num_batches(n, batch_size)
        assert sorted(torch.cat(seen).tolist()) == list(range(n))


def test_shuffled_order_is_reproducible_under_a_seed_and_differs_across_epochs_and_seeds():
    data = _ids_data(200)

    def epochs(seed: int) -> list[list[int]]:
        gen = make_generator(seed)
        return [
            torch.cat(
                [xb[:, 0] for xb, _ in batches(data, 32, shuffle=True, generator=gen)]
            ).tolist()
            for _ in range(3)
        ]

    a, b, c = epochs(11), epochs(11), epochs(12)
    assert a == b
    assert a[0] != a[1]  # a fresh permutation each epoch
    assert a != c
    assert a[0] != list(range(200))


def test_drop_last_skips_only_the_short_batch():
    data = _ids_data(25)
    sizes = [
        xb.shape[0]
        for xb, _ in batches(data, 10, shuffle=True, generator=make_generator(0), drop_last=True)
    ]
    assert sizes == [10, 10] == [10] * num_batches(25, 10, drop_last=True)


def test_batches_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(_ids_data(3), 0))


def test_tensor_data_validates_shapes():
    with pytest.raises(ValueError, match="int64"):
        TensorData(x=torch.zeros(3, 2), y=torch.zeros(3))
    with pytest.raises(ValueError, match="y must be"):
        TensorData(x=torch.zeros(3, 2, dtype=torch.int64), y=torch.zeros(4))
    with pytest.raises(ValueError, match="groups"):
        TensorData(
            x=torch.zeros(3, 2, dtype=torch.int64), y=torch.zeros(3), groups={"u": torch.zeros(2)}
        )
