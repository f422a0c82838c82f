"""config.json -> ``ArchConfig``: the fields the planner and model code need, defaults filled in.

transformers' config classes are the reference for what a field means and its default. Importing
them costs ~2 s (they import torch), which `plan` cannot afford, so when the file spells out every
field we need (published and transformers-saved configs do) we read those fields directly, and only
a config that leaves one out is routed through the transformers class for its default.
tests/test_checkpoint.py checks that both paths agree on every model we build.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from qwen_runner.errors import CheckpointError, UnsupportedModelError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"

# model_type -> the architectures our model code implements (config.json names both).
SUPPORTED_MODEL_TYPES = {
    "qwen3_next": "Qwen3NextForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}
FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"
# Sanity bound on num_hidden_layers (the largest Qwen has 94): per-layer tables are sized by it.
MAX_LAYERS = 4096
# Qwen3-Next without explicit layer_types: every 4th layer is full attention (transformers' default).
DEFAULT_FULL_ATTENTION_INTERVAL = 4

@dataclass(frozen=True)
class ArchConfig:
    """The fields of config.json the planner and model code need, defaults filled in."""

    model_type: str
    architecture: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    intermediate_size: int
    layer_types: tuple[str, ...]
    mlp_only_layers: tuple[int, ...]
    decoder_sparse_step: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    dtype: str
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0


# Fields every supported config must provide (directly or through the transformers default).
_COMMON_FIELDS = (
    "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "num_key_value_heads",
    "num_experts_per_tok", "moe_intermediate_size", "intermediate_size", "tie_word_embeddings",
    "max_position_embeddings", "decoder_sparse_step", "mlp_only_layers",
)
_EXTRA_FIELDS = {
    "qwen3_moe": (),
    "qwen2_moe": ("shared_expert_intermediate_size",),
    "qwen3_next": (
        "shared_expert_intermediate_size", "head_dim", "linear_num_key_heads", "linear_num_value_heads",
        "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim",
    ),
}


def load_json(path: Path, what: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise CheckpointError(f"cannot read {what} {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{what} {path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{what} {path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} is not a JSON object")
    return data


def _num_experts(raw: dict) -> int | None:
    # transformers 5 writes num_local_experts for Qwen3-MoE (num_experts is its alias); 4.x wrote num_experts.
    value = raw.get("num_experts", raw.get("num_local_experts"))
    return value


def _via_transformers(model_type: str, raw: dict) -> dict:
    """Fill missing fields from transformers' config class for ``model_type`` (no remote code)."""
    from transformers import CONFIG_MAPPING  # slow: imports torch

    cls = CONFIG_MAPPING[model_type]
    known = {k: v for k, v in raw.items() if k not in ("auto_map",)}
    try:
        cfg = cls(**known)
    except Exception as err:  # noqa: BLE001 - transformers' validators raise assorted types; all mean "bad config"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"config.json is not a valid {cls.__name__}: {first}") from None
    out = cfg.to_dict()
    out["num_experts"] = getattr(cfg, "num_experts", None)
    out["layer_types"] = getattr(cfg, "layer_types", None)
    out["head_dim"] = getattr(cfg, "head_dim", None)
    return out


def _int_field(raw: dict, key: str, minimum: int = 0) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CheckpointError(f"config.json field {key}={value!r} is not an integer >= {minimum}")
    return value


def parse_config(raw: dict, force_transformers: bool = False) -> ArchConfig:
    """config.json contents -> ArchConfig; UnsupportedModelError for architectures we do not run."""
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
        shown = model_type if isinstance(model_type, str) else "missing"
        raise UnsupportedModelError(f"unsupported architecture: model_type {shown!r} ({', '.join(map(str, archs)) or 'no architectures'})")
    expected = SUPPORTED_MODEL_TYPES[model_type]
    if archs and expected not in archs:
        raise UnsupportedModelError(f"unsupported architecture {archs} for model_type {model_type!r}; expected {expected}")
    needed = _COMMON_FIELDS + _EXTRA_FIELDS[model_type]
    missing = [k for k in needed if k not in raw] + ([] if _num_experts(raw) is not None else ["num_experts"])
    if model_type == "qwen3_next" and "layer_types" not in raw:
        interval = raw.get("full_attention_interval")
        if isinstance(interval, int) and not isinstance(interval, bool) and interval > 0 and isinstance(raw.get("num_hidden_layers"), int):
            # Published Qwen3-Next configs give the interval, not the list; same rule as transformers.
            raw = {**raw, "layer_types": [
                LINEAR_ATTENTION if (i + 1) % interval else FULL_ATTENTION for i in range(raw["num_hidden_layers"])
            ]}
        else:
            missing.append("layer_types")
    if missing or force_transformers:
        log.debug("config.json lacks %s: reading it through transformers' config class", missing)
        raw = {**raw, **_via_transformers(model_type, raw)}

    layers = _int_field(raw, "num_hidden_layers", 1)
    if layers > MAX_LAYERS:
        raise CheckpointError(f"config.json num_hidden_layers={layers} is implausible (more than {MAX_LAYERS})")
    heads = _int_field(raw, "num_attention_heads", 1)
    hidden = _int_field(raw, "hidden_size", 1)
    layer_types = raw.get("layer_types")
    if model_type == "qwen3_next":
        if not isinstance(layer_types, list) or len(layer_types) != layers:
            raise CheckpointError(f"config.json layer_types must list {layers} entries, got {layer_types!r:.80}")
        if any(t not in (FULL_ATTENTION, LINEAR_ATTENTION) for t in layer_types):
            raise CheckpointError(f"config.json layer_types has unknown entries: {sorted(set(layer_types))}")
    else:
        layer_types = [FULL_ATTENTION] * layers
    head_dim = raw.get("head_dim") or hidden // heads
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    mlp_only = raw.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(isinstance(i, int) for i in mlp_only):
        raise CheckpointError(f"config.json mlp_only_layers={mlp_only!r} is not a list of layer numbers")
    experts = _num_experts(raw)
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
        raise CheckpointError(f"config.json num_experts={experts!r} is not a positive integer")
    top_k = _int_field(raw, "num_experts_per_tok", 1)
    if top_k > experts:
        raise CheckpointError(f"config.json num_experts_per_tok={top_k} exceeds num_experts={experts}")
    linear = {}
    if model_type == "qwen3_next":
        linear = {k: _int_field(raw, k, 1) for k in _EXTRA_FIELDS["qwen3_next"] if k.startswith("linear_")}
    return ArchConfig(
        model_type=model_type,
        architecture=expected,
        hidden_size=hidden,
        num_layers=layers,
        vocab_size=_int_field(raw, "vocab_size", 1),
        num_attention_heads=heads,
        num_kv_heads=_int_field(raw, "num_key_value_heads", 1),
        head_dim=int(head_dim),
        num_experts=experts,
        top_k=top_k,
        moe_intermediate_size=_int_field(raw, "moe_intermediate_size", 1),
        shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0),
        intermediate_size=_int_field(raw, "intermediate_size", 0),
        layer_types=tuple(layer_types),
        mlp_only_layers=tuple(mlp_only),
        decoder_sparse_step=_int_field(raw, "decoder_sparse_step", 1),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=_int_field(raw, "max_position_embeddings", 1),
        dtype=str(dtype),
        **linear,
    )


def read_config(model_dir: Path) -> tuple[ArchConfig, dict]:
    """(ArchConfig, raw config dict) of a checkpoint directory."""
    raw = load_json(Path(model_dir) / CONFIG_FILE, CONFIG_FILE)
    return parse_config(raw), raw
