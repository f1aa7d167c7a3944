"""Field embeddings over a :class:`~dynamic_ctr.spec.FeatureSpec`.

All fields share ONE ``nn.Embedding`` of ``V = sum(f.vocab_size)`` rows; a
registered ``(S,)`` offset buffer maps every slot's local index to its field's rows,
so a batch is embedded by a single lookup. Sequence fields are mean-pooled over
their non-pad slots (an all-pad row pools to the zero vector).

:meth:`FieldEmbedding.with_feature_sums` also gives, from the same single lookup,
the sums over every active *feature* (each categorical slot and each non-pad slot of
a sequence field) that a feature-level FM needs (Rendle, 2010).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dynamic_ctr.spec import PAD_INDEX, FeatureSpec

__all__ = ["EMBEDDING_INIT_STD", "FieldEmbedding", "carry_over_embeddings", "field_order"]

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
        self.register_buffer(
            "slot_onehot",
            nn.functional.one_hot(self.slot_field, len(ordered)).t().to(torch.get_default_dtype()),
            persistent=False,
        )  # (F, S): 1 where slot s belongs to field f
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

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.num_slots:
            raise ValueError(f"x must be (B, {self.num_slots}), got {tuple(x.shape)}")

    def _slot_weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x (B, S)`` -> ``(active (B, S), pool (B, S))``.

        ``active`` is 1 on every active feature (categorical slots, non-pad sequence
        slots) and 0 on pad slots of sequence fields; ``pool`` weighs each slot into
        its field's mean (categorical 1, sequence 1/count on non-pad slots, so an
        all-pad row pools to zero).
        """
        nonpad = (x != PAD_INDEX).to(self.table.weight.dtype)  # (B, S)
        active = torch.where(self.is_sequence_slot, nonpad, 1.0)  # (B, S)
        counts = nonpad.new_zeros(x.shape[0], self.num_fields)
        counts.index_add_(1, self.slot_field, nonpad)  # (B, F): non-pad slots per field
        per_slot = counts.index_select(1, self.slot_field).clamp_min(1.0)  # (B, S)
        return active, active / torch.where(self.is_sequence_slot, per_slot, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S)`` int64 local indices -> ``(B, F, D)``."""
        self._check_input(x)
        if not self._sequence_slices:
            return self.table(x + self.offsets)  # (B, S=F, D)
        # One embedding_bag for all fields: a categorical slot is a bag of one with
        # weight 1; a sequence field's slots form one bag weighted 1/count on non-pad
        # slots (mean pooling; an all-pad row pools to zero).
        b = x.shape[0]
        _, weights = self._slot_weights(x)  # (B, S)
        row = torch.arange(b, device=x.device).unsqueeze(1)  # (B, 1)
        starts = (row * self.num_slots + self.field_start).reshape(-1)  # (B*F,)
        rows, weights = (x + self.offsets).reshape(-1), weights.reshape(-1)  # (B*S,)
        scatter = self.table.weight.is_cuda and not torch.are_deterministic_algorithms_enabled()
        if scatter and torch.is_grad_enabled() and self.table.weight.requires_grad:
            bags = (row * self.num_fields + self.slot_field).reshape(-1)  # (B*S,): each slot's bag
            pooled = _ScatterBag.apply(self.table.weight, rows, starts, weights, bags)
        else:
            pooled = nn.functional.embedding_bag(rows, self.table.weight, starts, mode="sum", per_sample_weights=weights)
        return pooled.view(b, self.num_fields, self.dim)  # (B*F, D) -> (B, F, D)

    def with_feature_sums(
        self, x: Tensor, norm_columns: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Field embeddings and sums over every active feature, from ONE lookup.

        A feature is one categorical slot or one non-pad slot of a sequence field:
        each value of a multi-valued field counts on its own, with x = 1 (a value in
        two slots of a row counts twice); pad slots of sequence fields are none.
        The mean-pooled fields and the feature sum come out of one batched matmul of
        the looked-up rows with a ``(B, F + 1, S)`` slot-weight matrix.

        Args:
            x: ``(B, S)`` int64 local indices.
            norm_columns: leading columns counted in ``sq_norms`` (default all D).

        Returns:
            ``emb (B, F, D)`` (what :meth:`forward` gives), ``total (B, D) = sum_i v_i``
            and ``sq_norms (B,) = sum_i ||v_i[:norm_columns]||^2`` over the active
            features i of each row.
        """
        self._check_input(x)
        rows = self.table(x + self.offsets)  # (B, S, D)
        active, weights = self._slot_weights(x)  # (B, S), (B, S)
        slot_weights = torch.cat(
            [self.slot_onehot * weights.unsqueeze(1), active.unsqueeze(1)], dim=1
        )  # (B, F + 1, S): field means, then the sum over active features
        # In the table's precision, as forward's embedding_bag: under autocast the FM's
        # difference of two large sums would lose its digits in bfloat16.
        with torch.autocast(x.device.type, enabled=False):
            both = torch.bmm(slot_weights, rows)  # (B, F + 1, D)
            sq_norms = torch.einsum("bs,bsd->b", active, rows[..., :norm_columns].square())  # (B,)
        return both[:, :-1], both[:, -1], sq_norms


