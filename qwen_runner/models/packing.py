"""oneDNN weight packing for bf16 matmuls: reorder each weight once, at load.

Measured on the 2-core AMD EPYC (Zen 4, AVX512-BF16, no AMX) dev box, bf16, batch-1 decode
shapes: the same matmul through oneDNN with the weight reordered once into its blocked layout
was 1.2-2x faster than the unpacked F.linear, bit-identical, and no slower at prefill shapes.
Only bf16 was measured, so only bf16 is packed; fp32 keeps the plain path. (Qwen3-MoE takes
the other route to the same end: it turns oneDNN off for one-row bf16 matmuls, see
``layers.matmul_backend``. Which wins should be settled by one measurement across both.)
"""

from __future__ import annotations

import torch
from torch import nn

from qwen_runner.models.layers import DenseMLP, StackedExperts, grouped_by_expert, swiglu

PACKABLE_DTYPES = (torch.bfloat16,)
_PACK_BATCH_HINT = 1  # oneDNN picks the blocked layout for this M: decode is M = 1


def packing_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for a weight packed by ``_pack`` (no bias)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], "")


def _release(module: nn.Module, name: str) -> None:
    """Drop a parameter's storage once its packed copy exists, keeping its shape and dtype.

    The parameter becomes a zero-stride view of one element: shape-based code (planner,
    ``dtype``) still works and peak memory is one copy, not two. Its *values* are gone, so a
    packed model's ``state_dict`` must not be saved (the cache builder uses ``checkpoint_state``).
    """
    param = getattr(module, name)
    setattr(module, name, nn.Parameter(torch.empty((), dtype=param.dtype).expand(param.shape), requires_grad=False))


def pack_linear(module: nn.Linear) -> None:
    packed = _pack(module.weight)
    _release(module, "weight")
    module.forward = lambda x: packed_linear(x, packed)


def pack_dense_mlp(mlp: DenseMLP) -> None:
    w13, w2 = _pack(mlp.w13), _pack(mlp.w2)
    _release(mlp, "w13")
    _release(mlp, "w2")
    mlp.forward = lambda x: packed_linear(swiglu(packed_linear(x, w13)), w2)


def pack_experts(experts: StackedExperts) -> None:
    """Per-expert packed weights; decode and prefill mirror ``StackedExperts``' own loops."""
    w13 = [_pack(w) for w in experts.w13.unbind(0)]
    w2 = [_pack(w) for w in experts.w2.unbind(0)]
    _release(experts, "w13")
    _release(experts, "w2")

    def decode(x, weights, chosen):
        out = None
        for e, w in zip(chosen[0].tolist(), weights[0].unbind(0)):
            y = packed_linear(swiglu(packed_linear(x, w13[e])), w2[e]).mul_(w)
            out = y if out is None else out.add_(y)
        return out

    def prefill(x, weights, chosen):
        return grouped_by_expert(x, weights, chosen, experts.num_experts,
                                 lambda e, xs: packed_linear(swiglu(packed_linear(xs, w13[e])), w2[e]))

    experts.decode, experts.prefill = decode, prefill
