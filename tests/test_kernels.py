"""The C++ decode kernels (qwen_runner/kernels): results vs fp32 references, and the ATen fallback.

Both code paths of gemv.cpp are checked where the CPU allows: the AVX512-BF16 one and the portable
loops (any CPU). Tolerances are bf16's: the kernel accumulates in fp32 and rounds once, so its
error against an fp32 reference is about one bf16 ulp of the output (2^-8 relative) plus the
intermediate roundings the torch path also makes.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from qwen_runner import hardware, kernels
from qwen_runner.models import layers
from qwen_runner.models.layers import StackedExperts, linear, swiglu

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler")

AVX512 = hardware.detect_cpu().has("avx512_bf16")
PATHS = [False, True] if AVX512 else [False]
# the fast int4 path needs AVX512-VBMI and VNNI (vpermt2b, vpdpbusd); the int4 ops' flag is "fast"
INT4_PATHS = [False, True] if AVX512 and all(hardware.detect_cpu().has(f) for f in ("avx512vbmi", "avx512_vnni")) \
    else [False]
ODD_LINEAR_SHAPES = [(1, 1), (5, 33), (7, 17), (37, 1000), (130, 96), (257, 1024), (1024, 1024)]


@pytest.fixture
def ops(monkeypatch):
    """The extension, loaded in ``auto`` mode here or ``portable`` where the CPU lacks AVX512-BF16."""
    monkeypatch.setenv("QWEN_RUNNER_KERNELS", "auto" if AVX512 else "portable")
    kernels.reset()
    module = kernels.ops()
    assert module is not None, kernels.status()
    yield module
    kernels.reset()


def _bf16(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).bfloat16()


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("avx512", PATHS)
@pytest.mark.parametrize("rows,cols", ODD_LINEAR_SHAPES)
def test_linear_matches_fp32_reference(ops, avx512, rows, cols):
    torch.manual_seed(rows * 1000 + cols)
    x, w, b = _bf16(1, cols), _bf16(rows, cols), _bf16(rows)
    want = x.float() @ w.float().T
    got = ops.linear(x, w, None, avx512, 1 << 20)
    assert got.shape == (1, rows) and got.dtype == torch.bfloat16
    assert _rel_err(got, want) <= 2 ** -7
    got_b = ops.linear(x, w, b, avx512, 1 << 20)
    assert _rel_err(got_b, want + b.float()) <= 2 ** -7


@pytest.mark.parametrize("avx512", PATHS)
def test_linear_threads_split_rows_without_changing_results(ops, avx512):
    torch.manual_seed(1)
    x, w = _bf16(1, 1000), _bf16(1030, 1000)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.linear(x, w, None, avx512, 1)
        torch.set_num_threads(2)
        two = ops.linear(x, w, None, avx512, 1)  # 1 byte per thread: always splits
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)


def _experts(num, hidden, inter, seed=0) -> StackedExperts:
    torch.manual_seed(seed)
    experts = StackedExperts(num, hidden, inter)
    experts.w13 = torch.nn.Parameter(_bf16(num, 2 * inter, hidden, scale=0.1), requires_grad=False)
    experts.w2 = torch.nn.Parameter(_bf16(num, hidden, inter, scale=0.1), requires_grad=False)
    return experts


def _moe_fp32(experts: StackedExperts, x, weights, chosen) -> torch.Tensor:
    out = torch.zeros(1, x.shape[1])
    for w, e in zip(weights[0].float(), chosen[0].tolist()):
        out += w * (swiglu(x.float() @ experts.w13[e].float().T) @ experts.w2[e].float().T)
    return out


@pytest.mark.parametrize("avx512", PATHS)
@pytest.mark.parametrize("num,top_k,hidden,inter", [(8, 1, 96, 40), (8, 8, 100, 36), (6, 2, 1024, 512),
                                                     (4, 4, 33, 17)])
def test_moe_matches_fp32_reference_and_aten_path(ops, avx512, num, top_k, hidden, inter):
    experts = _experts(num, hidden, inter, seed=num + top_k + hidden)
    x = _bf16(1, hidden)
    weights = torch.softmax(torch.randn(1, top_k), -1).bfloat16()
    chosen = torch.randperm(num)[:top_k].view(1, top_k)
    want = _moe_fp32(experts, x, weights, chosen)
    got = ops.moe(x, experts.w13, experts.w2, chosen[0], weights[0], avx512, 1 << 20)
    assert got.shape == (1, hidden) and got.dtype == torch.bfloat16
    aten = experts.decode_aten(x, weights, chosen)
    # same roundings of the intermediates as the ATen path; a final fp32 sum instead of bf16 partials
    assert _rel_err(got, want) <= 2 ** -5
    assert _rel_err(got, aten.float()) <= 2 ** -5
    assert _rel_err(aten, want) <= 2 ** -4  # the reference is itself right to that level


@pytest.mark.parametrize("avx512", PATHS)
def test_moe_threads_do_not_change_results(ops, avx512):
    experts = _experts(8, 100, 36)
    x, weights, chosen = _bf16(1, 100), torch.rand(1, 3).bfloat16(), torch.tensor([[5, 0, 7]])
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.moe(x, experts.w13, experts.w2, chosen[0], weights[0], avx512, 1)
        torch.set_num_threads(2)
        two = ops.moe(x, experts.w13, experts.w2, chosen[0], weights[0], avx512, 1)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)


def test_moe_rejects_bad_expert_index(ops):
    experts = _experts(4, 32, 16)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.moe(_bf16(1, 32), experts.w13, experts.w2, torch.tensor([4]), torch.ones(1), False, 1 << 20)


def test_layers_use_the_kernel_for_one_bf16_row_only(ops, monkeypatch):
    calls = []
    real = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda *a: calls.append(a[0].shape) or real(*a))
    w = _bf16(24, 40)
    linear(_bf16(1, 40), w)
    linear(_bf16(3, 40), w)  # prefill rows: F.linear
    linear(torch.randn(1, 40), w.float())  # fp32: F.linear
    linear(_bf16(1, 40), w.t().contiguous().t())  # strided weight: F.linear
    assert calls == [(1, 40)]


class _Broken:
    def __init__(self):
        self.calls = 0

    def linear(self, *args):
        self.calls += 1
        raise RuntimeError("simulated kernel failure")

    moe = linear


def test_fallback_to_aten_when_the_kernel_raises(monkeypatch, caplog):
    broken = _Broken()
    monkeypatch.setattr(kernels, "_ops", broken)
    x, w = _bf16(1, 40), _bf16(24, 40)
    with caplog.at_level(logging.WARNING, logger="qwen_runner.kernels"):
        first = linear(x, w)
        second = linear(x, w)
    assert torch.equal(first, F.linear(x, w)) and torch.equal(second, first)
    assert broken.calls == 1  # disabled after the first error
    assert [r.message for r in caplog.records if "failed" in r.message] and len(caplog.records) == 1
    assert kernels.status()["active"] is False and "simulated" in kernels.status()["reason"]
    experts = _experts(4, 40, 16)
    weights, chosen = torch.ones(1, 2).bfloat16(), torch.tensor([[1, 3]])
    assert torch.equal(experts.decode(x, weights, chosen), experts.decode_aten(x, weights, chosen))
    kernels.reset()


def test_fused_moe_fallback_when_it_raises(monkeypatch):
    monkeypatch.setattr(kernels, "_ops", _Broken())
    experts = _experts(4, 40, 16)
    x, weights, chosen = _bf16(1, 40), torch.ones(1, 2).bfloat16(), torch.tensor([[1, 3]])
    assert torch.equal(experts.decode(x, weights, chosen), experts.decode_aten(x, weights, chosen))
    kernels.reset()


def test_off_mode_never_builds(monkeypatch):
    monkeypatch.setenv("QWEN_RUNNER_KERNELS", "off")
    kernels.reset()
    assert kernels.ops() is None
    assert kernels.status()["kernel"] == "aten"
    x, w = _bf16(1, 40), _bf16(24, 40)
    assert torch.equal(layers.linear(x, w), F.linear(x, w))
    kernels.reset()


def test_build_failure_keeps_aten(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("Error building extension 'qwen_runner_gemv'")

    monkeypatch.setenv("QWEN_RUNNER_KERNELS", "portable")
    monkeypatch.setattr(cpp_extension, "load", fail)
    kernels.reset()
    with caplog.at_level(logging.WARNING, logger="qwen_runner.kernels"):
        assert kernels.ops() is None
    assert "unavailable" in caplog.text
    assert kernels.status()["active"] is False
    kernels.reset()


def test_info_names_the_decode_kernel_without_building(monkeypatch):
    from qwen_runner.info import collect_info, format_info

    monkeypatch.setenv("QWEN_RUNNER_KERNELS", "off")
    kernels.reset()
    info = collect_info()
    assert info["compute"]["decode_kernel"]["kernel"] == "aten"
    assert "decode    one-row bf16 and int4 matmuls + fused MoE: aten" in format_info(info)
    monkeypatch.setenv("QWEN_RUNNER_KERNELS", "portable")
    kernels.reset()
    assert collect_info()["compute"]["decode_kernel"]["kernel"] == "C++ portable GEMV"
    assert kernels._ops is kernels._UNTRIED  # info never compiles
    kernels.reset()


def test_bf16_decode_with_the_kernel_tracks_the_aten_decode(ops, models_dir, monkeypatch):
    """Teacher-forced bf16 decode of a tiny model: same next tokens with the C++ kernels as with ATen."""
    from qwen_runner.models.loader import load

    model, _, _ = load(models_dir / "tiny-qwen3-moe", dtype=torch.bfloat16)
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(3))

    def decode_logits():
        cache = model.make_cache(ids.shape[1])
        return torch.cat([model(ids[:, i:i + 1], cache)[0] for i in range(ids.shape[1])])

    used = {"linear": 0, "moe": 0}
    for name in used:
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name: used.__setitem__(
            _name, used[_name] + 1) or _real(*a))
    ours = decode_logits()
    assert used["linear"] > 0 and used["moe"] > 0, used
    monkeypatch.setattr(kernels, "_ops", None)  # ATen path
    aten = decode_logits()
    agree = (ours.argmax(-1) == aten.argmax(-1)).float().mean().item()
    assert agree >= 0.95, agree
    # Random tiny weights amplify a one-ulp difference (one of ~400 norms differs in 2 of 64 elements: the
    # fp32 sum order) into visible logit changes at some positions, so the bound is on the typical position.
    cosine = F.cosine_similarity(ours, aten, dim=-1)
    assert cosine.median() >= 0.99 and cosine.min() >= 0.9, cosine


def test_bad_kernel_mode_is_one_line_with_a_hint():
    from qwen_runner.errors import QwenRunnerError
    from qwen_runner.settings import kernel_mode

    with pytest.raises(QwenRunnerError, match="QWEN_RUNNER_KERNELS='fast'"):
        kernel_mode({"QWEN_RUNNER_KERNELS": "fast"})
    assert kernel_mode({}) == "auto"


# --------------------------------------------------------------------------- int4 (torch's int4pack layout)

def _qweight(n: int, k: int, group: int, seed: int):
    from qwen_runner.models.quantized import QWeight

    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scales = torch.rand(k // group, n, generator=g) * 0.02 + 0.001
    zeros = torch.randint(0, 16, (k // group, n), generator=g).float()
    return QWeight(q, scales, zeros, 4, group)


def test_int4pack_layout_is_what_the_kernels_read():
    """The C++ int4 kernels read torch's CPU int4pack layout directly: 64-row blocks, k-major, byte j of
    column k = row j (low nibble) and row 32 + j (high). If a torch release changes it, this fails."""
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    blocks = packed.reshape(2, 64, 32).to(torch.int32)
    rebuilt = torch.cat([torch.cat([(b & 15).t(), (b >> 4).t()]) for b in blocks])
    assert torch.equal(rebuilt, q)


@pytest.mark.parametrize("fast", INT4_PATHS)
@pytest.mark.parametrize("n,k,group", [(64, 32, 32), (128, 256, 128), (192, 512, 64), (64, 1024, 256)])
def test_int4_linear_matches_the_aten_int4_kernel(ops, fast, n, k, group):
    from qwen_runner.models.quantized import int4_mm

    packed, sz = _qweight(n, k, group, seed=n + k).pack(torch.bfloat16)
    x = _bf16(1, k)
    got = ops.linear_int4(x, packed, sz, fast, 1 << 20)
    want = int4_mm(x, packed, sz)
    assert got.shape == (1, n) and got.dtype == torch.bfloat16
    # both accumulate in fp32 and round once: at most a bf16 ulp apart
    assert _rel_err(got, want.float()) <= 2 ** -7


@pytest.mark.parametrize("fast", INT4_PATHS)
def test_int4_linear_keeps_small_inputs_next_to_an_outlier(ops, fast):
    """The fast path carries x as 15-bit integers scaled per group: a 1000x outlier coarsens its group's
    step to max/16256, still far below bf16's own rounding of the output."""
    from qwen_runner.models.quantized import int4_mm

    packed, sz = _qweight(128, 256, 128, seed=9).pack(torch.bfloat16)
    x = _bf16(1, 256)
    x[0, 3] = 1000.0
    want = x.float() @ _qweight(128, 256, 128, seed=9).dequantize(torch.float32).T
    got = ops.linear_int4(x, packed, sz, fast, 1 << 20)
    assert _rel_err(got, want) <= 2 ** -8
    assert _rel_err(got, int4_mm(x, packed, sz).float()) <= 2 ** -7


