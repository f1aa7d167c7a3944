"""Multi-domain CTR models: STAR, MMoE and first-order MAML, one domain per sample.

Each model is ``FieldEmbedding -> network(flat embeddings, domain id)``; the domain id is
the value of ``cfg.domain_field`` (a categorical field: a coarse partition such as a
genre, or a fine one such as the item, APG Table 6), read from its input slot. Ids follow
the spec's convention (0 pad, 1 ``__other__``/OOV, real domains from 2), so the networks
hold ``vocab_size`` domain slots. The networks themselves are ``models/star.py`` and
``models/mmoe.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dynamic_ctr.models.embedding import FieldEmbedding
from dynamic_ctr.models.mmoe import MMoENetwork
from dynamic_ctr.models.star import StarNetwork

__all__ = ["STAR", "MMoE"]


class _DomainModel(nn.Module):
    """Embedding, domain-slot bookkeeping and the per-domain parameter roles shared by
    :class:`STAR`, :class:`MMoE` and :class:`MAML`."""

    def __init__(self, cfg: Any, spec: Any, dense: nn.Module | None) -> None:
        super().__init__()
        if dense is not None:
            raise ValueError(f"{cfg.family} takes no dense tower")
        self.embedding = FieldEmbedding(spec, cfg.embedding_dim)
        # categorical fields come first on the F axis and in the slots: field index = slot
        self.domain_index = self.embedding.field_index(cfg.domain_field)
        self.num_domains = spec[cfg.domain_field].vocab_size
        self.in_dim = self.embedding.num_fields * cfg.embedding_dim

    def parameter_roles(self) -> dict[str, list[nn.Parameter]]:
        """The network's per-domain parameters as role ``domain`` (lazy updates); none
        for MAML (no per-domain parameters) and for a folded network."""
        roles = getattr(getattr(self, "net", None), "parameter_roles", None)
        return roles() if callable(roles) else {}


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


class MMoE(_DomainModel):
    """MMoE with one gate and one tower per domain (Ma et al., 2018; APG Table 6):
    ``x (B, S) -> (B,)`` logits."""

    def __init__(self, cfg: Any, spec: Any, dense: nn.Module | None = None) -> None:
        super().__init__(cfg, spec, dense)
        m = cfg.mmoe
        self.net = MMoENetwork(
            self.in_dim, self.num_domains, num_experts=m.num_experts, expert_units=m.expert_units,
            tower_units=m.tower_units, dropout=cfg.dropout, lazy_domains=m.lazy_domains,
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S)`` int64 -> logits ``(B,)``."""
        emb = self.embedding(x)  # (B, F, D)
        return self.net(emb.flatten(1), x[:, self.domain_index])


