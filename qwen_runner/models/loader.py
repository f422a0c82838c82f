"""From a checkpoint directory to a runnable model, with one copy of the weights in RAM.

The path is: config.json -> architecture module -> ``Model`` built on the meta device
(no memory) -> ``checkpoint_state`` streams ``(name, tensor)`` pairs, each read from the
mmap'd safetensors file one tensor at a time (experts stacked one layer at a time) ->
``load_state_dict(assign=True)`` adopts those tensors as the parameters (no copy).
Peak RSS is therefore the final weights plus one layer in flight.

``model_state_from_checkpoint`` is separate from module construction so the ready-tier
cache can store its output (the stacked layout) and later load it with
``torch.load(mmap=True, weights_only=True)`` + ``assign=True`` through ``build_model(..., state=...)``.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType

import torch

from qwen_runner import settings as S
from qwen_runner.errors import CheckpointError, UnsupportedModelError
from qwen_runner.models import quantized
from qwen_runner.quant import parse_quantization_config

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_GLOB = "*.safetensors"

# config.json's architectures[0] -> module implementing it, imported on first use.
ARCHITECTURES: dict[str, str] = {
    "Qwen3MoeForCausalLM": "qwen_runner.models.qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen_runner.models.qwen2_moe",
    "Qwen3NextForCausalLM": "qwen_runner.models.qwen3_next",
}

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def read_config(path: str | Path) -> dict:
    """config.json as a dict; a missing or malformed file is a CheckpointError."""
    file = Path(path) / CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"no {CONFIG_FILE} in {path}") from err
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {file}: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    return config


def architecture_of(config: dict) -> str:
    archs = config.get("architectures") or []
    if not archs or not isinstance(archs, list):
        raise CheckpointError("config.json names no architectures")
    return archs[0]


def architecture_module(architecture: str) -> ModuleType:
    """The module implementing ``architecture``; UnsupportedModelError if we have none."""
    name = ARCHITECTURES.get(architecture)
    if name is None:
        raise UnsupportedModelError(f"architecture {architecture} is not supported")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name == name:
            raise UnsupportedModelError(f"architecture {architecture} is not implemented yet ({name} missing)") from err
        raise


def checkpoint_dtype(config: dict) -> torch.dtype:
    """The dtype the checkpoint was saved in (config ``dtype``/``torch_dtype``), fp32 if unstated."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return _DTYPES.get(str(name).replace("torch.", ""), torch.float32)


