"""The compute dtype chain: fp16 -> bf16 -> fp32, decided from CPU features first.

A 16-bit dtype is chosen only where the CPU has instructions that make it pay;
without them torch emulates 16-bit math and fp32 is faster. A kernel that raises at
build or first use moves one step down the chain (``next_dtype``).
"""

from __future__ import annotations

from dataclasses import dataclass

CHAIN = ("fp16", "bf16", "fp32")

TORCH_DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str
    reason: str

    def torch_dtype(self):
        import torch

        return getattr(torch, TORCH_DTYPE_NAMES[self.dtype])


def choose_dtype(isa: dict[str, bool], requested: str = "auto") -> DtypeChoice:
    """Pick the compute dtype for this CPU; an explicit request wins."""
    if requested != "auto":
        if requested not in CHAIN:
            raise ValueError(f"unknown dtype {requested!r}; expected auto or one of {', '.join(CHAIN)}")
        return DtypeChoice(requested, "requested")
    if isa.get("amx_fp16"):
        return DtypeChoice("fp16", "AMX-FP16 tiles run fp16 matmuls natively")
    if isa.get("amx_bf16"):
        return DtypeChoice("bf16", "AMX-BF16 tiles run bf16 matmuls natively (fp16 would be emulated: no AMX-FP16)")
    if isa.get("avx512_bf16"):
        return DtypeChoice("bf16", "AVX512-BF16 dot products; halves weight bytes read per token")
    if isa.get("avx512_fp16"):
        return DtypeChoice("fp16", "AVX512-FP16 arithmetic without any bf16 instructions")
    return DtypeChoice("fp32", "no native 16-bit matmul instructions: 16-bit math would be emulated")


def next_dtype(dtype: str) -> str | None:
    """The next step down the chain, or None at fp32 (nothing left to fall back to)."""
    index = CHAIN.index(dtype)
    return CHAIN[index + 1] if index + 1 < len(CHAIN) else None


def matmul_kernel(dtype: str, isa: dict[str, bool]) -> str:
    """Which kernel family torch's CPU matmul dispatches to for this dtype here (oneDNN/MKL)."""
    if dtype == "bf16":
        return "oneDNN AMX-BF16" if isa.get("amx_bf16") else "oneDNN AVX512-BF16" if isa.get("avx512_bf16") else "emulated bf16"
    if dtype == "fp16":
        return "oneDNN AMX-FP16" if isa.get("amx_fp16") else "oneDNN AVX512-FP16" if isa.get("avx512_fp16") else "emulated fp16"
    return "MKL sgemm (AVX-512)" if isa.get("avx512f") else "MKL sgemm (AVX2)" if isa.get("avx2") else "MKL sgemm"
