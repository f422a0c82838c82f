"""`qwen-runner bench`: prefill/decode speed, load time, peak RSS and GB/s, measured, with medians.

Every measurement is a fresh process (``bench_worker``), interleaved across repeats so a
noisy neighbour hits every configuration alike. Our engine is measured loading from the
ready tier and from the raw checkpoint; ``--compare transformers`` adds transformers'
generate on the same checkpoint. A memory-bandwidth probe runs in the same invocation, so
GB/s achieved is reported against what this box can read. The JSON schema is docs/bench.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from qwen_runner import __version__, hardware, precision
from qwen_runner.errors import QwenRunnerError

log = logging.getLogger(__name__)

SCHEMA = "qwen-runner-bench/1"
OURS, TRANSFORMERS, PROBE = "qwen-runner", "transformers", "probe"
COMPARABLE = (TRANSFORMERS,)
METRICS = ("load_s", "start_to_first_token_s", "prefill_tps", "ttft_s", "decode_tps", "gbps", "peak_rss_bytes")
WORKER_TIMEOUT_S = 1800


@dataclass
class BenchOptions:
    model: Path
    prompt_tokens: int = 128
    gen_tokens: int = 32
    repeats: int = 3
    threads: list[int] = field(default_factory=lambda: [1])
    dtype: str = "auto"
    compare: tuple[str, ...] = ()


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"qwen-runner": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "auto-round", "intel-extension-for-pytorch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def environment(dtype: str) -> dict:
    cpu = hardware.detect_cpu()
    return {
        "cpu": cpu.model, "arch": cpu.arch, "isa": cpu.isa,
        "physical_cores": cpu.physical_cores, "logical_cores": cpu.logical_cores,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "versions": _versions(),
        "dtype": dtype,
        "matmul_kernel": precision.matmul_kernel(dtype, cpu.isa),
        "load_average_start": list(os.getloadavg()),
    }


class Runner:
    """Spawns workers; one JSON line back from each."""

    def __init__(self, options: BenchOptions, cache_dir: Path, empty_cache: Path):
        self.options, self.cache_dir, self.empty_cache = options, cache_dir, empty_cache

    def spawn(self, impl: str, threads: int, dtype: str, source: str | None = None) -> dict:
        opts = self.options
        spec = {"impl": impl, "model": str(opts.model), "threads": threads, "dtype": dtype,
                "prompt_tokens": opts.prompt_tokens, "gen_tokens": opts.gen_tokens, "started": time.time()}
        env = {**os.environ, "QWEN_RUNNER_CACHE": str(self.empty_cache if source == "raw" else self.cache_dir)}
        env.pop("OMP_NUM_THREADS", None)  # the worker sets its own before importing torch
        proc = subprocess.run([sys.executable, "-m", "qwen_runner.bench_worker", json.dumps(spec)],
                              env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise QwenRunnerError(f"bench worker ({impl}, {threads} threads) failed: {last}",
                                  "rerun with -v; `qwen-runner generate MODEL --prompt hi` checks the model alone")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if impl != PROBE and source is not None and result["source"] != source:
            raise QwenRunnerError(f"expected to load from the {source} tier but loaded from {result['source']}")
        return result

    def build_ready(self, dtype: str) -> None:
        env = {**os.environ, "QWEN_RUNNER_CACHE": str(self.cache_dir)}
        proc = subprocess.run([sys.executable, "-m", "qwen_runner", "build-cache", str(self.options.model),
                               "--dtype", dtype], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise QwenRunnerError(f"could not build the ready tier: {proc.stderr.strip().splitlines()[-1:]}")


def run_bench(options: BenchOptions, cache_dir: Path, progress=lambda message: None) -> dict:
    """Measure everything and return the report (complete: true); raises before returning partial data."""
    from qwen_runner.checkpoint import inspect_checkpoint

    spec = inspect_checkpoint(options.model)
    dtype = options.dtype if options.dtype != "auto" else precision.choose_dtype(hardware.detect_cpu().isa).dtype
    env = environment(dtype)
    samples: dict[tuple[str, str, int], list[dict]] = {}
    probes: dict[int, list[float]] = {t: [] for t in options.threads}
    with tempfile.TemporaryDirectory(prefix="qwen-runner-bench-") as empty:
        runner = Runner(options, cache_dir, Path(empty))
        progress("building the ready tier (once)")
        runner.build_ready(dtype)
        plan = [(OURS, "ready"), (OURS, "raw")] + [(impl, "checkpoint") for impl in options.compare]
        for repeat in range(options.repeats):
            for threads in options.threads:
                probes[threads].append(runner.spawn(PROBE, threads, dtype)["read_gbps"])
                for impl, source in plan:
                    progress(f"repeat {repeat + 1}/{options.repeats}: {impl} ({source}), {threads} thread(s)")
                    result = runner.spawn(impl, threads, dtype, source if impl == OURS else None)
                    samples.setdefault((impl, source, threads), []).append(result)
    env["load_average_end"] = list(os.getloadavg())
    return _report(options, spec, dtype, env, samples, probes)


def _report(options, spec, dtype, env, samples, probes) -> dict:
    bandwidth = {str(t): _summary(v) for t, v in probes.items()}
    results = []
    for (impl, source, threads), runs in samples.items():
        # Both implementations read the same weights per token; ours knows how many (in-memory dtype).
        bytes_per_token = next((r["bytes_per_token"] for _, rs in samples.items() for r in rs
                                if r.get("bytes_per_token")), None)
        row = {"impl": impl, "source": source, "threads": threads}
        for metric in METRICS:
            if metric == "gbps":
                values = [r["decode_tps"] * bytes_per_token / 1e9 for r in runs] if bytes_per_token else []
            else:
                values = [r[metric] for r in runs if r.get(metric) is not None]
            row[metric] = _summary(values) if values else None
        if row["gbps"]:
            row["bandwidth_fraction"] = row["gbps"]["median"] / bandwidth[str(threads)]["median"]
        results.append(row)
    return {
        "schema": SCHEMA,
        "complete": True,
        "model": str(options.model),
        "architecture": spec.config.architecture,
        "config": {"prompt_tokens": options.prompt_tokens, "gen_tokens": options.gen_tokens,
                   "repeats": options.repeats, "threads": options.threads, "dtype": dtype,
                   "compare": list(options.compare)},
        "active_bytes_per_token": next((r["bytes_per_token"] for rs in samples.values() for r in rs
                                        if r.get("bytes_per_token")), spec.active_bytes_per_token),
        "environment": env,
        "bandwidth_gbps": bandwidth,
        "results": results,
        "ratios": _ratios(results, options.threads),
    }


def _median(results, impl, source, threads, metric):
    for row in results:
        if (row["impl"], row["source"], row["threads"]) == (impl, source, threads) and row.get(metric):
            return row[metric]["median"]
    return None


def _ratios(results: list[dict], threads_list: list[int]) -> list[dict]:
    ratios = []
    for threads in threads_list:
        raw = _median(results, OURS, "raw", threads, "start_to_first_token_s")
        ready = _median(results, OURS, "ready", threads, "start_to_first_token_s")
        if raw and ready:
            ratios.append({"threads": threads, "metric": "start_to_first_token_s", "what": "raw / ready",
                           "ratio": raw / ready})
        for other in COMPARABLE:
            for metric in ("decode_tps", "prefill_tps"):
                ours_value = _median(results, OURS, "ready", threads, metric)
                theirs = _median(results, other, "checkpoint", threads, metric)
                if ours_value and theirs:
                    ratios.append({"threads": threads, "metric": metric, "what": f"{OURS} / {other}",
                                   "ratio": ours_value / theirs})
    return ratios


def check_report(report: dict) -> list[str]:
    """Schema and sanity problems of a report (empty when fine): what CI asserts, never a speed threshold."""
    problems = []
    for key in ("schema", "complete", "model", "config", "environment", "bandwidth_gbps", "results", "ratios"):
        if key not in report:
            problems.append(f"missing {key}")
    if problems:
        return problems
    if report["schema"] != SCHEMA or report["complete"] is not True:
        problems.append("wrong schema or incomplete")
    for row in report["results"]:
        for metric in METRICS:
            value = row.get(metric)
            if value is None:
                continue
            nums = [value["min"], value["median"], value["max"]]
            if not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in nums):
                problems.append(f"{row['impl']}/{row['source']}/{row['threads']} {metric}: not positive finite {nums}")
            elif not value["min"] <= value["median"] <= value["max"]:
                problems.append(f"{row['impl']} {metric}: min <= median <= max does not hold")
        for needed in ("decode_tps", "prefill_tps", "peak_rss_bytes", "start_to_first_token_s"):
            if row.get(needed) is None:
                problems.append(f"{row['impl']}/{row['source']} has no {needed}")
        if row.get("bandwidth_fraction") is not None and row["bandwidth_fraction"] > 1.5:
            problems.append(f"{row['impl']} reads {row['bandwidth_fraction']:.1f}x the probed bandwidth")
    return problems


def format_report(report: dict) -> str:
    cfg, env = report["config"], report["environment"]
    lines = [
        f"qwen-runner bench · {Path(report['model']).name} ({report['architecture']}) · {cfg['dtype']} · "
        f"prompt {cfg['prompt_tokens']} · gen {cfg['gen_tokens']} · {cfg['repeats']} repeat(s), medians [min-max]",
        f"{env['cpu']} · {env['physical_cores']} cores · OMP_WAIT_POLICY={env['omp_wait_policy']} · "
        f"torch {env['versions']['torch']} · matmul {env['matmul_kernel']} · load average "
        f"{env['load_average_start'][0]:.2f} -> {env['load_average_end'][0]:.2f}",
        "bandwidth probe: " + ", ".join(f"{t} thread(s) {v['median']:.1f} GB/s" for t, v in report["bandwidth_gbps"].items()),
        f"{'thr':>3} {'impl':<13}{'source':<11}{'load s':>8}{'start->1st s':>13}{'prefill t/s':>12}"
        f"{'TTFT s':>8}{'decode t/s':>11}{'GB/s':>7}{'of probe':>9}{'peak RSS':>10}",
    ]

    def med(row, metric, fmt):
        return format(row[metric]["median"], fmt) if row.get(metric) else "-"

    for row in sorted(report["results"], key=lambda r: (r["threads"], r["impl"] != OURS, r["source"])):
        fraction = f"{row['bandwidth_fraction']:.0%}" if row.get("bandwidth_fraction") else "-"
        rss = f"{row['peak_rss_bytes']['median'] / (1 << 30):.2f} GiB" if row.get("peak_rss_bytes") else "-"
        lines.append(
            f"{row['threads']:>3} {row['impl']:<13}{row['source']:<11}{med(row, 'load_s', '.2f'):>8}"
            f"{med(row, 'start_to_first_token_s', '.2f'):>13}{med(row, 'prefill_tps', '.1f'):>12}"
            f"{med(row, 'ttft_s', '.3f'):>8}{med(row, 'decode_tps', '.1f'):>11}{med(row, 'gbps', '.1f'):>7}"
            f"{fraction:>9}{rss:>10}"
        )
        if row.get("decode_tps"):
            d = row["decode_tps"]
            lines[-1] += f"   decode [{d['min']:.1f}-{d['max']:.1f}]"
    for ratio in report["ratios"]:
        lines.append(f"ratio ({ratio['threads']} thread(s)) {ratio['metric']} {ratio['what']}: {ratio['ratio']:.2f}x")
    return "\n".join(lines)


def write_report(report: dict, path: Path) -> None:
    """Write the JSON report atomically: a partial report never sits at ``path``."""
    path = path.expanduser().resolve()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
