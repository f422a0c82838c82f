"""Resolving and inspecting a checkpoint without loading its weights.

``inspect_checkpoint(dir)`` reads config.json, the safetensors index and each shard's *header* (the
first 8 + N bytes of the file; never the data) and returns a ``ModelSpec``: what the model is, what
every tensor costs, and how many bytes one decoded token reads. It must be fast (the 80B checkpoint has
~220k tensors in its headers) and must turn every malformed input into one ``CheckpointError`` line.
config.json is read by ``arch_config`` (why not through transformers' classes directly: see there).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from qwen_runner import quant as Q
from qwen_runner.arch_config import (  # noqa: F401  (re-exported: the planner and tests read them here)
    CONFIG_FILE, FULL_ATTENTION, LINEAR_ATTENTION, SUPPORTED_MODEL_TYPES, ArchConfig, load_json, parse_config,
    read_config,
)
from qwen_runner.errors import CheckpointError, ModelNotFoundError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_SUFFIX = ".safetensors"
# safetensors' own reader refuses headers above 100 MB; so do we (a corrupt length must not make us
# allocate gigabytes).
MAX_HEADER_BYTES = 100 * 1000 * 1000
HEADER_LENGTH_BYTES = 8
METADATA_KEY = "__metadata__"
_QWEIGHT = ".qweight"

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


# Tensor roles, by what a decoded token does with them.
EMBEDDING, LM_HEAD, FINAL_NORM = "embedding", "lm_head", "final_norm"
ATTENTION, ROUTER, EXPERT, SHARED_EXPERT, DENSE_MLP, OTHER = (
    "attention", "router", "expert", "shared_expert", "dense_mlp", "other",
)
_LAYER_PREFIX = "model.layers."
_MLP_BLOCKS = ("mlp", "block_sparse_moe")


# --------------------------------------------------------------------------------------------- MODEL


def _hf_hub_cache(env: dict[str, str] | None = None) -> Path:
    """Where huggingface_hub keeps downloads (same precedence as huggingface_hub.constants)."""
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    home = Path(env["HF_HOME"]).expanduser() if env.get("HF_HOME") else Path.home() / ".cache" / "huggingface"
    return home / "hub"


def _from_hf_cache(repo_id: str, env: dict[str, str] | None = None) -> Path | None:
    """The snapshot directory of ``org/name`` if it is already in the local HF cache (offline, no network)."""
    repo_dir = _hf_hub_cache(env) / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    snapshots = repo_dir / "snapshots"
    if ref.is_file():
        snap = snapshots / ref.read_text().strip()
        if snap.is_dir():
            return snap
    if snapshots.is_dir():  # no refs/main (e.g. a pinned revision): the newest snapshot
        candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        return candidates[0] if candidates else None
    return None


def _looks_like_repo_id(model: str) -> bool:
    return model.count("/") == 1 and not model.startswith((".", "/", "~"))


def resolve_model_dir(model: str) -> Path:
    """A user's MODEL argument -> the checkpoint directory, resolved and checked.

    MODEL is a local directory, or a repo id (``Qwen/Qwen3-30B-A3B``) already in the local Hugging Face
    cache; we never download (the tool runs on boxes without a hub).
    """
    path = Path(model).expanduser()
    if not path.exists() and _looks_like_repo_id(model):
        cached = _from_hf_cache(model)
        if cached is None:
            raise ModelNotFoundError(
                f"model not found: {model} (no such directory, and not in the Hugging Face cache {_hf_hub_cache()})",
                f"download it first (`hf download {model}`) or pass the checkpoint directory",
            )
        path = cached
    if not path.exists():
        raise ModelNotFoundError(f"model not found: {model} (no such file or directory)")
    path = path.resolve()
    if not path.is_dir():
        raise ModelNotFoundError(f"model path is not a directory: {path}")
    if not (path / CONFIG_FILE).is_file():
        raise ModelNotFoundError(f"no {CONFIG_FILE} in {path}: not a Hugging Face checkpoint directory")
    return path


# ----------------------------------------------------------------------------------------- HEADERS


class TensorInfo(NamedTuple):
    """One tensor as its header describes it (a NamedTuple: the 80B checkpoint has ~220k of them)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str
    layer: int | None = None
    role: str = OTHER
    expert: int | None = None


