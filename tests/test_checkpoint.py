"""Inspecting checkpoints from config + headers only: numbers, the 80B skeleton, malformed input, fuzz."""

from __future__ import annotations

import json
import math
import shutil
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_runner import checkpoint as C
from qwen_runner import quant as Q
from qwen_runner.cli import main
from qwen_runner.errors import CheckpointError, ModelNotFoundError, UnsupportedModelError

from tests.conftest import REPO, model_path

sys.path.insert(0, str(REPO / "scripts"))
import make_giant_skeleton as skeleton  # noqa: E402

BUILT = ("tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-qwen3-next", "demo")


@pytest.fixture(scope="session")
def next80b(tmp_path_factory) -> Path:
    """The Qwen3-Next-80B-A3B int4 skeleton (~42 GB apparent, a few MB on disk)."""
    return skeleton.make_skeleton("qwen3-next-80b-a3b-int4", tmp_path_factory.mktemp("skeletons"))


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """`qwen-runner ARGS` in this process (no torch is imported by plan); (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


# ------------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize("name", BUILT)
def test_built_models_add_up(name):
    spec = C.inspect_checkpoint(model_path(name))
    assert spec.total_bytes == spec.file_data_bytes  # transformers writes no padding between tensors
    assert sum(spec.bytes_per_layer) + sum(spec.bytes_by_role.get(r, 0) for r in (C.EMBEDDING, C.LM_HEAD, C.FINAL_NORM)) == spec.total_bytes
    assert 0 < spec.active_bytes_per_token < spec.total_bytes
    assert spec.bytes_by_role[C.EXPERT] > 0 and spec.bytes_by_role[C.ROUTER] > 0


def test_active_bytes_follow_the_documented_formula():
    spec = C.inspect_checkpoint(model_path("tiny-qwen3-moe"))
    c = spec.config
    b = spec.bytes_by_role
    expected = b[C.ATTENTION] + b[C.ROUTER] + b[C.FINAL_NORM] + b[C.EXPERT] * c.top_k // c.num_experts
    expected += b[C.LM_HEAD] + b[C.EMBEDDING] // c.vocab_size
    assert spec.active_bytes_per_token == expected
    # one expert of one layer, by hand: gate, up [moe, hidden] and down [hidden, moe], bf16
    one_expert = 3 * c.moe_intermediate_size * c.hidden_size * 2
    assert b[C.EXPERT] == one_expert * c.num_experts * c.num_layers


def test_tied_embeddings_count_the_matrix_once_as_lm_head():
    spec = C.inspect_checkpoint(model_path("tiny-qwen2-moe"))  # tie_word_embeddings: true
    assert C.LM_HEAD not in spec.bytes_by_role
    assert spec.active_by_role[C.LM_HEAD] == spec.bytes_by_role[C.EMBEDDING]
    assert spec.active_by_role[C.EMBEDDING] == 0


def test_qwen3_next_layer_pattern_and_state():
    spec = C.inspect_checkpoint(model_path("tiny-qwen3-next"))
    assert spec.config.layer_types == ("linear_attention",) * 3 + ("full_attention",)
    assert spec.kv_bytes_per_token(2) == 1 * 2 * spec.config.num_kv_heads * spec.config.head_dim * 2
    assert spec.recurrent_state_bytes(4, 2) > 0


@pytest.mark.parametrize("name", BUILT)
def test_fast_config_path_matches_transformers(name):
    raw = json.loads((model_path(name) / "config.json").read_text())
    assert C.parse_config(raw) == C.parse_config(raw, force_transformers=True)


@pytest.mark.parametrize("name", sorted(skeleton.CONFIGS))
def test_skeleton_configs_match_transformers(name):
    raw = skeleton.CONFIGS[name]
    assert C.parse_config(raw) == C.parse_config(raw, force_transformers=True)


def test_qwen3_next_80b_config_is_transformers_default():
    from transformers import Qwen3NextConfig

    ours, default = skeleton.CONFIGS["qwen3-next-80b-a3b"], Qwen3NextConfig()
    for key in ("hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "shared_expert_intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                "vocab_size", "linear_conv_kernel_dim"):
        assert ours[key] == getattr(default, key), key


# ------------------------------------------------------------------------------------------ skeleton


def test_80b_skeleton_is_full_scale_and_sparse(next80b):
    spec = C.inspect_checkpoint(next80b)
    files = sorted(next80b.glob("*.safetensors"))
    apparent = sum(f.stat().st_size for f in files)
    on_disk = sum(f.stat().st_blocks * 512 for f in files)
    assert 40e9 < apparent < 45e9 and on_disk < apparent / 100
    assert math.isclose(spec.total_bytes, spec.file_data_bytes, rel_tol=1e-3)
    assert len(files) == len(spec.shards) and all(s.data_bytes <= 5.1e9 for s in spec.shards)
    c = spec.config
    assert (c.hidden_size, c.num_layers, c.num_experts, c.top_k) == (2048, 48, 512, 10)
    assert spec.full_attention_layers == 12 and spec.linear_attention_layers == 36
    t = spec.tensors
    assert t["model.layers.0.mlp.experts.511.down_proj.qweight"].shape == (512 * 4 // 32, 2048)
    assert t["model.layers.0.mlp.experts.511.down_proj.qzeros"].shape == (512 // 128, 2048 * 4 // 32)
    assert t["model.layers.0.mlp.experts.511.down_proj.scales"].dtype == "F16"
    assert t["model.layers.0.mlp.gate.weight"].dtype == "BF16"  # router unquantized
    assert t["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 2048)
    assert "model.layers.3.self_attn.q_proj.qweight" in t and "model.layers.0.linear_attn.conv1d.weight" in t
    assert spec.quant is not None and spec.quant.for_layer("model.layers.0.mlp.gate").bits == 16
    # Active bytes: a ~3B-active model at 4 bits plus the bf16 lm_head, well under a tenth of the total.
    assert 1.5e9 < spec.active_bytes_per_token < 3e9


def test_mixed_recipe_stores_non_experts_at_8_bits():
    tensors, qcfg = skeleton.skeleton_tensors(skeleton.CONFIGS["qwen3-next-80b-a3b"], "mixed")
    quant = Q.parse_quantization_config(qcfg)
    assert quant.for_layer("model.layers.0.linear_attn.in_proj_qkvz").bits == 8
    assert quant.for_layer("model.layers.0.mlp.experts.7.up_proj").bits == 4
    assert quant.for_layer("model.layers.0.mlp.shared_expert_gate").bits == 16
    shapes = {name: shape for name, shape, _ in tensors}
    assert shapes["model.layers.0.linear_attn.in_proj_qkvz.qweight"] == (2048 * 8 // 32, 12288)
    assert shapes["model.layers.0.mlp.experts.7.up_proj.qweight"] == (2048 * 4 // 32, 512)


# ------------------------------------------------------------------------------------------ resolving


def test_repo_id_resolves_from_the_local_hf_cache(tmp_path, monkeypatch):
    snap = tmp_path / "models--Qwen--Tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "models--Qwen--Tiny" / "refs").mkdir()
    (tmp_path / "models--Qwen--Tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert C.resolve_model_dir("Qwen/Tiny") == snap.resolve()
    with pytest.raises(ModelNotFoundError, match="Hugging Face cache"):
        C.resolve_model_dir("Qwen/Absent")


# ------------------------------------------------------------------------------------------ malformed


def _copy_tiny(tmp_path: Path) -> Path:
    """A throwaway copy of tiny-qwen3-moe's config and weights (38 MB) to break."""
    src, dst = model_path("tiny-qwen3-moe"), tmp_path / "m"
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, dst / name)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _break_missing_config(m: Path) -> str:
    (m / "config.json").unlink()
    return "no config.json"


