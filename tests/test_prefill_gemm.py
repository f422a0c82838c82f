"""Prefill matmuls as fp32 GEMMs on widened bf16 weights (models.matmul), and the denormal flush.

Widening changes the kernel, not the math: bf16 x bf16 products are exact in fp32 and both paths
accumulate in fp32 and round once to bf16, so outputs differ only by accumulation order (about one
bf16 ulp where they differ at all).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from qwen_runner import hardware, settings
from qwen_runner.errors import QwenRunnerError
from qwen_runner.models import matmul
from qwen_runner.models.layers import StackedExperts, linear
from qwen_runner.models.loader import load
from tests.conftest import model_path

BF16_ULP = 2 ** -7  # relative spacing of bf16 values (8 significand bits)


@pytest.fixture
def prefill_mode(monkeypatch):
    """Set ``$QWEN_RUNNER_PREFILL_FP32`` and forget the cached decision, before and after."""
    def set_mode(mode: str) -> None:
        monkeypatch.setenv(settings.ENV_PREFILL_FP32, mode)
        matmul.reset()
    yield set_mode
    matmul.reset()


def _cpu_with(monkeypatch, flags: set[str]) -> None:
    real = hardware.detect_cpu()
    fake = dataclasses.replace(real, isa={flag: flag in flags for flag in {*real.isa, *flags}})
    monkeypatch.setattr(hardware, "detect_cpu", lambda *a, **k: fake)


def test_auto_widens_only_without_amx(prefill_mode, monkeypatch):
    prefill_mode("auto")
    _cpu_with(monkeypatch, {"avx512f", "avx512_bf16"})
    assert matmul.prefill_gemm()[0] is True
    _cpu_with(monkeypatch, {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
    assert matmul.prefill_gemm() == (False, "AMX-BF16: oneDNN's bf16 GEMM is the fast one")


def test_env_overrides_and_rejects_bad_values(prefill_mode):
    prefill_mode("off")
    assert matmul.prefill_gemm()[0] is False
    prefill_mode("on")
    assert matmul.prefill_gemm()[0] is True
    prefill_mode("sometimes")
    with pytest.raises(QwenRunnerError, match="QWEN_RUNNER_PREFILL_FP32"):
        matmul.prefill_gemm()


def test_widening_needs_bf16_and_enough_rows(prefill_mode):
    prefill_mode("on")
    rows = settings.PREFILL_FP32_MIN_ROWS
    assert matmul.widen_prefill(torch.zeros(rows, 8, dtype=torch.bfloat16))
    assert not matmul.widen_prefill(torch.zeros(rows - 1, 8, dtype=torch.bfloat16))
    assert not matmul.widen_prefill(torch.zeros(rows, 8))  # fp32 models: F.linear already is fp32


@pytest.mark.parametrize("rows,k,n", [(48, 64, 40), (200, 96, 2 * settings.PREFILL_FP32_BLOCK_ROWS + 16)])
def test_widened_linear_matches_the_bf16_gemm(prefill_mode, rows, k, n):
    """Block boundaries (n spans three weight blocks), bias, 3-D input."""
    prefill_mode("on")
    torch.manual_seed(rows + n)
    x, w, b = torch.randn(1, rows, k).bfloat16(), torch.randn(n, k).bfloat16(), torch.randn(n).bfloat16()
    got, want = linear(x, w, b), F.linear(x, w, b)
    exact = F.linear(x.float(), w.float(), b.float())
    assert got.shape == want.shape == (1, rows, n) and got.dtype == torch.bfloat16
    # both round the fp32-accumulated result once: each is within one ulp of the exact product
    for out in (got, want):
        assert ((out.float() - exact).abs() <= BF16_ULP * exact.abs() + 1e-3).all()
    assert (got == want).float().mean() >= 0.9


def test_one_row_and_few_rows_are_not_widened(prefill_mode, monkeypatch):
    prefill_mode("on")
    calls = []
    monkeypatch.setattr(matmul, "widened", lambda *a: calls.append(a) or F.linear(*a))
    w = torch.randn(32, 16).bfloat16()
    linear(torch.randn(1, 16).bfloat16(), w)
    linear(torch.randn(settings.PREFILL_FP32_MIN_ROWS - 1, 16).bfloat16(), w)
    assert calls == []
    linear(torch.randn(settings.PREFILL_FP32_MIN_ROWS, 16).bfloat16(), w)
    assert len(calls) == 1


def test_widened_experts_match_the_bf16_experts(prefill_mode):
    torch.manual_seed(0)
    experts = StackedExperts(num_experts=4, hidden=64, intermediate=32)
    experts.w13.data = torch.randn(4, 64, 64).bfloat16() * 0.1
    experts.w2.data = torch.randn(4, 64, 32).bfloat16() * 0.1
    x = torch.randn(256, 64).bfloat16()
    chosen = torch.stack([torch.randperm(4)[:2] for _ in range(256)])
    weights = torch.rand(256, 2).bfloat16()
    out = {}
    for mode in ("off", "on"):
        prefill_mode(mode)
        out[mode] = experts(x, weights, chosen)
    scale = out["off"].float().abs().max()
    assert (out["on"].float() - out["off"].float()).abs().max() <= 4 * BF16_ULP * scale


@pytest.mark.parametrize("name", ["tiny-qwen3-next", "tiny-qwen3-moe"])
def test_widened_prefill_model_logits_match(prefill_mode, name):
    """A 100-token prefill of a whole model, widened vs oneDNN bf16: same top-1 nearly everywhere."""
    model, _tok, _spec = load(model_path(name), dtype=torch.bfloat16)
    ids = torch.randint(0, 150000, (1, 100), generator=torch.Generator().manual_seed(1))
    logits = {}
    for mode in ("off", "on"):
        prefill_mode(mode)
        with torch.inference_mode():
            logits[mode] = model(ids, model.make_cache(128))[0]
    agree = (logits["on"].argmax(-1) == logits["off"].argmax(-1)).float().mean()
    cosine = F.cosine_similarity(logits["on"], logits["off"], dim=-1).min()
    assert agree >= 0.95 and cosine >= 0.999, (agree, cosine)


def test_open_model_flushes_denormals():
    """In a fresh process, open_model sets flush-to-zero before the OpenMP pool exists, so a bmm on a
    denormal state reads it as zero on 2 threads too (denormal arithmetic is ~100x slower)."""
    code = (
        "import time, torch\n"
        "from qwen_runner.runtime import flush_denormals\n"
        "flush_denormals(); torch.set_num_threads(2)\n"
        "a = torch.randn(16, 64, 128); s = torch.full((16, 128, 128), 1e-39)\n"
        "print(torch.bmm(a, s).abs().max().item())\n"
        "assert torch.tensor([1e-39]).mul(1.0).item() == 0.0\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) == 0.0  # denormal inputs read as zero in the workers too
