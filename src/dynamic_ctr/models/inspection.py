"""Model statistics for reports: parameter counts, generated cores, memory."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dynamic_ctr.models.apg import APGLinear

__all__ = ["count_parameters", "generated_cores", "hidden_memory_bytes"]


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters())


def _first_apg_layer(model: nn.Module) -> APGLinear:
    for module in model.modules():
        if isinstance(module, APGLinear):
            return module
    raise ValueError(f"{type(model).__name__} has no APG layer")


@torch.no_grad()
def generated_cores(model: nn.Module, x: Tensor) -> Tensor:
    """The specific parameters the FIRST APG layer generates for a batch.

    Args:
        model: a model with an APG dense tower (any mode; it is not changed).
        x: ``(B, S)`` input indices.

    Returns:
        ``(B, Q)``: ``S_i`` flattened (Q = K*K) for v2-v5, the full ``W_i`` (Q = M*N)
        for v1; the generated bias is not included.

    Raises:
        ValueError: the model has no APG layer.
    """
    layer = _first_apg_layer(model)
    seen: list[Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[1]))
    try:
        model(x)
    finally:
        handle.remove()
    core = "W" if layer.cfg.apg.version == "v1" else "S"
    return layer.generate(seen[0])[core].flatten(1)  # (B, Q)


def hidden_memory_bytes(model: nn.Module, batch_size: int) -> int:
    """Bytes of the dense tower's per-batch tensors, counted analytically.

    Counts, per hidden layer, the ``(B, H)`` output and, for APG layers, the
    generator's activations, the generated parameters (``(B, Q)``; G of them plus
    the combined one for mix-wise output aggregation) and the feed-forward
    intermediates (v2 and v4 with ``reconstruct``: ``V_i S_i`` and the
    reconstructed ``(B, M, N)`` W_i; v3-v5: two ``(B, K)``). Embeddings, cross
    networks, BatchNorm/activation copies and autograd buffers are not counted. Element size is that of the parameters.
    FinalMLP's two streams are both counted.
    """
    if batch_size < 1:
        raise ValueError(f"{batch_size=} must be >= 1")
    towers = [getattr(model, name, None) for name in ("dense", "dense2")]  # dense2: FinalMLP's stream 2
    towers = [t for t in towers if t is not None and hasattr(t, "activation_numel")]
    if not towers:
        raise ValueError(f"{type(model).__name__} has no dense tower with activation_numel")
    element_size = next(model.parameters()).element_size()
    return sum(t.activation_numel(batch_size) for t in towers) * element_size