def _break_unknown_arch(m: Path) -> str:
    _edit_config(m, model_type="llama", architectures=["LlamaForCausalLM"])
    return "unsupported architecture"


def _break_truncated_header(m: Path) -> str:
    with open(m / "model.safetensors", "r+b") as f:
        f.truncate(1000)  # the header alone is longer than this
    return "truncated header"


def _break_header_overclaims(m: Path) -> str:
    with open(m / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) - 4096)  # the last tensor now ends past the end of the file
    return "claims more bytes than the file holds"


def _break_non_json_config(m: Path) -> str:
    (m / "config.json").write_text("{'model_type': qwen3_moe")
    return "not valid JSON"


def _break_quant_config(m: Path) -> str:
    _edit_config(m, quantization_config={"quant_method": "auto-round", "bits": 4, "group_size": 128, "sym": True})
    return "inconsistent quantization_config"


@pytest.mark.parametrize("breaker", [
    _break_missing_config, _break_unknown_arch, _break_truncated_header, _break_header_overclaims,
    _break_non_json_config, _break_quant_config,
])
def test_malformed_checkpoint_is_one_line_no_traceback(tmp_path, capsys, breaker):
    model = _copy_tiny(tmp_path)
    expected = breaker(model)
    code, out, err = _cli(capsys, "plan", str(model))
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "hint:" in lines[0], err
    assert expected in lines[0] and "Traceback" not in err + out


