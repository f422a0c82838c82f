"""Streaming detokenization (never a split character) and stop strings (never a partial one)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from qwen_runner.detokenize import REPLACEMENT, IncrementalDetokenizer, StopStringMatcher
from tests.conftest import model_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(model_path("tiny-qwen3-moe"))


@pytest.mark.parametrize("text", [
    "你好，世界！龘鬱𠀋，今天的天气怎么样？",
    "Family: 👨‍👩‍👧‍👦, wave 👋🏽, 🦩 and 🫠, flags 🇫🇷🇯🇵 done.",
    "mixed ascii + 日本語 + 𝄞 + emoji 🤖 + Ελληνικά",
])
def test_streamed_text_never_splits_a_character(tokenizer, text):
    ids = tokenizer.encode(text)
    singles = [tokenizer.decode([i]) for i in ids]
    assert any(REPLACEMENT in s for s in singles), "test text must contain a character split across tokens"
    detok = IncrementalDetokenizer(tokenizer)
    chunks = [detok.add(i) for i in ids] + [detok.flush()]
    assert all(REPLACEMENT not in c for c in chunks)
    assert "".join(chunks) == text == detok.text


def test_invalid_bytes_are_flushed_eventually(tokenizer):
    broken = [i for i in tokenizer.encode("🫠") if REPLACEMENT in tokenizer.decode([i])][:1]
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.add(broken[0]) == ""
    assert REPLACEMENT in detok.flush()


def test_stop_string_split_across_chunks():
    matcher = StopStringMatcher(["</answer>", "STOP"])
    assert matcher.feed("the answer is 4</ans") == "the answer is 4"
    assert matcher.feed("wer> and more") == ""
    assert matcher.stopped and matcher.feed("x") == "" and matcher.flush() == ""


def test_false_alarm_is_released():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("ready ST") == "ready "
    assert matcher.feed("ART now") == "START now"
    assert matcher.feed("S") == ""
    assert matcher.flush() == "S" and not matcher.stopped


def test_earliest_stop_wins_and_no_stops_passes_through():
    matcher = StopStringMatcher(["bb", "a"])
    assert matcher.feed("xxbbya") == "xx"
    assert StopStringMatcher([]).feed("anything STOP") == "anything STOP"
