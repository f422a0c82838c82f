"""Opening a model for inference: resolve, choose the backend and dtype, load, and time it.

The one place `chat`, `generate` and `bench` get a runnable model from, so the ready-tier
cache (when current), the backend and the dtype chain plug in here once for all of them. The
dtype walks down the chain (fp16 -> bf16 -> fp32, with a logged warning) when the backend's
kernels raise at the probe, while loading or at the first forward (run here, on one token).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from qwen_runner import hardware, precision
from qwen_runner import settings as S

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
    backend: str = "native"
    precision: precision.ChainRecord | None = None
    lm_head: str = S.DEFAULT_LM_HEAD  # --lm-head: checkpoint (as stored) or int4 (RTN copy)

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


def first_forward(model) -> None:
    """One token through a throwaway cache: the kernels of every layer run once, before the user waits."""
    import torch

    model(torch.zeros((1, 1), dtype=torch.long), model.make_cache(2), last_only=True)


def flush_denormals() -> None:
    """Treat denormal floats (|x| < 1.2e-38) as zero, in this thread and the OpenMP workers it starts.

    x86 arithmetic on denormals is ~100x slower, and Gated DeltaNet's decayed recurrent state drifts
    into them: on bench-qwen3-next the chunk scan's [16, 64, 128] x [16, 128, 128] fp32 bmm took
    3.5 ms instead of 0.3 (~0.5 s of a 512-token prefill, docs/qwen3_next.md). Flushing changes no
    value above 1e-38. Threads inherit the FP environment when created, so this runs before the first
    parallel op; workers that already exist (a test process) keep theirs.
    """
    import torch

    torch.set_flush_denormal(True)


def _load(path: Path, impl, dtype: str, record: precision.ChainRecord, where: dict,
          lm_head: str = S.DEFAULT_LM_HEAD):
    """(model, tokenizer, spec, from_ready) at ``dtype``; sets ``where['stage']`` as it goes."""
    from qwen_runner.cache import open_ready

    where["stage"] = "load"
    custom = impl.load(path, dtype)
    from_ready = False
    if custom is not None:
        model, tokenizer, spec = custom
    else:
        model, manifest = open_ready(path, dtype, impl.name, with_manifest=True, lm_head=lm_head)
        if model is not None:
            from qwen_runner.cache.manifest import spec_from_record
            from qwen_runner.models.loader import load_tokenizer

            built = (manifest.get("precision") or {})
            if manifest["dtype"] != dtype:  # its build fell back: adopt the steps it recorded
                record.fallbacks += [f for f in built.get("fallbacks", []) if f not in record.fallbacks]
                record.final = dtype = manifest["dtype"]
            # The spec recorded in the manifest: the ready path reads no safetensors header.
            spec = spec_from_record(manifest.get("spec") or {}, path)
            if spec is None:  # a manifest written before the spec was recorded in it
                from qwen_runner.checkpoint import inspect_checkpoint

                spec = inspect_checkpoint(path)
            tokenizer, from_ready = load_tokenizer(path), True
        else:
            from qwen_runner.models import load

            model, tokenizer, spec = load(path, dtype=precision.DtypeChoice(dtype, "").torch_dtype(), lm_head=lm_head)
    model = impl.prepare(model, dtype)
    where["stage"] = "first forward"
    first_forward(model)
    return model, tokenizer, spec, from_ready


def open_model(model: str, dtype: str = "auto", backend: str = "native",
               lm_head: str = S.DEFAULT_LM_HEAD) -> LoadedModel:
    """Load MODEL for inference: from its ready tier when that is current (mmap, nothing converted),
    else from the checkpoint, logging why and how to build the ready tier. ``lm_head="int4"``: the head
    runs as an RTN int4 copy (from a ready tier built with ``--lm-head int4``, else quantized at load)."""
    from qwen_runner.backends import get_backend
    from qwen_runner.checkpoint import resolve_model_dir
    from qwen_runner.errors import QwenRunnerError

    path = resolve_model_dir(model)
    flush_denormals()
    impl = get_backend(backend)
    impl.require()
    if lm_head not in S.LM_HEAD_FORMATS:
        raise QwenRunnerError(f"--lm-head {lm_head!r} is not one of {', '.join(S.LM_HEAD_FORMATS)}")
    if lm_head != S.DEFAULT_LM_HEAD and not impl.has_cache_layout:
        raise QwenRunnerError(f"--lm-head {lm_head} needs --backend native (backend {impl.name} loads its own way)",
                              f"drop --lm-head {lm_head}, or use --backend native")
    choice = choose_dtype(dtype)
    record = precision.ChainRecord(choice.dtype, choice.reason)
    precision.walk_chain(record, "probe", impl.probe, log)
    start = time.perf_counter()
    where: dict = {}
    loaded, tokenizer, spec, from_ready = precision.walk_chain(
        record, lambda: where["stage"], lambda d: _load(path, impl, d, record, where, lm_head), log)
    seconds = time.perf_counter() - start
    log.info("loaded %s in %.2f s (%s)", path.name, seconds, "ready tier" if from_ready else "checkpoint")
    log.info("backend %s, dtype %s", impl.name, record.summary())
    final = precision.DtypeChoice(record.final, record.reason if not record.fallbacks else record.summary())
    return LoadedModel(path, loaded, tokenizer, spec, final, seconds, from_ready, impl.name, record, lm_head)
