"""FieldEmbedding: one table, per-slot offsets, mean pooling over non-pad slots."""

from __future__ import annotations

import pytest
import torch

from dynamic_ctr.models.embedding import FieldEmbedding, field_order
from dynamic_ctr.spec import FeatureSpec, FieldSpec


def _unit_embedding(spec: FeatureSpec, dim: int = 5) -> FieldEmbedding:
    torch.manual_seed(0)
    emb = FieldEmbedding(spec, dim)
    with torch.no_grad():
        emb.table.weight.normal_()  # unit scale, so differences are visible
    return emb


def test_shape_and_field_order(spec, batch):
    emb = _unit_embedding(spec)
    out = emb(batch)
    assert out.shape == (3, 4, 5)
    assert emb.field_names == ("user", "item", "domain", "genres") == field_order(spec)
    assert emb.table.num_embeddings == 10 + 8 + 4 + 6


def test_categorical_slots_use_their_own_field_rows(spec):
    emb = _unit_embedding(spec)
    x = torch.tensor([[2, 3, 1, 2, 0, 0, 0]])
    out = emb(x)[0]  # (F, D)
    w = emb.table.weight
    torch.testing.assert_close(out[0], w[2])  # user 2
    torch.testing.assert_close(out[1], w[10 + 3])  # item 3
    torch.testing.assert_close(out[2], w[18 + 1])  # domain OOV
    torch.testing.assert_close(out[3], w[22 + 2])  # genres [2]
    assert not torch.allclose(out[0], out[3])  # same local index 2, different fields


def test_sequence_is_mean_over_non_pad_slots(spec):
    emb = _unit_embedding(spec)
    w = emb.table.weight
    x = torch.tensor([[2, 2, 2, 2, 3, 0, 0], [2, 2, 2, 0, 2, 0, 3], [2, 2, 2, 2, 3, 5, 4]])
    out = emb(x)[:, 3]  # (B, D)
    expected_23 = (w[22 + 2] + w[22 + 3]) / 2
    torch.testing.assert_close(out[0], expected_23)
    torch.testing.assert_close(out[1], expected_23)  # pad position does not matter
    torch.testing.assert_close(out[2], (w[24] + w[25] + w[27] + w[26]) / 4)


def test_pad_slots_do_not_change_pooled_embedding(spec):
    emb = _unit_embedding(spec)
    with torch.no_grad():
        emb.table.weight[22].fill_(100.0)  # the genres pad row: must never leak in
    short = torch.tensor([[2, 2, 2, 4, 0, 0, 0]])
    padded = torch.tensor([[2, 2, 2, 0, 4, 0, 0]])
    torch.testing.assert_close(emb(short), emb(padded))
    torch.testing.assert_close(emb(short)[0, 3], emb.table.weight[22 + 4])


def test_all_pad_sequence_pools_to_zero(spec):
    emb = _unit_embedding(spec)
    out = emb(torch.tensor([[2, 2, 2, 0, 0, 0, 0]]))
    assert torch.equal(out[0, 3], torch.zeros(5))


def test_pad_slots_get_no_gradient(spec):
    emb = _unit_embedding(spec)
    emb(torch.tensor([[2, 2, 2, 3, 0, 0, 0]])).sum().backward()
    grad = emb.table.weight.grad
    assert torch.all(grad[22] == 0)  # genres pad row
    assert torch.all(grad[25] != 0)  # genres value 3


def test_only_categorical_spec_skips_pooling():
    spec = FeatureSpec((FieldSpec("a", "categorical", 3), FieldSpec("b", "categorical", 4)))
    emb = FieldEmbedding(spec, 2)
    assert emb(torch.tensor([[1, 2], [2, 3]])).shape == (2, 2, 2)


def test_wrong_input_shape_raises(spec):
    emb = FieldEmbedding(spec, 3)
    with pytest.raises(ValueError, match=r"\(B, 7\)"):
        emb(torch.zeros(2, 4, dtype=torch.long))


def test_carry_over_embeddings_moves_known_rows_and_keeps_new_ones_fresh() -> None:
    from dynamic_ctr.models import build_model
    from dynamic_ctr.models.embedding import carry_over_embeddings

    old_spec = FeatureSpec((FieldSpec("user", "categorical", 6), FieldSpec("g", "sequence", 4, max_len=2)))
    new_spec = FeatureSpec((FieldSpec("user", "categorical", 5), FieldSpec("g", "sequence", 6, max_len=2)))
    config = {"family": "wdl", "embedding_dim": 3, "hidden_units": [4], "apg": {"version": "v4", "rank": 2}}
    old = build_model({**config, "seed": 1}, old_spec)
    new = build_model({**config, "seed": 2}, new_spec)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    maps = {"user": [0, 1, 5, -1, 2], "g": [0, 1, 3, 2, -1, -1]}  # new index -> old index
    carry_over_embeddings(old, new, maps)
    for module_name in ("embedding", "linear_embedding"):
        old_table = getattr(old, module_name, None)
        if old_table is None:
            continue
        o, n = old_table.table.weight, getattr(new, module_name).table.weight
        f = fresh[f"{module_name}.table.weight"]
        for field, rows, o_start, n_start in (("user", maps["user"], 0, 0), ("g", maps["g"], 6, 5)):
            for i, j in enumerate(rows):
                expected = f[n_start + i] if j < 0 else o[o_start + j]
                torch.testing.assert_close(n[n_start + i], expected, rtol=0, atol=0, msg=f"{module_name} {field} row {i}")
    old_state = old.state_dict()
    for key, value in new.state_dict().items():
        if not key.endswith("table.weight"):
            torch.testing.assert_close(value, old_state[key], rtol=0, atol=0)