def test_quant_config_that_contradicts_the_headers(tmp_path):
    model = skeleton.make_skeleton("qwen3-30b-a3b-int4", tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 8  # tensors are packed at 4
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="at 8 bits mean"):
        C.inspect_checkpoint(model)


@pytest.mark.parametrize("raw, message", [
    ({"quant_method": "auto-round", "bits": 5}, "bits=5"),
    ({"quant_method": "auto-round", "bits": 4, "group_size": 0}, "group_size=0"),
    ({"quant_method": "auto-round", "bits": 4, "sym": "yes"}, "sym="),
    ({"quant_method": "auto-round", "bits": 4, "extra_config": {"lm_head": {"bits": "8"}}}, "lm_head"),
    ({"quant_method": "gptq"}, "bits is missing"),
    ("int4", "expected an object"),
])
def test_bad_quantization_configs(raw, message):
    with pytest.raises(CheckpointError, match=message):
        Q.parse_quantization_config(raw)


def test_unsupported_quant_method_and_regex_overrides():
    with pytest.raises(UnsupportedModelError):
        Q.parse_quantization_config({"quant_method": "fp8", "bits": 8})
    q = Q.parse_quantization_config({"quant_method": "auto-round", "bits": 4, "group_size": 128,
                                     "extra_config": {r".*mlp\.gate$": {"bits": 16}, "lm_head": {"bits": 8}}})
    assert q.for_layer("model.layers.3.mlp.gate").bits == 16
    assert q.for_layer("model.layers.3.mlp.gate_proj").bits == 4
    assert q.for_layer("lm_head").bits == 8


# ------------------------------------------------------------------------------------------ fuzz


def _blob(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=256), st.integers(min_value=0, max_value=1 << 40))
def test_fuzz_random_bytes_never_crash(data, file_size):
    try:
        C.parse_safetensors_header(data, file_size)
    except CheckpointError as err:
        assert "\n" not in err.message


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F16", "BF16", "I32", "F32", "Q4", 7]) | _json_values,
        "shape": st.lists(st.integers(-2, 2**20), max_size=4) | _json_values,
        "data_offsets": st.lists(st.integers(-2, 2**24), min_size=0, max_size=3) | _json_values,
    },
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=12), _entries | _json_values, max_size=5), st.integers(0, 2**25))
def test_fuzz_structured_headers(header, data_size):
    blob = _blob(header)
    try:
        tensors, length = C.parse_safetensors_header(blob, len(blob) + data_size)
    except CheckpointError:
        return
    # Whatever is accepted is self-consistent and inside the file.
    assert length == len(blob) - 8
    for name, info in tensors.items():
        begin, end = header[name]["data_offsets"]
        assert all(isinstance(d, int) and d >= 0 for d in info.shape)  # (a JSON true counts as 1: harmless)
        assert info.nbytes == math.prod(info.shape) * C.DTYPE_BYTES[info.dtype] == end - begin and end <= data_size


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["F16", "I32", "BF16"]), st.lists(st.integers(0, 64), max_size=3)), max_size=6),
       st.integers(0, 64))
def test_fuzz_valid_headers_round_trip(specs, slack):
    header, offset = {}, 0
    for k, (dtype, shape) in enumerate(specs):
        size = math.prod(shape) * C.DTYPE_BYTES[dtype]
        header[f"t{k}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = _blob(header)
    tensors, _ = C.parse_safetensors_header(blob, len(blob) + offset + slack)
    assert set(tensors) == set(header)
    if offset:  # one byte short: the last tensor now overruns the file
        with pytest.raises(CheckpointError, match="more bytes than the file holds"):
            C.parse_safetensors_header(blob, len(blob) + offset - 1)
