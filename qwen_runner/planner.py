"""Memory planning: what each heavy stage will cost, compared with this host, before it starts.

A ``ModelSpec`` (headers only) plus a ``Host`` (RAM, swap, cgroup, optional budget override) gives a
``StagePlan`` per stage with an itemized peak, a verdict (ok / tight / refuse) and concrete advice.
Every constant is named in settings.py; docs/planner.md explains the model and its calibration.

Stages:
- ``build``: the cache builder streams one unit (layer) at a time, so its peak is the builder's baseline
  plus what it copies of the largest unit (stacked experts; cast, fused or rearranged tensors), never the
  whole model.
- ``run``: weights resident (or, from the ready tier, an mmap working set), the KV cache for
  ``--max-context``, Qwen3-Next's recurrent and conv state, activations, runtime overhead.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qwen_runner import settings as S
from qwen_runner.checkpoint import (
    DENSE_MLP, DTYPE_BYTES, EMBEDDING, EXPERT, FINAL_NORM, LM_HEAD, SHARED_EXPERT, ModelSpec,
)
from qwen_runner.errors import InsufficientMemoryError, QwenRunnerError

log = logging.getLogger(__name__)

OK, TIGHT, REFUSE = "ok", "tight", "refuse"
BUILD, RUN = "build", "run"
STAGES = (BUILD, RUN)
COMPUTE_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """'24G', '24GiB', '512M', '1.5T', '1073741824' -> bytes (binary units: what RAM is sold in)."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise QwenRunnerError(f"memory size {text!r} is not understood", "use e.g. 16G, 512M or a byte count")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * _UNITS[unit])


def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", S.GIB), ("MiB", S.MIB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------------- HOST


@dataclass(frozen=True)
class Host:
    available: int  # RAM we may still use: available, capped by the cgroup; or the budget
    total: int
    swap_free: int
    swap_total: int
    cgroup_limit: int | None
    budget: int | None = None  # set when --memory-budget / QWEN_RUNNER_MEMORY_BUDGET overrides

    @property
    def source(self) -> str:
        if self.budget is not None:
            return f"budget override {fmt_bytes(self.budget)}"
        cg = f", cgroup limit {fmt_bytes(self.cgroup_limit)}" if self.cgroup_limit else ""
        return f"RAM available {fmt_bytes(self.available)} of {fmt_bytes(self.total)}, swap free {fmt_bytes(self.swap_free)}{cg}"


def detect_host(budget: str | int | None = None) -> Host:
    """This machine's memory, or a pretend machine of ``budget`` bytes RAM and no swap (tests, planning
    for a smaller box)."""
    if budget is not None:
        size = budget if isinstance(budget, int) else parse_size(budget)
        return Host(size, size, 0, 0, None, size)
    from qwen_runner.hardware import detect_memory

    mem = detect_memory()
    return Host(mem.usable, mem.total, mem.swap_free, mem.swap_total, mem.cgroup_limit)


