"""CTR backbones. Each takes its dense tower as an injected module.

Every backbone is ``Backbone(cfg, spec, dense)`` with ``forward(x (B, S)) -> (B,)``
logits. ``dense`` is a static ``layers.MLPTower`` or an ``apg.APGTower`` (anything
with ``out_dim`` and ``forward(h (B, E), emb (B, F, D)) -> (B, H)``), so APG x any
backbone needs no backbone code. E = F * D is the flattened embedding width::

    x (B, S) -> FieldEmbedding -> emb (B, F, D) -> flat (B, E)
      DNN:    dense(flat) -> Linear(H, 1)
      WDL:    FirstOrder(x) + dense(flat) -> Linear(H, 1)
      DeepFM: FirstOrder(x) + FM(emb) + dense(flat) -> Linear(H, 1)
      DCN:    [CrossNetV1(flat) (B, E) | dense(flat) (B, H)] -> Linear(E + H, 1)
      DCNv2:  [CrossNetV2(flat) (B, E) | dense(flat) (B, H)] -> Linear(E + H, 1)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from dynamic_ctr.models.config import ModelConfig
from dynamic_ctr.models.embedding import FieldEmbedding
from dynamic_ctr.models.layers import CrossNetV1, CrossNetV2, FactorizationMachine
from dynamic_ctr.spec import FeatureSpec

__all__ = ["BACKBONES", "DCN", "DNN", "WDL", "DCNv2", "DeepFM", "FirstOrder"]


class FirstOrder(nn.Module):
    """Linear (wide) term: one learned weight per field value plus a bias.

    ``x (B, S) -> (B,)``; sequence fields contribute the mean weight of their values.

    Args:
        spec: the feature spec.
    """

    # NOTE[DIFF]: WDL's wide part is this linear term over the raw fields (as in
    # DeepCTR/FuxiCTR), not hand-crafted cross-product features.

    def __init__(self, spec: FeatureSpec) -> None:
        super().__init__()
        self.weights = FieldEmbedding(spec, 1)
        self.bias = nn.Parameter(torch.zeros(()))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.weights(x).sum(dim=(1, 2)) + self.bias  # (B,)


class DNN(nn.Module):
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


class WDL(nn.Module):
    """Wide & Deep (Cheng et al., 2016, https://arxiv.org/abs/1606.07792).

    Args:
        cfg: model config (``embedding_dim``).
        spec: the feature spec.
        dense: the deep part's tower.
    """

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, dense: nn.Module) -> None:
        super().__init__()
        self.embedding = FieldEmbedding(spec, cfg.embedding_dim)
        self.wide = FirstOrder(spec)
        self.dense = dense
        self.head = nn.Linear(dense.out_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S) -> (B,)`` logits."""
        emb = self.embedding(x)  # (B, F, D)
        deep = self.head(self.dense(emb.flatten(1), emb)).squeeze(1)  # (B,)
        return self.wide(x) + deep


class DeepFM(nn.Module):
    """DeepFM (Guo et al., 2017, https://arxiv.org/abs/1703.04247).

    The FM and the DNN share the field embeddings.

    Args:
        cfg: model config (``embedding_dim``).
        spec: the feature spec.
        dense: the DNN part's tower.
    """

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, dense: nn.Module) -> None:
        super().__init__()
        self.embedding = FieldEmbedding(spec, cfg.embedding_dim)
        self.first_order = FirstOrder(spec)
        self.fm = FactorizationMachine()
        self.dense = dense
        self.head = nn.Linear(dense.out_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S) -> (B,)`` logits."""
        emb = self.embedding(x)  # (B, F, D)
        deep = self.head(self.dense(emb.flatten(1), emb)).squeeze(1)  # (B,)
        return self.first_order(x) + self.fm(emb) + deep


class DCN(nn.Module):
    """Deep & Cross Network (Wang et al., 2017), cross and deep parts in parallel.

    Args:
        cfg: model config (``embedding_dim``, ``cross_layers``).
        spec: the feature spec.
        dense: the deep part's tower.
    """

    cross_class: Callable[[int, int], nn.Module] = CrossNetV1

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, dense: nn.Module) -> None:
        super().__init__()
        self.embedding = FieldEmbedding(spec, cfg.embedding_dim)
        width = self.embedding.num_fields * cfg.embedding_dim
        self.cross = type(self).cross_class(width, cfg.cross_layers)
        self.dense = dense
        self.head = nn.Linear(width + dense.out_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S) -> (B,)`` logits."""
        emb = self.embedding(x)  # (B, F, D)
        flat = emb.flatten(1)  # (B, E)
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
