"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): GQA attention with q/k RMSNorm, top-k MoE.

The decoder here is also the Qwen2-MoE decoder (``qwen2_moe`` switches on qkv bias and
the shared expert through ``ModelArgs``), so both files share one forward and one
checkpoint mapping.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from qwen_runner.errors import UnsupportedModelError
from qwen_runner.models import quantized
from qwen_runner.models.layers import (
    Attention, CausalLM, DenseMLP, KVCache, Linear, RMSNorm, RotaryEmbedding, SparseMoE,
    gemv_threads, matmul_backend, thread_limit,
)

log = logging.getLogger(__name__)

ARCHITECTURE = "Qwen3MoeForCausalLM"
# Tokens per internal prefill step: bounds the attention score matrix and MoE buffers.
DEFAULT_PREFILL_CHUNK = 512
# Forwards of at most this many tokens run their matmuls on ATen's GEMV instead of oneDNN
# (see layers.matmul_backend for the measurement).
NATIVE_MATMUL_MAX_TOKENS = 1
DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class ModelArgs:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    intermediate_size: int  # dense MLP layers (mlp_only_layers / decoder_sparse_step)
    norm_topk_prob: bool
    sparse_layers: tuple[bool, ...]  # per layer: MoE (True) or dense MLP (False)
    tie_word_embeddings: bool
    qk_norm: bool = True
    qkv_bias: bool = False
    shared_expert_intermediate_size: int | None = None  # Qwen2-MoE only


def rope_theta_of(config: dict) -> float:
    """rope_theta from ``rope_parameters`` (transformers 5) or the top level (older configs).

    Only the default rope is implemented; a scaled rope (yarn, ...) would silently change
    positions, so it is refused.
    """
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UnsupportedModelError(f"rope type {rope_type!r} is not implemented (only the default rope)")
    return float(rope.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA)))


def sparse_layer_pattern(config: dict, num_layers: int, num_experts: int) -> tuple[bool, ...]:
    """Which layers are MoE: transformers' rule (mlp_only_layers, decoder_sparse_step)."""
    dense = set(config.get("mlp_only_layers") or [])
    step = config.get("decoder_sparse_step", 1) or 1
    return tuple(i not in dense and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers))