@pytest.mark.parametrize("fast", INT4_PATHS)
def test_int4_linear_threads_and_shape_checks(ops, fast):
    packed, sz = _qweight(256, 128, 32, seed=3).pack(torch.bfloat16)
    x = _bf16(1, 128)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.linear_int4(x, packed, sz, fast, 1)
        torch.set_num_threads(2)
        two = ops.linear_int4(x, packed, sz, fast, 1)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)
    odd, odd_sz = _qweight(80, 128, 32, seed=4).pack(torch.bfloat16)  # not whole 64-row blocks
    with pytest.raises(RuntimeError, match="multiple of 64"):
        ops.linear_int4(x, odd, odd_sz, fast, 1)


def _int4_experts(num: int, hidden: int, inter: int, group: int):
    from qwen_runner.models.quantized import QuantExperts

    pairs13 = [_qweight(2 * inter, hidden, group, seed=e).pack(torch.bfloat16) for e in range(num)]
    pairs2 = [_qweight(hidden, inter, group, seed=100 + e).pack(torch.bfloat16) for e in range(num)]
    state = {"w13_int4": torch.stack([p for p, _ in pairs13]), "w13_int4_sz": torch.stack([s for _, s in pairs13]),
             "w2_int4": torch.stack([p for p, _ in pairs2]), "w2_int4_sz": torch.stack([s for _, s in pairs2])}
    experts = QuantExperts(num, {k: (tuple(v.shape), v.dtype) for k, v in state.items()})
    experts.load_state_dict(state, assign=True)
    return experts


