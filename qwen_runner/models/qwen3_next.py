"""Qwen3-Next (Qwen3-Next-80B-A3B): hybrid Gated DeltaNet / gated attention layers + MoE.

Layers follow ``layer_types`` (80B-A3B: [linear, linear, linear, full] x 12). A *linear* layer
is a Gated DeltaNet (kernels in ``deltanet``): its memory of the past is a fixed-size state,
(conv window, recurrent state), so decode costs the same at any context length. A *full*
layer is GQA attention whose output is gated by ``sigmoid`` of a second half of ``q_proj``,
with zero-centered q/k RMSNorm and rotary on only the first ``partial_rotary_factor`` of
each head. Every layer ends in a top-k MoE plus a shared expert behind a sigmoid gate
(``layers.SparseMoE``). All RMSNorms except the DeltaNet output norm store ``weight - 1``.

Load-time layout changes (so the decode path does fewer ops):

- ``in_proj_qkvz`` and ``in_proj_ba`` are grouped per key head in the checkpoint
  (``[q k v.. z..]`` per group); we reorder rows into one ``in_proj`` whose output is
  ``[q | k | v | z | b | a]`` with heads in order, so the conv input is one contiguous slice.
- ``q_proj`` (queries and gates interleaved per head), ``k_proj``, ``v_proj`` fuse into ``qkv_proj``.
- the conv weight is stored tap-major ``[K, C]`` in fp32, ``A_log`` as ``exp(A_log)``, ``dt_bias`` in fp32
  (values first rounded to the model dtype, as the reference holds them).
- ``mtp.*`` (the multi-token-prediction head) is not used for generation and is skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwen_runner.errors import CheckpointError
from qwen_runner.models import deltanet, quantized
from qwen_runner.models.layers import (CausalLM, DenseMLP, KVCache, Linear, RMSNorm, RotaryEmbedding, SparseMoE,
                                       apply_rotary, attend, gemv_threads, matmul_backend, thread_limit)
from qwen_runner.models.qwen3_moe import _fused, _stacked_experts, rope_theta_of, sparse_layer_pattern

log = logging.getLogger(__name__)

ARCHITECTURE = "Qwen3NextForCausalLM"
LINEAR, FULL = "linear_attention", "full_attention"
# Tokens per internal prefill step: bounds the attention scores, the DeltaNet chunk tensors and MoE buffers.
DEFAULT_PREFILL_CHUNK = 512
# Forwards of at most this many tokens run their matmuls on the one-row GEMV path instead of
# oneDNN (see layers.matmul_backend); prefill keeps oneDNN.
NATIVE_MATMUL_MAX_TOKENS = 1
# transformers' defaults for keys older configs may omit.
DEFAULT_FULL_ATTENTION_INTERVAL = 4
DEFAULT_CONV_KERNEL = 4
# The recurrent state accumulates over the whole context: at least fp32 (fp64 models keep fp64).
MIN_STATE_DTYPE = torch.float32
MTP_PREFIX = "mtp."


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the recurrent state and of the small DeltaNet parameters for a model in ``dtype``."""
    return torch.promote_types(MIN_STATE_DTYPE, dtype)


@dataclass(frozen=True)
class ModelArgs:
    hidden_size: int
    num_layers: int
    layer_types: tuple[str, ...]
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    # gated full attention
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rotary_dim: int
    # Gated DeltaNet
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    conv_kernel: int
    # MoE
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    intermediate_size: int
    norm_topk_prob: bool
    sparse_layers: tuple[bool, ...]

    @property
    def key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels through the causal conv: q, k and v of all heads."""
        return 2 * self.key_dim + self.value_dim

    @property
    def num_linear(self) -> int:
        return sum(t == LINEAR for t in self.layer_types)

    @property
    def num_full(self) -> int:
        return sum(t == FULL for t in self.layer_types)


def layer_types_of(config: dict, num_layers: int) -> tuple[str, ...]:
    """``layer_types`` as written, else transformers' rule: every ``full_attention_interval``-th is full."""
    types = config.get("layer_types")
    if types is None:
        interval = config.get("full_attention_interval", DEFAULT_FULL_ATTENTION_INTERVAL)
        types = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(num_layers)]
    types = tuple(types)
    unknown = set(types) - {LINEAR, FULL}
    if len(types) != num_layers or unknown:
        raise CheckpointError(f"layer_types must list {num_layers} of {LINEAR!r}/{FULL!r}, got {types}")
    return types


