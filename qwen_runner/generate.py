"""The generation engine: prefill + decode over a model's cache, streaming text and stats.

``stream_generate`` yields ``GenerationEvent``s with new text; the last event carries
``GenerationStats``. A ``PromptCache`` keeps the tokens its model cache holds, so a new
prompt that shares a prefix (the next chat turn) prefills only what is new.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

from qwen_runner.detokenize import IncrementalDetokenizer, StopStringMatcher
from qwen_runner.errors import ContextOverflowError, QwenRunnerError
from qwen_runner.memory import peak_rss_bytes
from qwen_runner.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 512  # tokens per prefill forward: bounds activation memory


@dataclass
class GenerationStats:
    prompt_tokens: int
    reused_tokens: int  # served from the cache of the previous turn
    prefill_tokens: int  # actually run through the model (fewer if interrupted)
    prefill_seconds: float
    prefill_tps: float
    ttft_seconds: float | None  # None when interrupted before the first token
    generated_tokens: int
    decode_seconds: float
    decode_tps: float
    gbps: float | None  # weight bytes read per token x decode tok/s
    peak_rss_bytes: int
    finish_reason: str  # eos | stop | length | context | interrupted

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationEvent:
    text: str
    token: int | None = None
    stats: GenerationStats | None = None


class PromptCache:
    """A model cache plus the exact tokens it holds."""

    def __init__(self, model, max_context: int):
        self.model = model
        self.max_context = max_context
        self.cache = model.make_cache(max_context)
        self.tokens: list[int] = []

    def reset(self) -> None:
        if not self.cache.truncate(0):
            self.cache = self.model.make_cache(self.max_context)
        self.tokens = []

    def reuse(self, prompt: Sequence[int]) -> int:
        """Keep the longest shared prefix (leaving at least one prompt token to run); return its length."""
        limit = min(len(self.tokens), len(prompt) - 1)
        shared = 0
        while shared < limit and self.tokens[shared] == prompt[shared]:
            shared += 1
        if shared < len(self.tokens):
            if self.cache.truncate(shared):
                del self.tokens[shared:]
            else:  # recurrent state cannot roll back: start over
                self.reset()
                shared = 0
        return shared

    def feed(self, tokens: Sequence[int], last_only: bool = True) -> torch.Tensor:
        """Run tokens through the model, appending them to the cache; returns logits of the last one."""
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        try:
            logits = self.model(ids, self.cache, last_only=last_only)
        except BaseException:
            # An interrupted forward may have written part of the state: never reuse it.
            self.reset()
            raise
        self.tokens.extend(tokens)
        return logits[0, -1]


def stream_generate(
    model,
    tokenizer,
    prompt: Sequence[int],
    *,
    prompt_cache: PromptCache | None = None,
    max_context: int = 4096,
    max_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop_strings: Sequence[str] = (),
    eos_token_ids: Sequence[int] = (),
    bytes_per_token: int | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Iterator[GenerationEvent]:
    """Generate from ``prompt`` token ids, yielding text as whole characters; the last event has stats."""
    if not prompt:
        raise QwenRunnerError("empty prompt", "give at least one token of input")
    if prompt_cache is None:
        prompt_cache = PromptCache(model, max_context)
    max_context = prompt_cache.max_context
    if len(prompt) >= max_context:
        raise ContextOverflowError(f"the prompt has {len(prompt)} tokens but the context holds {max_context}")
    sampler = Sampler(sampling or SamplingParams())
    detok = IncrementalDetokenizer(tokenizer)
    stops = StopStringMatcher(list(stop_strings))
    eos = set(eos_token_ids)
    generated: list[int] = []
    finish = "length"

    start = time.perf_counter()
    reused = prompt_cache.reuse(prompt)
    todo = list(prompt[reused:])
    prefill_end = first_token_at = None
    prefilled = decode_forwards = 0
    with torch.inference_mode():
        try:
            for i in range(0, len(todo), prefill_chunk):
                logits = prompt_cache.feed(todo[i:i + prefill_chunk])
                prefilled += len(todo[i:i + prefill_chunk])
            prefill_end = time.perf_counter()
            history = torch.tensor(list(prompt), dtype=torch.long) if sampler.params.repetition_penalty != 1 else None
            while True:
                token = sampler(logits, history)
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                if token in eos:
                    finish = "eos"
                    break
                generated.append(token)
                if history is not None:
                    history = torch.cat([history, torch.tensor([token])])
                text = stops.feed(detok.add(token))
                if text:
                    yield GenerationEvent(text, token)
                if stops.stopped:
                    finish = "stop"
                    break
                if len(generated) >= max_tokens:
                    break
                if len(prompt_cache.tokens) + 1 > max_context:
                    finish = "context"
                    break
                logits = prompt_cache.feed([token])
                decode_forwards += 1
        except KeyboardInterrupt:
            finish = "interrupted"
            log.info("generation interrupted after %d tokens", len(generated))
    end = time.perf_counter()
    if finish != "stop":
        tail = stops.feed(detok.flush()) + stops.flush()
        if tail:
            yield GenerationEvent(tail)

    prefill_seconds = (prefill_end or end) - start
    decode_seconds = end - first_token_at if first_token_at else 0.0
    decode_tps = decode_forwards / decode_seconds if decode_forwards and decode_seconds > 0 else 0.0
    yield GenerationEvent("", stats=GenerationStats(
        prompt_tokens=len(prompt),
        reused_tokens=reused,
        prefill_tokens=prefilled,
        prefill_seconds=prefill_seconds,
        prefill_tps=prefilled / prefill_seconds if prefill_seconds > 0 else 0.0,
        ttft_seconds=first_token_at - start if first_token_at else None,
        generated_tokens=len(generated),
        decode_seconds=decode_seconds,
        decode_tps=decode_tps,
        gbps=bytes_per_token * decode_tps / 1e9 if bytes_per_token and decode_tps else None,
        peak_rss_bytes=peak_rss_bytes(),
        finish_reason=finish,
    ))


def complete(loaded, prompt_text: str, *, max_tokens: int, sampling: SamplingParams, max_context: int,
             out, err) -> GenerationStats:
    """`qwen-runner generate`: raw completion (no chat template) streamed to ``out``, stats to ``err``."""
    from qwen_runner.chat import eos_token_ids, format_stats

    prompt = loaded.tokenizer.encode(prompt_text, add_special_tokens=False)
    stats = None
    for event in stream_generate(
        loaded.model, loaded.tokenizer, prompt, max_context=max_context, max_tokens=max_tokens,
        sampling=sampling, eos_token_ids=eos_token_ids(loaded.tokenizer, loaded.path),
        bytes_per_token=loaded.bytes_per_token,
    ):
        out.write(event.text)
        out.flush()
        stats = event.stats or stats
    out.write("\n")
    err.write(format_stats(stats) + "\n")
    return stats
