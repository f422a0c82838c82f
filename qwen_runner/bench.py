"""`qwen-runner bench`: prefill/decode speed, load time, peak RSS and GB/s, measured, with medians.

Every measurement is a fresh process (``bench_worker``), interleaved across repeats so a
noisy neighbour hits every configuration alike. Our engine is measured loading from the
ready tier and from the raw checkpoint, and building the ready tier from nothing;
``--compare transformers[-fp32]`` adds transformers' generate on the same checkpoint, and
``--baseline OTHER`` measures a second checkpoint (e.g. the bf16 original of an int4 one) in
the same loop, so every ratio an issue asks for comes out of one run. A memory-bandwidth
probe runs in the same invocation, so GB/s achieved is reported against what this box can
read. The JSON schema is docs/bench.md.
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

from qwen_runner import __version__, hardware, kernels, precision
from qwen_runner import settings as S
from qwen_runner.errors import QwenRunnerError

log = logging.getLogger(__name__)

SCHEMA = "qwen-runner-bench/2"
OURS, TRANSFORMERS, PROBE, BUILD = "qwen-runner", "transformers", "probe", "build"
MAIN, BASELINE = "main", "baseline"
# --compare choices: the implementation and the dtype it runs in (None: the bench's dtype).
COMPARE_CHOICES = {"transformers": (TRANSFORMERS, None), "transformers-fp32": (TRANSFORMERS, "fp32")}
METRICS = ("load_s", "start_to_first_token_s", "prefill_tps", "ttft_s", "decode_tps", "gbps", "peak_rss_bytes",
           "build_s")
GENERATION_METRICS = ("decode_tps", "prefill_tps", "peak_rss_bytes", "start_to_first_token_s")
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
    baseline: Path | None = None
    measure_build: bool = True
    backend: str = "native"
    lm_head: str = S.DEFAULT_LM_HEAD  # --lm-head for MODEL's own runs (ready, raw, build); not the baseline's


@dataclass(frozen=True)
class Config:
    """One measured configuration: which checkpoint, which engine, loaded from where, in which dtype."""

    model: str  # MAIN or BASELINE
    impl: str
    source: str  # ready | raw | build | checkpoint
    dtype: str

    def label(self) -> str:
        name = self.impl if self.model == MAIN else f"{self.impl} baseline"
        return f"{name} ({self.source}, {self.dtype})"


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
    from qwen_runner.models.matmul import prefill_gemm_status

    cpu = hardware.detect_cpu()
    return {
        "cpu": cpu.model, "arch": cpu.arch, "isa": cpu.isa,
        "physical_cores": cpu.physical_cores, "logical_cores": cpu.logical_cores,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "versions": _versions(),
        "dtype": dtype,
        "matmul_kernel": precision.matmul_kernel(dtype, cpu.isa),
        "prefill_gemm": prefill_gemm_status(dtype)["kernel"],
        "load_average_start": list(os.getloadavg()),
    }


class Runner:
    """Spawns workers; one JSON line back from each."""

    def __init__(self, options: BenchOptions, cache_dir: Path, empty_cache: Path):
        self.options, self.cache_dir, self.empty_cache = options, cache_dir, empty_cache
        self.kernels_root = kernels.extensions_root()

    def model_path(self, model: str) -> Path:
        return self.options.baseline if model == BASELINE else self.options.model

    def spawn(self, impl: str, threads: int, dtype: str, source: str | None = None, model: str = MAIN) -> dict:
        opts = self.options
        spec = {"impl": impl, "model": str(self.model_path(model)), "threads": threads, "dtype": dtype,
                "backend": opts.backend, "lm_head": opts.lm_head if model == MAIN else S.DEFAULT_LM_HEAD,
                "prompt_tokens": opts.prompt_tokens, "gen_tokens": opts.gen_tokens, "started": time.time()}
        with tempfile.TemporaryDirectory(prefix="qwen-runner-bench-build-") as scratch:
            # raw: an empty cache so nothing is found; build: a fresh one so everything is built.
            cache = {"raw": self.empty_cache, BUILD: Path(scratch)}.get(source, self.cache_dir)
            # one build of the C++ kernels for all workers, whatever cache each one uses
            env = {**os.environ, "QWEN_RUNNER_CACHE": str(cache), "TORCH_EXTENSIONS_DIR": str(self.kernels_root)}
            env.pop("OMP_NUM_THREADS", None)  # the worker sets its own before importing torch
            proc = subprocess.run([sys.executable, "-m", "qwen_runner.bench_worker", json.dumps(spec)],
                                  env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise QwenRunnerError(f"bench worker ({impl}, {threads} threads) failed: {last}",
                                  "rerun with -v; `qwen-runner generate MODEL --prompt hi` checks the model alone")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if impl == OURS and source is not None and result["source"] != source:
            raise QwenRunnerError(f"expected to load from the {source} tier but loaded from {result['source']}")
        return result

    def build_ready(self, dtype: str, model: str = MAIN) -> None:
        env = {**os.environ, "QWEN_RUNNER_CACHE": str(self.cache_dir)}
        lm_head = self.options.lm_head if model == MAIN else S.DEFAULT_LM_HEAD
        proc = subprocess.run([sys.executable, "-m", "qwen_runner", "build-cache", str(self.model_path(model)),
                               "--dtype", dtype, "--backend", self.options.backend, "--lm-head", lm_head],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise QwenRunnerError(f"could not build the ready tier: {proc.stderr.strip().splitlines()[-1:]}")


def plan_configs(options: BenchOptions, dtype: str) -> list[Config]:
    """Every configuration one repeat measures, in the order they are interleaved."""
    compares = [COMPARE_CHOICES[name] for name in options.compare]
    if options.backend != "native":  # ipex optimizes at load time: no cache tier to load or build
        return [Config(MAIN, OURS, "raw", dtype)] + [Config(MAIN, i, "checkpoint", c or dtype) for i, c in compares]
    configs = [Config(MAIN, OURS, "ready", dtype), Config(MAIN, OURS, "raw", dtype)]
    if options.measure_build:
        configs.append(Config(MAIN, BUILD, BUILD, dtype))
    configs += [Config(MAIN, impl, "checkpoint", cdtype or dtype) for impl, cdtype in compares]
    if options.baseline is not None:
        configs.append(Config(BASELINE, OURS, "ready", dtype))
        configs += [Config(BASELINE, impl, "checkpoint", cdtype or dtype) for impl, cdtype in compares]
    return configs


def run_bench(options: BenchOptions, cache_dir: Path, progress=lambda message: None) -> dict:
    """Measure everything and return the report (complete: true); raises before returning partial data."""
    from qwen_runner.checkpoint import inspect_checkpoint

    spec = inspect_checkpoint(options.model)
    if options.baseline is not None:
        inspect_checkpoint(options.baseline)  # a bad baseline fails before anything is measured
    dtype = options.dtype if options.dtype != "auto" else precision.choose_dtype(hardware.detect_cpu().isa).dtype
    env = environment(dtype)
    if options.lm_head != S.DEFAULT_LM_HEAD:  # MODEL's runs use a non-default head (the baseline's is as stored)
        from qwen_runner.cache.manifest import head_record

        env["lm_head"] = {"model": MAIN, **head_record(options.lm_head)}
    configs = plan_configs(options, dtype)
    samples: dict[tuple[Config, int], list[dict]] = {}
    probes: dict[int, list[float]] = {t: [] for t in options.threads}
    with tempfile.TemporaryDirectory(prefix="qwen-runner-bench-") as empty:
        runner = Runner(options, cache_dir, Path(empty))
        for model in {c.model for c in configs if c.impl == OURS and c.source == "ready"}:
            progress(f"building the ready tier of the {model} model (once)")
            runner.build_ready(dtype, model)
        for repeat in range(options.repeats):
            for threads in options.threads:
                probes[threads].append(runner.spawn(PROBE, threads, dtype)["read_gbps"])
                for config in configs:
                    if config.impl == BUILD and threads != max(options.threads):
                        continue  # one build per repeat, at the most threads
                    progress(f"repeat {repeat + 1}/{options.repeats}: {config.label()}, {threads} thread(s)")
                    result = runner.spawn(config.impl, threads, config.dtype, config.source, config.model)
                    samples.setdefault((config, threads), []).append(result)
    env["load_average_end"] = list(os.getloadavg())
    # The dtype our engine ended with and why (every step down the fp16 -> bf16 -> fp32 chain, if any).
    env["precision"] = next((r[0].get("precision") for (c, _t), r in samples.items() if c.impl == OURS), None)
    return _report(options, spec, dtype, env, samples, probes)


def _bytes_per_token(samples: dict, model: str, dtype: str) -> int | None:
    """Weight bytes one token reads, as our engine reports it for this checkpoint in this dtype.

    transformers reads the same weights per token, so its rows use the same number; a row in
    another dtype (transformers fp32) scales by the element size, and an int4 checkpoint's
    16-bit baseline has its own entry.
    """
    for (config, _), runs in samples.items():
        if config.model == model and config.impl == OURS:
            for run in runs:
                if run.get("bytes_per_token"):
                    ours = run["bytes_per_token"]
                    if dtype != config.dtype and config.dtype in ELEMENT_BYTES and dtype in ELEMENT_BYTES:
                        return ours * ELEMENT_BYTES[dtype] // ELEMENT_BYTES[config.dtype]
                    return ours
    return None


ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _report(options, spec, dtype, env, samples, probes) -> dict:
    bandwidth = {str(t): _summary(v) for t, v in probes.items()}
    results = []
    for (config, threads), runs in samples.items():
        row = {"model": config.model, "impl": config.impl, "source": config.source, "dtype": config.dtype,
               "threads": threads}
        bytes_per_token = _bytes_per_token(samples, config.model, config.dtype)
        for metric in METRICS:
            if metric == "gbps":
                values = ([r["decode_tps"] * bytes_per_token / 1e9 for r in runs if r.get("decode_tps")]
                          if bytes_per_token else [])
            else:
                values = [r[metric] for r in runs if r.get(metric) is not None]
            row[metric] = _summary(values) if values else None
        row["weight_kernel"] = next((r["weight_kernel"] for r in runs if r.get("weight_kernel")), None)  # int4
        if row["gbps"]:
            row["bandwidth_fraction"] = row["gbps"]["median"] / bandwidth[str(threads)]["median"]
        results.append(row)
    return {
        "schema": SCHEMA,
        "complete": True,
        "model": str(options.model),
        "architecture": spec.config.architecture,
        "baseline": str(options.baseline) if options.baseline else None,
        "config": {"prompt_tokens": options.prompt_tokens, "gen_tokens": options.gen_tokens,
                   "repeats": options.repeats, "threads": options.threads, "dtype": dtype,
                   "compare": list(options.compare)},
        "active_bytes_per_token": _bytes_per_token(samples, MAIN, dtype) or spec.active_bytes_per_token,
        "environment": env,
        "bandwidth_gbps": bandwidth,
        "results": results,
        "ratios": _ratios(results, options.threads, dtype),
    }


def _median(results, threads, metric, *, model=MAIN, impl=OURS, source="ready", dtype=None):
    for row in results:
        if ((row["model"], row["impl"], row["source"], row["threads"]) == (model, impl, source, threads)
                and (dtype is None or row["dtype"] == dtype) and row.get(metric)):
            return row[metric]["median"]
    return None


def _name(row: dict, main_dtype: str) -> str:
    """How a ratio names a row: 'transformers', 'transformers fp32', 'qwen-runner baseline', ..."""
    name = row["impl"] + (" baseline" if row["model"] == BASELINE else "")
    return name if row["dtype"] == main_dtype else f"{name} {row['dtype']}"


def _ratios(results: list[dict], threads_list: list[int], dtype: str) -> list[dict]:
    """Start raw / ready, and our ready-tier speed on the main model over every other engine measured."""
    ratios = []
    for threads in threads_list:
        raw = _median(results, threads, "start_to_first_token_s", source="raw")
        ready = _median(results, threads, "start_to_first_token_s")
        if raw and ready:
            ratios.append({"threads": threads, "metric": "start_to_first_token_s", "what": "raw / ready",
                           "ratio": raw / ready})
        others = [r for r in results if r["threads"] == threads and r["source"] in ("checkpoint", "ready")
                  and not (r["model"] == MAIN and r["impl"] == OURS)]
        for metric in ("decode_tps", "prefill_tps"):
            ours_value = _median(results, threads, metric)
            for row in others:
                if ours_value and row.get(metric):
                    ratios.append({"threads": threads, "metric": metric, "what": f"{OURS} / {_name(row, dtype)}",
                                   "ratio": ours_value / row[metric]["median"]})
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
        needed = ("build_s", "peak_rss_bytes") if row["source"] == BUILD else GENERATION_METRICS
        for metric in needed:
            if row.get(metric) is None:
                problems.append(f"{row['impl']}/{row['source']} has no {metric}")
        if row.get("bandwidth_fraction") is not None and row["bandwidth_fraction"] > 1.5:
            problems.append(f"{row['impl']} reads {row['bandwidth_fraction']:.1f}x the probed bandwidth")
    return problems


def format_report(report: dict) -> str:
    cfg, env = report["config"], report["environment"]
    lines = [
        f"qwen-runner bench · {Path(report['model']).name} ({report['architecture']}) · {cfg['dtype']} · "
        f"prompt {cfg['prompt_tokens']} · gen {cfg['gen_tokens']} · {cfg['repeats']} repeat(s), medians [min-max]",
        f"{env['cpu']} · {env['physical_cores']} cores · OMP_WAIT_POLICY={env['omp_wait_policy']} · "
        f"torch {env['versions']['torch']} · matmul {env['matmul_kernel']} · prefill "
        f"{env.get('prefill_gemm', env['matmul_kernel'])} · load average "
        f"{env['load_average_start'][0]:.2f} -> {env['load_average_end'][0]:.2f}",
        "bandwidth probe: " + ", ".join(f"{t} thread(s) {v['median']:.1f} GB/s" for t, v in report["bandwidth_gbps"].items()),
    ]
    if report.get("baseline"):
        lines.append(f"baseline model: {report['baseline']}")
    head = env.get("lm_head")
    if head:
        extra = ", ".join(f"{k} {v}" for k, v in head.items() if k not in ("model", "format"))
        lines.append(f"lm_head ({head['model']}): {head['format']} ({extra})")
    kernels = {(r["model"], r["weight_kernel"]) for r in report["results"] if r.get("weight_kernel")}
    for model, kernel in sorted(kernels):
        lines.append(f"int4 weights ({model}): {kernel}")
    lines.append(f"{'thr':>3} {'impl':<25}{'source':<11}{'dtype':<6}{'load s':>8}{'start->1st s':>13}"
                 f"{'prefill t/s':>12}{'TTFT s':>8}{'decode t/s':>11}{'GB/s':>7}{'of probe':>9}{'peak RSS':>10}")

    def med(row, metric, fmt):
        return format(row[metric]["median"], fmt) if row.get(metric) else "-"

    order = {OURS: 0, BUILD: 1, TRANSFORMERS: 2}
    for row in sorted(report["results"], key=lambda r: (r["threads"], r["model"] != MAIN, order.get(r["impl"], 3),
                                                         r["source"], r["dtype"])):
        fraction = f"{row['bandwidth_fraction']:.0%}" if row.get("bandwidth_fraction") else "-"
        rss = f"{row['peak_rss_bytes']['median'] / (1 << 30):.2f} GiB" if row.get("peak_rss_bytes") else "-"
        name = row["impl"] + (" (baseline)" if row["model"] == BASELINE else "")
        load = med(row, "build_s" if row["source"] == BUILD else "load_s", ".2f")
        lines.append(
            f"{row['threads']:>3} {name:<25}{row['source']:<11}{row['dtype']:<6}{load:>8}"
            f"{med(row, 'start_to_first_token_s', '.2f'):>13}{med(row, 'prefill_tps', '.1f'):>12}"
            f"{med(row, 'ttft_s', '.3f'):>8}{med(row, 'decode_tps', '.1f'):>11}{med(row, 'gbps', '.1f'):>7}"
            f"{fraction:>9}{rss:>10}"
        )
        if row.get("decode_tps"):
            d = row["decode_tps"]
            lines[-1] += f"   decode [{d['min']:.1f}-{d['max']:.1f}]"
    if any(r["source"] == BUILD for r in report["results"]):
        lines.append("(build rows: `load s` is the build-cache time from the checkpoint to a complete ready tier)")
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