def partial_rotary_factor_of(config: dict) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))


def args_from_config(config: dict) -> ModelArgs:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    layers = config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // heads
    experts = config.get("num_experts", 0)
    key_heads, value_heads = config["linear_num_key_heads"], config["linear_num_value_heads"]
    if value_heads % key_heads:
        raise CheckpointError(
            f"linear_num_value_heads {value_heads} is not a multiple of linear_num_key_heads {key_heads}")
    return ModelArgs(
        hidden_size=hidden,
        num_layers=layers,
        layer_types=layer_types_of(config, layers),
        vocab_size=config["vocab_size"],
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads", heads),
        head_dim=head_dim,
        rope_theta=rope_theta_of(config),
        rotary_dim=int(head_dim * partial_rotary_factor_of(config)),
        linear_num_key_heads=key_heads,
        linear_num_value_heads=value_heads,
        linear_key_head_dim=config["linear_key_head_dim"],
        linear_value_head_dim=config["linear_value_head_dim"],
        conv_kernel=config.get("linear_conv_kernel_dim", DEFAULT_CONV_KERNEL),
        num_experts=experts,
        top_k=config["num_experts_per_tok"],
        moe_intermediate_size=config["moe_intermediate_size"],
        shared_expert_intermediate_size=config["shared_expert_intermediate_size"],
        intermediate_size=config.get("intermediate_size", 0),
        norm_topk_prob=bool(config.get("norm_topk_prob", True)),
        sparse_layers=sparse_layer_pattern(config, layers, experts),
    )


# --------------------------------------------------------------------------- cache

def cache_bytes(args: ModelArgs, max_context: int, dtype: torch.dtype) -> int:
    """Bytes ``make_cache(max_context)`` allocates for a model computing in ``dtype``.

    Full-attention layers: keys + values ``[kv_heads, max_context, head_dim]`` in ``dtype``.
    Linear layers: conv window ``[K-1, conv_dim]`` in ``dtype`` + recurrent state
    ``[Hv, Dk, Dv]`` in fp32, independent of the context length. The planner computes the
    same from the checkpoint spec (``ModelSpec.kv_bytes_per_token`` + ``recurrent_state_bytes``);
    tests hold the two and the real allocation equal.
    """
    item = torch.empty((), dtype=dtype).element_size()
    state_item = torch.empty((), dtype=state_dtype(dtype)).element_size()
    kv = 2 * args.num_full * args.num_kv_heads * max_context * args.head_dim * item
    conv = args.num_linear * (args.conv_kernel - 1) * args.conv_dim * item
    recurrent = (args.num_linear * args.linear_num_value_heads * args.linear_key_head_dim
                 * args.linear_value_head_dim * state_item)
    return kv + conv + recurrent


class HybridCache:
    """KV for the full-attention layers + (conv window, recurrent state) for the linear ones.

    Everything is preallocated. ``length`` is the number of tokens seen (the KV cache's).
    Rolling back is only possible to the start (``truncate(0)`` zeroes the states) or to
    where we are: a recurrent state keeps no per-token history, so ``truncate(n)`` for
    ``0 < n < length`` returns False and the caller recomputes from scratch.
    """

    def __init__(self, args: ModelArgs, max_context: int, dtype: torch.dtype):
        self.kv = KVCache(args.num_full, args.num_kv_heads, args.head_dim, max_context, dtype)
        self.conv = torch.zeros(args.num_linear, args.conv_kernel - 1, args.conv_dim, dtype=dtype)
        self.recurrent = torch.zeros(args.num_linear, args.linear_num_value_heads, args.linear_key_head_dim,
                                     args.linear_value_head_dim, dtype=state_dtype(dtype))
        # per-slot views, so layers index a Python list instead of dispatching a select per token
        self.conv_slots = list(self.conv.unbind(0))
        self.recurrent_slots = list(self.recurrent.unbind(0))

    @property
    def length(self) -> int:
        return self.kv.length

    @property
    def max_context(self) -> int:
        return self.kv.max_context

    def check_room(self, new_tokens: int) -> None:
        self.kv.check_room(new_tokens)

    def advance(self, new_tokens: int) -> None:
        self.kv.advance(new_tokens)

    def truncate(self, n: int) -> bool:
        if n == self.length:
            return True
        if n != 0:
            return False
        self.conv.zero_()
        self.recurrent.zero_()
        return self.kv.truncate(0)

    def nbytes(self) -> int:
        return self.kv.nbytes() + sum(t.numel() * t.element_size() for t in (self.conv, self.recurrent))


