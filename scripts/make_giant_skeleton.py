#!/usr/bin/env python
"""Full-scale checkpoint *skeletons*: real configs and real safetensors headers, data as sparse holes.

Each skeleton is what a published int4 AutoRound export of the model looks like to anything that reads
headers (every tensor name, shape and dtype; ~5 GB shards with an index), but its tensor data are holes:
a ~41 GB Qwen3-Next-80B-A3B takes ~0 bytes of disk. The planner, and later the cache builder's
streaming logic, can then be exercised at full scale on a 24 GiB box. Reading the data gives zeros.

    python scripts/make_giant_skeleton.py                 # all of them, under models/skeletons/
    python scripts/make_giant_skeleton.py --only qwen3-next-80b-a3b-int4 --out /tmp/sk

Formats follow auto-round's auto_gptq packing for each quantized nn.Linear(in, out):
``qweight`` int32 [in*bits/32, out], ``qzeros`` int32 [in/group, out*bits/32], ``scales`` fp16
[in/group, out]; routers (``mlp.gate``), ``shared_expert_gate``, embeddings, lm_head, norms and the small
linear-attention parameters stay 16-bit and are listed in ``extra_config`` as bits 16 where they are
linears, as auto-round writes them.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "models" / "skeletons"
SHARD_BYTES = 5 * 1000**3  # published shards are ~5 GB
GROUP_SIZE = 128
INT4, INT8, FLOAT = 4, 8, 16
PACK_BITS = 32
HEADER_ALIGN = 8  # safetensors pads the JSON header with spaces to a multiple of 8
FLOAT_DTYPE, SCALE_DTYPE, PACK_DTYPE = "BF16", "F16", "I32"
DTYPE_BYTES = {"BF16": 2, "F16": 2, "I32": 4, "F32": 4}

log = logging.getLogger("make_giant_skeleton")

_COMMON = {
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
    "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "vocab_size": 151936, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "norm_topk_prob": True, "output_router_logits": False, "router_aux_loss_coef": 0.001,
}
# The published config.json files (Qwen/Qwen3-Next-80B-A3B-Instruct, Qwen/Qwen3-30B-A3B,
# Qwen/Qwen3-235B-A22B); the Qwen3-Next values equal transformers' Qwen3NextConfig defaults.
CONFIGS = {
    "qwen3-next-80b-a3b": {
        **_COMMON, "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
        "attention_bias": False, "full_attention_interval": 4, "head_dim": 256, "hidden_size": 2048,
        "intermediate_size": 5120, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
        "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_value_head_dim": 128,
        "max_position_embeddings": 262144, "moe_intermediate_size": 512, "num_attention_heads": 16,
        "num_experts": 512, "num_experts_per_tok": 10, "num_hidden_layers": 48, "num_key_value_heads": 2,
        "partial_rotary_factor": 0.25, "rope_theta": 10000000, "shared_expert_intermediate_size": 512,
        "use_sliding_window": False,
    },
    "qwen3-30b-a3b": {
        **_COMMON, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "attention_bias": False, "head_dim": 128, "hidden_size": 2048, "intermediate_size": 6144,
        "max_position_embeddings": 40960, "max_window_layers": 48, "moe_intermediate_size": 768,
        "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_key_value_heads": 4, "rope_theta": 1000000.0, "sliding_window": None, "use_sliding_window": False,
    },
    "qwen3-235b-a22b": {
        **_COMMON, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "attention_bias": False, "head_dim": 128, "hidden_size": 4096, "intermediate_size": 12288,
        "max_position_embeddings": 40960, "max_window_layers": 94, "moe_intermediate_size": 1536,
        "num_attention_heads": 64, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 94,
        "num_key_value_heads": 4, "rope_theta": 1000000.0, "sliding_window": None, "use_sliding_window": False,
    },
}
# skeleton name -> (config, recipe)
SKELETONS = {
    "qwen3-next-80b-a3b-int4": ("qwen3-next-80b-a3b", "int4"),
    "qwen3-next-80b-a3b-int4-mixed": ("qwen3-next-80b-a3b", "mixed"),
    "qwen3-30b-a3b-int4": ("qwen3-30b-a3b", "int4"),
    "qwen3-235b-a22b-int4": ("qwen3-235b-a22b", "int4"),
}


def _layer_linears(cfg: dict, i: int) -> tuple[list[tuple[str, int, int, str]], list[tuple[str, tuple, str]]]:
    """(linears as (module, in, out, kind), other tensors as (name, shape, dtype)) of decoder layer i.

    kind: "expert", "router", "gate" (shared_expert_gate), or "dense" (attention, shared expert).
    """
    h, p = cfg["hidden_size"], f"model.layers.{i}"
    linears: list[tuple[str, int, int, str]] = []
    other: list[tuple[str, tuple, str]] = [
        (f"{p}.input_layernorm.weight", (h,), FLOAT_DTYPE),
        (f"{p}.post_attention_layernorm.weight", (h,), FLOAT_DTYPE),
    ]
    full = cfg["model_type"] != "qwen3_next" or (i + 1) % cfg["full_attention_interval"] == 0
    if full:
        heads, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        gated = 2 if cfg["model_type"] == "qwen3_next" else 1  # Qwen3-Next's q_proj also emits the output gate
        linears += [
            (f"{p}.self_attn.q_proj", h, heads * hd * gated, "dense"),
            (f"{p}.self_attn.k_proj", h, kv * hd, "dense"),
            (f"{p}.self_attn.v_proj", h, kv * hd, "dense"),
            (f"{p}.self_attn.o_proj", heads * hd, h, "dense"),
        ]
        other += [(f"{p}.self_attn.q_norm.weight", (hd,), FLOAT_DTYPE), (f"{p}.self_attn.k_norm.weight", (hd,), FLOAT_DTYPE)]
    else:
        nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
        dk, dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
        key_dim, value_dim = nk * dk, nv * dv
        linears += [
            (f"{p}.linear_attn.in_proj_qkvz", h, 2 * key_dim + 2 * value_dim, "dense"),
            (f"{p}.linear_attn.in_proj_ba", h, 2 * nv, "dense"),
            (f"{p}.linear_attn.out_proj", value_dim, h, "dense"),
        ]
        other += [
            (f"{p}.linear_attn.conv1d.weight", (2 * key_dim + value_dim, 1, cfg["linear_conv_kernel_dim"]), FLOAT_DTYPE),
            (f"{p}.linear_attn.dt_bias", (nv,), FLOAT_DTYPE),
            (f"{p}.linear_attn.A_log", (nv,), FLOAT_DTYPE),
            (f"{p}.linear_attn.norm.weight", (dv,), FLOAT_DTYPE),
        ]
    moe = cfg["moe_intermediate_size"]
    linears.append((f"{p}.mlp.gate", h, cfg["num_experts"], "router"))
    for e in range(cfg["num_experts"]):
        q = f"{p}.mlp.experts.{e}"
        linears += [(f"{q}.gate_proj", h, moe, "expert"), (f"{q}.up_proj", h, moe, "expert"), (f"{q}.down_proj", moe, h, "expert")]
    shared = cfg.get("shared_expert_intermediate_size", 0)
    if shared and cfg["model_type"] == "qwen3_next":
        q = f"{p}.mlp.shared_expert"
        linears += [(f"{q}.gate_proj", h, shared, "dense"), (f"{q}.up_proj", h, shared, "dense"), (f"{q}.down_proj", shared, h, "dense")]
        linears.append((f"{p}.mlp.shared_expert_gate", h, 1, "gate"))
    return linears, other


def _bits(kind: str, recipe: str) -> int:
    if kind in ("router", "gate"):
        return FLOAT
    if kind == "dense" and recipe == "mixed":
        return INT8
    return INT4


def _linear_tensors(module: str, n_in: int, n_out: int, bits: int) -> list[tuple[str, tuple, str]]:
    if bits >= FLOAT:
        return [(f"{module}.weight", (n_out, n_in), FLOAT_DTYPE)]
    groups = math.ceil(n_in / GROUP_SIZE)
    return [
        (f"{module}.qweight", (n_in * bits // PACK_BITS, n_out), PACK_DTYPE),
        (f"{module}.qzeros", (groups, n_out * bits // PACK_BITS), PACK_DTYPE),
        (f"{module}.scales", (groups, n_out), SCALE_DTYPE),
    ]


def skeleton_tensors(cfg: dict, recipe: str) -> tuple[list[tuple[str, tuple, str]], dict]:
    """Every tensor of the checkpoint in file order, and the quantization_config describing them."""
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    tensors: list[tuple[str, tuple, str]] = [("model.embed_tokens.weight", (vocab, h), FLOAT_DTYPE)]
    extra: dict[str, dict] = {}
    for i in range(cfg["num_hidden_layers"]):
        linears, other = _layer_linears(cfg, i)
        for module, n_in, n_out, kind in linears:
            bits = _bits(kind, recipe)
            if bits != INT4:
                extra[module] = {"bits": bits} if bits < FLOAT else {"bits": FLOAT, "data_type": "float"}
            tensors += _linear_tensors(module, n_in, n_out, bits)
        tensors += other
    tensors += [("model.norm.weight", (h,), FLOAT_DTYPE), ("lm_head.weight", (vocab, h), FLOAT_DTYPE)]
    qcfg = {
        "quant_method": "auto-round", "bits": INT4, "group_size": GROUP_SIZE, "sym": True,
        "data_type": "int", "packing_format": "auto_round:auto_gptq", "iters": 200,
        "block_name_to_quantize": "model.layers", "extra_config": extra,
    }
    return tensors, qcfg


def _nbytes(shape: tuple, dtype: str) -> int:
    return math.prod(shape) * DTYPE_BYTES[dtype]


def _write_shard(path: Path, entries: list[tuple[str, tuple, str]]) -> int:
    """Header for ``entries``, then a hole the size of their data. Returns the data size."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % HEADER_ALIGN)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        f.truncate(8 + len(blob) + offset)  # sparse: no data blocks are written
    tmp.replace(path)
    return offset


