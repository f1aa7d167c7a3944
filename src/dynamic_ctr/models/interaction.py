"""Feature-interaction layers of the static CTR backbones (DynInt Table 1 and the
stronger public anchors): PNN's products, xDeepFM's CIN, AutoInt's interacting layer,
FiBiNET's SENET and bilinear interaction, FinalMLP's feature selection and fusion, and
Deep Crossing's residual unit. ``models/backbones.py`` assembles them into models.

Every layer reads field embeddings ``emb (B, F, D)`` (or a flat ``(B, E)``) and uses the
shapes B, F, D, E and H of ``models/__init__``, plus (P here is not APG's width):

====  ==============================================================
P     field pairs ``i < j``, ``F (F - 1) / 2``, in :func:`field_pairs` order
A     AutoInt's attention width per field, all heads together (``heads x d'``)
H_k   feature maps of CIN layer k (``H_0 = F``)
====  ==============================================================

No layer materialises a ``(B, P, D, D)`` tensor: every per-pair D x D kernel is applied
as a batched matrix product over the pairs (``(P, B, D) @ (P, D, D)``), in a pairs-first
layout.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dynamic_ctr.models.layers import HiddenActivation

__all__ = [
    "CIN",
    "SENET",
    "BilinearFusion",
    "BilinearInteraction",
    "FeatureSelection",
    "InnerProduct",
    "KernelProduct",
    "MultiHeadSelfAttention",
    "ResidualUnit",
    "field_pairs",
]


def field_pairs(num_fields: int) -> tuple[Tensor, Tensor]:
    """``(rows, cols)``, two int64 ``(P,)`` tensors: every pair ``i < j`` of F fields,
    ordered by i, then j (``(0, 1), (0, 2), ..., (F - 2, F - 1)``, as DeepCTR's)."""
    pairs = list(itertools.combinations(range(num_fields), 2))
    rows = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    cols = torch.tensor([j for _, j in pairs], dtype=torch.long)
    return rows, cols


class _Pairs(nn.Module):
    """Holds the ``(P,)`` row and column indices of the field pairs as buffers.

    Pairs are gathered pairs first, ``(P, B, D)``: whole ``(B, D)`` blocks selected from
    a ``(F, B, D)`` copy (an ``index_add`` of whole blocks backwards), the layout in which
    the per-pair kernels are one ``bmm``. Advanced indexing (``emb[:, rows]``)
    back-propagates through ``index_put`` with accumulation, which took a quarter of
    FiBiNET's training step.
    """

    rows: Tensor
    cols: Tensor

    def __init__(self, num_fields: int) -> None:
        super().__init__()
        if num_fields < 1:
            raise ValueError(f"{num_fields=} must be >= 1")
        rows, cols = field_pairs(num_fields)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.num_fields = num_fields
        self.num_pairs = len(rows)

    def _check(self, emb: Tensor) -> None:
        if emb.ndim != 3 or emb.shape[1] != self.num_fields:
            raise ValueError(f"emb must be (B, {self.num_fields}, D), got {tuple(emb.shape)}")

    def _fields_first(self, emb: Tensor) -> Tensor:
        """``emb (B, F, D) -> (F, B, D)``, contiguous."""
        self._check(emb)
        return emb.transpose(0, 1).contiguous()

    def _left_right(self, fields: Tensor) -> tuple[Tensor, Tensor]:
        """``fields (F, B, D) -> (e_i (P, B, D), e_j (P, B, D))`` of every pair ``i < j``."""
        return fields.index_select(0, self.rows), fields.index_select(0, self.cols)


class InnerProduct(_Pairs):
    """IPNN's inner-product signal (Qu et al., ICDM 2016, eq. 7): ``p_ij = <e_i, e_j>``.

    One batched Gram matrix ``emb emb^T (B, F, F)``, read at the pairs ``i < j``.

    Args:
        num_fields: F.
    """

    def forward(self, emb: Tensor) -> Tensor:
        """``emb (B, F, D) -> (B, P)``."""
        self._check(emb)
        gram = torch.bmm(emb, emb.transpose(1, 2))  # (B, F, F)
        return gram.flatten(1).index_select(1, self.rows * self.num_fields + self.cols)  # (B, P)


class KernelProduct(_Pairs):
    """The outer-product signal in its kernel form, ``p_ij = e_i^T K_ij e_j`` (Qu et al.,
    "Product-based neural networks for user response prediction over multi-field
    categorical data", TOIS 2018, KPNN; DeepCTR's ``OutterProductLayer``).

    Kernel types: ``mat`` a ``D x D`` K_ij per pair; ``vec`` a diagonal one,
    ``p_ij = sum_d e_id k_ijd e_jd``; ``num`` one number, ``p_ij = k_ij <e_i, e_j>``.

    NOTE[DIFF]: the ICDM 2016 OPNN sums the field embeddings and takes the outer product
    ``f_S f_S^T`` of that sum (an approximation for speed); the kernel form keeps one
    value per pair, as the journal version and DeepCTR do.

    Args:
        num_fields: F.
        dim: D.
        kernel: ``mat``, ``vec`` or ``num``.
    """

    def __init__(self, num_fields: int, dim: int, kernel: str = "mat") -> None:
        super().__init__(num_fields)
        shapes = {"mat": (self.num_pairs, dim, dim), "vec": (self.num_pairs, dim), "num": (self.num_pairs, 1)}
        if kernel not in shapes:
            raise ValueError(f"{kernel=} must be one of {tuple(shapes)}")
        self.kernel_type = kernel
        self.kernel = nn.Parameter(torch.empty(shapes[kernel]))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.kernel_type == "mat":
            for k in self.kernel:  # Glorot per (D, D) matrix
                nn.init.xavier_uniform_(k)
        else:
            nn.init.xavier_uniform_(self.kernel)

    def forward(self, emb: Tensor) -> Tensor:
        """``emb (B, F, D) -> (B, P)``."""
        left, right = self._left_right(self._fields_first(emb))  # (P, B, D) each
        if self.kernel_type == "mat":
            left = torch.bmm(left, self.kernel)  # (P, B, D): e_i^T K_ij, one matmul per pair
        else:
            left = left * self.kernel.unsqueeze(1)  # (P, B, D): diag(k_ij) e_i, or k_ij e_i
        return (left * right).sum(dim=2).t()  # (B, P)


class CIN(nn.Module):
    """xDeepFM's Compressed Interaction Network (Lian et al., KDD 2018, §3.2).

    Layer k (eq. 6): ``X^k_h = sum_i sum_j W^{k,h}_{ij} (X^{k-1}_i o X^0_j)``, the
    Hadamard products of every row of ``X^{k-1} (H_{k-1}, D)`` with every field of
    ``X^0 (F, D)``, compressed to H_k feature maps; each map is sum-pooled over D
    (eq. 7) and the pooled maps of all layers are concatenated (eq. 8).

    ``split_half``: of each layer's maps but the last layer's, the first half feeds the
    next layer and the second half the output (the authors' code, DeepCTR); otherwise
    every map does both.

    NOTE[DIFF]: no bias and no activation, as eq. 6 (DeepCTR's ``CIN`` has a Conv1d bias
    and ReLU by default; the authors' code defaults to the identity).

    On the CPU a batch runs in row blocks whose largest product tensor has at most
    :attr:`block_numel` elements (rows are independent, so the result is the same): a
    larger one (32 MiB and up) is a fresh ``mmap`` from glibc on every allocation, and
    its page faults cost about a fifth of an xDeepFM training step at B = 1024, F = 8,
    D = 16, H = 128 (about 77 -> 60 ms per step in two blocks on 2 cores).

    Args:
        num_fields: F.
        layer_sizes: H_1, H_2, ... (all but the last even when ``split_half``).
        split_half: see above.
    """

    def __init__(self, num_fields: int, layer_sizes: Sequence[int], split_half: bool = True) -> None:
        super().__init__()
        sizes = list(layer_sizes)
        if not sizes or any(h < 1 for h in sizes):
            raise ValueError(f"layer_sizes={sizes} must hold one or more ints >= 1")
        if split_half and any(h % 2 for h in sizes[:-1]):
            raise ValueError(f"layer_sizes={sizes}: with split_half every size but the last must be even")
        self.split_half = split_half
        self.num_fields = num_fields
        self.layers = nn.ModuleList()
        self.next_sizes: list[int] = []  # maps fed to the next layer
        rows = num_fields  # H_{k-1}
        for k, h in enumerate(sizes):
            # W^k as a (H_k, H_{k-1} F) matrix over the flattened (i, j) products
            self.layers.append(nn.Linear(rows * num_fields, h, bias=False))
            last = k == len(sizes) - 1
            rows = h // 2 if split_half and not last else h
            self.next_sizes.append(rows)
        self.out_dim = sum(
            h - n if split_half and k < len(sizes) - 1 else h
            for k, (h, n) in enumerate(zip(sizes, self.next_sizes))
        )
        # H_{k-1} F of the widest layer: the product tensor has B D times as many elements
        self.widest = num_fields * max([num_fields, *self.next_sizes[:-1]])

    #: Largest product tensor per block on the CPU (2^22 elements, 16 MiB in float32).
    block_numel = 1 << 22

    def forward(self, x0: Tensor) -> Tensor:
        """``x0 (B, F, D) -> (B, out_dim)``: the sum-pooled maps of every layer."""
        b, f, d = x0.shape
        if f != self.num_fields:
            raise ValueError(f"x0 must be (B, {self.num_fields}, D), got {tuple(x0.shape)}")
        block = max(1, self.block_numel // (d * self.widest))
        if x0.device.type == "cpu" and b > block:
            return torch.cat([self._forward(part) for part in x0.split(block)])  # (B, out_dim)
        return self._forward(x0)

    def _forward(self, x0: Tensor) -> Tensor:
        """:meth:`forward` on one block of rows, ``x0 (B', F, D) -> (B', out_dim)``."""
        b, f, d = x0.shape
        # Maps last, (B, D, H): the products of a layer are then a (B D, H_{k-1} F) matrix
        # and W^k one GEMM over all B D rows (not B small (H_k, .) @ (., D) products).
        # The products are a batched outer product (bmm, k = 1), whose backward is two
        # bmm's; a broadcast multiply's backward reduces two full-size temporaries
        # (1.6x slower for the whole layer at B = 1024, F = 8, D = 16, H = 128).
        base = x0.transpose(1, 2).reshape(b * d, 1, f)  # (B D, 1, F)
        x, pooled = x0.transpose(1, 2), []  # X^0 with maps last, (B, D, F)
        for k, layer in enumerate(self.layers):
            rows = x.reshape(b * d, -1, 1)  # (B D, H_{k-1}, 1)
            z = torch.bmm(rows, base).view(b, d, -1)  # (B, D, H_{k-1} F): (i, j) at i F + j
            maps = nn.functional.linear(z, layer.weight)  # (B, D, H_k)
            if self.split_half and k < len(self.layers) - 1:
                x, out = maps.split([self.next_sizes[k], maps.shape[2] - self.next_sizes[k]], dim=2)
            else:
                x = out = maps
            pooled.append(out.sum(dim=1))  # (B, maps to the output): sum pooling over D
        return torch.cat(pooled, dim=1)  # (B, out_dim)


class MultiHeadSelfAttention(nn.Module):
    """AutoInt's interacting layer (Song et al., CIKM 2019, §4.3, eqs. 5-8).

    Per head h, ``alpha_mk = softmax_k(<W_Q e_m, W_K e_k>)`` and
    ``e~_m = sum_k alpha_mk W_V e_k``; the heads are concatenated to width A and, with
    ``residual``, ``e_m^Res = ReLU(e~_m + W_Res e_m)`` (else ``ReLU(e~_m)``).

    Q, K, V (and the residual projection) come from ONE ``(D_in, 3A or 4A)`` matrix
    product. No scaling of the scores, as eq. 5 (DeepCTR's default; Transformers divide
    by ``sqrt(d')``) and no biases.

    Args:
        in_dim: D_in, the width of each field's input.
        dim: A, the output width per field (all heads).
        heads: must divide A.
        residual: add ``W_Res e_m``.
    """

    def __init__(self, in_dim: int, dim: int, heads: int, residual: bool = True) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.dim, self.heads, self.residual = dim, heads, residual
        # columns: W_Q | W_K | W_V (| W_Res), each (D_in, A)
        self.weight = nn.Parameter(torch.empty(in_dim, dim * (4 if residual else 3)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for block in self.weight.detach().split(self.dim, dim=1):
            nn.init.xavier_uniform_(block)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, F, D_in) -> (B, F, A)``."""
        b, f, _ = x.shape
        proj = torch.matmul(x, self.weight)  # (B, F, 3A or 4A)
        # one split (its backward concatenates; slicing would zero-fill a full-size grad
        # per slice)
        q, k, v, *res = proj.split(self.dim, dim=2)  # (B, F, A) each
        q, k, v = (t.view(b, f, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, heads, F, d')
        # Scores with the keys on dim 2: torch's softmax over a last dim as short as F
        # is ~3x slower than over an inner one (and its fused attention kernels are no
        # faster at F x F = 8 x 8 per head).
        scores = torch.matmul(k, q.transpose(2, 3))  # (B, heads, F_k, F_q): <W_K e_k, W_Q e_m>
        weights = scores.softmax(dim=2)  # (B, heads, F_k, F_q): alpha_mk, over the keys k
        out = torch.matmul(weights.transpose(2, 3), v)  # (B, heads, F, d')
        out = out.transpose(1, 2).reshape(b, f, self.dim)  # (B, F, A): heads concatenated
        if res:
            out = out + res[0]  # + W_Res e_m
        return torch.relu(out)


class SENET(nn.Module):
    """FiBiNET's Squeeze-Excitation network (Huang et al., RecSys 2019, §3.3).

    Squeeze ``z_i = mean_d e_id`` (eq. 1); excitation ``a = ReLU(W_2 ReLU(W_1 z))``
    (eq. 2) with ``W_1 (F // r, F)``, ``W_2 (F, F // r)`` and no biases; re-weight
    ``v_i = a_i e_i`` (eq. 3).

    Args:
        num_fields: F.
        reduction: r; the excitation's hidden width is ``max(1, F // r)``.
    """

    def __init__(self, num_fields: int, reduction: int = 3) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"{reduction=} must be >= 1")
        hidden = max(1, num_fields // reduction)
        self.squeeze_to_hidden = nn.Linear(num_fields, hidden, bias=False)  # W_1
        self.hidden_to_weights = nn.Linear(hidden, num_fields, bias=False)  # W_2

    def weights(self, emb: Tensor) -> Tensor:
        """``emb (B, F, D) -> a (B, F)``, the field weights."""
        z = emb.mean(dim=2)  # (B, F)
        return torch.relu(self.hidden_to_weights(torch.relu(self.squeeze_to_hidden(z))))  # (B, F)

    def forward(self, emb: Tensor) -> Tensor:
        """``emb (B, F, D) -> (B, F, D)``, each field scaled by its weight."""
        return emb * self.weights(emb).unsqueeze(2)  # (B, F, D)


class BilinearInteraction(_Pairs):
    """FiBiNET's bilinear interaction (§3.4, eqs. 4-6): ``p_ij = (v_i W) o v_j`` with

    * ``field_all``: one ``W (D, D)`` for all pairs (eq. 4);
    * ``field_each``: ``W_i`` per field i (eq. 5); field F - 1 is never the left of a
      pair, so F - 1 matrices;
    * ``field_interaction``: ``W_ij`` per pair (eq. 6).

    (Row-vector convention: ``v_i W`` is the paper's ``v_i . W``.)

    Args:
        num_fields: F.
        dim: D.
        bilinear_type: one of the three above.
    """

    def __init__(self, num_fields: int, dim: int, bilinear_type: str = "field_interaction") -> None:
        super().__init__(num_fields)
        count = {"field_all": 1, "field_each": max(1, num_fields - 1), "field_interaction": self.num_pairs}
        if bilinear_type not in count:
            raise ValueError(f"{bilinear_type=} must be one of {tuple(count)}")
        self.bilinear_type = bilinear_type
        self.weight = nn.Parameter(torch.empty(count[bilinear_type], dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in self.weight:  # Glorot per (D, D) matrix
            nn.init.xavier_uniform_(w)

    def forward(self, emb: Tensor) -> Tensor:
        """``emb (B, F, D) -> (B, P, D)``."""
        fields = self._fields_first(emb)  # (F, B, D)
        if self.bilinear_type == "field_all":
            fields_w = torch.matmul(fields, self.weight[0])  # (F, B, D): v_i W
        elif self.bilinear_type == "field_each":
            last = self.weight.shape[0]  # F - 1: the last field is never a left factor
            fields_w = torch.bmm(fields[:last], self.weight)  # (F - 1, B, D): v_i W_i
        if self.bilinear_type == "field_interaction":
            left, right = self._left_right(fields)  # (P, B, D) each
            left = torch.bmm(left, self.weight)  # (P, B, D): v_i W_ij
        else:
            left, right = fields_w.index_select(0, self.rows), fields.index_select(0, self.cols)
        return (left * right).transpose(0, 1)  # (B, P, D)


class _Gate(nn.Module):
    """One FinalMLP feature-selection gate: ``g = 2 sigmoid(MLP(c)) (B or 1, E)`` from the
    context ``c``, the concatenated embeddings of the context fields, or a learnable
    vector ``(1, D)`` (zeros at init) when there are none."""

    def __init__(self, context: Sequence[int], dim: int, hidden_units: Sequence[int], out_dim: int) -> None:
        super().__init__()
        self.register_buffer("context", torch.tensor(list(context), dtype=torch.long), persistent=False)
        self.bias = nn.Parameter(torch.zeros(1, dim)) if not context else None
        dims = [dim * max(1, len(context)), *hidden_units, out_dim]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*layers[:-1])  # ReLU between layers, sigmoid at the end

    def forward(self, emb: Tensor) -> Tensor:
        """``emb (B, F, D) -> (B, E)``, or ``(1, E)`` for a context-free gate (the same for
        every instance, so it is computed once, not per row)."""
        c = self.bias if self.bias is not None else emb[:, self.context].flatten(1)  # (B or 1, C)
        return 2.0 * torch.sigmoid(self.mlp(c))  # (B or 1, E)


class FeatureSelection(nn.Module):
    """FinalMLP's stream-specific feature selection (Mao et al., AAAI 2023, §3.2, eq. 2):
    ``x_k = e o 2 sigmoid(MLP_k(c_k))`` for the two streams k = 1, 2, where e is the
    flattened embedding ``(B, E)`` and ``c_k`` the stream's context.

    NOTE[DIFF]: the context embeddings are the model's own field embeddings (one lookup);
    FuxiCTR's ``FeatureSelection`` gives the gates separate embedding tables.

    Args:
        dim: D.
        num_fields: F.
        contexts: per stream, the positions (on the F axis) of its context fields.
        hidden_units: the gate MLPs' hidden widths (may be empty).
    """

    def __init__(
        self, dim: int, num_fields: int, contexts: tuple[Sequence[int], Sequence[int]], hidden_units: Sequence[int]
    ) -> None:
        super().__init__()
        self.gates = nn.ModuleList(_Gate(c, dim, hidden_units, num_fields * dim) for c in contexts)

    def forward(self, emb: Tensor) -> tuple[Tensor, Tensor]:
        """``emb (B, F, D) -> (x_1 (B, E), x_2 (B, E))``."""
        flat = emb.flatten(1)  # (B, E)
        x1, x2 = (flat * gate(emb) for gate in self.gates)
        return x1, x2


class BilinearFusion(nn.Module):
    """FinalMLP's multi-head bilinear fusion (§3.3, eqs. 3-4):
    ``logit = b + w_1^T o_1 + w_2^T o_2 + sum_h o_1h^T W_h o_2h``, the stream outputs
    ``o_1 (B, H_1)``, ``o_2 (B, H_2)`` cut into ``heads`` equal chunks ``o_kh``, one
    ``W_h (H_1 / heads, H_2 / heads)`` per head.

    Args:
        dim1: H_1.
        dim2: H_2.
        heads: must divide both.
    """

    def __init__(self, dim1: int, dim2: int, heads: int = 1) -> None:
        super().__init__()
        if heads < 1 or dim1 % heads or dim2 % heads:
            raise ValueError(f"heads={heads} must divide dim1={dim1} and dim2={dim2}")
        self.heads = heads
        self.linear1 = nn.Linear(dim1, 1)  # w_1 and the bias b
        self.linear2 = nn.Linear(dim2, 1, bias=False)  # w_2
        self.weight = nn.Parameter(torch.empty(heads, dim1 // heads, dim2 // heads))  # W_h
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Glorot over the bilinear map: var(o_1^T W o_2) ~ var of one linear term
        bound = math.sqrt(6.0 / (self.weight.shape[1] * self.weight.shape[2] + 1))
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, o1: Tensor, o2: Tensor) -> Tensor:
        """``o1 (B, H_1)``, ``o2 (B, H_2)`` -> ``(B,)`` logits."""
        b = o1.shape[0]
        h1 = o1.view(b, self.heads, -1).transpose(0, 1)  # (heads, B, H_1 / heads)
        h2 = o2.view(b, self.heads, -1).transpose(0, 1)  # (heads, B, H_2 / heads)
        bilinear = (torch.bmm(h1, self.weight) * h2).sum(dim=(0, 2))  # (B,): sum_h o_1h^T W_h o_2h
        return self.linear1(o1).squeeze(1) + self.linear2(o2).squeeze(1) + bilinear  # (B,)


class ResidualUnit(nn.Module):
    """Deep Crossing's residual unit (Shan et al., KDD 2016, §4.4, Figure 3):
    ``X^O = ReLU(X^I + W_1 ReLU(W_0 X^I + b_0) + b_1)``, the input width kept.

    With ``batch_norm``/``dropout`` (the config's, as every hidden layer) the outer ReLU is
    a ``HiddenActivation``: BatchNorm before it, dropout after.

    Args:
        dim: E, input and output width.
        hidden: the inner layer's width.
        batch_norm: BatchNorm1d on the sum.
        dropout: dropout after the unit (0 = none).
    """

    def __init__(self, dim: int, hidden: int, batch_norm: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.inner = nn.Linear(dim, hidden)  # W_0, b_0
        self.outer = nn.Linear(hidden, dim)  # W_1, b_1
        self.act = HiddenActivation(dim, batch_norm, dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, E) -> (B, E)``."""
        return self.act(x + self.outer(torch.relu(self.inner(x))))  # (B, E)
