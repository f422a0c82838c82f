"""The generation engine on a real (tiny) model: prefix reuse, stops, overflow, interrupts."""

from __future__ import annotations

import pytest
import torch

from qwen_runner.chat import ChatSession, eos_token_ids
from qwen_runner.errors import ContextOverflowError
from qwen_runner.generate import PromptCache, stream_generate
from qwen_runner.sampling import SamplingParams
from tests.conftest import model_path

MAX_CONTEXT = 512


@pytest.fixture(scope="module")
def tiny():
    from qwen_runner.models import load

    model, tokenizer, _ = load(model_path("tiny-qwen3-moe"), dtype=torch.float32)
    return model, tokenizer


def run(model, tokenizer, prompt, **kwargs):
    events = list(stream_generate(model, tokenizer, prompt, max_context=kwargs.pop("max_context", MAX_CONTEXT),
                                  **kwargs))
    return "".join(e.text for e in events), events[-1].stats


def prompt_ids(tokenizer, text="The quick brown fox jumps over the lazy dog."):
    return tokenizer.encode(text)


def test_greedy_is_deterministic_and_stats_are_consistent(tiny):
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer)
    text, stats = run(model, tokenizer, ids, max_tokens=12)
    again, _ = run(model, tokenizer, ids, max_tokens=12)
    assert text == again and text
    assert stats.generated_tokens == 12 and stats.finish_reason == "length"
    assert stats.prompt_tokens == stats.prefill_tokens == len(ids) and stats.reused_tokens == 0
    assert stats.decode_tps > 0 and stats.prefill_tps > 0 and 0 < stats.ttft_seconds
    assert stats.peak_rss_bytes > 0


def test_stop_string_ends_the_answer_before_it(tiny):
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer)
    full, _ = run(model, tokenizer, ids, max_tokens=16)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    text, stats = run(model, tokenizer, ids, max_tokens=16, stop_strings=[stop])
    assert stats.finish_reason == "stop"
    assert text == full[: full.index(stop)]


def test_eos_token_stops_without_output(tiny):
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer)
    first = next(e.token for e in stream_generate(model, tokenizer, ids, max_context=MAX_CONTEXT, max_tokens=1))
    text, stats = run(model, tokenizer, ids, max_tokens=8, eos_token_ids=[first])
    assert text == "" and stats.finish_reason == "eos" and stats.generated_tokens == 0


def test_prompt_longer_than_the_context_is_an_error(tiny):
    model, tokenizer = tiny
    with pytest.raises(ContextOverflowError, match="context holds 16"):
        run(model, tokenizer, list(range(100, 120)), max_context=16)


def test_generation_stops_at_the_end_of_the_context(tiny):
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer)
    text, stats = run(model, tokenizer, ids, max_tokens=100, max_context=len(ids) + 5)
    assert stats.finish_reason == "context"
    assert stats.prompt_tokens + stats.generated_tokens <= len(ids) + 6


def test_second_turn_prefills_only_its_new_tokens(tiny):
    model, tokenizer = tiny
    system = "You are a careful assistant. " * 20  # a long shared prefix makes reuse visible
    session = ChatSession(model, tokenizer, max_context=MAX_CONTEXT, max_tokens=8, system=system,
                          eos_ids=eos_token_ids(tokenizer))
    list(session.ask("Hello there, how are you?"))
    first = session.last_stats
    cached = len(session.prompt_cache.tokens)
    list(session.ask("Tell me more."))
    second = session.last_stats
    assert first.reused_tokens == 0 and first.prefill_tokens == first.prompt_tokens
    # Everything up to the first answer is served from the cache; Qwen3's template re-renders the
    # previous assistant turn without its empty <think></think> block, so reuse stops there.
    assert second.reused_tokens >= first.prompt_tokens - 8
    assert second.prefill_tokens == second.prompt_tokens - second.reused_tokens
    assert second.prefill_tokens < second.prompt_tokens // 3
    assert cached >= second.reused_tokens


def test_reused_prefix_gives_the_same_answer_as_a_fresh_prefill(tiny):
    model, tokenizer = tiny
    kwargs = dict(max_context=MAX_CONTEXT, max_tokens=10, eos_ids=eos_token_ids(tokenizer))
    warm = ChatSession(model, tokenizer, **kwargs)
    list(warm.ask("First question?"))
    reply = "".join(e.text for e in warm.ask("Second question?"))
    assert warm.last_stats.reused_tokens > 0
    cold = ChatSession(model, tokenizer, **kwargs)
    cold.messages = list(warm.messages[:2])  # same history, empty cache
    fresh = "".join(e.text for e in cold.ask("Second question?"))
    assert cold.last_stats.reused_tokens == 0
    assert fresh == reply


class InterruptingModel:
    """Wraps a model and raises KeyboardInterrupt inside the Nth forward, as Ctrl-C would."""

    def __init__(self, model, at_call: int):
        self.model, self.at_call, self.calls = model, at_call, 0

    def make_cache(self, max_context):
        return self.model.make_cache(max_context)

    def __call__(self, ids, cache, last_only=False):
        self.calls += 1
        if self.calls == self.at_call:
            raise KeyboardInterrupt
        return self.model(ids, cache, last_only=last_only)


def test_interrupt_mid_forward_leaves_a_clean_cache(tiny):
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer)
    expected, _ = run(model, tokenizer, ids, max_tokens=6)
    wrapped = InterruptingModel(model, at_call=4)
    cache = PromptCache(wrapped, MAX_CONTEXT)
    events = list(stream_generate(wrapped, tokenizer, ids, prompt_cache=cache, max_tokens=20))
    assert events[-1].stats.finish_reason == "interrupted"
    assert cache.tokens == [] and cache.cache.length == 0  # a half-written state is never reused
    again = "".join(e.text for e in stream_generate(wrapped, tokenizer, ids, prompt_cache=cache, max_tokens=6))
    assert again == expected


def test_sampling_with_a_seed_repeats(tiny):
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=3)
    a, _ = run(model, tokenizer, ids, max_tokens=10, sampling=params)
    b, _ = run(model, tokenizer, ids, max_tokens=10, sampling=params)
    assert a == b