@pytest.mark.parametrize("fast", INT4_PATHS)
@pytest.mark.parametrize("num,top_k,hidden,inter,group", [(4, 2, 128, 64, 32), (8, 8, 256, 128, 128),
                                                          (6, 3, 1024, 512, 128), (4, 3, 128, 32, 32),
                                                          (5, 4, 256, 256, 32)])
def test_int4_moe_matches_the_per_expert_aten_path(ops, fast, num, top_k, hidden, inter, group, monkeypatch):
    experts = _int4_experts(num, hidden, inter, group)
    x = _bf16(1, hidden)
    weights = torch.softmax(torch.randn(1, top_k), -1).bfloat16()
    chosen = torch.randperm(num)[:top_k].view(1, top_k)
    got = ops.moe_int4(x, experts.w13_int4, experts.w13_int4_sz, experts.w2_int4, experts.w2_int4_sz,
                       chosen[0], weights[0], fast, 1 << 20)
    monkeypatch.setattr(kernels, "moe_int4", lambda *a: None)
    aten = experts(x, weights, chosen)  # QuantExperts' per-expert int4_mm loop
    assert got.shape == (1, hidden) and got.dtype == torch.bfloat16
    # the routing weight multiplies h before the down projection (as the bf16 fused op) instead of the
    # expert's output, and the k outputs are summed in fp32: bf16 rounding differences only
    assert _rel_err(got, aten.float()) <= 2 ** -5


