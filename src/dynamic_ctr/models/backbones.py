"""CTR backbones. Each takes its dense tower as an injected module.

Every backbone is ``Backbone(cfg, spec, dense)`` with ``forward(x (B, S)) -> (B,)``
logits. ``dense`` is a static ``layers.MLPTower`` or an ``apg.APGTower`` (anything
with ``out_dim`` and ``forward(h (B, E), emb (B, F, D)) -> (B, H)``), so APG x any
backbone needs no backbone code. E = F * D is the flattened embedding width::

    x (B, S) -> FieldEmbedding -> emb (B, F, D) -> flat (B, E)
      DNN:    dense(flat) -> Linear(H, 1)
      WDL:    first-order(x) + dense(flat) -> Linear(H, 1)   (one table: emb | weight)
      DeepFM: first-order(x) + FM(x) + dense(flat) -> Linear(H, 1)
              (fm_input "features": FM and first-order term over every active
              feature; "fields": over the mean-pooled fields)
      DCN:    [CrossNetV1(flat) (B, E) | dense(flat) (B, H)] -> Linear(E + H, 1)
      DCNv2:  [CrossNetV2(flat) (B, E) | dense(flat) (B, H)] -> Linear(E + H, 1)

``dense`` is ``None`` for ``dnn: false`` (DynInt Table 2, the interaction layer
alone): WDL is then logistic regression over the fields, DeepFM an FM with its
first-order term, DCN / DCNv2 ``CrossNet(flat) -> Linear(E, 1)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from dynamic_ctr.models.config import ModelConfig
from dynamic_ctr.models.embedding import FieldEmbedding
from dynamic_ctr.models.layers import CrossNetV1, CrossNetV2, FactorizationMachine
from dynamic_ctr.spec import FeatureSpec

__all__ = ["BACKBONES", "DCN", "DNN", "WDL", "DCNv2", "DeepFM", "EmbeddingWithFirstOrder"]


class EmbeddingWithFirstOrder(FieldEmbedding):
    """Field embeddings plus a first-order (wide) weight per field value, in ONE table.

    The table has ``D + 1`` columns; the last holds each value's first-order weight, so
    the deep and the wide parts share one lookup (and one backward) per batch.
    ``forward(x)`` gives the ``(B, F, D)`` embeddings like any :class:`FieldEmbedding`;
    :meth:`with_first_order` also gives the ``(B,)`` linear term, in which sequence
    fields contribute the mean weight of their values, as their embeddings are
    mean-pooled; :meth:`with_features` gives Rendle's feature-level linear term (the
    sum of the weights of ALL active features) and the FM's feature sums instead.

    Args:
        spec: the feature spec.
        dim: D, the embedding width of the deep part.
    """

    # NOTE[DIFF]: WDL's wide part is this linear term over the raw fields (as in
    # DeepCTR/FuxiCTR), not hand-crafted cross-product features.

    def __init__(self, spec: FeatureSpec, dim: int) -> None:
        super().__init__(spec, dim + 1)
        self.bias = nn.Parameter(torch.zeros(()))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "bias"):  # FieldEmbedding.__init__ calls this before the bias exists
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S) -> (B, F, D)``."""
        return super().forward(x)[..., :-1]

    def with_first_order(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x (B, S) -> (emb (B, F, D), linear (B,))`` from one lookup."""
        both = super().forward(x)  # (B, F, D + 1)
        return both[..., :-1], both[..., -1].sum(dim=1) + self.bias

    def with_features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Feature-level terms from one lookup (``FieldEmbedding.with_feature_sums``).

        Args:
            x: ``(B, S)`` int64 local indices.

        Returns:
            ``emb (B, F, D)`` (mean-pooled fields, for the dense part), ``linear (B,)``
            ``= b + sum_i w_i`` over every active feature i, and the FM's sums
            ``total (B, D) = sum_i v_i`` and ``sq_norms (B,) = sum_i ||v_i||^2``.
        """
        both, total, sq_norms = self.with_feature_sums(x, norm_columns=self.dim - 1)
        return both[..., :-1], total[:, -1] + self.bias, total[:, :-1], sq_norms


class _Backbone(nn.Module):
    """What every backbone shares: the dense tower's own loss term, when it has one."""

    dense: nn.Module | None

    def penalty(self) -> Tensor | None:
        """The tower's model-supplied loss term (AdaSparse's sparsity regulariser of the
        last training forward), or None; the training loop adds it after each forward."""
        penalty = getattr(self.dense, "penalty", None)
        return penalty() if callable(penalty) else None


class DNN(_Backbone):
    """Embedding + dense tower + linear head.

    Args:
        cfg: model config (``embedding_dim``).
        spec: the feature spec.
        dense: the dense tower.
    """

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, dense: nn.Module) -> None:
        super().__init__()
        self.embedding = FieldEmbedding(spec, cfg.embedding_dim)
        self.dense = dense
        self.head = nn.Linear(dense.out_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S) -> (B,)`` logits."""
        emb = self.embedding(x)  # (B, F, D)
        h = self.dense(emb.flatten(1), emb)  # (B, H)
        return self.head(h).squeeze(1)  # (B,)


class WDL(_Backbone):
    """Wide & Deep (Cheng et al., 2016, https://arxiv.org/abs/1606.07792).

    Args:
        cfg: model config (``embedding_dim``).
        spec: the feature spec.
        dense: the deep part's tower.
    """

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, dense: nn.Module | None) -> None:
        super().__init__()
        self.embedding = EmbeddingWithFirstOrder(spec, cfg.embedding_dim)
        self.dense = dense
        self.head = nn.Linear(dense.out_dim, 1) if dense is not None else None

    def deep(self, emb: Tensor) -> Tensor:
        """``emb (B, F, D) -> (B,)``: the deep part's logit (0 without a DNN)."""
        if self.dense is None:
            return emb.new_zeros(emb.shape[0])
        return self.head(self.dense(emb.flatten(1), emb)).squeeze(1)  # (B,)

    def wide_and_deep(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x (B, S) -> (emb (B, F, D), wide + deep logits (B,))``."""
        emb, wide = self.embedding.with_first_order(x)  # (B, F, D), (B,)
        return emb, wide + self.deep(emb)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S) -> (B,)`` logits."""
        return self.wide_and_deep(x)[1]


class DeepFM(WDL):
    """DeepFM (Guo et al., 2017, https://arxiv.org/abs/1703.04247): a first-order term,
    an FM and a DNN part sharing one embedding table (WDL's, with its first-order column).

    ``fm_input="features"`` (default): the FM is Rendle's, over every active feature,
    ``sum_{i<j} <v_i, v_j>`` with each value of a multi-valued field a feature of its
    own (pairs within a field included, pad slots excluded), and the first-order term
    is ``b + sum_i w_i`` over the same features. ``fm_input="fields"``: both run over
    the mean-pooled fields (WDL's first-order term plus an FM over the DNN part's
    ``(B, F, D)`` input). The DNN part reads the mean-pooled fields either way.

    Args:
        cfg: model config (``embedding_dim``, ``fm_input``).
        spec: the feature spec.
        dense: the DNN part's tower.
    """

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, dense: nn.Module | None) -> None:
        super().__init__(cfg, spec, dense)
        self.fm = FactorizationMachine()
        self.fm_input = cfg.fm_input

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S) -> (B,)`` logits."""
        if self.fm_input == "fields":
            emb, logits = self.wide_and_deep(x)  # (B, F, D), (B,)
            return logits + self.fm(emb)
        emb, linear, total, sq_norms = self.embedding.with_features(x)  # (B,F,D) (B,) (B,D) (B,)
        return linear + self.fm.from_sums(total, sq_norms) + self.deep(emb)


class DCN(_Backbone):
    """Deep & Cross Network (Wang et al., 2017), cross and deep parts in parallel.

    Args:
        cfg: model config (``embedding_dim``, ``cross_layers``).
        spec: the feature spec.
        dense: the deep part's tower.
    """

    cross_class: Callable[[int, int], nn.Module] = CrossNetV1

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, dense: nn.Module | None) -> None:
        super().__init__()
        self.embedding = FieldEmbedding(spec, cfg.embedding_dim)
        width = self.embedding.num_fields * cfg.embedding_dim
        self.cross = type(self).cross_class(width, cfg.cross_layers)
        self.dense = dense
        self.head = nn.Linear(width + (dense.out_dim if dense is not None else 0), 1)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S) -> (B,)`` logits."""
        emb = self.embedding(x)  # (B, F, D)
        flat = emb.flatten(1)  # (B, E)
        if self.dense is None:
            return self.head(self.cross(flat)).squeeze(1)  # (B,)
        both = torch.cat([self.cross(flat), self.dense(flat, emb)], dim=1)  # (B, E + H)
        return self.head(both).squeeze(1)  # (B,)


class DCNv2(DCN):
    """DCN-V2 (Wang et al., 2021), full-rank cross layers, parallel structure."""

    cross_class = CrossNetV2


BACKBONES: dict[str, Callable[[ModelConfig, FeatureSpec, nn.Module], nn.Module]] = {
    "dnn": DNN,
    "wdl": WDL,
    "deepfm": DeepFM,
    "dcn": DCN,
    "dcnv2": DCNv2,
}
