#!/usr/bin/env python
"""Process start to first token: from the ready tier vs from the raw checkpoint, in one run.

Each measurement is a fresh `python` process that does what `chat` does (``runtime.open_model``, encode
a prompt, one forward, pick the first token); the two sources alternate (interleaved) so a busy
neighbour on the shared box hits both alike, and medians are reported. "raw" points the child at an
empty cache dir, so ``open_model`` loads the checkpoint (conversion included); "ready" uses a cache dir
where the ready tier was built first. The child also reports its phases (imports, open_model, forward).

    python scripts/bench_load.py                       # models/demo and models/bench-qwen3-moe, 3 runs each
    python scripts/bench_load.py models/demo --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = [REPO / "models" / "demo", REPO / "models" / "bench-qwen3-moe"]
PROMPT = "Write a haiku about the sea."
SOURCES = ("raw", "ready")


def child(model: str, dtype: str, started: float) -> None:
    """Runs in the measured process; ``started`` is the parent's wall clock just before spawning it."""
    t_imports = time.time()
    from qwen_runner.threads import configure_threads

    configure_threads(None)
    import torch

    from qwen_runner.runtime import open_model

    t_open = time.time()
    loaded = open_model(model, dtype)
    t_forward = time.time()
    ids = torch.tensor([loaded.tokenizer.encode(PROMPT)])
    with torch.inference_mode():
        logits = loaded.model(ids, loaded.model.make_cache(ids.shape[1] + 1), last_only=True)
    token = int(logits[0, -1].argmax())
    done = time.time()
    print(json.dumps({
        "first_token": token, "total": done - started, "interpreter": t_imports - started,
        "imports": t_open - t_imports, "open_model": t_forward - t_open, "forward": done - t_forward,
    }))


def measure(model: Path, dtype: str, cache: Path) -> dict:
    env = {**os.environ, "QWEN_RUNNER_CACHE": str(cache)}
    started = time.time()
    out = subprocess.run([sys.executable, __file__, "--child", str(model), "--dtype", dtype, "--started", repr(started)],
                         env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", type=Path, default=DEFAULT_MODELS)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dtype, args.started)
        return

    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        caches = {"raw": Path(tmp) / "empty", "ready": Path(tmp) / "ready"}
        rows = []
        for model in args.models:
            env = {**os.environ, "QWEN_RUNNER_CACHE": str(caches["ready"])}
            subprocess.run([sys.executable, "-m", "qwen_runner", "build-cache", str(model), "--dtype", args.dtype],
                           env=env, cwd=REPO, check=True, capture_output=True)
            runs: dict[str, list[dict]] = {s: [] for s in SOURCES}
            for _ in range(args.runs):
                for source in SOURCES:  # interleaved
                    runs[source].append(measure(model, args.dtype, caches[source]))
            tokens = {r["first_token"] for s in SOURCES for r in runs[s]}
            med = {s: {k: statistics.median(r[k] for r in runs[s]) for k in ("total", "imports", "open_model", "forward")}
                   for s in SOURCES}
            rows.append({
                "model": model.name, "runs": args.runs, "dtype": args.dtype, "same_first_token": len(tokens) == 1,
                "raw": med["raw"], "ready": med["ready"],
                "ratio_total": med["raw"]["total"] / med["ready"]["total"],
                "ratio_open_model": med["raw"]["open_model"] / med["ready"]["open_model"],
            })
    load = os.getloadavg()
    print(f"{'model':<18}{'source':<7}{'start->1st token':>17}{'imports':>9}{'open_model':>11}{'forward':>9}")
    for row in rows:
        for source in SOURCES:
            m = row[source]
            print(f"{row['model']:<18}{source:<7}{m['total']:>16.2f}s{m['imports']:>8.2f}s{m['open_model']:>10.2f}s{m['forward']:>8.2f}s")
        print(f"{'':<18}ratio  start->first token {row['ratio_total']:.1f}x, open_model {row['ratio_open_model']:.1f}x, "
              f"same first token: {row['same_first_token']}")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs")
    print(json.dumps({"rows": rows, "loadavg": load}))


if __name__ == "__main__":
    main()