# --------------------------------------------------------------------------- token mixers

class GatedAttention(nn.Module):
    """GQA attention with an output gate: ``o_proj(attn(q, k, v) * sigmoid(gate))``.

    ``qkv_proj.weight`` rows: the checkpoint's ``q_proj`` (per head: ``head_dim`` query rows
    then ``head_dim`` gate rows), then ``k_proj``, then ``v_proj``.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.qg_size, self.kv_size = 2 * self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = Linear(args.hidden_size, self.qg_size + 2 * self.kv_size, bias=False)
        self.o_proj = Linear(self.heads * self.head_dim, args.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps, zero_centered=True)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps, zero_centered=True)

    def forward(self, x: torch.Tensor, cache: HybridCache, slot: int,
                rope: tuple[torch.Tensor, torch.Tensor], last_only: bool = False) -> torch.Tensor:
        """``x [T, H]`` -> ``[T, H]``, or ``[1, H]`` for the last position only if ``last_only``
        (keys and values of every position still go to the cache)."""
        length, d = x.shape[0], self.head_dim
        qkv = self.qkv_proj(x)
        qg = qkv[:, :self.qg_size].view(length, self.heads, 2 * d)
        k = qkv[:, self.qg_size:self.qg_size + self.kv_size].view(length, self.kv_heads, d)
        v = qkv[:, self.qg_size + self.kv_size:].view(length, self.kv_heads, d)
        q, k = self.q_norm(qg[..., :d]), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        keys, values = cache.kv.write(slot, k.transpose(0, 1), v.transpose(0, 1))
        start = cache.length
        if last_only:
            q, qg, start, length = q[-1:], qg[-1:], start + length - 1, 1
        out = attend(q.transpose(0, 1), keys, values, start, self.scale)
        gate = qg[..., d:].reshape(length, -1)
        return self.o_proj(out.mul_(torch.sigmoid(gate)))


class GatedDeltaNet(nn.Module):
    """Qwen3-Next's linear attention: in_proj -> causal conv -> gated delta rule -> gated norm -> out_proj.

    Parameters (our layout, see the module docstring): ``in_proj.weight`` (rows
    ``[q | k | v | z | b | a]``), ``conv_weight [K, conv_dim]`` fp32, ``dt_bias [Hv]`` fp32,
    ``decay_rate [Hv]`` fp32 (= ``exp(A_log)``), ``norm_weight [Dv]``, ``out_proj.weight``.
    Per token: ``beta = sigmoid(b)``, log decay ``g = -decay_rate * softplus(a + dt_bias)``.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.hk, self.hv = args.linear_num_key_heads, args.linear_num_value_heads
        self.dk, self.dv = args.linear_key_head_dim, args.linear_value_head_dim
        self.key_dim, self.value_dim, self.conv_dim = args.key_dim, args.value_dim, args.conv_dim
        self.eps = args.rms_norm_eps
        self.q_scale = self.dk ** -0.5
        self.in_proj = Linear(args.hidden_size, self.conv_dim + self.value_dim + 2 * self.hv, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(args.conv_kernel, self.conv_dim, dtype=MIN_STATE_DTYPE),
                                        requires_grad=False)
        self.dt_bias = nn.Parameter(torch.empty(self.hv, dtype=MIN_STATE_DTYPE), requires_grad=False)
        self.decay_rate = nn.Parameter(torch.empty(self.hv, dtype=MIN_STATE_DTYPE), requires_grad=False)
        self.norm_weight = nn.Parameter(torch.empty(self.dv), requires_grad=False)
        self.out_proj = Linear(self.value_dim, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache: HybridCache, slot: int, last_only: bool = False) -> torch.Tensor:
        """``x [T, H]`` -> ``[T, H]``, or ``[1, H]`` for the last position only if ``last_only``
        (the states still advance over every position)."""
        length = x.shape[0]
        proj = self.in_proj(x)
        z_end = self.conv_dim + self.value_dim
        state = cache.recurrent_slots[slot]
        # conv output rounded to the model dtype (as the reference does), then fp32 for the delta rule
        mixed = deltanet.causal_conv(proj[:, :self.conv_dim], cache.conv_slots[slot], self.conv_weight).to(state.dtype)
        qk = deltanet.l2norm(mixed[:, :2 * self.key_dim].view(length, 2 * self.hk, self.dk))
        q, k = qk[:, :self.hk].mul(self.q_scale), qk[:, self.hk:]
        v = mixed[:, 2 * self.key_dim:].view(length, self.hv, self.dv)
        # beta's sigmoid runs in the model dtype and g's softplus in fp32, as in the reference
        beta = torch.sigmoid(proj[:, z_end:z_end + self.hv]).to(state.dtype)
        g = F.softplus(proj[:, z_end + self.hv:].to(state.dtype) + self.dt_bias).mul_(self.decay_rate).neg_()
        q, k = deltanet.expand_heads(q, self.hv), deltanet.expand_heads(k, self.hv)
        if length == 1:
            core = deltanet.recurrent_step(q[0], k[0], v[0], g[0].exp(), beta[0], state).unsqueeze(0)
        else:
            core = deltanet.chunked(q, k, v, g, beta, state)
        z = proj[:, self.conv_dim:z_end].view(length, self.hv, self.dv)
        if last_only:
            core, z, length = core[-1:], z[-1:], 1
        out = deltanet.gated_rms_norm(core, z, self.norm_weight, self.eps, x.dtype)
        return self.out_proj(out.reshape(length, self.value_dim))