class CheckpointReader:
    """Per-tensor access to a (possibly sharded) safetensors checkpoint, memory-mapped.

    ``get`` reads one tensor and casts it; nothing else of the file becomes resident.
    ``unused()`` lists keys never read, so a mapping that forgets a tensor is noticed.
    """

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"cannot read {index}: {err}") from err
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob(SAFETENSORS_GLOB))
            weight_map = None
        if not files:
            raise CheckpointError(f"no *.safetensors weights in {self.path}")
        self._handles = {}
        self._file_of: dict[str, str] = {}
        for name in files:
            file = self.path / name
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as err:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"cannot open {file}: {err}") from err
            self._handles[name] = handle
            for key in handle.keys():
                self._file_of[key] = name
        if weight_map is not None:
            missing = [k for k, f in weight_map.items() if self._file_of.get(k) != f]
            if missing:
                raise CheckpointError(
                    f"{INDEX_FILE} lists {len(missing)} tensors not in their shard, e.g. {missing[0]}"
                )
        self._used: set[str] = set()

    def keys(self) -> list[str]:
        return list(self._file_of)

    def has(self, key: str) -> bool:
        return key in self._file_of

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, cast to ``dtype`` (a no-op when it already is)."""
        name = self._file_of.get(key)
        if name is None:
            raise CheckpointError(f"tensor {key} missing from the checkpoint in {self.path}")
        try:
            tensor = self._handles[name].get_tensor(key)
        except Exception as err:
            raise CheckpointError(f"cannot read tensor {key} from {name}: {err}") from err
        self._used.add(key)
        return tensor if dtype is None else tensor.to(dtype)

    def ignore(self, keys: Iterable[str]) -> None:
        """Mark tensors the model deliberately does not use (e.g. Qwen3-Next's ``mtp.*``) as consumed,
        without reading them, so ``unused()`` keeps flagging only real omissions."""
        self._used.update(keys)

    def unused(self) -> list[str]:
        return sorted(set(self._file_of) - self._used)


def model_state_from_checkpoint(path: str | Path, dtype: torch.dtype | None = None,
                                config: dict | None = None,
                                lm_head: str = S.DEFAULT_LM_HEAD) -> Iterator[tuple[str, torch.Tensor]]:
    """Our parameters ``(name, tensor)``, in our layout and ``dtype``, streamed from a checkpoint.
    ``lm_head``: ``checkpoint`` (as stored) or ``int4`` (an RTN int4 copy, ``quantized.int4_lm_head``)."""
    if lm_head not in S.LM_HEAD_FORMATS:
        raise UnsupportedModelError(f"lm_head format {lm_head!r} is not one of {', '.join(S.LM_HEAD_FORMATS)}")
    config = read_config(path) if config is None else config
    dtype = dtype or checkpoint_dtype(config)
    state = _checkpoint_state(path, dtype, config)
    yield from quantized.int4_lm_head(state, dtype) if lm_head == S.LM_HEAD_INT4 else state


def _checkpoint_state(path: str | Path, dtype: torch.dtype, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    module = architecture_module(architecture_of(config))
    args = module.Model.args_from_config(config)
    reader = CheckpointReader(path)
    dtype = dtype or checkpoint_dtype(config)
    qconfig = parse_quantization_config(config.get("quantization_config"))
    if qconfig is None:
        yield from module.checkpoint_state(reader, args, dtype)
    else:  # unpacked per linear, fused/stacked by the architecture, packed for the int4 kernel here
        yield from quantized.pack_for_runtime(
            module.checkpoint_state(quantized.QuantizedReader(reader, qconfig), args, dtype), dtype)
    leftover = reader.unused()
    if leftover:
        log.warning("%d checkpoint tensors unused, e.g. %s", len(leftover), leftover[0])


def build_model(config: dict, state: Iterable[tuple[str, torch.Tensor]]) -> torch.nn.Module:
    """Construct ``Model`` on the meta device and adopt ``state``'s tensors as its parameters."""
    module = architecture_module(architecture_of(config))
    with torch.device("meta"):
        model = module.Model.from_config(config)
    tensors = dict(state)
    quantized.adapt(model, tensors)  # int4-packed weights (from a checkpoint or the ready tier) -> int4 modules
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint does not match the {architecture_of(config)} layout: {err}") from err
    del tensors
    left_on_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if left_on_meta:
        raise CheckpointError(f"parameters never loaded: {left_on_meta[:3]}")
    model.requires_grad_(False)
    model.eval()
    if getattr(model, "dtype", None) is torch.bfloat16:
        from qwen_runner import kernels

        kernels.ops()  # build/load the C++ decode kernels now, not inside the first timed decode step
    return model


def _spec(path: Path, config: dict):
    """The checkpoint's ModelSpec when checkpoint.inspect_checkpoint exists, else the HF config dict."""
    try:
        from qwen_runner.checkpoint import inspect_checkpoint
    except ImportError:
        return config
    return inspect_checkpoint(path)


def load(model_path: str | Path, dtype: torch.dtype | None = None, lm_head: str = S.DEFAULT_LM_HEAD):
    """``(model, tokenizer, spec)`` for a checkpoint dir; ``dtype=None`` keeps the checkpoint's dtype;
    ``lm_head="int4"`` quantizes the head at load (as ``build-cache --lm-head int4`` does at build time)."""
    path = Path(model_path)
    config = read_config(path)
    dtype = dtype or checkpoint_dtype(config)
    model = build_model(config, model_state_from_checkpoint(path, dtype, config, lm_head))
    log.info("loaded %s (%s, %s)", path.name, model.architecture, dtype)
    return model, load_tokenizer(path), _spec(path, config)


def load_tokenizer(model_path: str | Path):
    """The checkpoint's tokenizer alone: the lean one (qwen_runner.tokenizer) unless only transformers can."""
    from qwen_runner.tokenizer import load_tokenizer as load_lean

    return load_lean(model_path)
