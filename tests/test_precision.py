"""The dtype chain decided from CPU features: every step walked with injected feature sets."""

from __future__ import annotations

import pytest

from qwen_runner import precision


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"amx_fp16", "amx_bf16", "avx512_bf16", "avx512_fp16"}, "fp16"),  # Granite Rapids
        ({"amx_bf16", "avx512_bf16", "avx512_fp16"}, "bf16"),  # Sapphire Rapids: fp16 has no AMX
        ({"avx512_bf16"}, "bf16"),  # Zen 4, Cooper Lake
        ({"avx512_fp16"}, "fp16"),
        ({"avx2", "avx512f"}, "fp32"),  # Skylake-X
        (set(), "fp32"),
    ],
)
def test_dtype_from_features(flags, expected):
    isa = {flag: True for flag in flags}
    choice = precision.choose_dtype(isa)
    assert choice.dtype == expected and choice.reason


def test_explicit_request_wins_and_is_validated():
    assert precision.choose_dtype({}, "bf16").dtype == "bf16"
    with pytest.raises(ValueError):
        precision.choose_dtype({}, "int3")


def test_chain_steps_down_to_fp32_and_stops():
    assert precision.next_dtype("fp16") == "bf16"
    assert precision.next_dtype("bf16") == "fp32"
    assert precision.next_dtype("fp32") is None


def test_torch_dtype_names():
    import torch

    assert precision.DtypeChoice("bf16", "").torch_dtype() is torch.bfloat16
