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
from dynamic_ctr.models.layers import MLPTower
from dynamic_ctr.models.mmoe import MMoENetwork
from dynamic_ctr.models.star import (
    DomainGroups,
    StarNetwork,
    auto_grouped,
    domain_linear,
    group_domains,
)

__all__ = ["MAML", "STAR", "MMoE"]


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
    competitor [9]): ``x (B, S) -> (B,)`` logits.

    ``FieldEmbedding -> dense tower z (B, H) -> head``. ``maml.fast_weights`` says what a
    domain adapts: ``head``, the prediction head alone (ANIL, Raghu et al., 2020), or
    ``tower``, every linear map of the tower and the head (the embeddings stay shared:
    a copy per domain would be a copy of every table). Training (the loop's ``meta_loss``
    hook): the batch's rows alternate between support and query; per domain, one inner
    SGD step of size ``maml.inner_lr`` on the mean BCE of the domain's support rows; the
    loss is the query rows' BCE at their domain's adapted weights, the inner step held
    constant (first order: the shared weights get the gradient as if taken at the adapted
    ones, the tower and embeddings through ``z``). A domain with query rows but no
    support rows in the batch keeps the shared weights.

    - ``head``: the step is in closed form for a linear head, all domains at once,
      ``g_d = mean_{i in S_d} (sigma(l_i) - y_i) [z_i; 1]``.
    - ``tower``: autograd gives the step, one pass for all the batch's domains: the
      support rows run through the shared weights expanded to one copy per present domain
      (``models/star.py``'s ``domain_linear``, STAR's per-domain products), and each
      domain's rows' mean loss differentiates its own copy. The query rows run through
      their domain's ``W - step_d`` the same way.

    Deployment (the loop's ``adapt`` hook, before every validation): each domain's fast
    weights take the same step on all its training rows and are kept in buffers
    (``adapted_*``; ``tower``: a copy of the tower per domain, P x its size, not counted
    as parameters), so an evaluation-mode forward uses its domain's adapted weights (a
    domain without training rows: the shared ones).

    Choices where the references are silent for CTR: one inner step, alternating
    support/query rows within the shuffled batch, the embeddings shared.
    """

    adapted: Tensor

    def __init__(self, cfg: Any, spec: Any, dense: nn.Module | None = None) -> None:
        super().__init__(cfg, spec, None)
        if dense is None:
            raise ValueError("maml needs a dense tower")
        self.dense = dense
        self.head = nn.Linear(dense.out_dim, 1)
        self.inner_lr = cfg.maml.inner_lr
        self.fast_weights = cfg.maml.fast_weights
        self.register_buffer("adapted", torch.zeros((), dtype=torch.bool))
        if self.fast_weights == "head":
            self.register_buffer("adapted_weight", torch.zeros(self.num_domains, dense.out_dim))  # (P, H)
            self.register_buffer("adapted_bias", torch.zeros(self.num_domains))  # (P,)
            return
        if not isinstance(dense, MLPTower):
            raise ValueError(  # noqa: TRY004 - a setting that does not fit the tower, as config checks
                f"maml.fast_weights='tower' adapts a tower of linear maps (hidden_units), got a "
                f"{type(dense).__name__}: use maml.fast_weights='head'"
            )
        for i, linear in enumerate(self._fast_linears()):  # per domain: (P, N, M) and (P, N)
            self.register_buffer(f"adapted_weight_{i}", torch.zeros(self.num_domains, *linear.weight.shape))
            self.register_buffer(f"adapted_bias_{i}", torch.zeros(self.num_domains, *linear.bias.shape))

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x (B, S)`` -> the tower output ``z (B, H)`` and the domain ids ``(B,)``."""
        emb = self.embedding(x)  # (B, F, D)
        return self.dense(emb.flatten(1), emb), x[:, self.domain_index]

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, S)`` int64 -> logits ``(B,)``: the domain's adapted weights in evaluation."""
        if self.training or not bool(self.adapted):
            z, _ = self.features(x)
            return self.head(z).squeeze(1)
        if self.fast_weights == "tower":
            h, domain = self.embedding(x).flatten(1), x[:, self.domain_index]
            groups = group_domains(domain)
            fast = [table.index_select(0, groups.ids) for table in self._adapted_tower()]  # the batch's domains
            n = len(fast) // 2
            return self._domain_logits(h, groups, fast[:n], fast[n:])
        z, domain = self.features(x)
        return (z * self.adapted_weight[domain]).sum(1) + self.adapted_bias[domain]  # (B,)

    # ------------------------------------------------------------------ fast weights: head

    def _inner_step(self, z: Tensor, logits: Tensor, y: Tensor, domain: Tensor) -> tuple[Tensor, Tensor]:
        """Per domain, ``inner_lr`` times the mean BCE gradient of the head over the rows
        given: ``(P, H)`` and ``(P,)``, zero for domains without rows (constants)."""
        g = (torch.sigmoid(logits) - y).detach()  # (N,): dBCE / dlogit
        count = torch.bincount(domain, minlength=self.num_domains).clamp(min=1).to(z.dtype)  # (P,)
        grad_w = z.new_zeros(self.num_domains, z.shape[1]).index_add(0, domain, g.unsqueeze(1) * z.detach())
        grad_b = z.new_zeros(self.num_domains).index_add(0, domain, g)
        return self.inner_lr * grad_w / count.unsqueeze(1), self.inner_lr * grad_b / count

    # ------------------------------------------------------------------ fast weights: tower

    def _fast_linears(self) -> list[nn.Linear]:
        """The linear maps a domain adapts with ``fast_weights="tower"``: the tower's, then the head."""
        return [*self.dense.linears, self.head]

    def _fast_parameters(self) -> list[Tensor]:
        """Their weights, then their biases (the order of :meth:`_tower_gradients`)."""
        linears = self._fast_linears()
        return [lin.weight for lin in linears] + [lin.bias for lin in linears]

    def _adapted_tower(self) -> list[Tensor]:
        """The per-domain buffers of :meth:`_fast_parameters`, in the same order: ``(P, N, M)``
        weights, then ``(P, N)`` biases."""
        n = len(self._fast_linears())
        return [getattr(self, f"adapted_weight_{i}") for i in range(n)] + [
            getattr(self, f"adapted_bias_{i}") for i in range(n)
        ]

    def _domain_logits(self, h: Tensor, groups: DomainGroups, weights: list[Tensor], biases: list[Tensor]) -> Tensor:
        """``h (B, E_in)`` through the tower and head with each present domain's own
        linear maps, ``weights[l] (K, N, M)`` and ``biases[l] (K, N)`` in ``groups.ids``
        order (the shared activations between them) -> logits ``(B,)`` in batch order."""
        grouped = auto_grouped(groups)
        x = h[groups.order] if grouped else h  # sorted by domain for the grouped form
        acts = [*self.dense.acts, None]  # no activation on the logit
        for weight, bias, act in zip(weights, biases, acts, strict=True):
            x = domain_linear(x, weight, bias, groups, grouped)
            if act is not None:
                x = act(x)
        logit = x.squeeze(1)
        return logit[groups.rank] if grouped else logit

    def _tower_gradients(self, h: Tensor, y: Tensor, groups: DomainGroups, mean: bool) -> list[Tensor]:
        """The BCE gradient of every fast linear map at the shared weights, per present
        domain: ``[dW_0 (K, N, M), ..., dW_L, db_0 (K, N), ..., db_L]``, each domain's over
        its own rows (their mean when ``mean``, else their sum); constants (first order)."""
        k, n = len(groups.sizes), len(self._fast_linears())
        with torch.enable_grad():  # also inside adapt's no_grad
            # one copy of the shared weights per present domain (expanded views: no copy),
            # so that each domain's rows differentiate their own copy
            copies = [p.detach().expand(k, *p.shape).requires_grad_() for p in self._fast_parameters()]
            logits = self._domain_logits(h.detach(), groups, copies[:n], copies[n:])  # (B,)
            per_row = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
            if mean:
                per_row = per_row / groups.counts[groups.inverse].to(per_row.dtype)
            return list(torch.autograd.grad(per_row.sum(), copies))

    def _tower_meta_loss(self, x: Tensor, y: Tensor, support: Tensor) -> Tensor:
        """``meta_loss`` with ``fast_weights="tower"``."""
        h, domain = self.embedding(x).flatten(1), x[:, self.domain_index]
        query = ~support
        inner, outer = group_domains(domain[support]), group_domains(domain[query])
        fast = [p.expand(len(outer.sizes), *p.shape) for p in self._fast_parameters()]  # (K_q, ...) shared
        if inner.sizes:  # each query domain's weights minus its support rows' step (none: no step)
            grads = self._tower_gradients(h[support], y[support], inner, mean=True)
            at = torch.searchsorted(inner.ids, outer.ids).clamp(max=len(inner.sizes) - 1)
            has_support = inner.ids[at] == outer.ids  # (K_q,)
            for i, grad in enumerate(grads):
                step = torch.where(has_support.view(-1, *[1] * (grad.ndim - 1)), grad.index_select(0, at), 0.0)
                fast[i] = fast[i] - self.inner_lr * step
        n = len(self._fast_linears())
        logits = self._domain_logits(h[query], outer, fast[:n], fast[n:])  # (B_q,)
        return nn.functional.binary_cross_entropy_with_logits(logits, y[query])

    # ------------------------------------------------------------------ training and deployment

    def meta_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The first-order MAML loss of one batch (see the class docstring)."""
        support = torch.arange(x.shape[0], device=x.device) % 2 == 0
        if self.fast_weights == "tower":
            return self._tower_meta_loss(x, y, support)
        z, domain = self.features(x)
        logits = self.head(z).squeeze(1)  # (B,)
        step_w, step_b = self._inner_step(z[support], logits[support], y[support], domain[support])
        query = ~support
        dq = domain[query]
        adapted = logits[query] - (z[query] * step_w[dq]).sum(1) - step_b[dq]  # (B_q,)
        return nn.functional.binary_cross_entropy_with_logits(adapted, y[query])

    @torch.no_grad()
    def adapt(self, data: Any, batch_size: int = 8192) -> None:
        """Each domain's fast weights after one inner step on all its rows of ``data`` (a
        ``TensorData``: ``x``, ``y``), kept in the buffers an evaluation forward reads."""
        was_training = self.training
        self.eval()
        if self.fast_weights == "tower":
            self._adapt_tower(data, batch_size)
        else:
            self._adapt_head(data, batch_size)
        self.adapted.fill_(True)
        self.train(was_training)

    def _adapt_head(self, data: Any, batch_size: int) -> None:
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

    def _adapt_tower(self, data: Any, batch_size: int) -> None:
        params, buffers = self._fast_parameters(), self._adapted_tower()
        sums = [b.new_zeros(b.shape) for b in buffers]  # (P, ...): each domain's gradient sum
        counts = buffers[0].new_zeros(self.num_domains)
        for start in range(0, len(data.y), batch_size):
            x, y = data.x[start:start + batch_size], data.y[start:start + batch_size]
            groups = group_domains(x[:, self.domain_index])
            grads = self._tower_gradients(self.embedding(x).flatten(1), y, groups, mean=False)
            for total, grad in zip(sums, grads, strict=True):
                total.index_add_(0, groups.ids, grad)
            counts.index_add_(0, groups.ids, groups.counts.to(counts.dtype))
        counts = counts.clamp(min=1)
        for buffer, total, param in zip(buffers, sums, params, strict=True):
            mean = total / counts.view(-1, *[1] * param.ndim)
            buffer.copy_(param.detach() - self.inner_lr * mean)  # no rows: mean 0, the shared weights
