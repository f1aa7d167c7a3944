"""APG conditions z (KDD §3.1) and the functions that combine several of them.

* self-wise: z is the APG layer's own input ``h (B, d_in)``; there is no module here
  (``build_condition`` returns ``None``) and the tower passes ``h`` as ``z``.
* group-wise: z is one field's embedding, ``(B, F, D) -> (B, D)``
  (:class:`GroupCondition`, e.g. the user: "thousand users, thousand models").
* mix-wise, input aggregation: G field embeddings are combined into one z, then one
  generator runs (:class:`MixInputCondition`, ``(B, F, D) -> (B, C)``).
* mix-wise, output aggregation: the G embeddings stay separate
  (:class:`MixOutputCondition`, ``(B, F, D) -> (B, G, D)``); each feeds its own
  generator and the G generated parameter vectors are combined
  (``models.apg.MixOutputGenerator``).

Combiners reduce G tokens ``(B, G, T)``: :class:`ConcatTokens` ``-> (B, G*T)``,
:class:`MeanTokens` ``-> (B, T)``, :class:`AttentionTokens` ``-> (B, T)`` and, for
concatenated *parameters*, :class:`MixTokens` ``-> (B, T)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dynamic_ctr.models.config import ConditionConfig

__all__ = [
    "AttentionTokens",
    "ConcatTokens",
    "GroupCondition",
    "MeanTokens",
    "MixInputCondition",
    "MixOutputCondition",
    "MixTokens",
    "build_condition",
    "make_combiner",
]


class ConcatTokens(nn.Module):
    """``(B, G, T) -> (B, G*T)``: z = concat_j(z^j)."""

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens.flatten(1)


class MeanTokens(nn.Module):
    """``(B, G, T) -> (B, T)``: z = 1/G sum_j z^j."""

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens.mean(dim=1)


class AttentionTokens(nn.Module):
    """``(B, G, T) -> (B, T)``: z = sum_j alpha_j z^j, alpha from self-attention.

    Scaled dot-product self-attention over the G tokens,
    ``A = softmax(q k^T / sqrt(A_d))`` with ``q = z W_q``, ``k = z W_k``; token j's
    score is the attention it receives, averaged over the queries:
    ``alpha_j = mean_i A_ij`` (so ``sum_j alpha_j = 1``).

    Args:
        dim: T, the token width.
        attention_dim: A_d, the query/key width.
    """

    def __init__(self, dim: int, attention_dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, attention_dim, bias=False)
        self.key = nn.Linear(dim, attention_dim, bias=False)
        self.scale = 1.0 / math.sqrt(attention_dim)

    def attention(self, tokens: Tensor) -> Tensor:
        """``(B, G, T) -> alpha (B, G)``."""
        q, k = self.query(tokens), self.key(tokens)  # (B, G, A_d)
        scores = torch.softmax(q @ k.transpose(1, 2) * self.scale, dim=-1)  # (B, G, G)
        return scores.mean(dim=1)  # (B, G)

    def forward(self, tokens: Tensor) -> Tensor:
        alpha = self.attention(tokens)  # (B, G)
        return torch.einsum("bg,bgt->bt", alpha, tokens)  # (B, T)


class MixTokens(nn.Module):
    """``(B, G, T) -> (B, T)``: concatenated parameter vectors mapped back to one.

    A learned map over the concatenated axis, element by element:
    ``p_t = sum_j c_jt p^j_t`` with ``c (G, T)`` initialised to 1/G.

    Args:
        num: G, the number of tokens.
        dim: T, the token width.
    """

    # NOTE[DIFF]: the paper's output aggregation by "concatenation" does not say how G
    # concatenated parameter sets become one layer's parameters; a full (G*T) x T map
    # would be far too large for v1 (T = d_in * d_out), hence the element-wise map.
    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 1.0 / self.weight.shape[0])

    def forward(self, tokens: Tensor) -> Tensor:
        return (tokens * self.weight).sum(dim=1)  # (B, T)


def make_combiner(cond: ConditionConfig, num: int, dim: int) -> tuple[nn.Module, int]:
    """The combiner of ``cond.combine`` for G=``num`` tokens of width T=``dim``.

    Returns the module and its output width. Output aggregation combines parameter
    vectors, so ``concat`` there is :class:`MixTokens` (width T, not G*T).
    """
    if cond.combine == "mean":
        return MeanTokens(), dim
    if cond.combine == "attention":
        return AttentionTokens(dim, cond.attention_dim), dim
    if cond.combine == "concat":
        if cond.output_aggregation:
            return MixTokens(num, dim), dim
        return ConcatTokens(), num * dim
    raise ValueError(
        f"apg.condition.combine={cond.combine!r} must be one of concat, mean, attention"
    )


class GroupCondition(nn.Module):
    """Group-wise condition: one field's embedding, ``(B, F, D) -> (B, D)``.

    Args:
        field_index: position of the condition field along F.
    """

    def __init__(self, field_index: int) -> None:
        super().__init__()
        self.field_index = field_index

    def forward(self, emb: Tensor) -> Tensor:
        return emb[:, self.field_index]  # (B, D)


class MixOutputCondition(nn.Module):
    """Mix-wise condition for output aggregation: ``(B, F, D) -> (B, G, D)``.

    The G embeddings are kept apart; the generator side combines parameters.

    Args:
        field_indices: positions of the G condition fields along F.
    """

    index: Tensor

    def __init__(self, field_indices: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer(
            "index", torch.tensor(field_indices, dtype=torch.long), persistent=False
        )

    def forward(self, emb: Tensor) -> Tensor:
        return emb.index_select(1, self.index)  # (B, G, D)


class MixInputCondition(nn.Module):
    """Mix-wise condition, input aggregation: ``(B, F, D) -> (B, C)``.

    Selects the G condition embeddings and combines them into one z (C = G*D for
    concat, D for mean and attention), which then feeds a single generator.

    Args:
        cond: the condition config (``combine``, ``attention_dim``).
        field_indices: positions of the G condition fields along F.
        dim: D, the embedding width.
    """

    def __init__(self, cond: ConditionConfig, field_indices: tuple[int, ...], dim: int) -> None:
        super().__init__()
        self.select = MixOutputCondition(field_indices)
        self.combine, self.out_dim = make_combiner(cond, len(field_indices), dim)

    def forward(self, emb: Tensor) -> Tensor:
        return self.combine(self.select(emb))  # (B, C)


def build_condition(
    cond: ConditionConfig, field_names: tuple[str, ...], dim: int
) -> tuple[nn.Module | None, int]:
    """The condition module of ``cond`` and the width of one z it emits.

    Args:
        cond: a resolved condition config (fields filled in).
        field_names: the F axis of the embeddings, in order.
        dim: D, the embedding width.

    Returns:
        ``(None, 0)`` for self-wise (z is each layer's input); otherwise the module
        and C, the width of z (per condition for output aggregation).
    """
    if cond.mode == "self":
        return None, 0
    missing = [n for n in cond.fields if n not in field_names]
    if missing or not cond.fields:
        raise ValueError(
            f"apg.condition.fields={list(cond.fields)} must name fields of {list(field_names)}"
        )
    indices = tuple(field_names.index(n) for n in cond.fields)
    if cond.mode == "group":
        return GroupCondition(indices[0]), dim
    if cond.output_aggregation:
        return MixOutputCondition(indices), dim
    module = MixInputCondition(cond, indices, dim)
    return module, module.out_dim