# --------------------------------------------------------------------------- decoder

class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str, sparse: bool):
        super().__init__()
        self.is_linear = layer_type == LINEAR
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, zero_centered=True)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(args)
        else:
            self.self_attn = GatedAttention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, zero_centered=True)
        if sparse:
            self.mlp = SparseMoE(args.hidden_size, args.num_experts, args.top_k, args.moe_intermediate_size,
                                 args.norm_topk_prob, args.shared_expert_intermediate_size)
        else:
            self.mlp = DenseMLP(args.hidden_size, args.intermediate_size)

    def forward(self, x: torch.Tensor, cache: HybridCache, slot: int, rope, last_only: bool = False,
                threads: tuple[int, int] | None = None) -> torch.Tensor:
        """``last_only``: the mixer still updates the cache for every position, but only the last
        position goes on (residual, MoE), as only its logits are wanted. ``threads``: at most this
        many threads for (the mixer, the MLP/MoE), for decode, whose GEMVs differ in size."""
        mixer_threads, mlp_threads = threads or (torch.get_num_threads(),) * 2
        h = self.input_layernorm(x)
        with thread_limit(mixer_threads):
            if self.is_linear:
                h = self.linear_attn(h, cache, slot, last_only)
            else:
                h = self.self_attn(h, cache, slot, rope, last_only)
        h = h + (x[-1:] if last_only else x)
        with thread_limit(mlp_threads):
            return h + self.mlp(self.post_attention_layernorm(h))


