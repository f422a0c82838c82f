"""Our Qwen3-MoE / Qwen2-MoE model code against transformers' ``...ForCausalLM`` on the same weights.

fp32 must match (identical greedy tokens, logits within 1e-4); bf16 must agree on the top-1
token almost everywhere; decode after prefill must equal recomputing the whole sequence.
Odd shapes: a 1-token prompt, a prompt longer than one prefill chunk, top-k = all experts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import REPO, model_path
from qwen_runner.errors import CheckpointError, ContextOverflowError, UnsupportedModelError
from qwen_runner.models import ARCHITECTURES, load

transformers = pytest.importorskip("transformers")

ARCHS = ["tiny-qwen3-moe", "tiny-qwen2-moe"]
PROMPT_LEN = 64
NEW_TOKENS = 32
FP32_ATOL = 1e-4
BF16_TOP1_MIN = 0.95
SEED = 1234


def _prompt(length: int, seed: int = SEED) -> torch.Tensor:
    return torch.randint(0, 5000, (1, length), generator=torch.Generator().manual_seed(seed))


def _reference(path, dtype):
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return ref.eval()


@torch.no_grad()
def _ref_logits(ref, ids: torch.Tensor) -> torch.Tensor:
    return ref(ids).logits.float()


@pytest.fixture(scope="module", params=ARCHS)
def pair_fp32(request):
    path = model_path(request.param)
    model, _, _ = load(path, dtype=torch.float32)
    return model, _reference(path, torch.float32)


def test_registry_names_all_three_architectures():
    assert set(ARCHITECTURES) >= {"Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "Qwen3NextForCausalLM"}


def test_fp32_logits_match_over_64_token_prompt(pair_fp32):
    model, ref = pair_fp32
    ids = _prompt(PROMPT_LEN)
    ours = model(ids, model.make_cache(PROMPT_LEN))
    assert ours.shape == (1, PROMPT_LEN, model.config_args.vocab_size) and ours.dtype == torch.float32
    diff = (ours - _ref_logits(ref, ids)).abs().max().item()
    assert diff <= FP32_ATOL, diff


def test_fp32_greedy_32_tokens_identical(pair_fp32):
    model, ref = pair_fp32
    ids = _prompt(16, seed=7)
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    cache = model.make_cache(ids.shape[1] + NEW_TOKENS)
    logits = model(ids, cache, last_only=True)
    assert logits.shape == (1, 1, model.config_args.vocab_size)
    tokens = []
    for _ in range(NEW_TOKENS):
        tokens.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[tokens[-1]]]), cache, last_only=True)
    assert tokens == expected[0, ids.shape[1]:].tolist()
    assert cache.length == ids.shape[1] + NEW_TOKENS


def test_decode_after_prefill_equals_full_recompute(pair_fp32):
    model, _ = pair_fp32
    ids = _prompt(PROMPT_LEN + 1)
    cache = model.make_cache(PROMPT_LEN + 1)
    model(ids[:, :PROMPT_LEN], cache, last_only=True)
    step = model(ids[:, PROMPT_LEN:], cache)
    full = model(ids, model.make_cache(PROMPT_LEN + 1))
    assert (step[0, -1] - full[0, -1]).abs().max().item() <= FP32_ATOL


def test_one_token_prompt(pair_fp32):
    model, ref = pair_fp32
    ids = _prompt(1)
    ours = model(ids, model.make_cache(4))
    assert (ours - _ref_logits(ref, ids)).abs().max().item() <= FP32_ATOL


def test_prompt_longer_than_one_chunk(pair_fp32):
    model, ref = pair_fp32
    ids = _prompt(40)
    saved = model.prefill_chunk
    model.prefill_chunk = 16  # 40 tokens = chunks of 16, 16, 8
    try:
        ours = model(ids, model.make_cache(64))
        last = model(ids, model.make_cache(64), last_only=True)
    finally:
        model.prefill_chunk = saved
    expected = _ref_logits(ref, ids)
    assert ours.shape[1] == 40
    assert (ours - expected).abs().max().item() <= FP32_ATOL
    assert (last[0, -1] - expected[0, -1]).abs().max().item() <= FP32_ATOL


def test_truncate_rolls_back_and_recomputes_the_same(pair_fp32):
    model, _ = pair_fp32
    ids = _prompt(24)
    cache = model.make_cache(32)
    first = model(ids, cache)
    assert cache.truncate(10) and cache.length == 10
    again = model(ids[:, 10:], cache)
    assert (again - first[:, 10:]).abs().max().item() <= FP32_ATOL
    assert not cache.truncate(cache.length + 1)
    assert cache.nbytes() > 0


def test_context_overflow_raises_before_writing(pair_fp32):
    model, _ = pair_fp32
    cache = model.make_cache(8)
    model(_prompt(6), cache)
    with pytest.raises(ContextOverflowError):
        model(_prompt(3), cache)
    assert cache.length == 6


@pytest.mark.parametrize("name", ARCHS)
def test_bf16_top1_agreement(name):
    path = model_path(name)
    model, _, _ = load(path, dtype=torch.bfloat16)
    ref = _reference(path, torch.bfloat16)
    ids = _prompt(PROMPT_LEN, seed=99)
    ours = model(ids, model.make_cache(PROMPT_LEN))
    agree = (ours[0].argmax(-1) == _ref_logits(ref, ids)[0].argmax(-1)).float().mean().item()
    assert agree >= BF16_TOP1_MIN, agree
    # decode in bf16 (ATen GEMV path) agrees with the prefill (oneDNN) path on the next token
    cache = model.make_cache(PROMPT_LEN + 1)
    model(ids[:, :-1], cache, last_only=True)
    step = model(ids[:, -1:], cache)
    assert step[0, -1].argmax() == ours[0, -1].argmax()


@pytest.mark.parametrize("name", ARCHS)
def test_top_k_equals_number_of_experts(name, tmp_path):
    config = transformers.AutoConfig.from_pretrained(model_path(name))
    config.num_experts_per_tok = config.num_experts
    torch.manual_seed(SEED)
    ref = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ref.save_pretrained(tmp_path)
    model, _, _ = load_model_only(tmp_path, torch.float32)
    ids = _prompt(12)
    ours = model(ids, model.make_cache(16))
    assert (ours - _ref_logits(ref, ids)).abs().max().item() <= FP32_ATOL
    cache = model.make_cache(16)
    model(ids[:, :-1], cache)
    step = model(ids[:, -1:], cache)
    assert (step[0, -1] - ours[0, -1]).abs().max().item() <= FP32_ATOL


def load_model_only(path, dtype):
    """load() without the tokenizer, for checkpoints saved by a test (they have none)."""
    from qwen_runner.models.loader import build_model, model_state_from_checkpoint, read_config

    config = read_config(path)
    return build_model(config, model_state_from_checkpoint(path, dtype, config)), None, config


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        self.ops.append((func.overloadpacket.__name__, shapes))
        return func(*args, **(kwargs or {}))


def test_decode_touches_only_top_k_experts():
    model, _, _ = load(model_path("tiny-qwen3-moe"), dtype=torch.float32)
    args = model.config_args
    cache = model.make_cache(8)
    model(_prompt(4), cache)
    with _OpLog() as log:
        model(_prompt(1), cache, last_only=True)
    stack_shapes = {tuple(layer.mlp.experts.w13.shape) for layer in model.layers}
    stack_shapes |= {tuple(layer.mlp.experts.w2.shape) for layer in model.layers}
    assert not [op for op, shapes in log.ops if stack_shapes & set(shapes)], "an op read a whole expert stack"
    matmuls = [op for op, _ in log.ops if op in ("linear", "mm", "addmm", "bmm")]
    # per layer: qkv, o_proj, router, and 2 per chosen expert; plus the lm_head
    assert len(matmuls) == args.num_layers * (3 + 2 * args.top_k) + 1


def test_unknown_architecture_and_missing_weights(tmp_path):
    config = json.loads((model_path("tiny-qwen3-moe") / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UnsupportedModelError):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError):
        load(tmp_path)


RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch, transformers
    from qwen_runner.memory import peak_rss_bytes as rss  # VmHWM: not inflated by the forking parent
    from qwen_runner.models import load
    before = rss()
    model, tok, spec = load(sys.argv[1], dtype=torch.bfloat16)
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    print(json.dumps({"before": before, "after": rss(), "weights": sum(storages.values())}))
""")
RSS_CONSTANT_BYTES = 150 * 2**20
RSS_SLACK = 0.10


def test_peak_rss_while_loading_is_weights_plus_constant():
    """Loading the 1.4 GB demo model must not hold a second copy of its weights."""
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(model_path("demo"))], capture_output=True,
                         text=True, timeout=300, cwd=REPO, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    grown = m["after"] - m["before"]
    assert m["weights"] > 1e9
    assert grown <= m["weights"] * (1 + RSS_SLACK) + RSS_CONSTANT_BYTES, m


def test_decode_thread_policy_restores_threads():
    from qwen_runner.models.layers import MIN_GEMV_BYTES_PER_THREAD, gemv_threads, thread_limit

    assert gemv_threads(MIN_GEMV_BYTES_PER_THREAD - 1, 8) == 1
    assert gemv_threads(3 * MIN_GEMV_BYTES_PER_THREAD, 8) == 3
    assert gemv_threads(100 * MIN_GEMV_BYTES_PER_THREAD, 2) == 2
    before = torch.get_num_threads()
    with thread_limit(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
