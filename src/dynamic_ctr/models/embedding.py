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
        e = self.table(x + self.offsets)  # (B, S, D)
        if not self._sequence_slices:
            return e
        c = self.num_categorical
        seq_x, seq_e = x[:, c:], e[:, c:]  # (B, S_seq), (B, S_seq, D)
        pooled = [e[:, :c]]
        for start, length in self._sequence_slices:
            mask = (seq_x[:, start : start + length] != PAD_INDEX).to(e.dtype)  # (B, L)
            summed = torch.einsum("bl,bld->bd", mask, seq_e[:, start : start + length])  # (B, D)
            count = mask.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1)
            pooled.append((summed / count).unsqueeze(1))  # (B, 1, D)
        return torch.cat(pooled, dim=1)  # (B, F, D)