@pytest.mark.parametrize("fast", INT4_PATHS)
def test_int4_moe_splits_experts_into_slices_for_more_threads_than_experts(ops, fast, monkeypatch):
    """One chosen expert on 2 threads: each thread takes a slice of its I columns (gate/up rows, SwiGLU,
    that slice's share of the down projection); the result matches the 1-thread whole-expert one."""
    experts = _int4_experts(3, 256, 256, 32)
    x, weights, chosen = _bf16(1, 256), torch.ones(1).bfloat16(), torch.tensor([2])
    args = (x, experts.w13_int4, experts.w13_int4_sz, experts.w2_int4, experts.w2_int4_sz, chosen, weights, fast, 1)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        whole = ops.moe_int4(*args)
        torch.set_num_threads(2)
        sliced = ops.moe_int4(*args)
    finally:
        torch.set_num_threads(previous)
    monkeypatch.setattr(kernels, "moe_int4", lambda *a: None)
    aten = experts(x, weights.view(1, 1), chosen.view(1, 1))
    assert _rel_err(sliced, whole.float()) <= 2 ** -7  # fp32 partial sums in another order only
    assert _rel_err(sliced, aten.float()) <= 2 ** -5


def test_quant_modules_route_one_bf16_row_to_the_int4_kernels(ops, monkeypatch):
    experts = _int4_experts(4, 128, 64, 32)
    calls = []
    real = kernels.moe_int4
    monkeypatch.setattr(kernels, "moe_int4", lambda *a: calls.append(a[0].shape) or real(*a))
    weights, chosen = torch.ones(1, 2).bfloat16(), torch.tensor([[0, 3]])
    experts(_bf16(1, 128), weights, chosen)
    experts(_bf16(2, 128), weights.repeat(2, 1), chosen.repeat(2, 1))  # prefill: grouped ATen path
    assert calls == [(1, 128)]


