"""Measure OpenMP wait policy x thread count on a decode-shaped workload.

Why: OMP_WAIT_POLICY is read once when torch loads OpenMP, so the default must be
chosen before import, by measurement. Each configuration runs in a fresh process
(interleaved over repeats) and times many small batch-1 matmuls like a MoE decode
step: 8 layers x (attention projections + top-8 expert gate/up/down) per token.

    python scripts/measure_threads.py [--repeats 5] [--tokens 20] [--busy 1]

--busy N starts N single-threaded busy loops for the whole measurement, to model a
shared box (another job, a browser, CI neighbours on the same cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import time, torch
torch.manual_seed(0)
hidden, inter, experts, topk, layers = 1024, 512, 64, 8, 8
dtype = torch.bfloat16
wqkv = torch.randn(layers, hidden, 1536, dtype=dtype)
wo = torch.randn(layers, 1024, hidden, dtype=dtype)
w13 = torch.randn(layers, experts, hidden, 2 * inter, dtype=dtype)
w2 = torch.randn(layers, experts, inter, hidden, dtype=dtype)
x = torch.randn(1, hidden, dtype=dtype)
def token():
    h = x
    for l in range(layers):
        h = h + (h @ wqkv[l])[:, :1024] @ wo[l]
        for e in range(topk):
            gu = h @ w13[l, e]
            h = h + (torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]) @ w2[l, e]
    return h
for _ in range(3):
    token()
t = time.perf_counter()
for _ in range(TOKENS):
    token()
print((time.perf_counter() - t) / TOKENS)
"""


def run(policy: str, threads: int, tokens: int) -> float:
    env = dict(os.environ, OMP_WAIT_POLICY=policy, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run(
        [sys.executable, "-c", WORKER.replace("TOKENS", str(tokens))],
        env=env, check=True, capture_output=True, text=True,
    )
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--busy", type=int, default=0, help="background busy-loop processes")
    args = parser.parse_args()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        rows = measure(args.repeats, args.tokens)
    finally:
        for proc in busy:
            proc.kill()
    print(json.dumps({"busy_processes": args.busy, "load_average": os.getloadavg(), "rows": rows}, indent=2))


def measure(repeats: int, tokens: int) -> list[dict]:
    configs = [(p, t) for t in (1, 2) for p in ("PASSIVE", "ACTIVE")]
    samples: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    for _ in range(repeats):  # interleaved so drift hits every configuration alike
        for policy, threads in configs:
            samples[(policy, threads)].append(run(policy, threads, tokens))
    rows = []
    for (policy, threads), times in samples.items():
        median = statistics.median(times)
        rows.append({"policy": policy, "threads": threads, "ms_per_token_median": round(median * 1e3, 2),
                     "ms_min": round(min(times) * 1e3, 2), "ms_max": round(max(times) * 1e3, 2),
                     "tok_per_s": round(1 / median, 1)})
    return rows


if __name__ == "__main__":
    main()
