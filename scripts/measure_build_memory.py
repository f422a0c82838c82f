#!/usr/bin/env python
"""Peak memory of `qwen-runner build-cache` at full scale, against the planner's build estimate.

Runs the builder in a child process on a checkpoint (by default the 80B Qwen3-Next int4 skeleton from
scripts/make_giant_skeleton.py), samples the child's RssAnon (anonymous resident memory: what the OOM
killer counts; file-backed mmap pages are evictable and excluded) from /proc every few milliseconds,
and prints one JSON line: measured peak, the planner's build-stage peak, their ratio, time, bytes written.

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


def planner_build_peak(model: Path, dtype: str) -> tuple[int, int]:
    """(the planner's build-stage peak, the part of its items a raw-only build incurs: baseline + raw unit).

    The planner models a converting build (raw unit + converted unit + unpack scratch); a ``--tier raw``
    build holds only the raw unit, so both figures are reported.
    """
    from qwen_runner.checkpoint import inspect_checkpoint
    from qwen_runner.planner import detect_host, make_plan

    plan = make_plan(inspect_checkpoint(model), detect_host(), compute_dtype=dtype, ready_tier=False, disk_probe=False)
    items = plan.stages["build"].items
    return plan.stages["build"].peak, items["runtime overhead"] + items["largest layer, raw"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--layers", type=int, default=None, help="partial build of the first N layers")
    parser.add_argument("--tier", default="raw", choices=["raw", "ready"])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--cache-root", type=Path, default=REPO / ".scale-cache")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    estimate, raw_only = planner_build_peak(args.model, args.dtype)
    args.cache_root.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="build-", dir=args.cache_root))
    cmd = [sys.executable, "-m", "qwen_runner", "build-cache", str(args.model), "--tier", args.tier, "--dtype", args.dtype]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
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
    if proc.returncode != 0:
        print(err, file=sys.stderr)
    if not args.keep:
        shutil.rmtree(cache)
    load = os.getloadavg()
    print(json.dumps({
        "model": args.model.name, "tier": args.tier, "layers": args.layers or "all",
        "returncode": proc.returncode, "seconds": round(seconds, 1), "bytes_written": written,
        "peak_rss_anon_gib": round(peak[0] / GIB, 3), "planner_build_peak_gib": round(estimate / GIB, 3),
        "estimate_over_measured": round(estimate / max(1, peak[0]), 3),
        "planner_raw_items_gib": round(raw_only / GIB, 3), "raw_items_over_measured": round(raw_only / max(1, peak[0]), 3),
        "loadavg": [round(x, 2) for x in load], "builder_says": out.strip(),
    }))


if __name__ == "__main__":
    main()