@pytest.mark.skipif(not AVX512, reason="needs the AVX512-BF16 kernels to be loaded in auto mode")
def test_int4_ops_leave_avx512_bf16_cpus_without_vbmi_to_aten(monkeypatch):
    """Cooper Lake has AVX512-BF16 but no VBMI: the int4 ops step aside there (ATen's int4pack kernel
    beats the portable loops), while the bf16 ops stay on."""
    no_vbmi = hardware.detect_cpu("model name\t: Cooper Lake\nflags\t\t: avx2 avx512f avx512bw avx512_bf16\n")
    monkeypatch.setattr(hardware, "detect_cpu", lambda *a: no_vbmi)
    monkeypatch.setenv("QWEN_RUNNER_KERNELS", "auto")
    kernels.reset()
    try:
        assert kernels.active()
        packed, sz = _qweight(64, 128, 32, seed=5).pack(torch.bfloat16)
        assert kernels.linear_int4(_bf16(1, 128), packed, sz) is None
        assert kernels.linear(_bf16(1, 128), _bf16(64, 128), None) is not None
    finally:
        kernels.reset()


@pytest.mark.parametrize("avx512", PATHS)  # one code path; parametrized for symmetry with the others
@pytest.mark.parametrize("shape,zero_centered", [((1, 1024), False), ((1, 1024), True), ((16, 64), False),
                                                 ((3, 2, 100), True), ((1, 7), False)])
def test_rms_norm_matches_the_torch_path(ops, avx512, shape, zero_centered, monkeypatch):
    torch.manual_seed(sum(shape))
    x, w = _bf16(*shape, scale=3.0), _bf16(shape[-1])
    got = layers.rms_norm(x, w, 1e-6, zero_centered)
    monkeypatch.setattr(kernels, "rms_norm", lambda *a: None)
    want = layers.rms_norm(x, w, 1e-6, zero_centered)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    # same rounding points; only the fp32 sum of squares may differ in order
    assert (got == want).float().mean() >= 0.99
    assert _rel_err(got, want.float()) <= 2 ** -7


