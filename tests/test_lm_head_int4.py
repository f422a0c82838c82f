"""``--lm-head int4``: an RTN int4 copy of the lm_head (docs/quantization.md, "int4 lm_head").

Random tiny weights are the hard case for 4-bit (no outliers to protect, flat logits): measured logits
cosine 0.9959-0.9960 against the 16-bit head on tiny-qwen3-moe, its int4 checkpoint and tiny-qwen3-next
(bf16 and fp32), so 0.99 is a bound a broken quantizer (wrong zero point, wrong group, rows swapped by
the chunked packing) fails by far.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwen_runner import settings as S
from qwen_runner.cache import build_cache, find_ready, open_ready
from qwen_runner.cache.store import MANIFEST, READY
from qwen_runner.errors import CacheError, UnsupportedModelError
from qwen_runner.models import load
from qwen_runner.models import quantized as Q
from tests.conftest import model_path

COSINE_MIN = 0.99
IDS = torch.randint(1000, 100000, (1, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(S.ENV_CACHE, str(root))
    return root


def logits(model) -> torch.Tensor:
    return model(IDS, model.make_cache(IDS.shape[1] + 1))[0]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def test_rtn_int4_is_within_half_a_step_and_chunking_packs_the_same():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(320, 256, generator=g)
    weight[5, :64] = 0.25  # a constant group: finite scale, exact values
    q = Q.rtn_int4(weight, 64, torch.float32)
    assert q.q.dtype is torch.uint8 and int(q.q.max()) <= 15 and q.scales.shape == (4, 320)
    step = q.scales.t().repeat_interleave(64, 1)
    err = (q.dequantize(torch.float32) - weight).abs()
    assert bool((err <= step / 2 + 1e-6).all())
    assert torch.allclose(q.dequantize(torch.float32)[5, :64], torch.full((64,), 0.25))
    for dtype in (torch.bfloat16, torch.float32):
        whole = Q.quantize_lm_head(weight.to(dtype), dtype, 64, chunk_rows=1 << 20)
        chunked = Q.quantize_lm_head(weight.to(dtype), dtype, 64, chunk_rows=128)
        assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


def test_group_falls_back_to_a_divisor_of_the_hidden_size():
    assert Q.lm_head_group(1024) == S.LM_HEAD_INT4_GROUP
    assert Q.lm_head_group(1024, 128) == 128
    assert Q.lm_head_group(896, 128) == 128
    assert Q.lm_head_group(64, 128) == 64
    assert Q.lm_head_group(96, 128) == 32
    assert Q.lm_head_group(40, 128) is None


@pytest.mark.parametrize("name,dtype", [("tiny-qwen3-moe", torch.bfloat16), ("tiny-qwen3-moe", torch.float32),
                                        ("tiny-qwen3-moe-int4", torch.bfloat16), ("tiny-qwen3-next", torch.bfloat16)])
def test_head_becomes_int4_and_logits_stay_close(name, dtype):
    base, _, _ = load(model_path(name), dtype)
    head4, _, _ = load(model_path(name), dtype, lm_head=S.LM_HEAD_INT4)
    assert not Q.is_quantized_module(base.lm_head)
    assert isinstance(head4.lm_head, Q.QuantLinear)
    assert head4.embed_tokens.weight.dtype is dtype and torch.equal(head4.embed_tokens.weight, base.embed_tokens.weight)
    head_bytes = sum(p.nbytes for p in head4.lm_head.parameters())
    assert head_bytes < base.lm_head.weight.nbytes // (2 if dtype is torch.bfloat16 else 4) * 1.3
    if hasattr(base, "decode_weight_bytes"):  # what bench's GB/s counts
        assert head4.decode_weight_bytes() < base.decode_weight_bytes()
    a, b = logits(base), logits(head4)
    assert cosine(a, b).min() >= COSINE_MIN


def test_tied_embedding_stays_16_bit():
    base, _, _ = load(model_path("tiny-qwen2-moe"), torch.bfloat16)
    assert base.lm_head.weight.data_ptr() == base.embed_tokens.weight.data_ptr()  # tied in this fixture
    head4, _, _ = load(model_path("tiny-qwen2-moe"), torch.bfloat16, lm_head=S.LM_HEAD_INT4)
    assert isinstance(head4.lm_head, Q.QuantLinear)
    assert torch.equal(head4.embed_tokens.weight, base.embed_tokens.weight)
    assert cosine(logits(base), logits(head4)).min() >= COSINE_MIN


def test_fp16_is_refused_in_one_line():
    with pytest.raises(UnsupportedModelError, match="--lm-head int4"):
        load(model_path("tiny-qwen3-moe"), torch.float16, lm_head=S.LM_HEAD_INT4)


def test_default_build_has_no_int4_head(cache_root):
    result = build_cache(model_path("tiny-qwen3-moe"), "bf16")
    assert result.paths.variant == "bf16-native"
    manifest = json.loads(result.paths.manifest.read_text())
    assert manifest["lm_head"] == {"format": "checkpoint"}
    head = torch.load(result.paths.shard(READY, "head"), weights_only=True)
    assert "lm_head.weight" in head and not any(k.endswith(Q.INT4_SUFFIX) for k in head)


def test_int4_head_ready_tier_is_its_own_entry_and_loads_as_the_raw_path(cache_root):
    path = model_path("tiny-qwen3-moe-int4").resolve()
    default = build_cache(path, "bf16")
    head4 = build_cache(path, "bf16", lm_head=S.LM_HEAD_INT4)
    assert head4.paths.dir != default.paths.dir and head4.paths.variant == "bf16-native-head4"
    manifest = json.loads(head4.paths.manifest.read_text())
    assert manifest["lm_head"] == {"format": "int4", "method": "rtn-asym-minmax", "group": S.LM_HEAD_INT4_GROUP}
    shard = torch.load(head4.paths.shard(READY, "head"), weights_only=True)
    assert set(shard) >= {"lm_head.weight_int4", "lm_head.weight_int4_sz"} and "lm_head.weight" not in shard

    ready = open_ready(path, "bf16", lm_head=S.LM_HEAD_INT4)
    raw, _, _ = load(path, torch.bfloat16, lm_head=S.LM_HEAD_INT4)
    assert isinstance(ready.lm_head, Q.QuantLinear)
    assert torch.equal(logits(ready), logits(raw))
    assert not Q.is_quantized_module(open_ready(path, "bf16").lm_head)  # the default entry is untouched

    # a manifest that does not say int4 head is never used as one (and the reverse)
    manifest["lm_head"] = {"format": "checkpoint"}
    head4.paths.manifest.write_text(json.dumps(manifest))
    problems = find_ready(path, "bf16", lm_head=S.LM_HEAD_INT4)[2]
    assert problems and problems[0].file == MANIFEST and "lm_head" in problems[0].message
    assert open_ready(path, "bf16", lm_head=S.LM_HEAD_INT4) is None
    default_manifest = json.loads(default.paths.manifest.read_text())
    default_manifest["lm_head"] = {"format": "int4", "method": "rtn-asym-minmax", "group": S.LM_HEAD_INT4_GROUP}
    default.paths.manifest.write_text(json.dumps(default_manifest))
    assert "lm_head" in find_ready(path, "bf16")[2][0].message
    # a rebuild notices the mismatch and rebuilds every shard
    again = build_cache(path, "bf16", lm_head=S.LM_HEAD_INT4)
    assert again.written == again.units and not find_ready(path, "bf16", lm_head=S.LM_HEAD_INT4)[2]


def test_manifest_without_the_field_is_a_default_entry(cache_root):
    """Entries built before the field existed stay valid for the default head, never for int4."""
    result = build_cache(model_path("tiny-qwen3-moe"), "bf16")
    manifest = json.loads(result.paths.manifest.read_text())
    del manifest["lm_head"]
    result.paths.manifest.write_text(json.dumps(manifest))
    assert not find_ready(model_path("tiny-qwen3-moe").resolve(), "bf16")[2]


def test_raw_tier_refuses_the_option(cache_root):
    with pytest.raises(CacheError, match="ready tier"):
        build_cache(model_path("tiny-qwen3-moe"), "bf16", target="raw", lm_head=S.LM_HEAD_INT4)


def test_info_names_an_int4_head_entry(cache_root):
    from qwen_runner.info import cache_precisions

    build_cache(model_path("tiny-qwen3-moe"), "bf16", lm_head=S.LM_HEAD_INT4)
    build_cache(model_path("tiny-qwen3-moe"), "bf16")
    entries = {e["entry"].split("/")[1]: e for e in cache_precisions()}
    assert entries["bf16-native-head4"]["lm_head"]["format"] == "int4"
    assert "lm_head" not in entries["bf16-native"]