def measure_disk_read(path: Path, nbytes: int = S.DISK_PROBE_BYTES, seconds: float = S.DISK_PROBE_SECONDS) -> float | None:
    """Bytes/s reading ``path`` now, from its middle, after asking the kernel to drop those pages.

    A quick probe, not a benchmark: it bounds decode speed when weights stream from disk. Sparse files
    (the skeletons) read as fast as memory, which is the truth for them.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        start = max(0, size // 2 - nbytes // 2)
        length = min(nbytes, size - start)
        if length <= 0:
            return None
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
        chunk, done = 4 * S.MIB, 0
        t0 = time.perf_counter()
        while done < length and time.perf_counter() - t0 < seconds:
            got = os.pread(fd, min(chunk, length - done), start + done)
            if not got:
                break
            done += len(got)
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    return done / elapsed if done and elapsed > 0 else None


# ---------------------------------------------------------------------------------------------- PLAN


@dataclass
class StagePlan:
    stage: str
    items: dict[str, int]
    peak: int
    available: int
    verdict: str = OK
    reason: str = ""
    advice: list[str] = field(default_factory=list)


@dataclass
class MemoryPlan:
    spec: dict
    host: Host
    max_context: int
    compute_dtype: str
    stages: dict[str, StagePlan]
    disk_read_bps: float | None = None
    decode_tok_s_bound: float | None = None

    def as_dict(self) -> dict:
        return {
            "model": self.spec,
            "host": {**asdict(self.host), "source": self.host.source},
            "max_context": self.max_context,
            "compute_dtype": self.compute_dtype,
            "disk_read_bytes_per_s": self.disk_read_bps,
            "decode_tok_s_bound": self.decode_tok_s_bound,
            "stages": {name: asdict(stage) for name, stage in self.stages.items()},
        }


def resident_weight_bytes(spec: ModelSpec, compute_dtype: str) -> int:
    """Weights once loaded: float tensors cast to the compute dtype, packed int4 as it is, and int8
    linears dequantized to the compute dtype (what models.quantized holds: one byte per value becomes
    ``width`` bytes)."""
    width = COMPUTE_DTYPE_BYTES[compute_dtype]
    return sum(
        nbytes // DTYPE_BYTES[dtype] * width if dtype in FLOAT_DTYPES else nbytes
        for dtype, nbytes in spec.bytes_by_dtype.items()
    ) + getattr(spec, "int8_values", 0) * (width - 1)


def _scaled(nbytes: int, spec: ModelSpec, resident: int) -> int:
    """``nbytes`` of checkpoint data rescaled to what it is once cast to the compute dtype."""
    return nbytes * resident // max(1, spec.total_bytes)


def _runtime_overhead() -> int:
    return S.RUNTIME_BASELINE_RSS + S.TOKENIZER_RSS + S.RUNTIME_SLACK


def _activation_bytes(spec: ModelSpec) -> int:
    c = spec.config
    widths = c.hidden_size * S.ACTIVATION_HIDDEN_COPIES + c.moe_intermediate_size * 2 * c.top_k
    widths += 2 * c.shared_expert_intermediate_size + c.num_experts
    return S.PREFILL_CHUNK_TOKENS * widths * S.ACTIVATION_DTYPE_BYTES + c.vocab_size * S.ACTIVATION_DTYPE_BYTES


def _verdict(stage: StagePlan, host: Host) -> None:
    if stage.peak <= host.available * S.PLAN_OK_FRACTION:
        stage.verdict = OK
    elif stage.peak <= host.available:
        stage.verdict, stage.reason = TIGHT, f"peak {fmt_bytes(stage.peak)} is over {S.PLAN_OK_FRACTION:.0%} of the {fmt_bytes(host.available)} available"
    elif stage.peak <= host.available + host.swap_free:
        stage.verdict, stage.reason = TIGHT, f"peak {fmt_bytes(stage.peak)} exceeds the {fmt_bytes(host.available)} of RAM and will use swap"
    else:
        stage.verdict = REFUSE
        stage.reason = f"peak {fmt_bytes(stage.peak)} exceeds the {fmt_bytes(host.available)} available" + (
            f" + {fmt_bytes(host.swap_free)} swap" if host.swap_free else ""
        )


def _swap_advice(shortfall: int) -> str:
    gib = -(-(shortfall + S.SWAP_ADVICE_HEADROOM) // S.GIB)
    return f"add {gib} GiB of swap: sudo {S.SWAP_SCRIPT} add {gib}G (remove it later with: sudo {S.SWAP_SCRIPT} remove)"


BUILD_RAW, BUILD_READY = "raw", "ready"  # build-cache --tier
_HF_DTYPE = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
# Tensors the ready stage rewrites even without a dtype change (fused q/k/v and gate+up, Qwen3-Next's
# rearranged linear-attention inputs and fp32 state parameters); any other same-dtype tensor is passed
# on as a view of the mmap'd checkpoint: file-backed pages, not anonymous memory.
_REWRITTEN_SUFFIXES = (
    "q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias", "k_proj.bias", "v_proj.bias",
    "in_proj_qkvz.weight", "in_proj_ba.weight", "conv1d.weight", "A_log", "dt_bias",
)
_FUSED_MLP_SUFFIXES = ("gate_proj.weight", "up_proj.weight")
_UNIT_OF_ROLE = {EMBEDDING: "embed", LM_HEAD: "head", FINAL_NORM: "head"}


def build_unit_bytes(spec: ModelSpec, compute_dtype: str, target: str = BUILD_READY) -> int:
    """Anonymous bytes the builder holds for its largest unit (a layer, the embedding or the head).

    The builder streams one unit at a time and holds only the tensors it *copies*: per-expert tensors
    stacked into ``[E, ...]`` (both tiers), and in the ready tier every tensor cast to another dtype,
    fused or rearranged. Views of the mmap'd checkpoint are file-backed and evictable. A converted tied
    embedding stays alive to the end (the lm_head is the same tensor). A quantized checkpoint's ready
    build (int4 repacking) is counted whole. A spec without its tensor table (restored from a cache
    manifest) gets the conservative whole-unit figure.
    """
    width, target_dtype = COMPUTE_DTYPE_BYTES[compute_dtype], _HF_DTYPE[compute_dtype]
    if not spec.tensors:
        return _scaled(spec.largest_unit_bytes, spec, resident_weight_bytes(spec, compute_dtype))
    per_unit: dict[object, int] = {}
    tied_embedding = 0
    for info in spec.tensors.values():
        unit = info.layer if info.layer is not None else _UNIT_OF_ROLE.get(info.role)
        if unit is None:  # e.g. mtp.*: not cached
            continue
        stacked = info.role == EXPERT and info.expert is not None
        if target == BUILD_RAW:
            copied = info.nbytes if stacked else 0
        else:
            is_float = info.dtype in FLOAT_DTYPES
            size = info.nbytes // DTYPE_BYTES[info.dtype] * width if is_float else info.nbytes
            rewritten = (
                stacked or spec.quant is not None or (is_float and info.dtype != target_dtype)
                or info.name.endswith(_REWRITTEN_SUFFIXES)
                or (info.role in (SHARED_EXPERT, DENSE_MLP) and info.name.endswith(_FUSED_MLP_SUFFIXES))
            )
            copied = size if rewritten else 0
            if info.role == EMBEDDING and spec.config.tie_word_embeddings:
                tied_embedding = copied
        per_unit[unit] = per_unit.get(unit, 0) + copied
    return max((held + (tied_embedding if unit != "embed" else 0) for unit, held in per_unit.items()), default=0)


def plan_build(spec: ModelSpec, host: Host, compute_dtype: str, target: str = BUILD_READY) -> StagePlan:
    """The builder's peak anonymous memory: its own baseline + the largest unit it holds (+ unpack scratch
    when int4 is repacked). Calibrated against scripts/measure_build_memory.py (docs/planner.md)."""
    held = build_unit_bytes(spec, compute_dtype, target)
    tensors = len(spec.tensors) or spec.tensor_count or 0
    items = {
        "builder baseline": S.BUILD_BASELINE_RSS,
        "per-tensor bookkeeping": tensors * S.BUILD_BYTES_PER_TENSOR,
        "largest unit in flight": held,
        "allocator slack": min(held, S.BUILD_ALLOCATOR_SLACK),
    }
    if target == BUILD_READY and spec.quant is not None:
        packed = [n for dtype, n in spec.largest_tensor_bytes.items() if dtype not in FLOAT_DTYPES]
        items["int4 unpack scratch"] = max(packed, default=0) * S.BUILD_UNPACK_FACTOR
    stage = StagePlan(BUILD, items, sum(items.values()), host.available)
    _verdict(stage, host)
    if stage.verdict == REFUSE:
        stage.advice.append(_swap_advice(stage.peak - host.available - host.swap_free))
    return stage


def plan_run(spec: ModelSpec, host: Host, max_context: int, compute_dtype: str, ready_tier: bool,
             disk_probe: bool = True) -> tuple[StagePlan, float | None, float | None]:
    """(run stage, disk bytes/s measured, decode tok/s bound when streaming from disk)."""
    width = COMPUTE_DTYPE_BYTES[compute_dtype]
    resident = resident_weight_bytes(spec, compute_dtype)
    kv_per_token = spec.kv_bytes_per_token(width)
    fixed = {
        "runtime overhead": _runtime_overhead(),
        "recurrent + conv state": spec.recurrent_state_bytes(S.RECURRENT_STATE_DTYPE_BYTES, width),
    }
    kv = kv_per_token * max_context
    # Load transient (a layer mapped + converted) and prefill activations are never live together.
    transient = max(_scaled(spec.largest_unit_bytes, spec, resident) * S.LOAD_TRANSIENT_UNITS, _activation_bytes(spec))
    items = {"weights": resident, f"KV cache ({max_context} tokens)": kv, **fixed, "load/activations": transient}
    stage = StagePlan(RUN, items, sum(items.values()), host.available)
    _verdict(stage, host)
    disk_bps = tok_s = None
    if stage.verdict == OK:
        return stage, disk_bps, tok_s

    non_weights = stage.peak - resident
    # Bytes every token touches no matter which experts it picks must stay resident to run from mmap.
    hot = spec.active_bytes_per_token - spec.active_by_role.get(EXPERT, 0)
    fits_mmap = non_weights + _scaled(hot, spec, resident) <= host.available * S.PLAN_OK_FRACTION
    if resident > host.available and fits_mmap:
        cache_room = max(0, host.available - non_weights)
        miss = 1 - min(1.0, cache_room / max(1, resident))
        if disk_probe:
            disk_bps = measure_disk_read(spec.path / max(spec.shards, key=lambda s: s.data_bytes).file)
        if disk_bps:
            tok_s = disk_bps / max(1.0, spec.active_bytes_per_token * miss)
        speed = (
            f"expected decode <= {tok_s:.1f} tok/s at the disk read speed measured now ({fmt_bytes(disk_bps)}/s)"
            if tok_s else "decode speed bounded by disk reads"
        )
        if ready_tier:
            stage.verdict, stage.reason = TIGHT, f"the model ({fmt_bytes(resident)}) exceeds RAM: it will run from mmap; {speed}"
        else:
            stage.verdict = REFUSE
            stage.reason = f"the model ({fmt_bytes(resident)}) exceeds the {fmt_bytes(host.available)} available"
            stage.advice.append(
                f"build the ready tier first (qwen-runner build-cache {spec.path}): the model then runs from mmap; {speed}"
            )
    if stage.verdict == REFUSE:
        if kv and stage.peak - kv <= host.available * S.PLAN_OK_FRACTION:
            fit = int((host.available * S.PLAN_OK_FRACTION - (stage.peak - kv)) // kv_per_token)
            fit = fit // S.CONTEXT_ADVICE_STEP * S.CONTEXT_ADVICE_STEP
            if fit > 0:
                stage.advice.append(f"lower the context: --max-context {fit} fits")
        stage.advice.append(_swap_advice(stage.peak - host.available - host.swap_free))
    return stage, disk_bps, tok_s


def ready_tier_exists(spec: ModelSpec) -> bool:
    """Whether the cache module reports a current ready tier for this checkpoint (False until it exists)."""
    try:
        from qwen_runner.cache import ready_tier_exists as probe  # type: ignore[attr-defined]
    except ImportError:
        return False
    try:
        return bool(probe(spec.path))
    except Exception as err:  # noqa: BLE001 - a broken cache only means "not ready"; the builder reports it
        log.debug("ready tier probe failed: %s", err)
        return False


def _ready_spec(model_dir: Path, dtype: str) -> ModelSpec | None:
    try:
        from qwen_runner.cache.load import ready_spec
    except ImportError:
        return None
    try:
        return ready_spec(model_dir, dtype)
    except Exception as err:  # noqa: BLE001 - a broken cache only means "read the headers"; chat reports it
        log.debug("ready tier spec unavailable: %s", err)
        return None


def make_plan(spec: ModelSpec, host: Host, max_context: int = S.DEFAULT_MAX_CONTEXT,
              compute_dtype: str = "bf16", ready_tier: bool | None = None, disk_probe: bool = True,
              build_target: str = BUILD_READY) -> MemoryPlan:
    if max_context < 1:
        raise QwenRunnerError(f"--max-context {max_context} must be at least 1")
    if compute_dtype not in COMPUTE_DTYPE_BYTES:
        raise QwenRunnerError(f"compute dtype {compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPE_BYTES)}")
    ready = ready_tier_exists(spec) if ready_tier is None else ready_tier
    build = plan_build(spec, host, compute_dtype, build_target)
    run, disk_bps, tok_s = plan_run(spec, host, max_context, compute_dtype, ready, disk_probe)
    return MemoryPlan(spec.summary(), host, max_context, compute_dtype, {BUILD: build, RUN: run}, disk_bps, tok_s)


def default_compute_dtype() -> str:
    """What `chat` would pick here (precision.choose_dtype on this CPU's features)."""
    from qwen_runner import hardware, precision

    return precision.choose_dtype(hardware.detect_cpu().isa, "auto").dtype


def require(model: str, stage: str, max_context: int = S.DEFAULT_MAX_CONTEXT, budget: str | None = None,
            force: bool = False, compute_dtype: str | None = None, build_target: str = BUILD_READY) -> MemoryPlan | None:
    """Plan ``stage`` for MODEL before any heavy work; raise InsufficientMemoryError unless it fits or --force.

    Reads only config.json and safetensors headers, so refusing costs well under a second.
    """
    from qwen_runner.checkpoint import inspect_checkpoint, resolve_model_dir

    model_dir = resolve_model_dir(model)
    dtype = compute_dtype if compute_dtype in COMPUTE_DTYPE_BYTES else default_compute_dtype()
    # Running from a current ready tier: its manifest holds the spec, so no header is read.
    spec = _ready_spec(model_dir, dtype) if stage == RUN else None
    ready = True if spec is not None else None
    spec = spec or inspect_checkpoint(model_dir)
    host = detect_host(budget if budget is not None else S.load_settings().memory_budget)
    plan = make_plan(spec, host, max_context, dtype, ready_tier=ready, build_target=build_target)
    verdict = plan.stages[stage]
    if verdict.verdict == REFUSE:
        if force:
            log.warning("%s: %s; going ahead because of --force", stage, verdict.reason)
            return plan
        advice = "; ".join(verdict.advice) or "see `qwen-runner plan MODEL`"
        raise InsufficientMemoryError(f"refusing to {stage}: {verdict.reason}", f"{advice}; or pass --force to try anyway")
    if verdict.verdict == TIGHT:
        log.warning("%s: %s", stage, verdict.reason)
    return plan


# ---------------------------------------------------------------------------------------------- TEXT


def format_plan(plan: MemoryPlan) -> str:
    m = plan.spec
    lt = m["layer_types"]
    layers = f"{m['layers']} layers"
    if lt.get("linear_attention"):
        layers += f" ({lt['linear_attention']} linear-attention, {lt['full_attention']} full-attention)"
    shared = f", shared expert {m['shared_expert_intermediate_size']}" if m["shared_expert_intermediate_size"] else ""
    active = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in m["active_by_role"].items() if v)
    lines = [
        f"model    {m['path']}",
        f"         {m['architecture']}: {layers}, {m['experts']} experts top-{m['top_k']}{shared}, hidden {m['hidden_size']}, vocab {m['vocab_size']}",
        f"weights  {fmt_bytes(m['total_bytes'])} in {m['shards']} shard(s), {m['tensors']} tensors, {m['quantization'] or m['dtype']}",
        f"active   {fmt_bytes(m['active_bytes_per_token'])} read per decoded token ({active})",
        f"host     {plan.host.source}",
        f"plan     compute dtype {plan.compute_dtype}, --max-context {plan.max_context}",
        "",
        f"{'stage':<7}{'peak':>12}{'available':>12}  verdict",
    ]
    for stage in plan.stages.values():
        lines.append(f"{stage.stage:<7}{fmt_bytes(stage.peak):>12}{fmt_bytes(stage.available):>12}  {stage.verdict}")
        for name, value in stage.items.items():
            lines.append(f"         {name:<28}{fmt_bytes(value):>12}")
    notes = [(s.stage, s.reason, s.advice) for s in plan.stages.values() if s.reason or s.advice]
    if notes:
        lines.append("")
    for name, reason, advice in notes:
        if reason:
            lines.append(f"{name}: {reason}")
        for line in advice:
            lines.append(f"  advice: {line}")
    return "\n".join(lines)