class MAML(_DomainModel):
    """First-order MAML over domains: each domain a task (Finn et al., 2017; AdaSparse's
    competitor [9]), with the prediction head as the fast weights (ANIL, Raghu et al.,
    2020): ``x (B, S) -> (B,)`` logits.

    ``FieldEmbedding -> dense tower z (B, H) -> head``. Training (the loop's
    ``meta_loss`` hook): the batch's rows alternate between support and query; per domain,
    one inner SGD step of size ``maml.inner_lr`` on the support rows' mean BCE gradient of
    the head, ``g_d = mean_{i in S_d} (sigma(l_i) - y_i) [z_i; 1]`` (closed form for a
    linear head, all domains at once); the loss is the query rows' BCE at their domain's
    adapted head, with ``g_d`` held constant (first order: the gradient reaches the head
    as if taken at the adapted weights, and the tower and embeddings through ``z``).
    Deployment (the loop's ``adapt`` hook, before every validation): each domain's head
    takes the same step on all its training rows and is kept in buffers, so an
    evaluation-mode forward uses its domain's adapted head (a domain without training
    rows: the shared head).

    Choices where the references are silent for CTR: one inner step, the head alone
    adapted (the tower is shared: per-domain towers are STAR's and MMoE's idea),
    alternating support/query rows within the shuffled batch.
    """

    adapted: Tensor

    def __init__(self, cfg: Any, spec: Any, dense: nn.Module | None = None) -> None:
        super().__init__(cfg, spec, None)
        if dense is None:
            raise ValueError("maml needs a dense tower")
        self.dense = dense
        self.head = nn.Linear(dense.out_dim, 1)
        self.inner_lr = cfg.maml.inner_lr
        self.register_buffer("adapted_weight", torch.zeros(self.num_domains, dense.out_dim))  # (P, H)
        self.register_buffer("adapted_bias", torch.zeros(self.num_domains))  # (P,)
        self.register_buffer("adapted", torch.zeros((), dtype=torch.bool))

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x (B, S)`` -> the tower output ``z (B, H)`` and the domain ids ``(B,)``."""
        emb = self.embedding(x)  # (B, F, D)
        return self.dense(emb.flatten(1), emb), x[:, self.domain_index]

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S)`` int64 -> logits ``(B,)``: the domain's adapted head in evaluation."""
        z, domain = self.features(x)
        if self.training or not bool(self.adapted):
            return self.head(z).squeeze(1)
        return (z * self.adapted_weight[domain]).sum(1) + self.adapted_bias[domain]  # (B,)

    def _inner_step(self, z: Tensor, logits: Tensor, y: Tensor, domain: Tensor) -> tuple[Tensor, Tensor]:
        """Per domain, ``inner_lr`` times the mean BCE gradient of the head over the rows
        given: ``(P, H)`` and ``(P,)``, zero for domains without rows (constants)."""
        g = (torch.sigmoid(logits) - y).detach()  # (N,): dBCE / dlogit
        count = torch.bincount(domain, minlength=self.num_domains).clamp(min=1).to(z.dtype)  # (P,)
        grad_w = z.new_zeros(self.num_domains, z.shape[1]).index_add(0, domain, g.unsqueeze(1) * z.detach())
        grad_b = z.new_zeros(self.num_domains).index_add(0, domain, g)
        return self.inner_lr * grad_w / count.unsqueeze(1), self.inner_lr * grad_b / count

    def meta_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The first-order MAML loss of one batch (see the class docstring)."""
        z, domain = self.features(x)
        logits = self.head(z).squeeze(1)  # (B,)
        support = torch.arange(x.shape[0], device=x.device) % 2 == 0
        step_w, step_b = self._inner_step(z[support], logits[support], y[support], domain[support])
        query = ~support
        dq = domain[query]
        adapted = logits[query] - (z[query] * step_w[dq]).sum(1) - step_b[dq]  # (B_q,)
        return nn.functional.binary_cross_entropy_with_logits(adapted, y[query])

    @torch.no_grad()
    def adapt(self, data: Any, batch_size: int = 8192) -> None:
        """Each domain's head after one inner step on all its rows of ``data`` (a
        ``TensorData``: ``x``, ``y``), kept in the buffers an evaluation forward reads."""
        was_training = self.training
        self.eval()
        sums_w = self.adapted_weight.new_zeros(self.adapted_weight.shape)
        sums_b = self.adapted_bias.new_zeros(self.adapted_bias.shape)
        counts = self.adapted_bias.new_zeros(self.adapted_bias.shape)
        for start in range(0, len(data.y), batch_size):
            x, y = data.x[start:start + batch_size], data.y[start:start + batch_size]
            z, domain = self.features(x)
            g = torch.sigmoid(self.head(z).squeeze(1)) - y
            sums_w.index_add_(0, domain, g.unsqueeze(1) * z)
            sums_b.index_add_(0, domain, g)
            counts.index_add_(0, domain, torch.ones_like(g))
        counts = counts.clamp(min=1)
        self.adapted_weight.copy_(self.head.weight[0] - self.inner_lr * sums_w / counts.unsqueeze(1))
        self.adapted_bias.copy_(self.head.bias[0] - self.inner_lr * sums_b / counts)
        self.adapted.fill_(True)
        self.train(was_training)