class Model(CausalLM):
    """Hybrid DeltaNet/attention MoE decoder; ``forward(input_ids [1, T], cache)`` -> fp32 logits."""

    architecture = ARCHITECTURE
    args_from_config = staticmethod(args_from_config)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.config_args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(args, kind, sparse) for kind, sparse in zip(args.layer_types, args.sparse_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, zero_centered=True)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rope = RotaryEmbedding(args.rotary_dim, args.rope_theta)
        self.prefill_chunk = DEFAULT_PREFILL_CHUNK
        self.native_matmul_max_tokens = NATIVE_MATMUL_MAX_TOKENS
        self._layer_gemv_bytes: list[tuple[int, int]] | None = None
        # layer i -> its slot in the KV cache (full) or in the state tensors (linear)
        counters = {LINEAR: 0, FULL: 0}
        self.slots: list[int] = []
        for kind in args.layer_types:
            self.slots.append(counters[kind])
            counters[kind] += 1

    def make_cache(self, max_context: int) -> HybridCache:
        return HybridCache(self.config_args, max_context, self.dtype)

    def cache_bytes(self, max_context: int) -> int:
        return cache_bytes(self.config_args, max_context, self.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: HybridCache, last_only: bool = False) -> torch.Tensor:
        """Append ``input_ids [1, T]`` to ``cache``; logits ``[1, T, vocab]`` (``[1, 1, vocab]`` if last_only)."""
        ids = input_ids.reshape(-1)
        length = ids.shape[0]
        if length == 0:
            raise ValueError("forward needs at least one token")
        cache.check_room(length)
        decode = length <= self.native_matmul_max_tokens
        threads = torch.get_num_threads()
        hidden = []
        with matmul_backend(onednn=not decode):
            # decode: the layers' GEMVs are small, so they run on fewer threads than the lm_head
            layer_threads = ([(gemv_threads(mixer, threads), gemv_threads(mlp, threads))
                              for mixer, mlp in self._largest_layer_gemv_bytes()] if decode else None)
            for begin in range(0, length, self.prefill_chunk):
                final = begin + self.prefill_chunk >= length
                x = self._layers(ids[begin:begin + self.prefill_chunk], cache, last_only and final, layer_threads)
                if not last_only or final:
                    hidden.append(x)
            x = hidden[0] if len(hidden) == 1 else torch.cat(hidden)
            return self.lm_head(self.norm(x)).float().unsqueeze(0)

    def _largest_layer_gemv_bytes(self) -> list[tuple[int, int]]:
        """Per layer, bytes of the largest single weight matrix a decoded token reads in (the
        mixer, the MLP/MoE); for stacked experts, one expert's slice."""
        if self._layer_gemv_bytes is None:
            def largest(module: nn.Module) -> int:
                sizes = [p.nbytes // p.shape[0] if name.startswith("experts.") else p.nbytes
                         for name, p in module.named_parameters()]
                experts = getattr(module, "experts", None)
                # the fused C++ MoE ops (bf16, int4) read the top-k experts' w13 and w2 in one call
                fused = experts.fused_decode_bytes(module.top_k) if experts is not None else None
                return max([1, fused or 0] + sizes)
            self._layer_gemv_bytes = [
                (largest(layer.linear_attn if layer.is_linear else layer.self_attn), largest(layer.mlp))
                for layer in self.layers]
        return self._layer_gemv_bytes

    def _layers(self, ids: torch.Tensor, cache: HybridCache, last_only: bool = False,
                layer_threads: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Hidden states ``[T, H]``; with ``last_only`` the last layer finishes only the last position;
        ``layer_threads``: per layer, ``DecoderLayer.forward``'s ``threads``."""
        length = ids.shape[0]
        x = self.embed_tokens(ids)
        rope = self.rope.slice(cache.length, length, x.dtype)
        last = len(self.layers) - 1
        for i, (slot, layer) in enumerate(zip(self.slots, self.layers)):
            x = layer(x, cache, slot, rope, last_only and i == last and length > 1,
                      layer_threads[i] if layer_threads else None)
        cache.advance(length)
        return x


# --------------------------------------------------------------------------- checkpoint mapping

def _grouped_rows(weight: torch.Tensor, groups: int, sizes: list[int]) -> list[torch.Tensor]:
    """Split rows grouped per key head (``[g0: s0 s1 ..][g1: s0 s1 ..]``) into one block per part, heads in order."""
    parts = weight.view(groups, sum(sizes), weight.shape[-1]).split(sizes, dim=1)
    return [p.reshape(-1, weight.shape[-1]) for p in parts]


def linear_in_proj(qkvz: torch.Tensor, ba: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Checkpoint ``in_proj_qkvz`` + ``in_proj_ba`` -> our ``in_proj`` with rows ``[q | k | v | z | b | a]``.

    The checkpoint groups rows per key head: ``[q (Dk), k (Dk), v (r*Dv), z (r*Dv)]`` and
    ``[b (r), a (r)]`` with ``r = Hv / Hk`` (transformers' ``fix_query_key_value_ordering``).
    """
    hk, ratio = args.linear_num_key_heads, args.linear_num_value_heads // args.linear_num_key_heads
    dk, dv = args.linear_key_head_dim, args.linear_value_head_dim
    q, k, v, z = _grouped_rows(qkvz, hk, [dk, dk, ratio * dv, ratio * dv])
    b, a = _grouped_rows(ba, hk, [ratio, ratio])
    return torch.cat((q, k, v, z, b, a))


def checkpoint_state(reader, args: ModelArgs, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Published HF keys -> our parameters, one layer at a time (``mtp.*`` skipped)."""
    mtp = [key for key in reader.keys() if key.startswith(MTP_PREFIX)]
    if mtp:
        log.info("skipping %d multi-token-prediction tensors (%s*)", len(mtp), MTP_PREFIX)
        reader.ignore(mtp)
    embed = reader.get("model.embed_tokens.weight", dtype)
    yield "embed_tokens.weight", embed
    if not args.tie_word_embeddings:
        embed = None  # else the cache builder would hold the embedding through every layer
    for i, (kind, sparse) in enumerate(zip(args.layer_types, args.sparse_layers)):
        src, dst = f"model.layers.{i}", f"layers.{i}"
        yield f"{dst}.input_layernorm.weight", reader.get(f"{src}.input_layernorm.weight", dtype)
        yield f"{dst}.post_attention_layernorm.weight", reader.get(f"{src}.post_attention_layernorm.weight", dtype)
        if kind == LINEAR:
            yield from _linear_attention_state(reader, args, f"{src}.linear_attn", f"{dst}.linear_attn", dtype)
        else:
            attn, out = f"{src}.self_attn", f"{dst}.self_attn"
            yield f"{out}.qkv_proj.weight", _fused(reader, [f"{attn}.{p}_proj.weight" for p in "qkv"], dtype)
            yield f"{out}.o_proj.weight", reader.get(f"{attn}.o_proj.weight", dtype)
            yield f"{out}.q_norm.weight", reader.get(f"{attn}.q_norm.weight", dtype)
            yield f"{out}.k_norm.weight", reader.get(f"{attn}.k_norm.weight", dtype)
        mlp = f"{src}.mlp"
        if not sparse:
            yield f"{dst}.mlp.w13", _fused(reader, [f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"], dtype)
            yield f"{dst}.mlp.w2", reader.get(f"{mlp}.down_proj.weight", dtype)
            continue
        yield f"{dst}.mlp.gate.weight", reader.get(f"{mlp}.gate.weight", dtype)
        w13, w2 = _stacked_experts(reader, f"{mlp}.experts", args.num_experts, dtype)
        yield f"{dst}.mlp.experts.w13", w13
        yield f"{dst}.mlp.experts.w2", w2
        shared = f"{mlp}.shared_expert"
        yield f"{dst}.mlp.shared_expert.w13", _fused(
            reader, [f"{shared}.gate_proj.weight", f"{shared}.up_proj.weight"], dtype)
        yield f"{dst}.mlp.shared_expert.w2", reader.get(f"{shared}.down_proj.weight", dtype)
        yield f"{dst}.mlp.shared_expert_gate.weight", reader.get(f"{mlp}.shared_expert_gate.weight", dtype)
    yield "norm.weight", reader.get("model.norm.weight", dtype)
    if args.tie_word_embeddings:
        yield "lm_head.weight", embed
    else:
        yield "lm_head.weight", reader.get("lm_head.weight", dtype)


def _linear_attention_state(reader, args: ModelArgs, src: str, dst: str, dtype: torch.dtype):
    """One DeltaNet layer. Small fp32 parameters are first rounded to ``dtype``, as the
    reference holds them in the model dtype and upcasts at use."""
    qkvz = reader.get(f"{src}.in_proj_qkvz.weight", dtype)
    ba = reader.get(f"{src}.in_proj_ba.weight", dtype)
    if isinstance(qkvz, quantized.QWeight) or isinstance(ba, quantized.QWeight):
        # the same row order, applied as an index to the (unpacked) quantized rows
        rows = torch.arange(qkvz.shape[0] + ba.shape[0]).unsqueeze(1)
        order = linear_in_proj(rows[:qkvz.shape[0]], rows[qkvz.shape[0]:], args).squeeze(1)
        yield f"{dst}.in_proj.weight", quantized.select_rows(quantized.cat_rows([qkvz, ba]), order)
    else:
        yield f"{dst}.in_proj.weight", linear_in_proj(qkvz, ba, args)
    conv = reader.get(f"{src}.conv1d.weight", dtype)  # [C, 1, K]
    yield f"{dst}.conv_weight", conv.squeeze(1).t().to(state_dtype(dtype)).contiguous()
    yield f"{dst}.dt_bias", reader.get(f"{src}.dt_bias", dtype).to(state_dtype(dtype))
    yield f"{dst}.decay_rate", reader.get(f"{src}.A_log", dtype).to(state_dtype(dtype)).exp()
    yield f"{dst}.norm_weight", reader.get(f"{src}.norm.weight", dtype)
    yield f"{dst}.out_proj.weight", reader.get(f"{src}.out_proj.weight", dtype)


def state_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    """Cache bytes each extra token of context costs (only the full-attention KV grows)."""
    return cache_bytes(args, 1, dtype) - cache_bytes(args, 0, dtype)


__all__ = ["ARCHITECTURE", "ModelArgs", "Model", "HybridCache", "args_from_config", "cache_bytes",
           "checkpoint_state", "linear_in_proj", "state_bytes_per_token"]
