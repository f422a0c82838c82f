#!/usr/bin/env python
"""Decode speed of our model code vs transformers' generate, with a memory-bandwidth probe.

Every configuration (implementation, dtype, threads) runs in a fresh subprocess so
OpenMP's thread count and wait policy are set before torch loads; configurations are
interleaved across repeats (A B C A B C ...) so a noisy neighbour hits all of them alike;
the table reports medians. GB/s = weight bytes one decoded token reads (attention, norms,
router, top-k experts, lm_head, one embedding row) x decode tok/s, next to the read
bandwidth the probe measured in the same run at the same thread count.

    .venv/bin/python scripts/bench_models.py --model models/bench-qwen3-moe --threads 1 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("bench_models")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "bench-qwen3-moe"
PROMPT_TOKENS = 32
NEW_TOKENS = 32
WAIT_POLICY = "PASSIVE"  # spinning OpenMP workers on a shared 2-core box cost ~10x on small matmuls
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
WORKER_TIMEOUT_S = 900


# ----------------------------------------------------------------------------- workers (one per process)

def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _prompt(vocab_limit: int = 5000):
    import torch

    return torch.randint(0, vocab_limit, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))


def worker_hf(model_path: str, dtype: str, new_tokens: int) -> dict:
    """transformers' generate, greedy; decode rate from the difference of two generation lengths."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_torch_dtype(dtype)).eval()
    ids = _prompt()
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
        return time.perf_counter() - start

    run(2)  # warm-up
    short = run(1)  # prefill + first token
    long = run(1 + new_tokens)
    return {"decode_tps": new_tokens / (long - short), "prefill_tps": PROMPT_TOKENS / short}


