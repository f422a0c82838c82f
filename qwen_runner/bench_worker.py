"""One measurement of `qwen-runner bench`, run in a fresh process.

A fresh process per measurement is the only way to time a cold start honestly and to let
each run choose its own OpenMP threads (read once, when torch loads). The parent passes a
JSON spec as argv[1] (with its wall clock at spawn time) and reads one JSON line back.
"""

from __future__ import annotations

import json
import sys
import time

PROBE_BYTES = 1 << 30  # far larger than any cache: the probe reads DRAM
PROBE_REPEATS = 5
PROMPT_SEED = 0
PROMPT_TOKEN_RANGE = (1000, 100000)  # ordinary vocabulary ids, clear of special tokens


def _prompt(n: int):
    import torch

    low, high = PROMPT_TOKEN_RANGE
    return torch.randint(low, high, (n,), generator=torch.Generator().manual_seed(PROMPT_SEED)).tolist()


def probe(spec: dict) -> dict:
    """Read bandwidth at this thread count: the best of a few full passes over 1 GiB."""
    import torch

    buf = torch.ones(PROBE_BYTES // 4, dtype=torch.float32)
    buf.sum()
    best = float("inf")
    for _ in range(PROBE_REPEATS):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return {"read_gbps": PROBE_BYTES / best / 1e9}


def ours(spec: dict) -> dict:
    from qwen_runner.generate import stream_generate
    from qwen_runner.models.quantized import describe_kernel
    from qwen_runner.runtime import open_model

    loaded = open_model(spec["model"], spec["dtype"], spec.get("backend", "native"), spec.get("lm_head", "checkpoint"))
    loaded_at = time.time()
    prompt = _prompt(spec["prompt_tokens"])

    def run(max_tokens: int):
        """(stats, wall time of the first token) of one request on a fresh cache."""
        stats, first_token_at = None, None
        for event in stream_generate(
            loaded.model, loaded.tokenizer, prompt, max_context=spec["prompt_tokens"] + spec["gen_tokens"] + 1,
            max_tokens=max_tokens, eos_token_ids=(), bytes_per_token=loaded.bytes_per_token,
        ):
            if first_token_at is None:
                first_token_at = time.time()
            stats = event.stats or stats
        return stats, first_token_at

    cold, first_token_at = run(1)  # prefill + first token, cold as a user's first request
    stats, _ = run(spec["gen_tokens"])  # warm: the prefill rate and decode rate, as transformers' below
    return {
        "source": "ready" if loaded.from_ready else "raw",
        "dtype": loaded.dtype.dtype,
        "backend": loaded.backend,
        "precision": loaded.precision.as_dict() if loaded.precision else None,
        "load_s": loaded.load_seconds,
        "start_to_first_token_s": (first_token_at or time.time()) - spec["started"],
        "start_to_loaded_s": loaded_at - spec["started"],
        "prefill_tps": stats.prefill_tps,
        "ttft_s": cold.ttft_seconds,
        "decode_tps": stats.decode_tps,
        "generated_tokens": stats.generated_tokens,
        "bytes_per_token": loaded.bytes_per_token,
        "weight_kernel": describe_kernel(loaded.model),
        "lm_head": loaded.lm_head,
    }


def transformers_generate(spec: dict) -> dict:
    """transformers' own generate, greedy, on the same checkpoint; decode rate from token timestamps."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from qwen_runner.precision import TORCH_DTYPE_NAMES

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, TORCH_DTYPE_NAMES[spec["dtype"]]))
    model.eval()
    load_s = time.perf_counter() - start
    ids = torch.tensor([_prompt(spec["prompt_tokens"])])
    mask = torch.ones_like(ids)

    class TokenClock(BaseStreamer):
        """generate() hands the streamer the prompt, then each new token: their arrival times."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(n: int) -> TokenClock:
        clock = TokenClock()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0, streamer=clock)
        return clock

    begin = time.perf_counter()
    run(1)  # prefill + first token, cold as a user's first request
    first = time.perf_counter() - begin
    first_token_at = time.time()
    # Prefill and decode from the timestamps of one warm run (the prompt's, then each token's): the
    # difference of two runs' totals mixes in the cold first call and went negative on short runs.
    clock = run(spec["gen_tokens"]).times
    prefill_s, times = clock[1] - clock[0], clock[1:]
    decode_s = times[-1] - times[0]
    return {
        "source": "checkpoint",
        "dtype": spec["dtype"],
        "load_s": load_s,
        "start_to_first_token_s": first_token_at - spec["started"],
        "prefill_tps": spec["prompt_tokens"] / prefill_s,
        "ttft_s": first,
        "decode_tps": (len(times) - 1) / decode_s if len(times) > 1 and decode_s > 0 else None,
        "generated_tokens": spec["gen_tokens"],
    }


def build(spec: dict) -> dict:
    """`build-cache` from the checkpoint to a complete ready tier, in the (empty) cache the parent gave."""
    from qwen_runner.cache import build_cache

    start = time.perf_counter()
    result = build_cache(spec["model"], spec["dtype"], spec.get("backend", "native"), progress=False,
                         lm_head=spec.get("lm_head", "checkpoint"))
    if not result.complete or result.kept:
        raise SystemExit(f"expected a full build from an empty cache, got {result}")
    return {"source": "build", "dtype": spec["dtype"], "build_s": time.perf_counter() - start,
            "bytes_on_disk": result.bytes_on_disk}


WORKERS = {"probe": probe, "qwen-runner": ours, "transformers": transformers_generate, "build": build}


def main() -> None:
    spec = json.loads(sys.argv[1])
    from qwen_runner.threads import configure_threads

    configure_threads(spec["threads"])  # before torch is imported
    result = WORKERS[spec["impl"]](spec)
    from qwen_runner.memory import peak_rss_bytes

    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