@dataclass(frozen=True)
class ShardInfo:
    file: str
    file_size: int
    header_bytes: int  # 8-byte length + JSON header
    data_bytes: int  # what follows the header: the tensors


def _header_error(path: Path, message: str) -> CheckpointError:
    return CheckpointError(f"corrupt safetensors file {path.name}: {message}", f"re-download {path}")


class _Tally:
    """Running totals filled in the same pass that reads the headers (one pass over ~220k tensors)."""

    def __init__(self, num_layers: int | None):
        self.num_layers = num_layers
        self.per_layer = [0] * (num_layers or 0)
        self.experts_per_layer = [0] * (num_layers or 0)
        self.by_role: dict[str, int] = {}
        self.by_dtype: dict[str, int] = {}
        self.largest: dict[str, int] = {}
        self.packed: list[str] = []

    def count(self, name: str, dtype: str, nbytes: int, layer: int | None, role: str) -> None:
        if self.num_layers is None:  # validating only (fuzz tests, single headers)
            return
        self.by_role[role] = self.by_role.get(role, 0) + nbytes
        self.by_dtype[dtype] = self.by_dtype.get(dtype, 0) + nbytes
        if nbytes > self.largest.get(dtype, -1):
            self.largest[dtype] = nbytes
        if layer is not None:
            if layer >= self.num_layers:
                raise CheckpointError(f"tensor {name} belongs to layer {layer} but the config has {self.num_layers} layers")
            self.per_layer[layer] += nbytes
            if role == EXPERT:
                self.experts_per_layer[layer] += nbytes
        if name.endswith(_QWEIGHT):
            self.packed.append(name[: -len(_QWEIGHT)])