def make_skeleton(name: str, out: Path) -> Path:
    """Write skeleton ``name`` under ``out``; the cyclic GC is paused (10^5 headers entries, no cycles)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _make_skeleton(name, out)
    finally:
        if was_enabled:
            gc.enable()


def _make_skeleton(name: str, out: Path) -> Path:
    config_name, recipe = SKELETONS[name]
    cfg = dict(CONFIGS[config_name])
    tensors, qcfg = skeleton_tensors(cfg, recipe)
    target = out / name
    target.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, tuple, str]]] = [[]]
    size = 0
    for entry in tensors:
        nbytes = _nbytes(entry[1], entry[2])
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    weight_map, total = {}, 0
    for old in target.glob("*.safetensors"):
        old.unlink()
    for k, entries in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        total += _write_shard(target / file, entries)
        weight_map.update({n: file for n, _, _ in entries})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (target / "config.json").write_text(json.dumps({**cfg, "quantization_config": qcfg}, indent=2) + "\n")
    log.info("%s: %d tensors, %d shards, %.1f GB apparent", name, len(tensors), len(shards), total / 1e9)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"parent folder (default {DEFAULT_OUT})")
    parser.add_argument("--only", choices=sorted(SKELETONS), action="append", help="make just this one (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.only or list(SKELETONS):
        print(make_skeleton(name, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