def worker_ours(model_path: str, dtype: str, new_tokens: int) -> dict:
    import torch

    from qwen_runner.models import load

    model, _, _ = load(model_path, dtype=_torch_dtype(dtype))
    ids = _prompt()
    with torch.inference_mode():
        warm = model.make_cache(PROMPT_TOKENS + 2)
        logits = model(ids, warm, last_only=True)
        model(logits[0, -1].argmax().view(1, 1), warm, last_only=True)
        cache = model.make_cache(PROMPT_TOKENS + new_tokens + 1)
        start = time.perf_counter()
        logits = model(ids, cache, last_only=True)
        prefill = time.perf_counter() - start
        token = logits[0, -1].argmax().view(1, 1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(token, cache, last_only=True)[0, -1].argmax().view(1, 1)
        decode = time.perf_counter() - start
    return {"decode_tps": new_tokens / decode, "prefill_tps": PROMPT_TOKENS / prefill,
            "decode_weight_bytes": model.decode_weight_bytes()}


def run_worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["impl"] == "probe":
        from qwen_runner.bench_worker import probe  # the same probe `qwen-runner bench` runs

        return probe(spec)
    if spec["impl"] == "transformers":
        return worker_hf(spec["model"], spec["dtype"], spec["new_tokens"])
    return worker_ours(spec["model"], spec["dtype"], spec["new_tokens"])


# ----------------------------------------------------------------------------- orchestration

def decode_weight_bytes(model_path: Path, dtype: str) -> int:
    """Bytes per decoded token from our model built on the meta device (no weights read)."""
    import torch

    from qwen_runner.models.loader import architecture_module, architecture_of, read_config

    config = read_config(model_path)
    module = architecture_module(architecture_of(config))
    with torch.device("meta"):
        model = module.Model.from_config(config).to(_torch_dtype(dtype))
    return model.decode_weight_bytes()


def spawn(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
           "OMP_WAIT_POLICY": WAIT_POLICY, "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=WORKER_TIMEOUT_S, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def configurations(model: Path, threads: list[int], new_tokens: int, impls: list[str]) -> list[dict]:
    specs = []
    for t in threads:
        specs.append({"impl": "probe", "dtype": None, "threads": t})
        for impl, dtype in (s.split(":") for s in impls):
            specs.append({"impl": impl, "dtype": dtype, "threads": t, "model": str(model), "new_tokens": new_tokens})
    return specs


def summarize(results: dict[str, list[dict]], specs: list[dict], model: Path) -> list[dict]:
    probes = {s["threads"]: statistics.median(r["read_gbps"] for r in results[_key(s)])
              for s in specs if s["impl"] == "probe"}
    rows = []
    for s in specs:
        if s["impl"] == "probe":
            continue
        runs = results[_key(s)]
        tps = [r["decode_tps"] for r in runs]
        median = statistics.median(tps)
        weight_bytes = decode_weight_bytes(model, s["dtype"])
        gbps = weight_bytes * median / 1e9
        rows.append({
            "threads": s["threads"], "impl": s["impl"], "dtype": s["dtype"],
            "decode_tps": median, "decode_tps_min": min(tps), "decode_tps_max": max(tps),
            "prefill_tps": statistics.median(r["prefill_tps"] for r in runs),
            "bytes_per_token": weight_bytes, "gbps": gbps, "probe_gbps": probes[s["threads"]],
            "bandwidth_fraction": gbps / probes[s["threads"]],
        })
    for row in rows:
        base = {r["dtype"]: r["decode_tps"] for r in rows
                if r["threads"] == row["threads"] and r["impl"] == "transformers"}
        row["vs_transformers_bf16"] = row["decode_tps"] / base["bf16"] if "bf16" in base else None
        row["vs_transformers_fp32"] = row["decode_tps"] / base["fp32"] if "fp32" in base else None
    return rows


def _key(spec: dict) -> str:
    return f"{spec['impl']}:{spec['dtype']}:{spec['threads']}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Model `{meta['model']}`, prompt {PROMPT_TOKENS} tokens, {meta['new_tokens']} decoded tokens, "
        f"{meta['repeats']} interleaved repeats (median, min-max), OMP_WAIT_POLICY={WAIT_POLICY}. "
        f"Load average before/after: {meta['loadavg_before']} / {meta['loadavg_after']}.",
        "",
        "| threads | impl | dtype | decode tok/s | (min-max) | prefill tok/s | MB/token | GB/s | probe GB/s "
        "| % of probe | x transformers bf16 | x transformers fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['threads']} | {r['impl']} | {r['dtype']} | {r['decode_tps']:.1f} | {r['decode_tps_min']:.1f}-"
            f"{r['decode_tps_max']:.1f} | {r['prefill_tps']:.0f} | {r['bytes_per_token'] / 1e6:.0f} | {r['gbps']:.1f} "
            f"| {r['probe_gbps']:.1f} | {100 * r['bandwidth_fraction']:.0f}% | {fmt(r['vs_transformers_bf16'])} "
            f"| {fmt(r['vs_transformers_fp32'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--impls", nargs="+", default=["transformers:bf16", "transformers:fp32", "ours:bf16"],
                        help="IMPL:DTYPE pairs, IMPL in transformers/ours, DTYPE in bf16/fp32")
    parser.add_argument("--json", type=Path, help="also write the rows and metadata here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    specs = configurations(args.model.resolve(), args.threads, args.new_tokens, args.impls)
    results: dict[str, list[dict]] = {_key(s): [] for s in specs}
    loadavg_before = "%.2f %.2f %.2f" % os.getloadavg()
    for repeat in range(args.repeats):
        for spec in specs:
            result = spawn(spec)
            results[_key(spec)].append(result)
            log.info("repeat %d %s: %s", repeat + 1, _key(spec), json.dumps(result))
    meta = {"model": str(args.model), "new_tokens": args.new_tokens, "repeats": args.repeats,
            "loadavg_before": loadavg_before, "loadavg_after": "%.2f %.2f %.2f" % os.getloadavg()}
    rows = summarize(results, specs, args.model.resolve())
    print(markdown(rows, meta))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "raw": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
