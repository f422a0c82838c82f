#!/usr/bin/env python
"""Peak memory of `qwen-runner build-cache` at full scale, against the planner's build estimate.

Runs the builder in a child process on a checkpoint (by default the 80B Qwen3-Next int4 skeleton from
scripts/make_giant_skeleton.py), samples the child's RssAnon (anonymous resident memory: what the OOM
killer counts; file-backed mmap pages are evictable and excluded) from /proc every few milliseconds,
and prints one JSON line: measured peak, the planner's build-stage peak for that tier and dtype, their
ratio, time, bytes written. tests/test_planner.py calls ``measure`` on small checkpoints.

    python scripts/measure_build_memory.py --layers 2          # quick check (~1 min)
    python scripts/measure_build_memory.py                     # the full build (writes ~40 GB; see docs/cache.md)

The cache goes to a temporary folder under --cache-root and is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "skeletons" / "qwen3-next-80b-a3b-int4"
SAMPLE_SECONDS = 0.01
KIB = 1024
GIB = 1024**3


def rss_anon(pid: int) -> int | None:
    """RssAnon of ``pid`` in bytes (None once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * KIB
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def planner_build_peak(model: Path, dtype: str, tier: str) -> int:
    """The planner's build-stage peak for this build (its tier decides what the builder copies)."""
    from qwen_runner.checkpoint import inspect_checkpoint
    from qwen_runner.planner import BUILD, detect_host, make_plan

    plan = make_plan(inspect_checkpoint(model), detect_host(), compute_dtype=dtype, ready_tier=False, disk_probe=False,
                     build_target=tier)
    return plan.stages[BUILD].peak


def measure(model: Path, tier: str, dtype: str, layers: int | None, cache_root: Path, keep: bool = False) -> dict:
    """Run build-cache in a child process, sampling its RssAnon; the result dict (see main)."""
    estimate = planner_build_peak(model, dtype, tier)
    cache_root.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="build-", dir=cache_root))
    cmd = [sys.executable, "-m", "qwen_runner", "build-cache", str(model), "--tier", tier, "--dtype", dtype]
    if layers:
        cmd += ["--layers", str(layers)]
    env = {**os.environ, "QWEN_RUNNER_CACHE": str(cache)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            value = rss_anon(proc.pid)
            if value:
                peak[0] = max(peak[0], value)
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    seconds = time.perf_counter() - start
    written = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    if not keep:
        shutil.rmtree(cache)
    return {
        "model": model.name, "tier": tier, "dtype": dtype, "layers": layers or "all",
        "returncode": proc.returncode, "stderr": err[-2000:], "seconds": round(seconds, 1), "bytes_written": written,
        "peak_rss_anon_bytes": peak[0], "planner_build_peak_bytes": estimate,
        "peak_rss_anon_gib": round(peak[0] / GIB, 3), "planner_build_peak_gib": round(estimate / GIB, 3),
        "estimate_over_measured": round(estimate / max(1, peak[0]), 3),
        "loadavg": [round(x, 2) for x in os.getloadavg()], "builder_says": out.strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--layers", type=int, default=None, help="partial build of the first N layers")
    parser.add_argument("--tier", default="raw", choices=["raw", "ready"])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--cache-root", type=Path, default=REPO / ".scale-cache")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    result = measure(args.model, args.tier, args.dtype, args.layers, args.cache_root, args.keep)
    if result["returncode"] != 0:
        print(result["stderr"], file=sys.stderr)
    result.pop("stderr")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
