"""Our C++ decode kernels (gemv.cpp, int4.cpp, attention.cpp): one-row bf16 and int4 GEMVs, fused one-token
MoEs (bf16, int4), decode attention, router and RMSNorm.

Why: torch's one-row bf16 matmul reads weights at about half the memory bandwidth and a MoE
layer costs ~2k+5 dispatched ops per token (docs/models.md has the microbenchmark). The
extension is JIT-compiled once with torch.utils.cpp_extension (gcc + ninja) into the
qwen-runner cache (or ``$TORCH_EXTENSIONS_DIR``) on first use and reused afterwards.

It is used only where it is fast: bf16, one row, a CPU with AVX512-BF16 (``auto``). Anything
else (no compiler, no ninja, a failed build, an error on a call) leaves the ATen path in charge
with one logged warning; importing this module never compiles and never fails.
``$QWEN_RUNNER_KERNELS``: ``auto`` (default), ``off``, or ``portable`` (the plain-loop C++ path,
for tests on any CPU). Callers go through ``models.layers.linear`` / ``StackedExperts.decode``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from importlib import metadata
from pathlib import Path

from qwen_runner import hardware
from qwen_runner.settings import MIN_GEMV_BYTES_PER_THREAD, kernel_mode, load_settings

log = logging.getLogger(__name__)

NAME = "qwen_runner_gemv"
SOURCES = [Path(__file__).with_name(name) for name in ("gemv.cpp", "int4.cpp", "attention.cpp")]
HEADER = Path(__file__).with_name("common.h")
_CFLAGS = ["-O3", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]  # resolves to the libgomp torch already loaded (same soname)

_UNTRIED = object()
_ops = _UNTRIED  # the loaded extension, or None when it is not in use
_avx512 = False
_int4_fast = False  # the AVX512-VBMI + VNNI int4 path (vpermt2b gathers, vpdpbusd multiplies); see int4.cpp
_state: dict = {"active": False, "kernel": "aten", "reason": "not loaded yet (loads with the first bf16 model)"}


def extensions_root() -> Path:
    """``$TORCH_EXTENSIONS_DIR`` if set, else ``<cache>/extensions/torch-<version>`` (a build per torch).

    Processes that point ``$QWEN_RUNNER_CACHE`` at a scratch cache (bench workers) get this root
    passed in ``$TORCH_EXTENSIONS_DIR`` so they reuse the build instead of compiling again.
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    return load_settings().cache_dir / "extensions" / f"torch-{metadata.version('torch')}"


def build_dir() -> Path:
    return extensions_root() / NAME


def _decide() -> tuple[bool, str | None]:
    """(use the AVX512 path, reason not to load at all or None)."""
    mode = kernel_mode()
    if mode == "off":
        return False, "off ($QWEN_RUNNER_KERNELS=off)"
    if mode == "portable":
        return False, None
    if not hardware.detect_cpu().has("avx512_bf16"):
        return False, "CPU lacks avx512_bf16: ATen's GEMV is faster than the portable C++ loops"
    return True, None


def _int4_fast_on_this_cpu(avx512: bool) -> bool:
    cpu = hardware.detect_cpu()
    return avx512 and cpu.has("avx512vbmi") and cpu.has("avx512_vnni")


def _label(avx512: bool) -> str:
    """What ``info`` and ``bench`` call the decode kernels: the bf16 GEMV and the int4 path."""
    if not avx512:
        return "C++ portable GEMV"
    if _int4_fast_on_this_cpu(avx512):
        return "C++ AVX512-BF16 GEMV, AVX512-VNNI int4"
    return "C++ AVX512-BF16 GEMV, ATen int4 (no AVX512-VBMI)"


def _load():
    global _avx512, _int4_fast
    avx512, skip = _decide()
    if skip:
        _state.update(active=False, kernel="aten", reason=skip)
        return None
    start = time.perf_counter()
    try:
        from torch.utils import cpp_extension

        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        # torch rebuilds when a source or a flag changes; the header's hash is passed as a flag so that an
        # edit to common.h alone rebuilds too
        header = hashlib.sha256(HEADER.read_bytes()).hexdigest()[:16]
        module = cpp_extension.load(NAME, [str(p) for p in SOURCES],
                                    extra_cflags=[*_CFLAGS, f"-DQR_COMMON_H={header}"], extra_ldflags=list(_LDFLAGS),
                                    build_directory=str(directory), verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: keep ATen
        log.warning("C++ decode kernels unavailable, using ATen matmuls: %s", _one_line(exc))
        _state.update(active=False, kernel="aten", reason=f"build failed: {_one_line(exc)}")
        return None
    seconds = time.perf_counter() - start
    _avx512 = avx512
    _int4_fast = _int4_fast_on_this_cpu(avx512)
    kernel = _label(avx512)
    _state.update(active=True, kernel=kernel, reason=f"loaded in {seconds:.1f} s from {directory}",
                  load_seconds=round(seconds, 2))
    log.info("%s loaded in %.1f s (build dir %s)", kernel, seconds, directory)
    return module


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]