def test_rms_norm_kernel_only_for_decode_sizes(ops, monkeypatch):
    from qwen_runner import settings

    calls = []
    monkeypatch.setattr(kernels, "rms_norm", lambda *a: calls.append(a[0].shape) or None)
    w = _bf16(64)
    layers.rms_norm(_bf16(4, 64), w, 1e-6)
    layers.rms_norm(_bf16(settings.RMS_NORM_KERNEL_MAX_ELEMENTS // 64 + 1, 64), w, 1e-6)  # prefill: torch
    layers.rms_norm(torch.randn(4, 64), w.float(), 1e-6)  # fp32: torch
    assert calls == [(4, 64)]


@pytest.mark.parametrize("avx512", PATHS)
@pytest.mark.parametrize("qk_norm", [True, False])
def test_attention_decode_matches_the_torch_path(ops, avx512, qk_norm, monkeypatch):
    """One C++ call per decode step (q/k norm, rotary, cache write, attention) against the torch ops it
    replaces: the cache bit for bit, the attention output within a bf16 ulp (fp32 sum order only)."""
    from qwen_runner.models.layers import Attention, KVCache, RotaryEmbedding

    torch.manual_seed(7)
    attention = Attention(256, 8, 2, 32, qk_norm=qk_norm)
    for p in attention.parameters():
        p.data = torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 else 0.0)
    attention = attention.bfloat16()
    attention.o_proj = torch.nn.Identity()  # compare the attention output itself
    monkeypatch.setattr(kernels, "_avx512", avx512)
    rope = RotaryEmbedding(32, 1e6)
    fused, plain = KVCache(2, 2, 32, 64, torch.bfloat16), KVCache(2, 2, 32, 64, torch.bfloat16)
    xs = _bf16(40, 256)
    for cache in (fused, plain):
        attention(xs[:7], cache, 1, rope.slice_signed(0, 7, torch.bfloat16))
        cache.advance(7)
    real = kernels.attention_decode
    for t in range(7, 40):  # past 16 and 32 positions: whole and partial vectors of scores
        step = rope.slice_signed(fused.length, 1, torch.bfloat16)
        calls = []
        monkeypatch.setattr(kernels, "attention_decode", lambda *a: calls.append(1) or real(*a))
        got = attention(xs[t:t + 1], fused, 1, step)
        monkeypatch.setattr(kernels, "attention_decode", lambda *a: None)
        want = attention(xs[t:t + 1], plain, 1, step)
        fused.advance(1)
        plain.advance(1)
        assert calls == [1]
        assert torch.equal(fused.k, plain.k) and torch.equal(fused.v, plain.v)
        assert _rel_err(got, want.float()) <= 2 ** -7
        assert (got == want).float().mean() >= 0.9


@pytest.mark.parametrize("normalize", [True, False])
def test_route_topk_matches_the_torch_router(ops, normalize, monkeypatch):
    """The one-call decode router picks the same experts and, up to fp32 rounding, the same bf16 weights
    as softmax + topk (+ renormalization) in torch."""
    torch.manual_seed(11)
    router = _bf16(64, 128, scale=0.3)
    for _ in range(100):
        x = _bf16(1, 128)
        got_w, got_e = layers.route(x, router, 8, normalize)
        monkeypatch.setattr(kernels, "route_topk", lambda *a: None)
        want_w, want_e = layers.route(x, router, 8, normalize)
        monkeypatch.undo()
        assert got_w.dtype == want_w.dtype == torch.bfloat16 and got_e.dtype == want_e.dtype == torch.int64
        assert torch.equal(got_e, want_e)
        assert _rel_err(got_w, want_w.float()) <= 2 ** -8


def test_bench_and_info_name_the_int4_decode_path(ops, monkeypatch):
    from qwen_runner.models.quantized import KERNEL, describe_kernel

    model = torch.nn.Module()
    assert describe_kernel(model) is None  # dense
    model.quant_kernel = KERNEL
    assert describe_kernel(model) == f"prefill {KERNEL}; decode {kernels.int4_decode()}"
    assert "int4" in kernels.status()["kernel"] or not AVX512
    monkeypatch.setattr(kernels, "_ops", None)  # kernels off: ATen runs int4 decode too
    assert describe_kernel(model) == KERNEL
