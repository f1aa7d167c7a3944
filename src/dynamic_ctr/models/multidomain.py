"""Multi-domain CTR models: STAR and MMoE on the field embeddings, one domain per sample.

Each model is ``FieldEmbedding -> network(flat embeddings, domain id)``; the domain id is
the value of ``cfg.domain_field`` (a categorical field: a coarse partition such as a
genre, or a fine one such as the item, APG Table 6), read from its input slot. Ids follow
the spec's convention (0 pad, 1 ``__other__``/OOV, real domains from 2), so the networks
hold ``vocab_size`` domain slots. The networks themselves are ``models/star.py`` and
``models/mmoe.py``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from dynamic_ctr.models.embedding import FieldEmbedding
from dynamic_ctr.models.mmoe import MMoENetwork
from dynamic_ctr.models.star import StarNetwork

__all__ = ["STAR", "MMoE"]


class _DomainModel(nn.Module):
    """Embedding and domain-slot bookkeeping shared by :class:`STAR` and :class:`MMoE`."""

    def __init__(self, cfg: Any, spec: Any, dense: nn.Module | None) -> None:
        super().__init__()
        if dense is not None:
            raise ValueError(f"{cfg.family} takes no dense tower")
        self.embedding = FieldEmbedding(spec, cfg.embedding_dim)
        # categorical fields come first on the F axis and in the slots: field index = slot
        self.domain_index = self.embedding.field_index(cfg.domain_field)
        self.num_domains = spec[cfg.domain_field].vocab_size
        self.in_dim = self.embedding.num_fields * cfg.embedding_dim


class STAR(_DomainModel):
    """STAR (Sheng et al., 2021): ``x (B, S) -> (B,)`` logits. The auxiliary network reads
    the domain field's embedding. A folded model (``cfg.folded``) holds the serving form,
    ``W_shared o W_d`` multiplied out per domain (:meth:`StarNetwork.fold`)."""

    def __init__(self, cfg: Any, spec: Any, dense: nn.Module | None = None) -> None:
        super().__init__(cfg, spec, dense)
        self.net: nn.Module = StarNetwork(
            self.in_dim, cfg.hidden_units, self.num_domains, cfg.embedding_dim,
            aux_hidden=cfg.star.aux_hidden, dropout=cfg.dropout, norm=cfg.star.norm,
        )
        if cfg.folded:  # rebuild the serving structure that the saved weights belong to
            self.net = self.net.fold()

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S)`` int64 -> logits ``(B,)``."""
        emb = self.embedding(x)  # (B, F, D)
        return self.net(emb.flatten(1), x[:, self.domain_index], emb[:, self.domain_index])

    def parameter_roles(self) -> dict[str, list[nn.Parameter]]:
        """The network's per-domain parameters as role ``domain`` (lazy updates)."""
        roles = getattr(self.net, "parameter_roles", None)  # a folded network has none
        return roles() if callable(roles) else {}


class MMoE(_DomainModel):
    """MMoE with one gate and one tower per domain (Ma et al., 2018; APG Table 6):
    ``x (B, S) -> (B,)`` logits."""

    def __init__(self, cfg: Any, spec: Any, dense: nn.Module | None = None) -> None:
        super().__init__(cfg, spec, dense)
        m = cfg.mmoe
        self.net = MMoENetwork(
            self.in_dim, self.num_domains, num_experts=m.num_experts, expert_units=m.expert_units,
            tower_units=m.tower_units, dropout=cfg.dropout,
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S)`` int64 -> logits ``(B,)``."""
        emb = self.embedding(x)  # (B, F, D)
        return self.net(emb.flatten(1), x[:, self.domain_index])
