"""CTR backbones. Each takes its dense tower as an injected module.

Every backbone is ``Backbone(cfg, spec, dense)`` with ``forward(x (B, S)) -> (B,)``
logits. ``dense`` is a static ``layers.MLPTower``, an ``apg.APGTower`` or an
``adasparse.AdaSparseTower`` (anything with ``out_dim`` and
``forward(h (B, E_in), emb (B, F, D)) -> (B, H)``), so APG x any backbone needs no
backbone code. E = F * D is the flattened embedding width, P = F (F - 1) / 2 the
number of field pairs (layers in ``models/interaction.py``)::

    x (B, S) -> FieldEmbedding -> emb (B, F, D) -> flat (B, E)
      DNN:    dense(flat) -> Linear(H, 1)
      WDL:    first-order(x) + dense(flat) -> Linear(H, 1)   (one table: emb | weight)
      DeepFM: first-order(x) + FM(x) + dense(flat) -> Linear(H, 1)
              (fm_input "features": FM and first-order term over every active
              feature; "fields": over the mean-pooled fields)
      DCN:    [CrossNetV1(flat) (B, E) | dense(flat) (B, H)] -> Linear(E + H, 1)
      DCNv2:  [CrossNetV2(flat) (B, E) | dense(flat) (B, H)] -> Linear(E + H, 1)
      PNN:    z = [flat | inner (B, P) | kernel outer (B, P)] -> dense(z) -> Linear(H, 1)
      DeepCrossing: flat -> residual units (B, E) -> Linear(E, 1)     (no dense tower)
      xDeepFM: first-order(x) + Linear(CIN(emb)) + Linear(dense(flat))
      AutoInt+: [interacting layers(emb) flattened (B, F A) | dense(flat)] -> Linear(F A + H, 1)
      FiBiNET: first-order(x) + Linear(dense(c)), c = [Bilinear(emb) | Bilinear(SENET(emb))]
               (B, 2 P D), the combination layer
      FinalMLP: x_1, x_2 = feature selection(emb) -> dense(x_1), dense2(x_2)
               -> bilinear fusion (two towers, both built by ``build_dense``)

``dense`` is ``None`` for ``dnn: false`` (DynInt Table 2, the interaction layer
alone): WDL is then logistic regression over the fields, DeepFM an FM with its
first-order term, DCN / DCNv2 ``CrossNet(flat) -> Linear(E, 1)``, PNN
``Linear(z)``, xDeepFM first order + CIN, AutoInt ``Linear`` over the interacting
layers, FiBiNET first order + ``Linear(c)`` (the paper's shallow FiBiNET).
DeepCrossing and FinalMLP refuse ``dnn: false``; DeepCrossing takes no tower (its
residual units are not a plain MLP) and FinalMLP two, as a tuple.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from dynamic_ctr.models.config import (
    AutoIntConfig,
    DeepCrossingConfig,
    FiBiNETConfig,
    FinalMLPConfig,
    ModelConfig,
    PNNConfig,
    XDeepFMConfig,
)
from dynamic_ctr.models.embedding import FieldEmbedding
from dynamic_ctr.models.interaction import (
    CIN,
    SENET,
    BilinearFusion,
    BilinearInteraction,
    FeatureSelection,
    InnerProduct,
    KernelProduct,
    MultiHeadSelfAttention,
    ResidualUnit,
)
from dynamic_ctr.models.layers import CrossNetV1, CrossNetV2, FactorizationMachine
from dynamic_ctr.spec import FeatureSpec

__all__ = [
    "BACKBONES",
    "DCN",
    "DNN",
    "PNN",
    "WDL",
    "AutoInt",
    "DCNv2",
    "DeepCrossing",
    "DeepFM",
    "EmbeddingWithFirstOrder",
    "FiBiNET",
    "FinalMLP",
    "XDeepFM",
]


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
        return _tower_penalty(self.dense)


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


class PNN(_Backbone):
    """Product-based Neural Network (Qu et al., ICDM 2016, https://arxiv.org/abs/1611.00144).

    The product layer is the linear signal (the flattened embeddings, ``l_z`` of §3.1)
    beside the product signal ``l_p``: IPNN's inner products, OPNN's kernel outer
    products (``pnn.kernel``; Qu et al. 2018) or both (PNN*), one value per field pair.
    It feeds the dense tower (whose first layer is the paper's ``l_1 = ReLU(l_z + l_p +
    b_1)``, eq. 3); ``dnn: false`` puts a linear head on it instead.

    Args:
        cfg: model config (``embedding_dim``, ``pnn``).
        spec: the feature spec.
        dense: the tower on the product layer, or None.
    """

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, dense: nn.Module | None) -> None:
        super().__init__()
        p = cfg.pnn or PNNConfig()
        self.embedding = FieldEmbedding(spec, cfg.embedding_dim)
        num_fields = self.embedding.num_fields
        self.inner = InnerProduct(num_fields) if p.product in ("inner", "both") else None
        self.outer = KernelProduct(num_fields, cfg.embedding_dim, p.kernel) if p.product in ("outer", "both") else None
        width = num_fields * cfg.embedding_dim + num_fields * (num_fields - 1) // 2 * p.products
        self.dense = dense
        self.head = nn.Linear(dense.out_dim if dense is not None else width, 1)

    def product_layer(self, emb: Tensor) -> Tensor:
        """``emb (B, F, D) -> (B, E + P)`` or ``(B, E + 2P)``: ``[flat | inner | outer]``."""
        parts = [emb.flatten(1)]  # (B, E): the linear signal
        if self.inner is not None:
            parts.append(self.inner(emb))  # (B, P)
        if self.outer is not None:
            parts.append(self.outer(emb))  # (B, P)
        return torch.cat(parts, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S) -> (B,)`` logits."""
        emb = self.embedding(x)  # (B, F, D)
        z = self.product_layer(emb)  # (B, E + P')
        h = self.dense(z, emb) if self.dense is not None else z  # (B, H) or (B, E + P')
        return self.head(h).squeeze(1)  # (B,)


