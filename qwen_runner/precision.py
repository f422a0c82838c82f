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


# ------------------------------------------------------------------------------------- walking the chain

# What a kernel raises when it lacks a dtype (torch: RuntimeError "... not implemented for 'Half'", some
# libraries NotImplementedError). Anything else (MemoryError, KeyboardInterrupt, our own
# errors) is not a dtype problem and propagates.
KERNEL_ERRORS = (RuntimeError, NotImplementedError)


@dataclass
class ChainRecord:
    """How the dtype was decided: the first choice, why, and every step down with its error."""

    chosen: str
    reason: str
    final: str = ""
    fallbacks: list = None  # [{"dtype", "stage", "error"}]

    def __post_init__(self):
        self.final = self.final or self.chosen
        self.fallbacks = list(self.fallbacks or [])

    def as_dict(self) -> dict:
        return {"chosen": self.chosen, "reason": self.reason, "final": self.final, "fallbacks": list(self.fallbacks)}

    @classmethod
    def from_dict(cls, data: dict) -> ChainRecord:
        return cls(data["chosen"], data.get("reason", ""), data.get("final", ""), data.get("fallbacks"))

    def summary(self) -> str:
        if not self.fallbacks:
            return f"{self.final} ({self.reason})"
        steps = "; ".join(f"{f['dtype']} failed at {f['stage']}: {f['error']}" for f in self.fallbacks)
        return f"{self.final} (fell back from {self.chosen}: {steps})"


def walk_chain(record: ChainRecord, stage, attempt, log=None):
    """``attempt(dtype)`` from ``record.final`` down the chain until one does not raise a kernel error.

    Each step down is logged as a warning and appended to ``record``; fp32 raising too is a
    ``KernelError`` (one line, with a hint). ``stage`` names where (a callable: asked after the error,
    for attempts with several stages). Returns ``attempt``'s result.
    """
    import logging

    from qwen_runner.errors import KernelError

    log = log or logging.getLogger(__name__)
    while True:
        dtype = record.final
        try:
            return attempt(dtype)
        except KERNEL_ERRORS as err:
            where = stage() if callable(stage) else stage
            dtype = record.final  # the attempt may have moved it (adopting a cache built lower)
            message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".strip()[:200]
            record.fallbacks.append({"dtype": dtype, "stage": where, "error": message})
            lower = next_dtype(dtype)
            if lower is None:
                raise KernelError(
                    f"no dtype works here: fp32 kernels failed at {where} ({message}) after "
                    f"{' -> '.join(f['dtype'] for f in record.fallbacks)}",
                ) from err
            log.warning("%s kernels failed at %s (%s): falling back to %s", dtype, where, message, lower)
            record.final = lower
