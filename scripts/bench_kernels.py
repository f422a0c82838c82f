"""Microbenchmark: one-row bf16 GEMV, ATen (oneDNN off, as decode runs) vs oneDNN vs our C++ kernel.

Prints weight GB/s per op at 1 and 2 threads, interleaved rounds, medians (the dev box is shared:
compare ratios within a run, not absolute numbers across runs). Also times the fused MoE op
against the ATen per-expert path of ``StackedExperts.decode`` on the bench-model shape.

    python scripts/bench_kernels.py [--rounds 7]
    python scripts/bench_kernels.py --model models/bench-qwen3-moe   # decode tok/s, kernels on vs off

With ``--model`` it instead decodes the model in bf16 with the C++ kernels and with ATen in one
process, alternating (A B A B ...), and prints median tok/s and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qwen_runner import kernels
from qwen_runner.models.layers import StackedExperts, matmul_backend

# (out rows N, in K); 1024x4096 is expert-sized (w2 at I=4096), 151936x1024 the bench model's lm_head
SHAPES = [(1024, 1024), (1024, 4096), (4096, 1024), (151936, 1024)]


COLD_BYTES = 256 * 2**20  # weights cycled per op: more than any L3 here, so every call reads DRAM, as decode does


def per_call(fn, copies: int, min_seconds: float = 0.15) -> float:
    """Seconds per ``fn(i)``, cycling i over the weight copies."""
    fn(0)
    calls, start = 0, time.perf_counter()
    while True:
        fn(calls % copies)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and calls >= copies:
            return elapsed / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", help="decode this checkpoint with the kernels on and off instead")
    args = parser.parse_args()
    if args.model:
        decode_ab(args.model, args.rounds)
        return
    ops = kernels.ops()
    if ops is None:
        raise SystemExit(f"kernel not active: {kernels.status()['reason']}")
    torch.manual_seed(0)
    print(f"kernel: {kernels.status()['kernel']}")
    print(f"{'op':<26}{'threads':>8}{'ATen GB/s':>11}{'oneDNN GB/s':>13}{'ours GB/s':>11}{'ours/ATen':>11}")
    for n, k in SHAPES:
        x = torch.randn(1, k).bfloat16()
        ws = [torch.randn(n, k).bfloat16() for _ in range(max(1, COLD_BYTES // (n * k * 2)))]
        w = ws[0]
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results = {"aten": [], "onednn": [], "ours": []}

            def aten(i):
                with matmul_backend(onednn=False):
                    torch.nn.functional.linear(x, ws[i])

            def onednn(i):
                with matmul_backend(onednn=True):
                    torch.nn.functional.linear(x, ws[i])

            def ours(i):
                kernels.linear(x, ws[i], None)

            for _ in range(args.rounds):
                for name, fn in (("aten", aten), ("onednn", onednn), ("ours", ours)):
                    results[name].append(w.nbytes / per_call(fn, len(ws)) / 1e9)
            med = {name: statistics.median(v) for name, v in results.items()}
            print(f"{f'GEMV {n}x{k}':<26}{threads:>8}{med['aten']:>11.1f}{med['onednn']:>13.1f}{med['ours']:>11.1f}"
                  f"{med['ours'] / med['aten']:>10.2f}x")
    # fused MoE: bench-qwen3-moe shape (E 64, top-8, H 1024, I 512)
    experts = StackedExperts(64, 1024, 512)
    with torch.no_grad():
        experts.w13.copy_(torch.randn_like(experts.w13) * 0.02)
        experts.w2.copy_(torch.randn_like(experts.w2) * 0.02)
    experts.bfloat16()
    x = torch.randn(1, 1024).bfloat16()
    weights = torch.softmax(torch.randn(1, 8), -1).bfloat16()
    # a different top-8 each call, as decode does: the 8 experts read (24 MB) rotate through the 192 MB stack
    choices = [torch.randperm(64)[:8].view(1, 8) for _ in range(64)]
    nbytes = 8 * 3 * 1024 * 512 * 2
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results = {"aten": [], "ours": []}

        def aten_moe(i):
            with matmul_backend(onednn=False):
                experts.decode_aten(x, weights, choices[i])

        def ours_moe(i):
            kernels.moe(x, experts.w13, experts.w2, choices[i][0], weights[0])

        for _ in range(args.rounds):
            results["aten"].append(nbytes / per_call(aten_moe, len(choices)) / 1e9)
            results["ours"].append(nbytes / per_call(ours_moe, len(choices)) / 1e9)
        med = {name: statistics.median(v) for name, v in results.items()}
        print(f"{'MoE 8 of 64 (1024, 512)':<26}{threads:>8}{med['aten']:>11.1f}{'-':>13}{med['ours']:>11.1f}"
              f"{med['ours'] / med['aten']:>10.2f}x")


def decode_ab(model_path: str, rounds: int, gen_tokens: int = 32, prompt_tokens: int = 128) -> None:
    from qwen_runner.models.loader import load

    model, _, _ = load(model_path, dtype=torch.bfloat16)
    ops = kernels.ops()
    if ops is None:
        raise SystemExit(f"kernel not active: {kernels.status()['reason']}")
    prompt = torch.randint(0, 1000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))

    def decode_tps(use_kernel: bool) -> float:
        kernels._ops = ops if use_kernel else None
        model._layer_gemv_bytes = None  # the decode thread policy depends on which path runs
        cache = model.make_cache(prompt_tokens + gen_tokens + 1)
        token = model(prompt, cache, last_only=True)[0, -1].argmax().view(1, 1)
        start = time.perf_counter()
        for _ in range(gen_tokens):
            token = model(token, cache)[0, -1].argmax().view(1, 1)
        return gen_tokens / (time.perf_counter() - start)

    print(f"{model_path}: bf16 decode tok/s, {gen_tokens} tokens after a {prompt_tokens}-token prompt, "
          f"{rounds} alternating rounds, medians")
    print(f"{'threads':>8}{'ATen':>10}{'C++':>10}{'C++/ATen':>10}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results = {True: [], False: []}
        for _ in range(rounds):
            for use_kernel in (False, True):
                results[use_kernel].append(decode_tps(use_kernel))
        aten, ours = statistics.median(results[False]), statistics.median(results[True])
        print(f"{threads:>8}{aten:>10.1f}{ours:>10.1f}{ours / aten:>9.2f}x   "
              f"(ATen {min(results[False]):.1f}-{max(results[False]):.1f}, "
              f"C++ {min(results[True]):.1f}-{max(results[True]):.1f})")
    kernels._ops = ops


if __name__ == "__main__":
    with torch.inference_mode():
        main()
