"""Opening a model for inference: resolve, choose the dtype, load, and time it.

The one place `chat`, `generate` and `bench` get a runnable model from, so the ready-tier
cache (when current) and the memory planner plug in here once for all of them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from qwen_runner import hardware, precision

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    path: Path
    model: object
    tokenizer: object
    spec: object
    dtype: precision.DtypeChoice
    load_seconds: float
    from_ready: bool = False

    @property
    def bytes_per_token(self) -> int | None:
        """Weight bytes one decoded token reads, for GB/s figures: the model counts its in-memory
        tensors (an fp32 run reads twice a bf16 checkpoint's bytes); the header spec is the fallback."""
        if hasattr(self.model, "decode_weight_bytes"):
            return self.model.decode_weight_bytes()
        return getattr(self.spec, "active_bytes_per_token", None)


def choose_dtype(requested: str = "auto") -> precision.DtypeChoice:
    choice = precision.choose_dtype(hardware.detect_cpu().isa, requested)
    log.info("compute dtype %s (%s)", choice.dtype, choice.reason)
    return choice


def open_model(model: str, dtype: str = "auto") -> LoadedModel:
    """Load MODEL for inference: from its ready tier when that is current (mmap, nothing converted,
    the spec from its manifest), else from the checkpoint, logging why and how to build the ready tier."""
    from qwen_runner.cache.load import current_ready
    from qwen_runner.checkpoint import resolve_model_dir

    path = resolve_model_dir(model)
    choice = choose_dtype(dtype)
    start = time.perf_counter()
    ready = current_ready(path, choice.dtype)
    if ready is not None:
        from qwen_runner.cache.load import load_ready_model
        from qwen_runner.cache.manifest import spec_from_record
        from qwen_runner.models.loader import load_tokenizer, read_config

        paths, manifest = ready
        log.info("loading the ready tier %s", paths.dir)
        loaded = load_ready_model(paths, manifest, read_config(path))
        tokenizer = load_tokenizer(path)
        spec = spec_from_record(manifest.get("spec") or {}, path)
        if spec is None:  # a manifest written before the spec was recorded in it
            from qwen_runner.checkpoint import inspect_checkpoint

            spec = inspect_checkpoint(path)
    else:
        from qwen_runner.models import load

        loaded, tokenizer, spec = load(path, dtype=choice.torch_dtype())
    seconds = time.perf_counter() - start
    log.info("loaded %s in %.2f s (%s)", path.name, seconds, "ready tier" if ready is not None else "checkpoint")
    return LoadedModel(path, loaded, tokenizer, spec, choice, seconds, ready is not None)
