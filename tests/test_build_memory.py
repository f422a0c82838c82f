"""The planner's build estimate models what the builder holds, and matches a measured build peak."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from qwen_runner import planner as P
from qwen_runner import settings as S
from qwen_runner.checkpoint import inspect_checkpoint
from tests.conftest import REPO, model_path

TOLERANCE = 0.15  # the bar: estimate within 15% of the measured peak


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_raw_tier_holds_only_stacked_experts():
    spec = inspect_checkpoint(model_path("tiny-qwen3-moe"))
    per_layer_experts = max(
        sum(t.nbytes for t in spec.tensors.values() if t.layer == i and t.expert is not None)
        for i in range(spec.config.num_layers)
    )
    assert P.build_unit_bytes(spec, "bf16", P.BUILD_RAW) == per_layer_experts > 0


def test_ready_tier_counts_casts_only_when_the_dtype_changes():
    spec = inspect_checkpoint(model_path("tiny-qwen3-moe"))  # a bf16 checkpoint, untied
    same = P.build_unit_bytes(spec, "bf16")
    cast = P.build_unit_bytes(spec, "fp32")
    # fp32: every tensor of the largest unit (here the head: lm_head + final norm) is a copy at twice the width.
    assert cast == 2 * (spec.largest_unit_bytes + spec.bytes_by_role["final_norm"])
    # bf16: only stacked experts and fused/rewritten tensors are copies; the embedding/lm_head are views.
    assert P.build_unit_bytes(spec, "bf16", P.BUILD_RAW) <= same < spec.largest_unit_bytes


def test_converted_tied_embedding_is_held_through_the_build():
    spec = inspect_checkpoint(model_path("tiny-qwen2-moe"))
    assert spec.config.tie_word_embeddings
    embedding = spec.bytes_by_role["embedding"] * 2  # bf16 -> fp32
    layer = max(spec.bytes_per_layer) * 2
    assert P.build_unit_bytes(spec, "fp32") >= embedding + min(layer, embedding) // 2


def test_build_items_and_raw_is_cheaper_than_ready_on_an_int4_skeleton(tmp_path):
    path = _script("make_giant_skeleton").make_skeleton("qwen3-30b-a3b-int4", tmp_path)
    spec = inspect_checkpoint(path)
    host = P.detect_host("64G")
    raw, ready = P.plan_build(spec, host, "bf16", P.BUILD_RAW), P.plan_build(spec, host, "bf16", P.BUILD_READY)
    assert "int4 unpack scratch" not in raw.items and ready.items["int4 unpack scratch"] > 0
    assert raw.items["builder baseline"] == S.BUILD_BASELINE_RSS
    assert raw.items["per-tensor bookkeeping"] == len(spec.tensors) * S.BUILD_BYTES_PER_TENSOR
    assert raw.peak < ready.peak < 4 * S.GIB


def _check(result: dict) -> None:
    assert result["returncode"] == 0, result["stderr"]
    ratio = result["planner_build_peak_bytes"] / result["peak_rss_anon_bytes"]
    assert abs(ratio - 1) <= TOLERANCE, (
        f"{result['model']} {result['tier']} {result['dtype']}: estimate {result['planner_build_peak_gib']} GiB, "
        f"measured {result['peak_rss_anon_gib']} GiB"
    )


def test_estimate_matches_measured_build_peak_tiny(tmp_path):
    _check(_script("measure_build_memory").measure(model_path("tiny-qwen3-moe"), "ready", "bf16", None, tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_estimate_matches_measured_build_peak_demo(tmp_path, dtype):
    """A converting build (fp32) and a same-dtype one (bf16) of the 1.4 GB demo model."""
    _check(_script("measure_build_memory").measure(model_path("demo"), "ready", dtype, None, tmp_path))


@pytest.mark.slow
def test_estimate_matches_measured_build_peak_80b_skeleton(tmp_path):
    """Full-scale headers (222k tensors), raw tier, one layer: the numbers docs/cache.md reports."""
    path = _script("make_giant_skeleton").make_skeleton("qwen3-next-80b-a3b-int4", tmp_path / "skeletons")
    _check(_script("measure_build_memory").measure(path, "raw", "bf16", 1, tmp_path / "cache"))