class DeepCrossing(_Backbone):
    """Deep Crossing (Shan et al., KDD 2016): embeddings stacked into one vector, residual
    units (``deepcrossing.residual_units``, one inner width each), a scoring layer.

    Its only deep part is the residual units, not a plain MLP, so it takes no dense tower
    (APG / AdaSparse are refused by the config) and has no ``dnn: false`` form.

    Args:
        cfg: model config (``embedding_dim``, ``deepcrossing``, ``batch_norm``, ``dropout``).
        spec: the feature spec.
        dense: must be None.
    """

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, dense: nn.Module | None = None) -> None:
        super().__init__()
        if dense is not None:
            raise ValueError("deepcrossing takes no dense tower (its residual units are its own)")
        units = (cfg.deepcrossing or DeepCrossingConfig()).residual_units
        self.embedding = FieldEmbedding(spec, cfg.embedding_dim)
        width = self.embedding.num_fields * cfg.embedding_dim
        self.units = nn.ModuleList(ResidualUnit(width, h, cfg.batch_norm, cfg.dropout) for h in units)
        self.dense = None
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S) -> (B,)`` logits."""
        h = self.embedding(x).flatten(1)  # (B, E): the stacking layer
        for unit in self.units:
            h = unit(h)  # (B, E)
        return self.head(h).squeeze(1)  # (B,)


class XDeepFM(_Backbone):
    """xDeepFM (Lian et al., KDD 2018, https://arxiv.org/abs/1803.05170), eq. 9: a
    first-order term, the CIN (``xdeepfm``) and the DNN part, their logits summed.

    ``dnn: false`` leaves the first-order term and the CIN.

    Args:
        cfg: model config (``embedding_dim``, ``xdeepfm``).
        spec: the feature spec.
        dense: the DNN part's tower, or None.
    """

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, dense: nn.Module | None) -> None:
        super().__init__()
        c = cfg.xdeepfm or XDeepFMConfig()
        self.embedding = EmbeddingWithFirstOrder(spec, cfg.embedding_dim)  # its bias is eq. 9's b
        self.cin = CIN(self.embedding.num_fields, c.cin_layer_sizes, c.cin_split_half)
        self.cin_head = nn.Linear(self.cin.out_dim, 1, bias=False)
        self.dense = dense
        self.head = nn.Linear(dense.out_dim, 1, bias=False) if dense is not None else None

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S) -> (B,)`` logits."""
        emb, logits = self.embedding.with_first_order(x)  # (B, F, D), (B,)
        logits = logits + self.cin_head(self.cin(emb)).squeeze(1)
        if self.dense is not None:
            logits = logits + self.head(self.dense(emb.flatten(1), emb)).squeeze(1)
        return logits  # (B,)


class AutoInt(_Backbone):
    """AutoInt (Song et al., CIKM 2019, https://arxiv.org/abs/1810.11921): stacked
    interacting layers (multi-head self-attention over the fields with residual
    connections, ``autoint``) and a linear output layer over their flattened output
    (eq. 9). With the dense tower it is AutoInt+ (§5.5): the tower runs in parallel on
    the flattened embeddings and the output layer reads both. ``dnn: false`` is AutoInt.

    Args:
        cfg: model config (``embedding_dim``, ``autoint``).
        spec: the feature spec.
        dense: AutoInt+'s tower, or None.
    """

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, dense: nn.Module | None) -> None:
        super().__init__()
        a = cfg.autoint or AutoIntConfig()
        dim = a.attention_dim or cfg.embedding_dim
        self.embedding = FieldEmbedding(spec, cfg.embedding_dim)
        self.attention = nn.ModuleList(
            MultiHeadSelfAttention(cfg.embedding_dim if i == 0 else dim, dim, a.attention_heads, a.attention_residual)
            for i in range(a.attention_layers)
        )
        self.dense = dense
        width = self.embedding.num_fields * dim + (dense.out_dim if dense is not None else 0)
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S) -> (B,)`` logits."""
        emb = self.embedding(x)  # (B, F, D)
        h = emb
        for layer in self.attention:
            h = layer(h)  # (B, F, A)
        out = h.flatten(1)  # (B, F A)
        if self.dense is not None:
            out = torch.cat([out, self.dense(emb.flatten(1), emb)], dim=1)  # (B, F A + H)
        return self.head(out).squeeze(1)  # (B,)


class FiBiNET(_Backbone):
    """FiBiNET (Huang et al., RecSys 2019, https://arxiv.org/abs/1905.09433).

    SENET re-weights the fields; the bilinear interaction (``fibinet.bilinear_type``)
    runs on the original embeddings (p) and on the re-weighted ones (q); the combination
    layer ``c = [p | q] (B, 2 P D)`` feeds the dense tower, whose logit is added to the
    first-order term (§3.6). ``dnn: false`` is the shallow FiBiNET: first order plus a
    linear head on c.

    NOTE[DIFF]: p and q have a bilinear layer each (the paper's Figure 1 draws two;
    DeepCTR shares one W between them). The shallow model's paper form sums c's
    elements; the linear head learns one weight per element (the sum is its all-ones case).

    Args:
        cfg: model config (``embedding_dim``, ``fibinet``).
        spec: the feature spec.
        dense: the tower on c, or None.
    """

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, dense: nn.Module | None) -> None:
        super().__init__()
        f = cfg.fibinet or FiBiNETConfig()
        self.embedding = EmbeddingWithFirstOrder(spec, cfg.embedding_dim)
        num_fields = self.embedding.num_fields
        self.senet = SENET(num_fields, f.senet_reduction)
        self.bilinear = BilinearInteraction(num_fields, cfg.embedding_dim, f.bilinear_type)  # -> p
        self.senet_bilinear = BilinearInteraction(num_fields, cfg.embedding_dim, f.bilinear_type)  # -> q
        width = 2 * self.bilinear.num_pairs * cfg.embedding_dim
        self.dense = dense
        self.head = nn.Linear(dense.out_dim if dense is not None else width, 1, bias=False)

    def combination(self, emb: Tensor) -> Tensor:
        """``emb (B, F, D) -> c (B, 2 P D)``: ``[p | q]``, flattened."""
        p = self.bilinear(emb)  # (B, P, D)
        q = self.senet_bilinear(self.senet(emb))  # (B, P, D)
        return torch.cat([p, q], dim=1).flatten(1)  # (B, 2 P D)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S) -> (B,)`` logits."""
        emb, linear = self.embedding.with_first_order(x)  # (B, F, D), (B,)
        c = self.combination(emb)  # (B, 2 P D)
        h = self.dense(c, emb) if self.dense is not None else c
        return linear + self.head(h).squeeze(1)  # (B,)


class FinalMLP(_Backbone):
    """FinalMLP (Mao et al., AAAI 2023, https://arxiv.org/abs/2304.00902): two MLP streams
    on stream-specific feature selections of the flattened embeddings, fused by a
    multi-head bilinear layer into the logit (``finalmlp``).

    Both streams are dense towers built by ``build_dense`` (``dense`` is the tuple of
    the two): APG or AdaSparse replace the hidden layers of both with no code here.

    Args:
        cfg: model config (``embedding_dim``, ``finalmlp``).
        spec: the feature spec.
        dense: ``(stream 1, stream 2)``.
    """

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, dense: tuple[nn.Module, nn.Module]) -> None:
        super().__init__()
        if not isinstance(dense, tuple | list) or len(dense) != 2:
            raise ValueError(f"finalmlp needs two dense towers (its streams), got {type(dense).__name__}")
        f = cfg.finalmlp or FinalMLPConfig()
        self.embedding = FieldEmbedding(spec, cfg.embedding_dim)
        contexts = tuple([self.embedding.field_index(n) for n in names] for names in (f.fs1_context, f.fs2_context))
        self.selection = FeatureSelection(cfg.embedding_dim, self.embedding.num_fields, contexts, f.fs_hidden_units)
        self.dense, self.dense2 = dense
        self.fusion = BilinearFusion(self.dense.out_dim, self.dense2.out_dim, f.heads)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S) -> (B,)`` logits."""
        emb = self.embedding(x)  # (B, F, D)
        x1, x2 = self.selection(emb)  # (B, E) each
        return self.fusion(self.dense(x1, emb), self.dense2(x2, emb))  # (B, H_1), (B, H_2) -> (B,)

    def penalty(self) -> Tensor | None:
        """The sum of both streams' loss terms (AdaSparse), or None."""
        terms = [t for t in (super().penalty(), _tower_penalty(self.dense2)) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None


def _tower_penalty(tower: nn.Module | None) -> Tensor | None:
    penalty = getattr(tower, "penalty", None)
    return penalty() if callable(penalty) else None


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "dnn": DNN,
    "wdl": WDL,
    "deepfm": DeepFM,
    "dcn": DCN,
    "dcnv2": DCNv2,
    "pnn": PNN,
    "deepcrossing": DeepCrossing,
    "xdeepfm": XDeepFM,
    "autoint": AutoInt,
    "fibinet": FiBiNET,
    "finalmlp": FinalMLP,
}
