"""The lean tokenizer (tokenizers + jinja2) gives exactly transformers' ids and chat text."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from qwen_runner.tokenizer import QwenTokenizer, generation_eos_ids, load_tokenizer
from tests.conftest import MODELS, REPO, model_path

MODELS_WITH_TOKENIZERS = ["tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-qwen3-next", "demo"]
TEXTS = [
    "Hello world",
    "  leading  spaces\n\n\ttabs\r\nand CRLF  ",
    "你好，世界！龘鬱𠀋 · Ελληνικά · 𝄞 · 👨‍👩‍👧‍👦 🫠 🇫🇷",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "<think>\nreasoning\n</think>\n\nanswer <tool_call>{\"a\": 1}</tool_call>",
    "def f(x):\n    return x ** 2  # it's 'quoted' and \"double\"\n",
    "numbers 1234567890 3.14159 -42 1e-9",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nuno"},
     {"role": "user", "content": "two"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "<|im_end|> injected 日本語 🫠"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x", "reasoning_content": "why"},
     {"role": "user", "content": "again", "name": None}],
]


def _pairs():
    for name in MODELS_WITH_TOKENIZERS:
        if not (MODELS / name / "tokenizer.json").is_file():
            if name == "demo":
                continue  # built by `make models` with the GGUF asset; the tiny ones are always there
            pytest.fail(f"{name} missing: run `make models`")
        yield name


@pytest.fixture(scope="module", params=list(_pairs()))
def pair(request):
    path = model_path(request.param)
    return AutoTokenizer.from_pretrained(path), load_tokenizer(path)


def test_lean_tokenizer_is_used_for_qwen_checkpoints(pair):
    _, ours = pair
    assert isinstance(ours, QwenTokenizer)


@pytest.mark.parametrize("text", TEXTS)
def test_same_ids_and_text(pair, text):
    ref, ours = pair
    for special in (True, False):
        ids = ref.encode(text, add_special_tokens=special)
        assert ours.encode(text, add_special_tokens=special) == ids
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_same_special_tokens(pair):
    ref, ours = pair
    assert ours.special_tokens_map == ref.special_tokens_map
    for attr in ("eos_token_id", "pad_token_id", "bos_token_id", "unk_token_id"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    for token in ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<think>", "not-a-token-at-all"):
        assert ours.convert_tokens_to_ids(token) == ref.convert_tokens_to_ids(token), token
    assert len(ours) == len(ref)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("think", [None, True, False])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_same_chat_template(pair, conversation, think, generation_prompt):
    ref, ours = pair
    kwargs = {} if think is None else {"enable_thinking": think}
    text = ref.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=False, **kwargs)
    assert ours.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=False, **kwargs) == text
    ids = ref.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=True, **kwargs)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ours.apply_chat_template(conversation, add_generation_prompt=generation_prompt, **kwargs)["input_ids"] == list(ids)


def test_generation_config_eos_matches_transformers():
    from transformers import GenerationConfig

    path = model_path("tiny-qwen3-moe")
    eos = GenerationConfig.from_pretrained(path).eos_token_id
    assert generation_eos_ids(path) == (eos if isinstance(eos, list) else [eos])


def test_other_tokenizer_classes_go_through_transformers(tmp_path):
    source = model_path("tiny-qwen3-moe")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / file, tmp_path / file)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert not isinstance(load_tokenizer(tmp_path), QwenTokenizer)


def test_loading_does_not_import_transformers():
    code = ("import sys; from qwen_runner.tokenizer import load_tokenizer; "
            f"t = load_tokenizer({str(model_path('tiny-qwen3-moe'))!r}); "
            "t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"