def parse_safetensors_header(data: bytes, file_size: int, path: Path = Path("<bytes>"),
                             tally: _Tally | None = None) -> tuple[dict[str, TensorInfo], int]:
    """Validate a header blob (``data`` = the file's first bytes) -> ({name: TensorInfo}, header_len).

    Every claim is checked against ``file_size``: a header may not reach past the file, and no tensor may
    end past it. Pure function of its inputs so the fuzz test can throw bytes at it. Classifying and
    tallying happen in the same loop (``tally``): at ~220k tensors, every extra pass costs ~0.1 s.
    """
    if len(data) < HEADER_LENGTH_BYTES or file_size < HEADER_LENGTH_BYTES:
        raise _header_error(path, f"truncated: {file_size} bytes, too short for the {HEADER_LENGTH_BYTES}-byte header length")
    (length,) = struct.unpack("<Q", data[:HEADER_LENGTH_BYTES])
    if length > MAX_HEADER_BYTES:
        raise _header_error(path, f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if HEADER_LENGTH_BYTES + length > file_size or HEADER_LENGTH_BYTES + length > len(data):
        raise _header_error(path, f"truncated header: it claims {length} bytes, the file holds {file_size - HEADER_LENGTH_BYTES}")
    try:
        header = json.loads(data[HEADER_LENGTH_BYTES : HEADER_LENGTH_BYTES + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise _header_error(path, f"header is not valid JSON ({type(err).__name__})") from None
    if not isinstance(header, dict):
        raise _header_error(path, "header is not a JSON object")
    data_size = file_size - HEADER_LENGTH_BYTES - length
    file = path.name
    tally = tally if tally is not None else _Tally(None)
    count = tally.count
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == METADATA_KEY:
            if entry is not None and not isinstance(entry, dict):
                raise _header_error(path, f"{METADATA_KEY} is not an object")
            continue
        try:  # the common, well-formed case in one go; anything odd is diagnosed below
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            # min() before prod(): a nested list or string dimension raises TypeError here instead of
            # making prod() repeat a list into gigabytes; a float dimension makes nbytes a float.
            if shape and min(shape) < 0:
                raise ValueError
            nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
            well_formed = (
                type(begin) is int and type(end) is int and 0 <= begin <= end <= data_size
                and end - begin == nbytes and type(nbytes) is int
            )
        except (TypeError, KeyError, ValueError):
            well_formed = False
        if not well_formed:
            _diagnose_entry(path, name, entry, data_size)
        layer, role, expert = classify(name)
        tensors[name] = TensorInfo(name, dtype, shape, nbytes, file, layer, role, expert)
        count(name, dtype, nbytes, layer, role)
    return tensors, length


def _diagnose_entry(path: Path, name: str, entry: object, data_size: int) -> None:
    """Raise the precise one-line error for a header entry the fast check rejected."""
    if not isinstance(entry, dict):
        raise _header_error(path, f"entry {name!r:.60} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise _header_error(path, f"tensor {name!r:.60} has unknown dtype {dtype!r:.20}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _header_error(path, f"tensor {name!r:.60} has a bad shape {shape!r:.60}")
    if (
        not isinstance(offsets, list) or len(offsets) != 2
        or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _header_error(path, f"tensor {name!r:.60} has bad data_offsets {offsets!r:.60}")
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise _header_error(path, f"tensor {name!r:.60}: shape {shape} {dtype} is {nbytes} bytes but its offsets span {offsets[1] - offsets[0]}")
    raise _header_error(
        path, f"header claims more bytes than the file holds: tensor {name!r:.60} ends at {offsets[1]}, data is {data_size} bytes"
    )


def read_safetensors_header(path: Path, tally: _Tally | None = None) -> tuple[dict[str, TensorInfo], ShardInfo]:
    """Read and validate one shard's header; never touches the tensor data."""
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(HEADER_LENGTH_BYTES)
            if len(head) == HEADER_LENGTH_BYTES:
                (length,) = struct.unpack("<Q", head)
                if length <= MAX_HEADER_BYTES:
                    head += f.read(min(length, max(0, file_size - HEADER_LENGTH_BYTES)))
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    tensors, length = parse_safetensors_header(head, file_size, path, tally)
    header_bytes = HEADER_LENGTH_BYTES + length
    return tensors, ShardInfo(path.name, file_size, header_bytes, file_size - header_bytes)


def _shard_files(model_dir: Path) -> tuple[list[str], dict[str, str] | None]:
    """(shard file names, weight_map or None): from the index when there is one, else the *.safetensors."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        index = load_json(index_path, INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{INDEX_FILE} has no valid weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:
            if "/" in name or name.startswith("."):
                raise CheckpointError(f"{INDEX_FILE} names a shard outside the checkpoint: {name!r}")
            if not (model_dir / name).is_file():
                raise CheckpointError(f"{INDEX_FILE} lists shard {name} but it is missing from {model_dir}")
        return files, weight_map
    files = sorted(p.name for p in model_dir.glob("*" + SAFETENSORS_SUFFIX))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {model_dir}", "only safetensors checkpoints are supported")
    return files, None


def classify(name: str) -> tuple[int | None, str, int | None]:
    """Tensor name -> (layer, role, expert) by what a decoded token does with it.

    Runs once per tensor (~220k for the 80B model): the part after ``model.layers.N.`` repeats in every
    layer, so its classification is cached.
    """
    if name.startswith(_LAYER_PREFIX):
        number, _, rest = name[len(_LAYER_PREFIX):].partition(".")
        if number.isdigit():
            hit = _REST_CACHE.get(rest)
            if hit is None:
                hit = _REST_CACHE[rest] = _classify_in_layer(rest)
            return int(number), hit[0], hit[1]
        return None, OTHER, None
    if name.startswith("model.embed_tokens."):
        return None, EMBEDDING, None
    if name.startswith("lm_head."):
        return None, LM_HEAD, None
    if name.startswith("model.norm."):
        return None, FINAL_NORM, None
    return None, OTHER, None  # e.g. Qwen3-Next's mtp.* (multi-token prediction, unused when decoding)


_REST_CACHE: dict[str, tuple[str, int | None]] = {}


def _classify_in_layer(rest: str) -> tuple[str, int | None]:
    """'mlp.experts.7.up_proj.weight' -> (EXPERT, 7); 'self_attn.q_proj.weight' -> (ATTENTION, None)."""
    parts = rest.split(".", 3)
    if len(parts) < 2 or parts[0] not in _MLP_BLOCKS:
        return ATTENTION, None
    sub = parts[1]
    if sub == "experts":
        expert = parts[2] if len(parts) > 2 else ""
        return EXPERT, int(expert) if expert.isdigit() else None  # None: fused [E, ...] tensors
    if sub in ("shared_expert", "shared_expert_gate"):
        return SHARED_EXPERT, None
    if sub == "gate":
        return ROUTER, None
    return DENSE_MLP, None


# -------------------------------------------------------------------------------------------- SPEC


@dataclass
class ModelSpec:
    """What a checkpoint is and what it costs, from its config and headers alone."""

    path: Path
    config: ArchConfig
    quant: Q.QuantConfig | None
    tensors: dict[str, TensorInfo]
    shards: list[ShardInfo]
    bytes_per_layer: list[int] = field(default_factory=list)
    bytes_by_role: dict[str, int] = field(default_factory=dict)
    active_by_role: dict[str, int] = field(default_factory=dict)
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    largest_tensor_bytes: dict[str, int] = field(default_factory=dict)  # per dtype
    # Set when ``tensors`` is left empty (a spec restored from a cache manifest: no per-tensor table).
    tensor_count: int | None = None
    # Values held by int8 linears: the runtime dequantizes them to the compute dtype (models.quantized).
    int8_values: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_dtype.values())

    @property
    def file_data_bytes(self) -> int:
        return sum(s.data_bytes for s in self.shards)

    @property
    def active_bytes_per_token(self) -> int:
        return sum(self.active_by_role.values())

    @property
    def largest_unit_bytes(self) -> int:
        """The biggest piece the builder holds at once: one decoder layer, or the embedding/lm_head."""
        outside = [self.bytes_by_role.get(r, 0) for r in (EMBEDDING, LM_HEAD)]
        return max([*self.bytes_per_layer, *outside, 0])

    @property
    def full_attention_layers(self) -> int:
        return sum(t == FULL_ATTENTION for t in self.config.layer_types)

    @property
    def linear_attention_layers(self) -> int:
        return sum(t == LINEAR_ATTENTION for t in self.config.layer_types)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every full-attention layer, for one position."""
        c = self.config
        return self.full_attention_layers * 2 * c.num_kv_heads * c.head_dim * dtype_bytes

    def recurrent_state_bytes(self, state_dtype_bytes: int, conv_dtype_bytes: int) -> int:
        """Qwen3-Next linear-attention layers: the gated-delta state [Hv, Dk, Dv] and the conv window
        (the last kernel-1 inputs of the causal conv)."""
        c = self.config
        if not self.linear_attention_layers:
            return 0
        state = c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim * state_dtype_bytes
        conv_dim = 2 * c.linear_num_key_heads * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim
        conv = conv_dim * (c.linear_conv_kernel_dim - 1) * conv_dtype_bytes
        return self.linear_attention_layers * (state + conv)

    def summary(self) -> dict:
        c = self.config
        return {
            "path": str(self.path),
            "architecture": c.architecture,
            "model_type": c.model_type,
            "layers": c.num_layers,
            "layer_types": {FULL_ATTENTION: self.full_attention_layers, LINEAR_ATTENTION: self.linear_attention_layers},
            "experts": c.num_experts,
            "top_k": c.top_k,
            "shared_expert_intermediate_size": c.shared_expert_intermediate_size,
            "hidden_size": c.hidden_size,
            "moe_intermediate_size": c.moe_intermediate_size,
            "vocab_size": c.vocab_size,
            "dtype": c.dtype,
            "quantization": self.quant.describe() if self.quant else None,
            "tensors": len(self.tensors) if self.tensor_count is None else self.tensor_count,
            "shards": len(self.shards),
            "total_bytes": self.total_bytes,
            "file_data_bytes": self.file_data_bytes,
            "largest_layer_bytes": max(self.bytes_per_layer, default=0),
            "bytes_by_role": dict(self.bytes_by_role),
            "active_bytes_per_token": self.active_bytes_per_token,
            "active_by_role": dict(self.active_by_role),
        }


def _account(spec: ModelSpec, tally: _Tally) -> None:
    """Bytes per layer/role/dtype and the bytes one decoded token reads (see docs/planner.md)."""
    c = spec.config
    by_role = tally.by_role
    active = {role: by_role.get(role, 0) for role in (ATTENTION, ROUTER, SHARED_EXPERT, DENSE_MLP, FINAL_NORM)}
    # Routed experts: top_k of num_experts per layer (experts of one layer are the same size).
    active[EXPERT] = sum(b * c.top_k // c.num_experts for b in tally.experts_per_layer)
    # The lm_head is read whole for every token's logits; the embedding only one row. Tied weights: the
    # one matrix is read whole as the lm_head (its row is then already counted).
    if LM_HEAD in by_role:
        active[LM_HEAD] = by_role[LM_HEAD]
        active[EMBEDDING] = by_role.get(EMBEDDING, 0) // c.vocab_size
    else:
        active[LM_HEAD] = by_role.get(EMBEDDING, 0)
        active[EMBEDDING] = 0
    spec.bytes_per_layer, spec.bytes_by_role, spec.active_by_role = tally.per_layer, by_role, active
    spec.bytes_by_dtype, spec.largest_tensor_bytes = tally.by_dtype, tally.largest


def _check_quant(spec: ModelSpec, packed: list[str]) -> None:
    """Packed tensors (modules with a qweight) must exist iff the config quantizes, and agree with its bits
    and group size."""
    if spec.quant is None:
        if packed:
            raise CheckpointError(
                f"inconsistent checkpoint: {len(packed)} packed (qweight) tensors such as {packed[0]} but config.json has no quantization_config"
            )
        return
    if not packed:
        raise CheckpointError(
            f"inconsistent quantization_config: it says {spec.quant.describe()} but no tensor is packed (no *.qweight)"
        )
    checked: set[tuple] = set()  # 512 experts x 48 layers share a handful of (shapes, bits) combinations
    for module in packed:
        scales = spec.tensors.get(module + ".scales")
        if scales is None:
            raise CheckpointError(f"inconsistent checkpoint: {module}.qweight has no {module}.scales")
        key = (spec.tensors[module + ".qweight"].shape, scales.shape, spec.quant.for_layer(module))
        if key not in checked:
            Q.check_packed_linear(module, *key, awq=spec.quant.awq)
            checked.add(key)


def inspect_checkpoint(model_dir: Path | str) -> ModelSpec:
    """config.json + safetensors headers -> ModelSpec. Reads no tensor data.

    The cyclic garbage collector is paused meanwhile: the headers become ~10^6 small acyclic objects,
    and the collector's repeated full passes over them tripled the time on the 80B checkpoint.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _inspect(Path(model_dir))
    finally:
        if was_enabled:
            gc.enable()


def _inspect(model_dir: Path) -> ModelSpec:
    config, raw = read_config(model_dir)
    quant = Q.parse_quantization_config(raw.get("quantization_config"))
    files, weight_map = _shard_files(model_dir)
    tensors: dict[str, TensorInfo] = {}
    file_of: dict[str, str] = {}
    shards: list[ShardInfo] = []
    tally = _Tally(config.num_layers)
    for file in files:
        header, shard = read_safetensors_header(model_dir / file, tally)
        shards.append(shard)
        if not tensors.keys().isdisjoint(header):
            dup = next(n for n in header if n in tensors)
            raise CheckpointError(f"tensor {dup} appears in both {tensors[dup].file} and {file}")
        tensors.update(header)
        file_of.update(dict.fromkeys(header, file))
    if weight_map is not None and weight_map != file_of:  # one C-level comparison; diagnose only on mismatch
        for name, file in weight_map.items():
            if file_of.get(name) != file:
                raise CheckpointError(f"{INDEX_FILE} places {name} in {file}, but that shard's header does not list it")
        extra = next(n for n in file_of if n not in weight_map)
        raise CheckpointError(f"shard {file_of[extra]} holds {extra}, which {INDEX_FILE} does not list")
    if not tensors:
        raise CheckpointError(f"the safetensors files in {model_dir} hold no tensors")
    spec = ModelSpec(model_dir, config, quant, tensors, shards)
    _check_quant(spec, tally.packed)
    _account(spec, tally)
    spec.int8_values = _int8_values(spec, tally.packed)
    return spec


def _int8_values(spec: ModelSpec, packed: list[str]) -> int:
    """Weights stored as int8 (qweight: 4 values per int32, i.e. one value per byte)."""
    if spec.quant is None:
        return 0
    return sum(spec.tensors[m + ".qweight"].nbytes for m in packed if spec.quant.for_layer(m).bits == 8)
