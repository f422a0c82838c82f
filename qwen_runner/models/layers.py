"""Shared building blocks for our lean CPU model code (batch 1, decode first).

Conventions used by every block here:

- Activations are 2-D ``[T, hidden]`` (batch is always 1; the model drops it once at the
  embedding and adds it back for the logits). Fewer dims = fewer view/transpose ops.
- Weights that are read together are fused at load time: q/k/v into one ``qkv_proj``,
  gate and up into one ``w13`` (gate rows first, then up rows).
- Routed experts are stacked per layer: ``w13 [E, 2I, H]`` and ``w2 [E, H, I]``. Decode
  touches only the k chosen experts through per-expert *views* (no gather copy: a copy
  of k experts per token would double the bytes moved). Prefill sorts the
  (token, expert) pairs once and runs one matmul pair per expert that was hit.
- Caches are preallocated at ``make_cache(max_context)``: no allocation grows per token.

The math mirrors transformers' Qwen2/Qwen3 MoE modules (the reference the parity tests
compare against); deviations are only in op order where the result is equal in fp32.
Other model files (qwen3_next) import from here: add to this file, do not rename.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen_runner import kernels
from qwen_runner import settings as S
from qwen_runner.errors import ContextOverflowError
from qwen_runner.models.matmul import (MIN_GEMV_BYTES_PER_THREAD, Linear, gemv_threads, linear,  # noqa: F401
                                       matmul_backend, thread_limit, widen_prefill, widened_mm)

__all__ = [
    "RMSNorm", "rms_norm", "RotaryEmbedding", "apply_rotary", "KVCache", "attend", "Attention",
    "apply_rotary_signed", "route", "DenseMLP", "StackedExperts", "SparseMoE", "swiglu", "causal_mask",
    "matmul_backend", "gemv_threads", "thread_limit", "CausalLM", "grouped_by_expert", "linear", "Linear",
]


# --------------------------------------------------------------------------- norms

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False) -> torch.Tensor:
    """RMSNorm computed in fp32, exactly as transformers does for each Qwen flavour.

    ``zero_centered=False`` (Qwen2/Qwen3-MoE): normalize in fp32, cast back, then ``weight * x``.
    ``zero_centered=True`` (Qwen3-Next): the stored weight is an offset from 1 and the
    multiply happens in fp32 before the cast.
    """
    dtype = x.dtype
    if dtype is torch.bfloat16 and x.numel() <= S.RMS_NORM_KERNEL_MAX_ELEMENTS:
        y = kernels.rms_norm(x, weight, eps, zero_centered)  # decode: one C++ call instead of ~8 ops
        if y is not None:
            return y
    # torch's rms_norm on fp32 equals transformers' x * rsqrt(mean(x^2) + eps) bit for bit
    # (checked on decode and prefill shapes) in one dispatched op instead of five.
    xf = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    if zero_centered:
        return (xf * (1.0 + weight.float())).to(dtype)
    return weight * xf.to(dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; see ``rms_norm`` for the two weight conventions."""

    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps
        self.zero_centered = zero_centered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.zero_centered)


# --------------------------------------------------------------------------- rotary

