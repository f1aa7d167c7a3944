"""Field embeddings over a :class:`~dynamic_ctr.spec.FeatureSpec`.

All fields share ONE ``nn.Embedding`` of ``V = sum(f.vocab_size)`` rows; a
registered ``(S,)`` offset buffer maps every slot's local index to its field's rows,
so a batch is embedded by a single lookup. Sequence fields are mean-pooled over
their non-pad slots (an all-pad row pools to the zero vector).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dynamic_ctr.spec import PAD_INDEX, FeatureSpec

__all__ = ["EMBEDDING_INIT_STD", "FieldEmbedding", "field_order"]

# Small normal init, as in DeepCTR/FuxiCTR: the first steps see near-zero embeddings.
EMBEDDING_INIT_STD = 1e-4


def field_order(spec: FeatureSpec) -> tuple[str, ...]:
    """Field names along the F axis: ``spec.categorical`` then ``spec.sequences``."""
    return tuple(f.name for f in (*spec.categorical, *spec.sequences))


class FieldEmbedding(nn.Module):
    """Embeds ``x (B, S)`` of local indices into ``(B, F, D)``.

    Fields come out in slot order: ``spec.categorical`` then ``spec.sequences``
    (see :attr:`field_names`).

    Args:
        spec: the feature spec; ``x`` columns follow ``spec.index_columns``.
        dim: D, the embedding width (1 gives per-field first-order weights).

    Example::

        >>> from dynamic_ctr.spec import FeatureSpec, FieldSpec
        >>> spec = FeatureSpec((FieldSpec("u", "categorical", 5),
        ...                     FieldSpec("g", "sequence", 7, max_len=3)))
        >>> FieldEmbedding(spec, 4)(torch.tensor([[2, 3, 4, 0]])).shape
        torch.Size([1, 2, 4])
    """

    offsets: Tensor

    def __init__(self, spec: FeatureSpec, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"{dim=} must be >= 1")
        ordered = (*spec.categorical, *spec.sequences)
        self.field_names = field_order(spec)
        self.num_categorical = len(spec.categorical)
        starts, total = {}, 0
        for f in ordered:
            starts[f.name] = total
            total += f.vocab_size
        slot_offsets = [starts[f.name] for f in spec.categorical]
        # (start slot within the sequence block, max_len) of every sequence field
        self._sequence_slices: tuple[tuple[int, int], ...] = ()
        seq_start = 0
        for f in spec.sequences:
            slot_offsets.extend([starts[f.name]] * f.max_len)
            self._sequence_slices += ((seq_start, f.max_len),)
            seq_start += f.max_len
        self.num_slots = len(slot_offsets)
        self.dim = dim
        self.table = nn.Embedding(total, dim)
        self.register_buffer(
            "offsets", torch.tensor(slot_offsets, dtype=torch.long), persistent=False
        )
        # For the single embedding_bag of forward: each slot's field, each field's first
        # slot, and which slots belong to sequence fields (mean-pooled).
        slot_field = list(range(self.num_categorical))
        for j, (_, length) in enumerate(self._sequence_slices):
            slot_field += [self.num_categorical + j] * length
        self.register_buffer("slot_field", torch.tensor(slot_field, dtype=torch.long), persistent=False)
        self.register_buffer(
            "field_start",
            torch.tensor([slot_field.index(i) for i in range(len(ordered))], dtype=torch.long),
            persistent=False,
        )
        self.register_buffer("is_sequence_slot", self.slot_field >= self.num_categorical, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.table.weight, std=EMBEDDING_INIT_STD)

    @property
    def num_fields(self) -> int:
        return len(self.field_names)

    def field_index(self, name: str) -> int:
        """Position of field ``name`` along the F axis of the output."""
        if name not in self.field_names:
            raise ValueError(f"no field {name!r}; fields are {list(self.field_names)}")
        return self.field_names.index(name)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S)`` int64 local indices -> ``(B, F, D)``."""
        if x.ndim != 2 or x.shape[1] != self.num_slots:
            raise ValueError(f"x must be (B, {self.num_slots}), got {tuple(x.shape)}")
        if not self._sequence_slices:
            return self.table(x + self.offsets)  # (B, S=F, D)
        # One embedding_bag for all fields: a categorical slot is a bag of one with
        # weight 1; a sequence field's slots form one bag weighted 1/count on non-pad
        # slots (mean pooling; an all-pad row pools to zero).
        b = x.shape[0]
        nonpad = (x != PAD_INDEX).to(self.table.weight.dtype)  # (B, S)
        counts = nonpad.new_zeros(b, self.num_fields).index_add_(1, self.slot_field, nonpad)  # (B, F)
        per_slot = counts.index_select(1, self.slot_field).clamp_min(1.0)  # (B, S)
        weights = torch.where(self.is_sequence_slot, nonpad / per_slot, 1.0)  # (B, S)
        starts = (torch.arange(b, device=x.device).unsqueeze(1) * self.num_slots + self.field_start).reshape(-1)
        pooled = nn.functional.embedding_bag(
            (x + self.offsets).reshape(-1), self.table.weight, starts, mode="sum",
            per_sample_weights=weights.reshape(-1),
        )  # (B*F, D)
        return pooled.view(b, self.num_fields, self.dim)  # (B, F, D)
