"""models.layers.rows_with_sparse_grad: the rows of a per-domain table, with a row-sparse
gradient equal to indexing's dense one, for 2-d and 3-d tables and int32 or int64 ids."""

from __future__ import annotations

import pytest
import torch

from dynamic_ctr.models.layers import rows_with_sparse_grad


@pytest.mark.parametrize("shape", [(7, 3), (7, 3, 2)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_rows_with_sparse_grad_match_indexing(shape, dtype):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([4, 0, 4, 6, 4], dtype=dtype)  # repeats are summed, absent rows stay out
    upstream = torch.randn((len(ids), *shape[1:]), generator=g, dtype=torch.float64)

    rows = rows_with_sparse_grad(table, ids)
    assert torch.equal(rows, table.detach()[ids.long()])
    (rows * upstream).sum().backward()
    sparse = table.grad
    table.grad = None
    (table[ids.long()] * upstream).sum().backward()

    assert sparse.is_sparse and sparse.sparse_dim() == 1 and sparse.shape == table.shape
    assert sorted(set(sparse.coalesce().indices()[0].tolist())) == [0, 4, 6]
    torch.testing.assert_close(sparse.to_dense(), table.grad, rtol=0, atol=1e-12)
