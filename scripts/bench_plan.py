"""How long `qwen-runner plan` takes on the giant skeletons: wall time of the whole command, fresh
process each, median [min-max] over runs. The issue's target is < 2 s for the 80B int4 skeleton.

    python scripts/make_giant_skeleton.py          # once: sparse 80B/30B/235B checkpoints
    python scripts/bench_plan.py [--runs 7] [SKELETON_DIR ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT = [REPO / "models" / "skeletons" / name for name in
           ("qwen3-next-80b-a3b-int4", "qwen3-next-80b-a3b-int4-mixed", "qwen3-30b-a3b-int4", "qwen3-235b-a22b-int4")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path, default=DEFAULT)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    for model in args.models:
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "qwen_runner", "plan", str(model), "--memory-budget", "24G"],
                           check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        print(f"{model.name:<34} median {statistics.median(times):.2f} s [{min(times):.2f}-{max(times):.2f}]")


if __name__ == "__main__":
    main()
