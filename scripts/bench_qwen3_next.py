"""Benchmark our Qwen3-Next against transformers (bf16) on models/bench-qwen3-next.

Each (engine, threads) configuration runs in a fresh process (OMP_WAIT_POLICY=PASSIVE,
threads pinned before torch loads), configurations are interleaved over the repeats, and
the table reports medians. Both engines do the same work:

- prefill: a 512-token prompt, logits of the last position only (transformers' generate
  keeps one position too);
- decode: greedy tokens after a short prompt (first a short untimed warm-up). For transformers, decode time is
  ``generate(N + 1 tokens) - generate(1 token)`` on the same prompt, so its prefill is excluded.

    python scripts/bench_qwen3_next.py [--repeats 3] [--decode-tokens 16] [--threads 1 2]

The load average is printed before and after, because this box is shared.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("bench_qwen3_next")

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "bench-qwen3-next"
PREFILL_TOKENS = 512
DECODE_PROMPT_TOKENS = 32
WARMUP_TOKENS = 2
# transformers is the baseline.
ENGINES = ("transformers", "ours")

WORKER = r"""
import json, sys, time, warnings
import torch
engine, path, threads, prefill_n, prompt_n, decode_n, warmup = sys.argv[1:8]
threads, prefill_n, prompt_n, decode_n, warmup = map(int, (threads, prefill_n, prompt_n, decode_n, warmup))
torch.set_num_threads(threads)
warnings.simplefilter("ignore")
gen = torch.Generator().manual_seed(0)
long_prompt = torch.randint(0, 150000, (1, prefill_n), generator=gen)
short_prompt = torch.randint(0, 150000, (1, prompt_n), generator=gen)
if engine == "ours":
    from qwen_runner.models import load
    model, _, _ = load(path, torch.bfloat16)
    def prefill():
        cache = model.make_cache(prefill_n)
        t = time.perf_counter(); model(long_prompt, cache, last_only=True); return time.perf_counter() - t
    def decode(n):
        cache = model.make_cache(prompt_n + n + 1)
        logits = model(short_prompt, cache, last_only=True)
        t = time.perf_counter()
        for _ in range(n):
            logits = model(logits[:, -1:].argmax(-1), cache)
        return time.perf_counter() - t
else:
    import transformers
    transformers.utils.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    def generate(prompt, n):
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        return time.perf_counter() - t
    def prefill():
        return generate(long_prompt, 1)
    def decode(n):
        return generate(short_prompt, n + 1) - generate(short_prompt, 1)
decode(warmup)
prefill_s = prefill()
decode_s = decode(decode_n)
print(json.dumps({"prefill_tps": prefill_n / prefill_s, "decode_tps": decode_n / decode_s}))
"""


def run_one(engine: str, threads: int, decode_tokens: int) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    args = [sys.executable, "-c", WORKER, engine, str(MODEL), str(threads), str(PREFILL_TOKENS),
            str(DECODE_PROMPT_TOKENS), str(decode_tokens), str(WARMUP_TOKENS)]
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", action="store_true", help="print raw results as JSON too")
    opts = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("load average before: %s", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    results: dict[tuple[str, int], list[dict]] = {}
    for repeat in range(opts.repeats):
        for threads in opts.threads:
            for engine in ENGINES:
                r = run_one(engine, threads, opts.decode_tokens)
                log.info("repeat %d %-12s %d thread(s): prefill %.1f tok/s, decode %.2f tok/s",
                         repeat, engine, threads, r["prefill_tps"], r["decode_tps"])
                results.setdefault((engine, threads), []).append(r)
    log.info("load average after: %s", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    lines = ["| threads | engine | prefill 512 tok/s | decode tok/s | prefill x | decode x |",
             "|---|---|---|---|---|---|"]
    def medians(engine: str, threads: int) -> dict[str, float]:
        runs = results[(engine, threads)]
        return {k: statistics.median(r[k] for r in runs) for k in ("prefill_tps", "decode_tps")}

    for threads in opts.threads:
        base = medians("transformers", threads)
        for engine in ENGINES:
            med = medians(engine, threads)
            lines.append(f"| {threads} | {engine} | {med['prefill_tps']:.1f} | {med['decode_tps']:.2f} | "
                         f"{med['prefill_tps'] / base['prefill_tps']:.2f} | "
                         f"{med['decode_tps'] / base['decode_tps']:.2f} |")
    log.info("\n%s", "\n".join(lines))
    if opts.json:
        log.info(json.dumps({f"{e}/{t}": v for (e, t), v in results.items()}))


if __name__ == "__main__":
    main()