class _ScatterBag(torch.autograd.Function):
    """``embedding_bag(rows, weight, starts, mode="sum", per_sample_weights=w)`` whose weight
    gradient is one ``index_add_`` (used on CUDA).

    Why: PyTorch's CUDA backward of ``embedding_bag`` sorts the rows, then one thread per
    column sums each distinct row's partial sums in a serial loop. A sequence field's pad
    row sits in most of its slots (MovieLens tags: about 10 of every row's 16 sequence
    slots), so at batch 8192 that loop runs thousands long: 0.37 ms of a 1.1 ms WDL+APG
    step on an H200, more than the sort itself (``benchmarks/train_throughput.py --device
    cuda``, docs/benchmarks.md). Here each slot's contribution ``w * grad[bag]`` is added
    to its row with atomics, and the slots of weight 0 (pad slots, which contribute
    nothing) go to scratch rows instead of piling onto one. The same sums, in another
    order: equal up to float rounding (and, atomics being unordered, not bit-reproducible
    between runs on CUDA, see :func:`~dynamic_ctr.training.device.seed_everything`);
    ``torch.use_deterministic_algorithms(True)`` keeps PyTorch's own sorted backward.

    ``bags`` gives each slot's bag (``(B*S,)``); ``w`` must not need a gradient.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, rows: Tensor, starts: Tensor, w: Tensor, bags: Tensor) -> Tensor:
        ctx.save_for_backward(rows, w, bags)
        ctx.num_rows = weight.shape[0]
        return nn.functional.embedding_bag(rows, weight, starts, mode="sum", per_sample_weights=w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:  # grad (B*F, D)
        rows, w, bags = ctx.saved_tensors
        contributions = grad.index_select(0, bags) * w.unsqueeze(1).to(grad.dtype)  # (B*S, D)
        scratch = min(rows.numel(), 4096)
        spread = ctx.num_rows + torch.arange(rows.numel(), device=rows.device) % scratch
        target = torch.where(w != 0, rows, spread)  # (B*S,)
        grad_weight = grad.new_zeros(ctx.num_rows + scratch, grad.shape[1])
        grad_weight.index_add_(0, target, contributions)
        return grad_weight[: ctx.num_rows], None, None, None, None


def carry_over_embeddings(
    old: nn.Module, new: nn.Module, row_maps: dict[str, Tensor | list[int]] | None = None, *, strict: bool = True
) -> list[str]:
    """Copy ``old``'s weights into ``new`` in place: a warm start.

    Every :class:`FieldEmbedding` of ``new`` takes, for each field, row ``i`` of the
    field from ``old``'s row ``row_maps[field][i]`` (``-1``: a value ``old`` never saw,
    left as ``new`` initialised it; ``row_maps=None``: the vocabularies are the same and
    rows are copied as they are); every other parameter and buffer is copied as is.

    Args:
        old: the model to start from.
        new: the model to fill, built on the same fields (vocabularies may differ).
        row_maps: per field, the old index of each new index.
        strict: ``new`` must be ``old``'s config on a refitted vocabulary: any tensor it
            cannot take from ``old`` is an error. ``False`` (another model of the same
            fields, e.g. WDL + APG started from a WDL champion): tensors without a
            counterpart of the same name and shape (and embedding tables of another
            width) keep their initial values.

    Returns:
        The keys of ``new.state_dict()`` that were copied.

    Raises:
        ValueError: (strict) the two models differ in anything but their fields'
            vocabularies (names the parameter); a field has no row map or a row map
            of the wrong length.
    """
    old_modules = dict(old.named_modules())
    old_state = old.state_dict()
    copied: list[str] = []
    handled: set[str] = set()
    with torch.no_grad():
        for path, module in new.named_modules():
            if not isinstance(module, FieldEmbedding):
                continue
            key = f"{path}.table.weight" if path else "table.weight"
            handled.add(key)
            before = old_modules.get(path)
            if not isinstance(before, FieldEmbedding) or before.field_names != module.field_names or before.table.embedding_dim != module.table.embedding_dim:
                if strict:
                    raise ValueError(f"{path or '<root>'}: the old model has no field embedding of width {module.table.embedding_dim} with fields {module.field_names}")
                continue
            if row_maps is None:
                if before.table.weight.shape != module.table.weight.shape:
                    raise ValueError(f"{key}: vocabularies differ ({tuple(before.table.weight.shape)} vs {tuple(module.table.weight.shape)}); give row_maps")
                module.table.weight.copy_(before.table.weight)
            else:
                _remap_rows(before, module, row_maps)
            copied.append(key)
        for key, value in new.state_dict().items():
            if key in handled:
                continue
            if key not in old_state or old_state[key].shape != value.shape:
                if strict:
                    got = tuple(old_state[key].shape) if key in old_state else "missing"
                    raise ValueError(f"{key}: {tuple(value.shape)} in the new model, {got} in the old one; only vocabularies may differ")
                continue
            value.copy_(old_state[key])
            copied.append(key)
    return copied


def _remap_rows(old: FieldEmbedding, new: FieldEmbedding, row_maps: dict[str, Tensor | list[int]]) -> None:
    new_start, old_start = _field_starts(new), _field_starts(old)
    for name in new.field_names:
        if name not in row_maps:
            raise ValueError(f"no row map for field {name!r}")
        rows = torch.as_tensor(row_maps[name], dtype=torch.long)
        size = new_start[name][1] - new_start[name][0]
        if rows.shape != (size,):
            raise ValueError(f"field {name!r}: the row map has {tuple(rows.shape)} entries, the new vocabulary {size}")
        known = rows >= 0
        target = torch.arange(new_start[name][0], new_start[name][1])[known]
        new.table.weight[target] = old.table.weight[rows[known] + old_start[name][0]]


def _field_starts(module: FieldEmbedding) -> dict[str, tuple[int, int]]:
    """``{field: (first row, end row)}`` of ``module``'s shared table."""
    starts = module.offsets.tolist()
    firsts = [int(starts[i]) for i in module.field_start.tolist()]
    ends = [*firsts[1:], module.table.num_embeddings]
    return dict(zip(module.field_names, zip(firsts, ends)))