def args_from_config(config: dict) -> ModelArgs:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    layers = config["num_hidden_layers"]
    experts = config.get("num_experts", config.get("num_local_experts", 0))
    if config.get("use_sliding_window"):
        raise UnsupportedModelError("sliding-window attention is not implemented")
    return ModelArgs(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads", heads),
        head_dim=config.get("head_dim") or hidden // heads,
        vocab_size=config["vocab_size"],
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta_of(config),
        num_experts=experts,
        top_k=config["num_experts_per_tok"],
        moe_intermediate_size=config["moe_intermediate_size"],
        intermediate_size=config.get("intermediate_size", 0),
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        sparse_layers=sparse_layer_pattern(config, layers, experts),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qk_norm=True,
        qkv_bias=bool(config.get("attention_bias", False)),
    )


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, sparse: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim,
                                   qkv_bias=args.qkv_bias, qk_norm=args.qk_norm, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        if sparse:
            self.mlp = SparseMoE(args.hidden_size, args.num_experts, args.top_k, args.moe_intermediate_size,
                                 args.norm_topk_prob, args.shared_expert_intermediate_size)
        else:
            self.mlp = DenseMLP(args.hidden_size, args.intermediate_size)

    def forward(self, x: torch.Tensor, cache: KVCache, slot: int, rope) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cache, slot, rope)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(CausalLM):
    """Decoder-only MoE transformer; ``forward(input_ids [1, T], cache)`` -> fp32 logits."""

    architecture = ARCHITECTURE
    args_from_config = staticmethod(args_from_config)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.config_args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, sparse) for sparse in args.sparse_layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rope = RotaryEmbedding(args.head_dim, args.rope_theta)
        self.prefill_chunk = DEFAULT_PREFILL_CHUNK
        self.native_matmul_max_tokens = NATIVE_MATMUL_MAX_TOKENS
        self._layer_gemv_bytes: int | None = None

    def decode_weight_bytes(self) -> int:
        """Weight bytes one decoded token reads: all but the unchosen experts and all but one embedding row.

        The basis of every GB/s figure (bytes x tok/s); the KV cache reads are not included.
        """
        a = self.config_args
        total = 0
        for name, p in self.named_parameters():
            size = p.numel() * p.element_size()
            if name == "embed_tokens.weight":
                size = p.shape[1] * p.element_size()
            elif ".experts." in name:
                size = size * a.top_k // a.num_experts
            total += size
        return total

    def make_cache(self, max_context: int) -> KVCache:
        a = self.config_args
        return KVCache(a.num_layers, a.num_kv_heads, a.head_dim, max_context, self.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Append ``input_ids [1, T]`` to ``cache``; logits ``[1, T, vocab]`` (``[1, 1, vocab]`` if last_only)."""
        ids = input_ids.reshape(-1)
        length = ids.shape[0]
        cache.check_room(length)
        with matmul_backend(onednn=length > self.native_matmul_max_tokens):
            return self._forward(ids, cache, last_only)

    def _forward(self, ids: torch.Tensor, cache: KVCache, last_only: bool) -> torch.Tensor:
        length = ids.shape[0]
        threads = torch.get_num_threads()
        decode = length <= self.native_matmul_max_tokens
        hidden = []
        for begin in range(0, length, self.prefill_chunk):
            chunk = ids[begin:begin + self.prefill_chunk]
            # decode: the layers' GEMVs are small, so they run on fewer threads than the lm_head
            with thread_limit(gemv_threads(self._largest_layer_gemv_bytes(), threads) if decode else threads):
                x = self._layers(chunk, cache)
            if not last_only or begin + self.prefill_chunk >= length:
                hidden.append(x[-1:] if last_only else x)
        x = hidden[0] if len(hidden) == 1 else torch.cat(hidden)
        return self.lm_head(self.norm(x)).float().unsqueeze(0)

    def _largest_layer_gemv_bytes(self) -> int:
        """Bytes of the largest single weight matrix a decoded token reads inside the layers
        (an expert's share of a stacked tensor; int4 weights count at their packed size)."""
        if self._layer_gemv_bytes is None:
            experts = self.config_args.num_experts or 1
            self._layer_gemv_bytes = max([1] + [
                p.nbytes // (experts if ".experts." in name else 1)
                for name, p in self.layers.named_parameters() if p.dim() >= 2])
            # the fused C++ MoE ops (bf16, int4) read the top-k experts' w13 and w2 in one call
            for layer in self.layers:
                experts = getattr(layer.mlp, "experts", None)
                fused = experts.fused_decode_bytes(layer.mlp.top_k) if experts is not None else None
                self._layer_gemv_bytes = max(self._layer_gemv_bytes, fused or 0)
        return self._layer_gemv_bytes

    def _layers(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        length = ids.shape[0]
        x = self.embed_tokens(ids)
        rope = self.rope.slice_signed(cache.length, length, x.dtype)
        for slot, layer in enumerate(self.layers):
            x = layer(x, cache, slot, rope)
        cache.advance(length)
        return x


# --------------------------------------------------------------------------- checkpoint mapping

def _fused(reader, keys: list[str], dtype: torch.dtype) -> torch.Tensor:
    """Concatenate checkpoint tensors along dim 0 into one new tensor (qkv, gate+up)."""
    parts = [reader.get(k) for k in keys]
    if any(isinstance(p, quantized.QWeight) for p in parts):
        return quantized.cat_rows([p if isinstance(p, quantized.QWeight) else p.to(dtype) for p in parts])
    out = torch.empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), dtype=dtype)
    begin = 0
    for p in parts:
        out[begin:begin + p.shape[0]] = p
        begin += p.shape[0]
    return out


def _stacked_experts(reader, prefix: str, num_experts: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert ``{gate,up,down}_proj`` -> ``w13 [E, 2I, H]``, ``w2 [E, H, I]``, one expert at a time."""
    if isinstance(reader.get(f"{prefix}.0.down_proj.weight"), quantized.QWeight):
        return quantized.stacked_experts(reader, prefix, num_experts, dtype)
    w13 = w2 = None
    for e in range(num_experts):
        gate = reader.get(f"{prefix}.{e}.gate_proj.weight")
        up = reader.get(f"{prefix}.{e}.up_proj.weight")
        down = reader.get(f"{prefix}.{e}.down_proj.weight")
        if w13 is None:
            inter = gate.shape[0]
            w13 = torch.empty((num_experts, 2 * inter, gate.shape[1]), dtype=dtype)
            w2 = torch.empty((num_experts, *down.shape), dtype=dtype)
        w13[e, :inter] = gate
        w13[e, inter:] = up
        w2[e] = down
    return w13, w2


def checkpoint_state(reader, args: ModelArgs, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Published HF keys -> our parameters, one layer at a time.

    ``q/k/v_proj`` fuse into ``qkv_proj``; per-expert ``gate/up/down_proj`` stack into
    ``experts.w13/w2``; dense and shared-expert MLPs fuse gate+up into ``w13``.
    """
    embed = reader.get("model.embed_tokens.weight", dtype)
    yield "embed_tokens.weight", embed
    if not args.tie_word_embeddings:
        embed = None  # else the cache builder would hold the embedding through every layer
    for i, sparse in enumerate(args.sparse_layers):
        src, dst = f"model.layers.{i}", f"layers.{i}"
        yield f"{dst}.input_layernorm.weight", reader.get(f"{src}.input_layernorm.weight", dtype)
        yield f"{dst}.post_attention_layernorm.weight", reader.get(f"{src}.post_attention_layernorm.weight", dtype)
        attn = f"{src}.self_attn"
        yield f"{dst}.self_attn.qkv_proj.weight", _fused(reader, [f"{attn}.{p}_proj.weight" for p in "qkv"], dtype)
        if args.qkv_bias:
            yield f"{dst}.self_attn.qkv_proj.bias", _fused(reader, [f"{attn}.{p}_proj.bias" for p in "qkv"], dtype)
        yield f"{dst}.self_attn.o_proj.weight", reader.get(f"{attn}.o_proj.weight", dtype)
        if args.qk_norm:
            yield f"{dst}.self_attn.q_norm.weight", reader.get(f"{attn}.q_norm.weight", dtype)
            yield f"{dst}.self_attn.k_norm.weight", reader.get(f"{attn}.k_norm.weight", dtype)
        mlp = f"{src}.mlp"
        if not sparse:
            yield f"{dst}.mlp.w13", _fused(reader, [f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"], dtype)
            yield f"{dst}.mlp.w2", reader.get(f"{mlp}.down_proj.weight", dtype)
            continue
        yield f"{dst}.mlp.gate.weight", reader.get(f"{mlp}.gate.weight", dtype)
        w13, w2 = _stacked_experts(reader, f"{mlp}.experts", args.num_experts, dtype)
        yield f"{dst}.mlp.experts.w13", w13
        yield f"{dst}.mlp.experts.w2", w2
        if args.shared_expert_intermediate_size:
            shared = f"{mlp}.shared_expert"
            yield f"{dst}.mlp.shared_expert.w13", _fused(
                reader, [f"{shared}.gate_proj.weight", f"{shared}.up_proj.weight"], dtype)
            yield f"{dst}.mlp.shared_expert.w2", reader.get(f"{shared}.down_proj.weight", dtype)
            yield f"{dst}.mlp.shared_expert_gate.weight", reader.get(f"{mlp}.shared_expert_gate.weight", dtype)
    yield "norm.weight", reader.get("model.norm.weight", dtype)
    if args.tie_word_embeddings:
        yield "lm_head.weight", embed  # the same tensor: tied weights cost no second copy
    else:
        yield "lm_head.weight", reader.get("lm_head.weight", dtype)