class RotaryEmbedding:
    """cos/sin tables for rotary positions, built once per max length (not per token).

    Not an nn.Module on purpose: it has no weights, so building the model on the meta
    device leaves nothing to re-materialize. ``rotary_dim < head_dim`` is partial rotary
    (Qwen3-Next rotates the first quarter of each head). Values equal transformers':
    ``position * inv_freq`` in fp32, ``cat(freqs, freqs)``, cos/sin in fp32, cast to the
    compute dtype.
    """

    def __init__(self, rotary_dim: int, theta: float, scaling: float = 1.0):
        if rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
        self.rotary_dim = rotary_dim
        self.theta = theta
        self.scaling = scaling
        # device="cpu": the model may be constructed under ``torch.device("meta")``.
        exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
        self.inv_freq = 1.0 / (theta ** exponent)
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        self._signed_sin: torch.Tensor | None = None

    def table(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``[length', rotary_dim]`` (length' >= length) in ``dtype``."""
        if self._cos is None or self._cos.shape[0] < length or self._cos.dtype != dtype:
            # Grow geometrically: decode asks for one more position every token, and rebuilding
            # an exactly-sized table each time would redo O(context) work per token.
            built = 0 if self._cos is None else self._cos.shape[0]
            positions = torch.arange(max(length, 2 * built), dtype=torch.int64, device="cpu").float()
            freqs = positions[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos = (emb.cos() * self.scaling).to(dtype)
            self._sin = (emb.sin() * self.scaling).to(dtype)
            half = self.rotary_dim // 2
            self._signed_sin = torch.cat((-self._sin[:, :half], self._sin[:, half:]), dim=-1)
        return self._cos, self._sin

    def slice_signed(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``slice`` but returns ``(cos, signed_sin)`` for ``apply_rotary_signed``."""
        self.table(start + length, dtype)
        return self._cos[start:start + length, None, :], self._signed_sin[start:start + length, None, :]

    def slice(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions ``start .. start+length-1``, shape ``[length, 1, rotary_dim]``.

        The middle dim broadcasts over heads for activations laid out ``[T, heads, head_dim]``.
        """
        cos, sin = self.table(start + length, dtype)
        return cos[start:start + length, None, :], sin[start:start + length, None, :]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x [..., head_dim]``; pass the rest through.

    ``sin`` is the plain table (as transformers uses it): ``x*cos + rotate_half(x)*sin``.
    """
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def apply_rotary_signed(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary`` in 4 ops for full-width rotary, with ``signed_sin = cat(-sin_half, sin_half)``.

    ``rotate_half(x) * sin == roll(x, half) * signed_sin`` exactly (negation commutes with
    rounding), so this equals ``apply_rotary`` bit for bit with half the dispatched ops.
    """
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin


# --------------------------------------------------------------------------- KV cache + attention

class KVCache:
    """Preallocated keys/values: ``k, v [layers, kv_heads, max_context, head_dim]``.

    ``length`` counts tokens already stored. Attention layers ``write`` their new
    keys/values at ``length`` during a forward; the model calls ``advance(T)`` once
    after all layers. ``truncate(n)`` rolls back by moving ``length`` (stale entries
    past it are simply overwritten later). ``layers`` counts attention layers only: a
    hybrid model (Qwen3-Next) gives each attention layer a slot index.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_context: int, dtype: torch.dtype):
        if max_context < 1:
            raise ValueError(f"max_context must be >= 1, got {max_context}")
        self.max_context = max_context
        self.length = 0
        shape = (layers, kv_heads, max_context, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)

    def check_room(self, new_tokens: int) -> None:
        """Raise ContextOverflowError before any layer writes past ``max_context``."""
        if self.length + new_tokens > self.max_context:
            raise ContextOverflowError(
                f"{self.length} cached + {new_tokens} new tokens exceed the context of {self.max_context}"
            )

    def write(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v [kv_heads, T, head_dim]`` at ``length``; return views of all keys/values so far."""
        start, end = self.length, self.length + k.shape[1]
        self.k[slot, :, start:end] = k
        self.v[slot, :, start:end] = v
        return self.k[slot, :, :end], self.v[slot, :, :end]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens

    def truncate(self, n: int) -> bool:
        """Keep the first ``n`` tokens. Always possible for n <= length (attention is position-indexed)."""
        if n < 0 or n > self.length:
            return False
        self.length = n
        return True

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


def causal_mask(start: int, length: int) -> torch.Tensor | None:
    """Boolean mask ``[T, start+T]`` (True = may attend) for T new queries after ``start`` cached keys.

    None when no mask is needed: one query sees every cached key. SDPA's ``is_causal``
    aligns the triangle top-left, which is wrong once ``start > 0``, so we pass a mask.
    """
    if length == 1:
        return None
    return torch.ones(length, start + length, dtype=torch.bool).tril(diagonal=start)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Causal GQA attention: ``q [heads, T, d]``, ``k, v [kv_heads, S, d]`` (S = start+T) -> ``[T, heads*d]``.

    Inputs go to SDPA as 4-D (batch 1): with 3-D inputs torch falls back to its math path
    (bmm + softmax), which in bf16 rounds differently from transformers (measured: top-1
    agreement ~90% on the tiny models instead of bit-identical logits).

    One query (decode) is laid out as ``[1, kv_heads, group, d]``: the ``group`` query heads
    sharing a kv head become that head's query rows, so no mask and no repeat of the
    cache is needed. With ``enable_gqa`` the CPU flash kernel instead expands K/V per
    call (measured, 1 thread, 2000 cached tokens: 3.8 ms vs 0.29 ms; same result).
    """
    heads, length, dim = q.shape
    kv_heads = k.shape[0]
    if length == 1:
        # threads by the cache bytes read, as for a GEMV: over a short cache, waking a sleeping worker
        # (PASSIVE) cost more than the attention (dev VM, 2 threads: 170 us per call against 71 on one)
        kv_bytes = 2 * k.numel() * k.element_size()
        with thread_limit(gemv_threads(kv_bytes, torch.get_num_threads())):
            out = F.scaled_dot_product_attention(
                q.view(1, kv_heads, heads // kv_heads, dim), k.unsqueeze(0), v.unsqueeze(0), scale=scale
            )
        return out.reshape(1, heads * dim)
    q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    if start == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_mask(start, length), scale=scale, enable_gqa=True
        )
    return out[0].transpose(0, 1).reshape(length, -1)


class Attention(nn.Module):
    """GQA self-attention with fused ``qkv_proj``, optional bias (Qwen2) and q/k RMSNorm (Qwen3).

    Parameters: ``qkv_proj.weight [(heads + 2*kv_heads)*d, H]`` (q rows, then k, then v),
    optional ``qkv_proj.bias``, ``o_proj.weight [H, heads*d]``, optional ``q_norm.weight``,
    ``k_norm.weight [d]``.
    """

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, *, qkv_bias: bool = False,
                 qk_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_size, self.kv_size = heads * head_dim, kv_heads * head_dim
        self.scale = head_dim ** -0.5
        self.qkv_proj = Linear(hidden, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = Linear(self.q_size, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None

    def forward(self, x: torch.Tensor, cache: KVCache, slot: int,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``x [T, H]`` -> ``[T, H]``; writes this layer's keys/values into ``cache`` slot ``slot``.

        ``rope`` is ``RotaryEmbedding.slice_signed(cache.length, T, dtype)``: (cos, signed_sin).
        """
        length = x.shape[0]
        qkv = self.qkv_proj(x)
        if length == 1 and qkv.dtype is torch.bfloat16 and cache.k.dtype is torch.bfloat16:
            out = self._decode_kernel(qkv, cache, slot, rope)
            if out is not None:
                return self.o_proj(out)
        q = qkv[:, :self.q_size].view(length, self.heads, self.head_dim)
        k = qkv[:, self.q_size:self.q_size + self.kv_size].view(length, self.kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(length, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, signed_sin = rope
        q, k = apply_rotary_signed(q, cos, signed_sin), apply_rotary_signed(k, cos, signed_sin)
        keys, values = cache.write(slot, k.transpose(0, 1), v.transpose(0, 1))
        out = attend(q.transpose(0, 1), keys, values, cache.length, self.scale)
        return self.o_proj(out)

    def _decode_kernel(self, qkv: torch.Tensor, cache: KVCache, slot: int,
                       rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """One token in one C++ call (norms, rotary, cache write, attention) instead of ~30 ops; None when
        the kernels are off or the rotary is partial."""
        cos, signed_sin = rope
        if cos.shape[-1] != self.head_dim:
            return None
        norms = (self.q_norm, self.k_norm)
        return kernels.attention_decode(qkv, *(n.weight if n is not None else None for n in norms),
                                        self.q_norm.eps if self.q_norm is not None else 0.0, cos.reshape(-1),
                                        signed_sin.reshape(-1), cache.k, cache.v, slot, cache.length, self.heads,
                                        self.kv_heads, self.scale)


# --------------------------------------------------------------------------- MLPs and MoE

def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for a fused ``[..., 2I]`` projection (gate half first)."""
    half = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :half]) * gate_up[..., half:]


class DenseMLP(nn.Module):
    """SwiGLU MLP with gate and up fused: ``w13 [2I, H]``, ``w2 [H, I]`` (also the Qwen2-MoE shared expert)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(2 * intermediate, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(hidden, intermediate), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(swiglu(linear(x, self.w13)), self.w2)


def route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int,
          norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k softmax router as in transformers: logits in the compute dtype, softmax in fp32.

    Returns ``(weights [T, k]`` in x's dtype, ``experts [T, k]`` int64).
    """
    logits = linear(x, router_weight)
    if logits.shape[0] == 1 and logits.dtype is torch.bfloat16:
        routed = kernels.route_topk(logits, top_k, norm_topk_prob)  # decode: one call instead of ~8 ops
        if routed is not None:
            return routed
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), experts


class StackedExperts(nn.Module):
    """Routed SwiGLU experts stacked per layer: ``w13 [E, 2I, H]``, ``w2 [E, H, I]``.

    ``forward(x, weights, experts)`` with ``x [T, H]``, ``weights/experts [T, k]``.
    Per-expert views are cached in Python lists so the decode loop indexes a list
    instead of dispatching a ``select`` op per expert; they are rebuilt whenever the
    parameters are replaced (``load_state_dict(assign=True)`` swaps the objects).
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts, self.intermediate = num_experts, intermediate
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate), requires_grad=False)
        self._views_of: tuple[int, int] | None = None
        self._w13_views: list[torch.Tensor] = []
        self._w2_views: list[torch.Tensor] = []

    def _views(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-expert transposed views ``w13[e].T [H, 2I]`` and ``w2[e].T [I, H]`` (no copies)."""
        key = (id(self.w13), id(self.w2))
        if self._views_of != key:
            self._w13_views = [w.t() for w in self.w13.unbind(0)]
            self._w2_views = [w.t() for w in self.w2.unbind(0)]
            self._views_of = key
        return self._w13_views, self._w2_views

    def fused_decode_bytes(self, top_k: int) -> int | None:
        """Weight bytes one fused C++ decode call reads (the top-k experts' w13 and w2), or None when
        decode runs per expert. Callers size the decode thread count from it."""
        if self.w13.dtype is not torch.bfloat16 or not kernels.active():
            return None
        return (self.w13.nbytes + self.w2.nbytes) * top_k // self.num_experts

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return self.decode(x, weights, experts)
        return self.prefill(x, weights, experts)

    def decode(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """One token: in bf16 one fused C++ call (``kernels.moe``) when active, else ``decode_aten``."""
        if x.dtype is torch.bfloat16 and self.w13.dtype is torch.bfloat16 and self.w13.is_contiguous():
            y = kernels.moe(x, self.w13, self.w2, experts[0], weights[0])
            if y is not None:
                return y
        return self.decode_aten(x, weights, experts)

    def decode_aten(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """One token: k gate/up GEMVs into one buffer, one SwiGLU, k down GEMVs, one weighted sum.

        Each expert is read through a view of the stack (no gather copy). Batching the
        elementwise work over the k experts keeps the op count at ~2k+5 per layer
        instead of ~8k for a per-expert chain; the sum order (expert by expert, in
        weight order) is the only difference from transformers' loop.
        """
        w13t, w2t = self._views()
        chosen = experts[0].tolist()
        top_k = len(chosen)
        gate_up = x.new_empty(top_k, 2 * self.intermediate)
        for j, e in enumerate(chosen):
            torch.mm(x, w13t[e], out=gate_up[j:j + 1])
        h = swiglu(gate_up).mul_(weights.view(top_k, 1))
        down = x.new_empty(top_k, x.shape[1])
        for j, e in enumerate(chosen):
            torch.mm(h[j:j + 1], w2t[e], out=down[j:j + 1])
        return down.sum(0, keepdim=True)

    def prefill(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Many tokens: sort (token, expert) pairs once, one matmul pair per expert that was hit."""
        w13, w2 = self._views()

        def mlp(e: int, xs: torch.Tensor) -> torch.Tensor:
            if widen_prefill(xs):  # fp32 GEMMs on widened weights where they are faster (models.matmul)
                return widened_mm(swiglu(widened_mm(xs, w13[e])), w2[e])
            return swiglu(xs @ w13[e]) @ w2[e]

        return grouped_by_expert(x, weights, experts, self.num_experts, mlp)


def grouped_by_expert(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, num_experts: int,
                      mlp) -> torch.Tensor:
    """Prefill MoE: sort the (token, expert) pairs once, run ``mlp(e, tokens_of_e)`` per expert hit,
    weight the rows, and scatter-add them back to their tokens."""
    top_k = experts.shape[1]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    tokens = order // top_k
    xs = x.index_select(0, tokens)
    ys = torch.empty_like(xs)
    begin = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        end = begin + n
        ys[begin:end] = mlp(e, xs[begin:end])
        begin = end
    ys.mul_(weights.reshape(-1, 1).index_select(0, order))
    return torch.zeros_like(x).index_add_(0, tokens, ys)


class SparseMoE(nn.Module):
    """Router + stacked experts, with the optional Qwen2-MoE shared expert behind a sigmoid gate.

    Parameters: ``gate.weight [E, H]`` (router), ``experts.w13/w2``, and when
    ``shared_intermediate`` is set ``shared_expert.w13/w2`` and ``shared_expert_gate.weight [1, H]``.
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int, norm_topk_prob: bool,
                 shared_intermediate: int | None = None):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = Linear(hidden, num_experts, bias=False)
        self.experts = StackedExperts(num_experts, hidden, intermediate)
        self.shared_expert = DenseMLP(hidden, shared_intermediate) if shared_intermediate else None
        self.shared_expert_gate = Linear(hidden, 1, bias=False) if shared_intermediate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = route(x, self.gate.weight, self.top_k, self.norm_topk_prob)
        out = self.experts(x, weights, experts)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


# --------------------------------------------------------------------------- model base

class CausalLM(nn.Module):
    """What every architecture's ``Model`` shares: construction from config.json, and its dtype.

    A subclass sets ``args_from_config = staticmethod(<its config -> ModelArgs function>)``.
    """

    args_from_config: staticmethod

    @classmethod
    def from_config(cls, config):
        """From the HF config.json dict (or a transformers config object)."""
        if not isinstance(config, dict):
            config = config.to_dict()
        return cls(cls.args_from_config(config))

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype
