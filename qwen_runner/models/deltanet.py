"""Gated DeltaNet kernels (Qwen3-Next's linear attention), pure torch, batch 1, CPU.

Math follows transformers' ``torch_chunk_gated_delta_rule`` / ``torch_recurrent_gated_delta_rule``
and its causal-conv1d fallbacks (the reference the parity tests compare against). Per value head
``h`` and token ``t``, with ``q, k`` L2-normalized and ``q`` scaled by ``1/sqrt(Dk)``::

    S_t = exp(g_t) * S_{t-1}                      # gated decay, S is [Dk, Dv]
    S_t = S_t + k_t^T (beta_t * (v_t - k_t S_t))  # delta rule: write only the correction
    o_t = q_t S_t

Two forms compute it:

- ``recurrent_step``: one token, a handful of in-place batched ops on the state (the decode hot
  path: nothing here depends on the context length).
- ``chunked``: many tokens, the WY/UT form over chunks of ``CHUNK`` tokens. Everything inside a
  chunk is batched over all chunks and heads at once (one triangular inverse); only the hand-off of
  the state from chunk to chunk is a Python loop (``T / CHUNK`` iterations of three batched matmuls).

Layouts: activations are ``[T, heads, dim]``; the recurrent state is fp32 ``[Hv, Dk, Dv]`` and
is updated in place, so a cache can preallocate it once. Query/key heads are shared by
``Hv // Hk`` consecutive value heads (as in transformers' ``repeat_interleave``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from qwen_runner.models.layers import rms_norm

# Tokens per chunk in the chunked form; any value gives the same result up to rounding.
# transformers uses 64; 32 halves the O(C^2) intra-chunk work and the triangular solve, which
# measured faster for a 512-token prefill here (docs/qwen3_next.md); fp32 differences ~1e-7.
CHUNK = 32
# epsilon of the q/k L2 normalization (FLA's and transformers' ``l2norm``).
L2NORM_EPS = 1e-6

__all__ = ["CHUNK", "causal_conv", "l2norm", "expand_heads", "recurrent_step", "chunked", "gated_rms_norm"]


def causal_conv(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv1d + SiLU over ``x [T, C]``, continuing from ``state [K-1, C]``.

    ``weight [K, C]`` is tap-major (tap ``j`` is a contiguous row) and fp32 holding values
    already rounded to ``x``'s dtype. ``state`` holds the previous ``K-1`` inputs and is
    overwritten with the last ``K-1`` of ``cat(state, x)``: the conv never looks further back,
    so this is all the history decode needs.

    Rounding matches transformers' conv1d in ``x``'s dtype: products of two bf16 values are
    exact in fp32, the taps are summed in fp32, the sum is rounded once to ``x``'s dtype and
    SiLU runs in that dtype. (A K-tap multiply-add is also ~10x faster here than
    ``F.conv1d`` with ``groups=C`` in bf16, which was measured at ~20 ms for 512 x 6144.)
    """
    length = x.shape[0]
    window = torch.cat((state, x))  # [K-1+T, C]
    if length == 1:
        out = (window * weight).sum(0, keepdim=True)
    else:
        out = window[:length] * weight[0]
        for j in range(1, weight.shape[0]):
            out.addcmul_(window[j:j + length], weight[j])
    state.copy_(window[length:])
    return F.silu(out.to(x.dtype))


@functools.cache
def _l2norm_weight(dim: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((dim,), dim ** -0.5, dtype=dtype)


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim, as transformers' (and FLA's) ``l2norm``.

    One fused ``F.rms_norm`` instead of five ops: ``rms_norm(x, eps / D) = x sqrt(D) / sqrt(sum(x^2) + eps)``,
    so the ``1 / sqrt(D)`` is the norm's (constant) weight. Equal up to fp32 rounding.
    """
    dim = x.shape[-1]
    return F.rms_norm(x, (dim,), _l2norm_weight(dim, x.dtype), eps=L2NORM_EPS / dim)


def expand_heads(x: torch.Tensor, num_v_heads: int) -> torch.Tensor:
    """``[..., Hk, D]`` -> ``[..., Hv, D]``: each q/k head serves ``Hv // Hk`` consecutive value heads."""
    ratio = num_v_heads // x.shape[-2]
    if ratio == 1:
        return x
    return x.repeat_interleave(ratio, dim=-2)


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, beta: torch.Tensor,
                   state: torch.Tensor) -> torch.Tensor:
    """One token. ``q, k [Hv, Dk]`` (normalized, q scaled), ``v [Hv, Dv]``, ``decay = exp(g)`` and
    ``beta`` ``[Hv]``, all fp32; ``state [Hv, Dk, Dv]`` fp32, updated in place. Returns ``[Hv, Dv]``.
    """
    state.mul_(decay[:, None, None])
    kv_mem = torch.bmm(k.unsqueeze(1), state).squeeze(1)          # what S already predicts for k
    delta = (v - kv_mem).mul_(beta[:, None])
    state.baddbmm_(k.unsqueeze(2), delta.unsqueeze(1))            # S += k^T delta
    return torch.bmm(q.unsqueeze(1), state).squeeze(1)


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            state: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Many tokens, WY/UT form. ``q, k [T, Hv, Dk]`` (normalized, q scaled), ``v [T, Hv, Dv]``,
    ``g`` (log decay, <= 0) and ``beta`` ``[T, Hv]``, all fp32; ``state [Hv, Dk, Dv]`` fp32 is
    the state before the first token and is overwritten with the state after the last.
    Returns ``[T, Hv, Dv]`` fp32.

    Within a chunk with cumulative log decay ``c`` the delta-rule updates collapse to one
    unit-lower-triangular system ``(I + A) [U | W] = [V_beta | K_beta exp(c)]``. One
    ``solve_triangular`` against the identity gives ``(I + A)^-1`` for all chunks and heads
    (a C-column right-hand side instead of Dk + Dv; transformers inverts it row by row in a
    Python loop), then a matmul per right-hand side. The scan over chunks then does, per chunk:
    one read of the state for both ``W`` and the decayed queries, the chunk's output, and one
    rank-``chunk`` state update. Tensors are laid out chunk-major ``[N, H, C, D]`` so each
    chunk's slice is contiguous (no hidden copies inside the loop). The tail is zero-padded
    (``g = beta = 0`` there: no decay, no write).
    """
    length = q.shape[0]
    heads, dk, dv = state.shape
    pad = (-length) % chunk

    def to_chunks(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[T, H, ...]`` -> ``[N, H, C, ...]`` (one copy, into ``out`` if given)."""
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad) if x.dim() == 3 else (0, 0, 0, pad))
        x = x.reshape(-1, chunk, *x.shape[1:]).transpose(1, 2)
        return x.contiguous() if out is None else out.copy_(x)

    g, beta, v = to_chunks(g), to_chunks(beta), to_chunks(v)
    n = g.shape[0]
    # k and q share one buffer, so one batched product gives k.k (the system) and q.k (the scores)
    kq = torch.empty(n, heads, 2 * chunk, dk, dtype=q.dtype)
    k, q = to_chunks(k, kq[:, :, :chunk]), to_chunks(q, kq[:, :, chunk:])
    cum = g.cumsum(-1)                                                    # [N, H, C]
    upper = torch.ones(chunk, chunk, dtype=torch.bool).triu_(1)
    # decay between positions j <= i of a chunk; masked to -inf above the diagonal before exp
    pair = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill_(upper, float("-inf")).exp_()
    scores = kq @ k.transpose(-1, -2)                                     # [N, H, 2C, C]
    system = scores[..., :chunk, :].mul_(pair).mul_(beta.unsqueeze(-1))   # (I + A) - I, strictly lower
    intra = scores[..., chunk:, :].mul_(pair)                             # causal, decayed q.k within a chunk
    # (I + A)^-1 from one triangular solve against the identity (C right-hand columns, not Dk + Dv)
    eye = torch.eye(chunk, dtype=state.dtype).expand_as(system)
    inverse = torch.linalg.solve_triangular(system, eye, upper=False, unitriangular=True)
    cum_exp = cum.exp().unsqueeze(-1)
    new_values = inverse @ (v * beta.unsqueeze(-1))
    # rows [0, C): W (what the old state predicts for each update), rows [C, 2C): decayed queries
    readers = torch.empty_like(kq)                                        # [N, H, 2C, Dk]
    torch.mul(q, cum_exp, out=readers[:, :, chunk:])
    readers[:, :, :chunk] = inverse @ (k * (beta.unsqueeze(-1) * cum_exp))
    k_tail = (k * (cum[..., -1:] - cum).exp().unsqueeze(-1)).transpose(-1, -2).contiguous()  # [N, H, Dk, C]
    chunk_decay = cum[..., -1].exp()[..., None, None]                     # [N, H, 1, 1]
    out = torch.empty(q.shape[0], heads, chunk, dv, dtype=state.dtype)
    s = state.clone()
    for i in range(q.shape[0]):
        read = torch.bmm(readers[i], s)                                   # [H, 2C, Dv]
        v_new = new_values[i] - read[:, :chunk]
        torch.baddbmm(read[:, chunk:], intra[i], v_new, out=out[i])
        s.mul_(chunk_decay[i]).baddbmm_(k_tail[i], v_new)
    state.copy_(s)
    return out.transpose(1, 2).reshape(-1, heads, dv)[:length]


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """Qwen3-Next's output norm: ``weight * rmsnorm(x) * silu(gate)``, cast to ``dtype``.

    Unlike the model's other RMSNorms the weight is *not* zero-centered (it multiplies
    directly, initialized to ones). Rounding follows transformers' ``Qwen3NextRMSNormGated``:
    the delta-rule output is first rounded to ``dtype``, normalized in fp32, rounded again
    before the weight multiply, and the SiLU gate is applied in fp32.
    """
    # layers.rms_norm rounds exactly there: fp32 norm (fused), cast, then the weight multiply
    return rms_norm(x.to(dtype), weight, eps).mul(F.silu(gate.float())).to(dtype)