def test_carry_over_refuses_models_that_differ_beyond_vocabularies() -> None:
    from dynamic_ctr.models import build_model
    from dynamic_ctr.models.embedding import carry_over_embeddings

    spec = FeatureSpec((FieldSpec("user", "categorical", 6),))
    old = build_model({"family": "wdl", "embedding_dim": 3, "hidden_units": [4], "seed": 1}, spec)
    wider = build_model({"family": "wdl", "embedding_dim": 3, "hidden_units": [5], "seed": 1}, spec)
    with pytest.raises(ValueError, match=r"only vocabularies may differ"):
        carry_over_embeddings(old, wider, {"user": list(range(6))})
    with pytest.raises(ValueError, match="the row map has"):
        carry_over_embeddings(old, build_model({"family": "wdl", "embedding_dim": 3, "hidden_units": [4], "seed": 1}, spec), {"user": [0, 1]})


def test_a_partial_warm_start_takes_the_tensors_another_model_shares() -> None:
    from dynamic_ctr.models import build_model
    from dynamic_ctr.models.embedding import carry_over_embeddings

    spec = FeatureSpec((FieldSpec("user", "categorical", 6), FieldSpec("g", "sequence", 4, max_len=2)))
    champion = build_model({"family": "wdl", "embedding_dim": 3, "hidden_units": [4], "seed": 1}, spec)
    challenger = build_model({"family": "wdl", "embedding_dim": 3, "hidden_units": [4], "seed": 2, "apg": {"version": "v4", "rank": 2}}, spec)
    fresh = {k: v.clone() for k, v in challenger.state_dict().items()}
    taken = carry_over_embeddings(champion, challenger, strict=False)
    assert "embedding.table.weight" in taken and len(taken) < len(fresh)
    old, new = champion.state_dict(), challenger.state_dict()
    for key, value in new.items():
        expected = old[key] if key in taken else fresh[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
    with pytest.raises(ValueError, match="only vocabularies may differ"):
        carry_over_embeddings(champion, build_model({**challenger.config, "seed": 3}, spec))


def _bag_inputs(spec: FeatureSpec, emb: FieldEmbedding, batch_size: int = 256):
    """A batch whose sequence slots are mostly pad (one hot row) and whose genres repeat."""
    from modelkit import random_batch

    x = random_batch(spec, batch_size, seed=3)
    x[:, -3:] = 0  # pad: the last 3 of genres' 4 slots in every row
    b = x.shape[0]
    _, weights = emb._slot_weights(x)
    starts = (torch.arange(b).unsqueeze(1) * emb.num_slots + emb.field_start).reshape(-1)
    bags = (torch.arange(b).unsqueeze(1) * emb.num_fields + emb.slot_field).reshape(-1)
    return (x + emb.offsets).reshape(-1), starts, weights.reshape(-1), bags


def test_scatter_bag_equals_embedding_bag_and_its_weight_gradient(spec):
    from dynamic_ctr.models.embedding import _ScatterBag

    emb = _unit_embedding(spec)
    rows, starts, weights, bags = _bag_inputs(spec, emb)
    assert (weights == 0).sum() > rows.numel() // 3  # many zero-weight pad slots, all on few rows
    grad_out = torch.randn(starts.numel(), emb.dim, generator=torch.Generator().manual_seed(0))
    table = emb.table.weight
    expected = torch.nn.functional.embedding_bag(rows, table, starts, mode="sum", per_sample_weights=weights)
    (expected_grad,) = torch.autograd.grad(expected, table, grad_out)
    got = _ScatterBag.apply(table, rows, starts, weights, bags)
    (got_grad,) = torch.autograd.grad(got, table, grad_out)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-5)  # the same sums, reordered
    pad_rows = emb.offsets[emb.is_sequence_slot].unique()
    assert torch.all(got_grad[pad_rows] == 0)  # the pad rows learn nothing


@pytest.mark.cuda
def test_field_embedding_on_cuda_has_the_cpu_gradient(spec):
    emb = _unit_embedding(spec)
    rows, *_ = _bag_inputs(spec, emb)
    x = rows.view(-1, emb.num_slots) - emb.offsets
    grad_out = torch.randn(x.shape[0], emb.num_fields, emb.dim, generator=torch.Generator().manual_seed(1))
    (cpu_grad,) = torch.autograd.grad(emb(x), emb.table.weight, grad_out)
    emb_cuda = emb.to("cuda")
    out = emb_cuda(x.cuda())
    assert "ScatterBag" in out.grad_fn.next_functions[0][0].name()  # the view's input: the scatter backward
    (cuda_grad,) = torch.autograd.grad(out, emb_cuda.table.weight, grad_out.cuda())
    torch.testing.assert_close(cuda_grad.cpu(), cpu_grad, rtol=1e-5, atol=1e-6)
