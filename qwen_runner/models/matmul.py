"""The model's matmuls: the oneDNN switch, the one-row thread policy and ``linear``, the entry point of
the C++ GEMV (one row) and of widened fp32 GEMMs (many rows, CPUs without AMX). Every architecture's
linears go through here (re-exported by ``layers``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from qwen_runner import hardware, kernels
from qwen_runner import settings as S
from qwen_runner.settings import MIN_GEMV_BYTES_PER_THREAD  # noqa: F401 (re-exported)

__all__ = ["matmul_backend", "gemv_threads", "thread_limit", "linear", "Linear", "MIN_GEMV_BYTES_PER_THREAD",
           "widen_prefill", "widened", "widened_mm", "prefill_gemm", "prefill_gemm_status"]


# --------------------------------------------------------------------------- matmul backend

@contextmanager
def matmul_backend(onednn: bool) -> Iterator[None]:
    """Route CPU matmuls through oneDNN (``onednn=True``) or ATen's own kernels, restoring after.

    Measured on this repo's 2-core AVX512-BF16 box (docs/models.md): for one-row bf16
    matmuls (decode GEMV), oneDNN reads weights at ~10 GB/s on one thread while ATen's
    native bf16 GEMV reads ~20 GB/s, so decode runs with oneDNN off. Multi-row (prefill)
    matmuls keep oneDNN, whose blocked bf16 kernels win there. The switch is one C call.
    """
    previous = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(onednn)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(previous)


def gemv_threads(nbytes: int, available: int) -> int:
    """Threads worth using for a one-row matmul reading ``nbytes`` of weights
    (``settings.MIN_GEMV_BYTES_PER_THREAD``, the policy the C++ kernels follow too)."""
    return max(1, min(available, nbytes // S.MIN_GEMV_BYTES_PER_THREAD))


@contextmanager
def thread_limit(threads: int) -> Iterator[None]:
    """Run the block with at most ``threads`` intra-op threads (set_num_threads costs ~0.1 us)."""
    previous = torch.get_num_threads()
    if threads >= previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- prefill GEMMs

_widen: bool | None = None


def prefill_gemm() -> tuple[bool, str]:
    """(widen bf16 prefill GEMMs to fp32, why): ``$QWEN_RUNNER_PREFILL_FP32``, else from CPU features
    (settings.PREFILL_FP32_MIN_ROWS says why: without AMX, fp32 sgemm outruns oneDNN's bf16 GEMM)."""
    mode = S.prefill_fp32_mode()
    if mode != "auto":
        return mode == "on", f"${S.ENV_PREFILL_FP32}={mode}"
    if hardware.detect_cpu().has("amx_bf16"):
        return False, "AMX-BF16: oneDNN's bf16 GEMM is the fast one"
    return True, "no AMX: fp32 GEMM on widened bf16 weights beats oneDNN's bf16 GEMM"


def prefill_gemm_status(dtype: str) -> dict:
    """What ``info`` and bench show: which GEMM a ``dtype`` model's prefill matmuls run, and why."""
    if dtype != "bf16":
        return {"widened": False, "kernel": f"{dtype} GEMM", "reason": "only bf16 prefill is widened"}
    widen, reason = prefill_gemm()
    return {"widened": widen, "kernel": "fp32 sgemm on widened bf16 weights" if widen else "oneDNN bf16 GEMM",
            "reason": reason}


def widen_prefill(x: torch.Tensor, min_rows: int | None = None) -> bool:
    """Whether a bf16 matmul over ``x``'s rows runs as an fp32 GEMM (decided once per process)."""
    global _widen
    min_rows = S.PREFILL_FP32_MIN_ROWS if min_rows is None else min_rows
    if x.dtype is not torch.bfloat16 or x.numel() < min_rows * x.shape[-1]:
        return False
    if _widen is None:
        _widen = prefill_gemm()[0]
    return _widen


def reset() -> None:
    """Forget the prefill decision (tests switch ``$QWEN_RUNNER_PREFILL_FP32``)."""
    global _widen
    _widen = None


def widened(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` computed in fp32 on ``weight`` widened ``PREFILL_FP32_BLOCK_ROWS`` rows at a time,
    rounded once to ``x``'s dtype (the bf16 GEMM also accumulates in fp32 and rounds once)."""
    rows, n = x.numel() // x.shape[-1], weight.shape[0]
    x32 = x.reshape(rows, x.shape[-1]).float()
    out = torch.empty(rows, n, dtype=x.dtype)
    step = S.PREFILL_FP32_BLOCK_ROWS
    for begin in range(0, n, step):
        block = F.linear(x32, weight[begin:begin + step].float(),
                         None if bias is None else bias[begin:begin + step].float())
        out[:, begin:begin + step] = block
    return out.view(*x.shape[:-1], n)


def widened_mm(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """``x @ weight_t`` as one fp32 GEMM, rounded to ``x``'s dtype (for expert-size weights, widened whole)."""
    return (x.float() @ weight_t.float()).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, except one bf16 row (decode) goes through our C++ GEMV when it is active, and many
    bf16 rows (prefill) through ``widened`` fp32 GEMMs on CPUs where those are faster (``prefill_gemm``).

    The kernel reads the weight at ~1.5x ATen's one-row speed (docs/models.md); anything it
    does not cover (other dtypes, a packed or strided weight, no kernel) is F.linear.
    Every architecture's linears go through here (or ``Linear``): keep the signature.
    """
    if x.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16:
        if x.dim() == 2 and x.shape[0] == 1 and weight.is_contiguous():
            y = kernels.linear(x, weight, bias)
            if y is not None:
                return y
        elif widen_prefill(x):
            return widened(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is ``linear`` (same parameters and state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
