"""All defaults and environment variables in one place.

Every tunable the tool reads from the environment is named here; code elsewhere
asks ``load_settings()`` instead of reading ``os.environ`` itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qwen_runner.errors import QwenRunnerError

# Environment variables the tool honours.
ENV_CACHE = "QWEN_RUNNER_CACHE"
ENV_THREADS = "QWEN_RUNNER_THREADS"
ENV_WAIT_POLICY = "QWEN_RUNNER_OMP_WAIT_POLICY"
ENV_MEMORY_BUDGET = "QWEN_RUNNER_MEMORY_BUDGET"
ENV_KERNELS = "QWEN_RUNNER_KERNELS"
ENV_PREFILL_FP32 = "QWEN_RUNNER_PREFILL_FP32"

# OpenMP's own variables, which we set before torch is imported.
OMP_NUM_THREADS = "OMP_NUM_THREADS"
OMP_WAIT_POLICY = "OMP_WAIT_POLICY"
MKL_NUM_THREADS = "MKL_NUM_THREADS"

# PASSIVE: idle OpenMP workers sleep instead of spinning. On a shared 2-core box
# the default (spinning) policy made 2-thread decode-size matmuls ~10x slower,
# see docs/threads.md for the measurement that chose this default.
DEFAULT_WAIT_POLICY = "PASSIVE"
WAIT_POLICIES = ("PASSIVE", "ACTIVE")

APP_NAME = "qwen-runner"


@dataclass(frozen=True)
class Settings:
    cache_dir: Path
    threads: int | None
    wait_policy: str
    memory_budget: str | None


def default_cache_dir(env: dict[str, str] | None = None) -> Path:
    """``$QWEN_RUNNER_CACHE``, else ``$XDG_CACHE_HOME/qwen-runner``, else ``~/.cache/qwen-runner``."""
    env = os.environ if env is None else env
    if env.get(ENV_CACHE):
        return Path(env[ENV_CACHE]).expanduser().resolve()
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / APP_NAME).resolve()


def load_settings(env: dict[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    threads = env.get(ENV_THREADS) or None
    if threads is not None and not (threads.isdigit() and int(threads) > 0):
        raise QwenRunnerError(f"{ENV_THREADS}={threads!r} is not a positive integer", f"unset it or set e.g. {ENV_THREADS}=4")
    wait_policy = env.get(ENV_WAIT_POLICY, DEFAULT_WAIT_POLICY).upper()
    if wait_policy not in WAIT_POLICIES:
        raise QwenRunnerError(f"{ENV_WAIT_POLICY}={wait_policy!r} is not one of {', '.join(WAIT_POLICIES)}")
    return Settings(
        cache_dir=default_cache_dir(env),
        threads=int(threads) if threads else None,
        wait_policy=wait_policy,
        memory_budget=env.get(ENV_MEMORY_BUDGET) or None,
    )

# C++ decode kernels (qwen_runner/kernels): auto = on where the CPU has AVX512-BF16; portable = the
# plain-loop C++ path on any CPU (tests); off = ATen only.
KERNEL_MODES = ("auto", "off", "portable")
DEFAULT_KERNEL_MODE = "auto"
# A one-row GEMV (ATen's under ``models.matmul.gemv_threads``, or the C++ GEMV / fused MoE call) gets
# another OpenMP thread per this many weight bytes; below it the team wake-up and barrier cost more than
# the second thread saves. Measured: 1-2 MB bf16 expert GEMVs ran at ~19 GB/s on 1 thread and ~18 on 2,
# while the 311 MB lm_head went from 20 to 30 GB/s (docs/models.md).
MIN_GEMV_BYTES_PER_THREAD = 4 * 2**20
# bf16 RMSNorms over at most this many elements (decode: one token's hidden state, its q/k heads) run in
# one C++ call when the kernels are active: torch's CPU rms_norm is a composite, ~25 us for one 1024-wide
# row and ~30 norms per decoded token; prefill-size norms stay with torch (vectorized, multi-threaded).
RMS_NORM_KERNEL_MAX_ELEMENTS = 16384


def kernel_mode(env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    mode = env.get(ENV_KERNELS, DEFAULT_KERNEL_MODE).lower()
    if mode not in KERNEL_MODES:
        raise QwenRunnerError(f"{ENV_KERNELS}={mode!r} is not one of {', '.join(KERNEL_MODES)}",
                              f"unset it or set {ENV_KERNELS}=auto")
    return mode


# Multi-row (prefill) bf16 matmuls: computed as fp32 GEMMs on bf16 weights widened block by block, where
# the CPU has no AMX. Without AMX, oneDNN's AVX512-BF16 GEMM ran at ~80 GFLOPS on the 2-core Xeon while
# fp32 sgemm ran ~150 (512x1024x2048, 1 thread); widened, [512, 1024] x [1024, 6176] went 74 -> 44 ms and
# an expert-size [64, 512] x [512, 1024] 0.87 -> 0.54 ms (docs/models.md). bf16 x bf16 products are exact
# in fp32 and both accumulate in fp32, so results agree to accumulation order. auto = on without AMX-BF16.
PREFILL_FP32_MODES = ("auto", "on", "off")
# Fewer rows than this stay in bf16: widening the weight costs as much as the GEMM saves (32 rows measured
# slower widened, 64 faster). Experts too: bench-qwen3-next's 512-token prefill (~64 rows per expert) took
# 2.1 s with experts widened from 48 rows, 2.5 s from 96, 3.3 s never (dense linears widened in all three).
PREFILL_FP32_MIN_ROWS = 48
# Weight rows widened at a time: a [1024, K] fp32 block stays in cache (a whole 9216-row weight widened at
# once cost 18 ms in page faults alone).
PREFILL_FP32_BLOCK_ROWS = 1024


def prefill_fp32_mode(env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    mode = env.get(ENV_PREFILL_FP32, "auto").lower()
    if mode not in PREFILL_FP32_MODES:
        raise QwenRunnerError(f"{ENV_PREFILL_FP32}={mode!r} is not one of {', '.join(PREFILL_FP32_MODES)}",
                              f"unset it or set {ENV_PREFILL_FP32}=auto")
    return mode


# lm_head format (--lm-head on build-cache, chat, generate, bench; docs/quantization.md "int4 lm_head").
# checkpoint: as stored (AutoRound keeps lm_head 16-bit); int4: an RTN copy (asymmetric, min-max per
# group) packed for the int4 kernel at build/load time. The embedding stays 16-bit, tied or not. The
# int4 head lives in its own cache variant folder (<dtype>-<backend>-<suffix>) and is recorded in the manifest.
LM_HEAD_CHECKPOINT, LM_HEAD_INT4 = "checkpoint", "int4"
LM_HEAD_FORMATS = (LM_HEAD_CHECKPOINT, LM_HEAD_INT4)
DEFAULT_LM_HEAD = LM_HEAD_CHECKPOINT
LM_HEAD_VARIANT_SUFFIX = {LM_HEAD_INT4: "head4"}
# Group size of the int4 head (kernel-legal: 32/64/128/256). Measured on models/demo (real Qwen2.5-Coder
# weights, 1024 tokens of this repo's docs, bf16; scripts/measure_lm_head_int4.py): mean KL from the 16-bit
# head 0.016 / 0.022 / 0.030 and top-1 agreement 92.0 / 90.8 / 88.4% at group 32 / 64 / 128, for 85 / 77 /
# 72 MB (bf16 head 272 MB) and one-row head times 8.2 / 7.3 / 7.0 ms (bf16 20.0 ms, 1 thread, busy box).
# 64 (also mlx-lm's default) keeps most of 128's speed with ~28% less KL. When the hidden size is not a
# multiple of it, the largest smaller kernel group that divides it is used.
LM_HEAD_INT4_GROUP = 64
# Rows quantized and packed at a time (a multiple of the int4 packing's 64-row block): bounds the fp32 and
# int32 scratch of a 151936 x 2048 head to a few tens of MB instead of ~2.5 GB.
LM_HEAD_QUANT_CHUNK_ROWS = 8192


# Generation defaults (chat, generate, bench).
DEFAULT_MAX_CONTEXT = 4096  # tokens the KV/state cache is allocated for unless --max-context says otherwise
DEFAULT_CHAT_MAX_TOKENS = 1024
DEFAULT_GENERATE_MAX_TOKENS = 128
# Qwen's recommended sampling for chat (non-thinking mode); --temperature 0 makes it greedy.
DEFAULT_CHAT_TEMPERATURE = 0.7
DEFAULT_CHAT_TOP_P = 0.8
DEFAULT_CHAT_TOP_K = 20

# Memory planner (qwen_runner/planner.py, docs/planner.md). All sizes in bytes.
GIB = 1024**3
MIB = 1024**2
# RSS of an idle process after `import torch` and qwen_runner's runtime modules (torch 2.13 CPU; the
# runtime no longer imports transformers, which cost +64 MiB). Most of it is torch's shared libraries,
# file-backed pages whose residency depends on the page cache: measured 226 MiB from a venv whose
# libraries the kernel had partly evicted, 282 MiB from a freshly installed one (a fresh CI checkout).
# Every run stage runs inside such a process; the planner takes the middle.
RUNTIME_BASELINE_RSS = 266 * MIB
# The Qwen tokenizer (151k-token BPE) loaded by qwen_runner.tokenizer (tokenizers + the jinja2 chat
# template): +92 MiB measured over the baseline (tiny models and demo alike); 100 MiB is the allowance.
TOKENIZER_RSS = 100 * MIB
# oneDNN/AMX kernel init on the first forward, allocator slack, thread stacks: a fixed extra.
RUNTIME_SLACK = 64 * MIB
# While loading, one layer (or the embedding/lm_head) is live twice: the mapped file pages being read
# and the converted/stacked copy. Measured on demo: +281 MiB peak over the loaded state, its largest
# unit (lm_head) being 260 MiB. Counted as this many copies of the largest unit.
LOAD_TRANSIENT_UNITS = 1
# KV cache element size (bf16/fp16 compute dtype) and the Qwen3-Next recurrent state (kept in fp32 for
# accuracy of the gated-delta recurrence) and conv window (compute dtype).
KV_CACHE_DTYPE_BYTES = 2
RECURRENT_STATE_DTYPE_BYTES = 4
CONV_STATE_DTYPE_BYTES = 2
# Prefill runs in chunks of this many tokens; activations are sized for one chunk at fp32.
PREFILL_CHUNK_TOKENS = 512
ACTIVATION_DTYPE_BYTES = 4
# Live fp32 copies of the hidden state per token in a layer's forward (residual, normed, attn out, ...).
# Attention scores are not itemized: torch's CPU SDPA kernel works in blocks.
ACTIVATION_HIDDEN_COPIES = 8
# Anonymous RSS of `qwen-runner build-cache` before its first unit (python, torch, safetensors, tqdm; no
# tokenizer): peak RssAnon of a tiny-qwen3-moe build measured 145-150 MiB here (scripts/measure_build_memory.py).
BUILD_BASELINE_RSS = 150 * MIB
# The builder's per-tensor bookkeeping: the header spec, the safetensors handles and name index, the
# fingerprint. Measured +230 MiB for the 80B checkpoint's 222,447 tensors (~1,085 bytes each).
BUILD_BYTES_PER_TENSOR = 1100
# Freed unit buffers the allocator keeps mapped (glibc serves 128 KiB-32 MiB blocks from its heap, which
# it trims lazily): measured +36-44 MiB over the live bytes on demo's bf16 and fp32 builds; counted as
# min(largest unit held, this).
BUILD_ALLOCATOR_SLACK = 40 * MIB
# Scratch for the largest packed tensor while int4 is repacked (int4 -> int8 values, i.e. x2 of the
# packed bytes, and a same-size repacked copy).
BUILD_UNPACK_FACTOR = 3
# Verdicts: ok while the peak stays under this share of available memory; tight up to all of it.
PLAN_OK_FRACTION = 0.85
# Headroom added when we advise swap, so the advice is not itself "tight".
SWAP_ADVICE_HEADROOM = 2 * GIB
SWAP_SCRIPT = "setup/swap.sh"
# How much of a checkpoint file the planner reads to measure disk speed "now" (only when the model
# exceeds RAM and will stream from disk), and the most time it may take.
DISK_PROBE_BYTES = 64 * MIB
DISK_PROBE_SECONDS = 0.5
# --max-context advice is rounded down to a multiple of this.
CONTEXT_ADVICE_STEP = 1024

# Tiered cache (qwen_runner/cache/, docs/cache.md).
# Bump when the on-disk layout or manifest schema changes: older caches are then rebuilt, never misread.
CACHE_FORMAT_VERSION = 1
CACHE_FILE_MODE = 0o600  # cache files are private to the user
CACHE_DIR_MODE = 0o700
CACHE_HASH_CHUNK_BYTES = 8 * MIB  # streaming checksum read size
CACHE_FINGERPRINT_CHARS = 12  # hex digits of the source fingerprint in the cache folder name
# Test hook: "POINT[:N]" makes the builder SIGKILL itself at the N-th (default 1st) crash point POINT
# (see qwen_runner/cache/store.py CRASH_POINTS). Used by tests/test_cache_crash.py only.
ENV_CACHE_CRASH_AT = "QWEN_RUNNER_CACHE_CRASH_AT"