def ops():
    """The extension module, loading (and if needed compiling) it on the first call; None if not in use."""
    global _ops
    if _ops is _UNTRIED:
        _ops = _load()
    return _ops


def active() -> bool:
    return ops() is not None


def status() -> dict:
    """What ``info`` shows, without compiling: the kernel in use (or planned) and why."""
    if _ops is _UNTRIED:
        avx512, skip = _decide()
        if skip:
            return {"active": False, "kernel": "aten", "reason": skip}
        built = any(build_dir().glob(f"{NAME}*.so")) if build_dir().is_dir() else False
        kernel = _label(avx512)
        reason = "built; loads with the first bf16 model" if built else "compiles (once) with the first bf16 model"
        return {"active": None, "kernel": kernel, "reason": reason}
    return dict(_state)


def _disable(exc: BaseException) -> None:
    global _ops
    _ops = None
    log.warning("C++ decode kernel failed, using ATen matmuls from now on: %s", _one_line(exc))
    _state.update(active=False, kernel="aten", reason=f"disabled after an error: {_one_line(exc)}")


def _call(name: str, *args):
    """The extension's op ``name`` on ``args``; None when the caller must use its ATen path (not loaded,
    or this call failed: then the kernels are disabled for the process, with one warning)."""
    op = ops() if _ops is _UNTRIED else _ops
    if op is None:
        return None
    try:
        return getattr(op, name)(*args)
    except (RuntimeError, TypeError, ValueError) as exc:
        _disable(exc)
        return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``x [1, K] @ weight.T (+ bias)`` in bf16 by the C++ GEMV; None when the caller must use ATen."""
    return _call("linear", x, weight, bias, _avx512, MIN_GEMV_BYTES_PER_THREAD)


def moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, experts: torch.Tensor,
        weights: torch.Tensor) -> torch.Tensor | None:
    """One token through its k stacked experts (see gemv.cpp ``moe``); None when the caller must use ATen."""
    return _call("moe", x, w13, w2, experts, weights, _avx512, MIN_GEMV_BYTES_PER_THREAD)


def attention_decode(qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                     cos: torch.Tensor, signed_sin: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                     slot: int, pos: int, heads: int, kv_heads: int, scale: float) -> torch.Tensor | None:
    """One decode step of GQA attention from the fused qkv row (attention.cpp ``attention_decode``): q/k norm,
    rotary, cache write, attention; None when the caller must run the torch ops."""
    return _call("attention_decode", qkv, q_norm, k_norm, eps, cos, signed_sin, cache_k, cache_v, slot, pos, heads,
                 kv_heads, scale, _avx512, MIN_GEMV_BYTES_PER_THREAD)


def route_topk(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One token's top-k softmax routing from its bf16 router logits (gemv.cpp ``route_topk``):
    (weights [1, k] bf16, experts [1, k] int64); None when the caller must run the torch ops."""
    return _call("route_topk", logits, top_k, normalize)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool) -> torch.Tensor | None:
    """RMSNorm of a few bf16 rows in one call (gemv.cpp ``rms_norm``); None when the caller must use torch."""
    return _call("rms_norm", x, weight, eps, zero_centered)


def _int4_in_use() -> bool:
    """The int4 ops run where they beat ATen's int4pack kernel: with AVX512-VBMI and VNNI, or the portable
    loops when asked for (tests). An AVX512-BF16 CPU without VBMI (Cooper Lake) keeps ATen's. Loads the
    extension first, so the flags it reads are this CPU's."""
    return ops() is not None and (_int4_fast or not _avx512)


def int4_decode() -> str | None:
    """The C++ path one-token int4 matmuls take, or None where ATen's int4pack kernel runs them."""
    if _ops is _UNTRIED or not _int4_in_use():
        return None
    return "C++ AVX512-VNNI int4" if _int4_fast else "C++ portable int4"


def linear_int4(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor | None:
    """``x [1, K] @ W.T`` for W in torch's CPU int4pack layout (bf16 scales); None when the caller must
    use ``aten._weight_int4pack_mm_for_cpu``."""
    if not _int4_in_use():
        return None
    return _call("linear_int4", x, packed, sz, _int4_fast, MIN_GEMV_BYTES_PER_THREAD)


def moe_int4(x: torch.Tensor, w13: torch.Tensor, sz13: torch.Tensor, w2: torch.Tensor, sz2: torch.Tensor,
             experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
    """One token through its k int4pack experts in one call (int4.cpp ``moe_int4``); None when the caller
    must use the per-expert ATen int4 path."""
    if not _int4_in_use():
        return None
    return _call("moe_int4", x, w13, sz13, w2, sz2, experts, weights, _int4_fast, MIN_GEMV_BYTES_PER_THREAD)


def reset() -> None:
    """Forget the load decision (tests switch ``$QWEN_RUNNER_KERNELS`` between runs)."""
    global _ops, _avx512, _int4_fast
    _ops = _UNTRIED
    _avx512 = _int4_fast = False
    _state.clear()
    _state.update(active=False, kernel="aten", reason="not loaded yet (loads with the first bf16 model)")
