"""One-row (decode) matmuls: the oneDNN switch, the thread policy and ``linear``, the entry point of
the C++ GEMV. Every architecture's decode linears go through here (re-exported by ``layers``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from qwen_runner import kernels
from qwen_runner import settings as S
from qwen_runner.settings import MIN_GEMV_BYTES_PER_THREAD  # noqa: F401 (re-exported)

__all__ = ["matmul_backend", "gemv_threads", "thread_limit", "linear", "Linear", "MIN_GEMV_BYTES_PER_THREAD"]


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, except one bf16 row (decode) goes through our C++ GEMV when it is active.

    The kernel reads the weight at ~1.5x ATen's one-row speed (docs/models.md); anything it
    does not cover (other dtypes, many rows, a packed or strided weight, no kernel) is F.linear.
    Every architecture's one-row linears go through here (or ``Linear``): keep the signature.
    """
    if (x.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16 and x.dim() == 2 and x.shape[0] == 1
            and weight.is_contiguous()):
        y = kernels.linear(x, weight, bias)
        if y is not None:
            return y
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is ``linear`` (same parameters and state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
