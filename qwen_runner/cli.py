"""The `qwen-runner` command: parse, call one function, print. Nothing else lives here.

torch is imported only inside commands, after ``configure_threads`` has exported the
OpenMP settings (OpenMP reads them once, when torch loads it).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import sys

import click

from qwen_runner import __version__
from qwen_runner import settings as S
from qwen_runner.errors import QwenRunnerError

log = logging.getLogger("qwen_runner")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _model_option(func):
    return click.argument("model", metavar="MODEL")(func)


def _backend_option(func):
    from qwen_runner.backends import BACKENDS, DEFAULT_BACKEND

    return click.option("--backend", type=click.Choice(BACKENDS), default=DEFAULT_BACKEND, show_default=True,
                        help="native: stock PyTorch; ipex: intel-extension-for-pytorch (optional, .venv-ipex).")(func)


def _check_lm_head(ctx, param, value: str) -> str:
    if value not in S.LM_HEAD_FORMATS:
        raise QwenRunnerError(f"--lm-head {value}: not one of {', '.join(S.LM_HEAD_FORMATS)}",
                              "e.g. --lm-head int4 (RTN int4 copy of the head) or leave it out (as stored)")
    return value


def _lm_head_option(func):
    return click.option(
        "--lm-head", "lm_head", metavar="[" + "|".join(S.LM_HEAD_FORMATS) + "]", default=S.DEFAULT_LM_HEAD,
        show_default=True, callback=_check_lm_head,
        help=f"lm_head format. checkpoint: as stored; int4: an RTN int4 copy (asym min-max, group "
             f"{S.LM_HEAD_INT4_GROUP}) made at build/load time, the embedding stays 16-bit "
             "(docs/quantization.md).")(func)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qwen-runner")
@click.option("--threads", type=int, default=None, help="Compute threads (default: physical cores usable here).")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, threads: int | None, verbose: int, debug: bool) -> None:
    """CPU inference for giant Qwen Mixture-of-Experts models."""
    from qwen_runner.threads import configure_threads

    _setup_logging(verbose)
    ctx.obj = {"debug": debug}
    configure_threads(threads)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(as_json: bool) -> None:
    """Hardware, threads, backends and the kernels that would be used."""
    from qwen_runner.info import collect_info, format_info

    report = collect_info()
    click.echo(json.dumps(report, indent=2) if as_json else format_info(report))


_BUDGET_HELP = f"Plan for this much RAM and no swap instead of this host's (e.g. 16G; env {S.ENV_MEMORY_BUDGET})."


@cli.command()
@_model_option
@click.option("--max-context", type=int, default=S.DEFAULT_MAX_CONTEXT, show_default=True,
              help="Context length to plan the KV/state cache for.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Compute dtype to plan for (auto: what chat would pick on this CPU).")
@click.option("--memory-budget", default=None, help=_BUDGET_HELP)
@click.option("--json", "as_json", is_flag=True)
def plan(model: str, max_context: int, dtype: str, memory_budget: str | None, as_json: bool) -> None:
    """Will MODEL fit? Per-stage memory peaks, verdicts and advice, from headers only."""
    from qwen_runner.checkpoint import inspect_checkpoint, resolve_model_dir
    from qwen_runner.planner import default_compute_dtype, detect_host, format_plan, make_plan

    spec = inspect_checkpoint(resolve_model_dir(model))
    host = detect_host(memory_budget or S.load_settings().memory_budget)
    result = make_plan(spec, host, max_context, default_compute_dtype() if dtype == "auto" else dtype)
    click.echo(json.dumps(result.as_dict(), indent=2, default=str) if as_json else format_plan(result))


def _memory_guard(stage: str, context_option: bool = False):
    """Add --force/--memory-budget (and --max-context if asked) and run the planner before the command.

    The check reads headers only, so a refusal (exit 3, one line, advice) comes before anything loads.
    Goes directly above ``def``; the command keeps its own ``force``/``max_context`` parameters if it has them.
    """

    def wrap(func):
        wanted = inspect.signature(func).parameters

        @functools.wraps(func)
        def guarded(*args, force: bool = False, memory_budget: str | None = None, **kwargs):
            from qwen_runner.planner import require

            require(kwargs["model"], stage, kwargs.get("max_context") or S.DEFAULT_MAX_CONTEXT, memory_budget, force,
                    kwargs.get("dtype"), build_target=kwargs.get("tier") or "ready")
            if "force" in wanted:
                kwargs["force"] = force
            if "max_context" not in wanted:
                kwargs.pop("max_context", None)
            return func(*args, **kwargs)

        guarded = click.option("--memory-budget", default=None, help=_BUDGET_HELP)(guarded)
        if "force" not in wanted:
            guarded = click.option("--force", is_flag=True, help="Go ahead even if the memory plan refuses.")(guarded)
        if context_option:
            guarded = click.option("--max-context", type=int, default=S.DEFAULT_MAX_CONTEXT, show_default=True,
                                   help="Context length to plan and allocate the cache for.")(guarded)
        return guarded

    return wrap


@cli.command("build-cache")
@_model_option
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Weight dtype of the cache (auto: what chat would pick on this CPU).")
@_backend_option
@click.option("--tier", type=click.Choice(["ready", "raw"]), default="ready", show_default=True,
              help="Build up to this tier (raw: the normalized checkpoint tensors only).")
@click.option("--rebuild", is_flag=True, help="Discard existing shards and build everything again.")
@click.option("--wait", is_flag=True, help="If another build-cache holds this cache, wait for it instead of refusing.")
@click.option("--layers", type=int, default=None, hidden=True, help="Partial build of the first N layers (quick checks).")
@_lm_head_option
@click.option("--force", is_flag=True, help="Go ahead even if the memory plan refuses.")
@_memory_guard("build")
def build_cache(model: str, dtype: str, backend: str, tier: str, rebuild: bool, wait: bool, layers: int | None,
                lm_head: str, force: bool) -> None:
    """Convert MODEL once into the mmap-able ready tier (streaming, resumable; see docs/cache.md)."""
    from qwen_runner.cache import build_cache as build
    from qwen_runner.planner import fmt_bytes

    result = build(model, dtype, backend, target=tier, layers=layers, rebuild=rebuild, wait=wait, lm_head=lm_head)
    state = "complete" if result.complete else f"partial (--layers {layers})"
    click.echo(f"{result.target} tier {state}: {result.units} shards ({result.written} written, {result.kept} kept), "
               f"{fmt_bytes(result.bytes_on_disk)} in {result.paths.dir}, {result.seconds:.1f} s")


@cli.command()
@click.argument("action", type=click.Choice(["ls", "verify", "rm"]))
@click.argument("model", required=False)
@click.option("--all", "everything", is_flag=True, help="rm: every entry in the cache dir.")
def cache(action: str, model: str | None, everything: bool) -> None:
    """List, verify (every checksum) or remove cache entries; MODEL narrows to one checkpoint."""
    from qwen_runner import cache as C
    from qwen_runner.cache import manifest as M
    from qwen_runner.checkpoint import resolve_model_dir
    from qwen_runner.errors import CacheError
    from qwen_runner.planner import fmt_bytes

    model_dir = resolve_model_dir(model) if model else None
    if action == "ls":
        entries = C.list_entries(model_dir)
        click.echo(f"cache dir {S.default_cache_dir()}")
        for e in entries:
            m = e.manifest or {}
            click.echo(f"{fmt_bytes(e.size):>10}  {e.state:<20} {e.folder}  <- {m.get('source', {}).get('path', '?')}")
        if not entries:
            click.echo("(empty)")
    elif action == "verify":
        if model_dir is None:
            raise CacheError("cache verify needs MODEL", "e.g. `qwen-runner cache verify models/demo`")
        entries, problems = C.verify(model_dir)
        if not entries:
            raise CacheError(f"no cache entry for {model_dir}", f"build it with `qwen-runner build-cache {model_dir}`")
        for entry, problem in problems:
            click.echo(f"bad  {entry.folder.name}/{problem.line()}", err=True)
        if problems:
            entry, first = problems[0]
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            m = entry.manifest or {}
            hint = C.build_hint(model_dir, m.get("dtype", "auto"), m.get("backend", "native"), M.manifest_lm_head(m))
            raise CacheError(f"{entry.folder}/{first.line()}{more}",
                             f"{hint} to rebuild "
                             f"what is stale, or `qwen-runner cache rm {model_dir}`")
        for entry in entries:
            click.echo(f"ok   {entry.folder} ({len(entry.manifest['shards'])} shards, checksums match)")
    else:
        if model_dir is None and not everything:
            raise CacheError("cache rm needs MODEL or --all", "e.g. `qwen-runner cache rm models/demo`")
        entries = C.list_entries(model_dir)
        freed = C.remove(entries)
        click.echo(f"removed {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {fmt_bytes(freed)} freed")


def _sampling_options(temperature: float, top_k: int = 0, top_p: float = 1.0):
    """The sampling flags shared by chat and generate (chat defaults to Qwen's recommended sampling)."""

    def wrap(func):
        for option in reversed([
            click.option("--temperature", type=float, default=temperature, show_default=True,
                         help="0 means greedy."),
            click.option("--top-k", type=int, default=top_k, show_default=True,
                         help="Keep the k most likely tokens (0: off)."),
            click.option("--top-p", type=float, default=top_p, show_default=True,
                         help="Nucleus sampling mass (1: off)."),
            click.option("--min-p", type=float, default=0.0, help="Drop tokens below min-p x the best (0: off)."),
            click.option("--repeat-penalty", type=float, default=1.0, help="Repetition penalty (1: off)."),
            click.option("--seed", type=int, default=None, help="Seed for repeatable sampling."),
            click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto",
                         show_default=True, help="Compute dtype (auto: from CPU features, see `info`)."),
            click.option("--max-context", type=int, default=S.DEFAULT_MAX_CONTEXT, show_default=True,
                         help="Tokens of context to allocate the cache for."),
        ]):
            func = option(func)
        return func

    return wrap


def _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed):
    from qwen_runner.sampling import SamplingParams

    try:
        return SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed)
    except ValueError as err:
        raise QwenRunnerError(f"bad sampling option: {err}", "see `qwen-runner chat --help`") from None


@cli.command()
@_model_option
@click.option("--prompt", default=None, help="One-shot question instead of the REPL (piped stdin works too).")
@click.option("--system", default=None, help="System prompt.")
@click.option("--think/--no-think", default=False, show_default=True, help="Qwen3 thinking mode.")
@click.option("--hide-thinking", is_flag=True, help="Do not print the <think> part of answers.")
@click.option("--max-tokens", type=int, default=S.DEFAULT_CHAT_MAX_TOKENS, show_default=True)
@click.option("--build-cache", "build_first", is_flag=True,
              help="Build (or finish) the ready tier first, with a progress bar, so this and later starts are fast.")
@_backend_option
@_lm_head_option
@_sampling_options(S.DEFAULT_CHAT_TEMPERATURE, S.DEFAULT_CHAT_TOP_K, S.DEFAULT_CHAT_TOP_P)
@_memory_guard("run")
def chat(model, prompt, system, think, hide_thinking, max_tokens, build_first, backend, lm_head, temperature, top_k,
         top_p, min_p, repeat_penalty, seed, dtype, max_context):
    """Chat with MODEL: a streaming REPL with tokens/s after each answer."""
    from qwen_runner.chat import start_chat
    from qwen_runner.runtime import open_model
    from qwen_runner.threads import active_config

    sampling = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed)
    if build_first:
        from qwen_runner.cache import build_cache as build

        build(model, dtype, backend, lm_head=lm_head)
    loaded = open_model(model, dtype, backend, lm_head)
    start_chat(loaded, prompt=prompt, system=system, think=think, show_thinking=not hide_thinking,
               max_context=max_context, max_tokens=max_tokens, sampling=sampling,
               history_file=S.load_settings().cache_dir / "chat_history", threads=active_config().threads)


@cli.command()
@_model_option
@click.option("--prompt", required=True, help="Text to continue (no chat template).")
@click.option("--max-tokens", type=int, default=S.DEFAULT_GENERATE_MAX_TOKENS, show_default=True)
@_backend_option
@_lm_head_option
@_sampling_options(0.0)
@_memory_guard("run")
def generate(model, prompt, max_tokens, backend, lm_head, temperature, top_k, top_p, min_p, repeat_penalty, seed,
             dtype, max_context):
    """Raw completion of --prompt: text to stdout, stats to stderr."""
    from qwen_runner.generate import complete
    from qwen_runner.runtime import open_model

    sampling = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed)
    loaded = open_model(model, dtype, backend, lm_head)
    complete(loaded, prompt, max_tokens=max_tokens, sampling=sampling, max_context=max_context,
             out=sys.stdout, err=sys.stderr)


def _thread_list(ctx, param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        counts = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise click.BadParameter("give thread counts like 1 or 1,2")
    return counts


@cli.command()
@_model_option
@click.option("--prompt-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--gen-tokens", type=click.IntRange(2), default=32, show_default=True)
@click.option("--repeat", "repeats", type=click.IntRange(1), default=3, show_default=True,
              help="Fresh-process measurements per configuration (median, min, max).")
@click.option("--threads", "thread_counts", callback=_thread_list, default=None,
              help="Thread counts to measure, e.g. 1,2 (default: the configured threads).")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True)
@click.option("--compare", type=click.Choice(["transformers", "transformers-fp32"]), multiple=True,
              help="Also measure transformers' generate on the same checkpoint, in the bench dtype or in fp32 "
                   "(separate processes, interleaved; repeatable).")
@click.option("--baseline", "baseline", default=None,
              help="A second checkpoint measured in the same loop (our ready tier and every --compare), e.g. the "
                   "bf16 original of an int4 MODEL; ratios of MODEL against it are printed.")
@click.option("--no-build", "skip_build", is_flag=True, help="Skip the build-cache measurement (time, peak RSS).")
@_backend_option
@_lm_head_option
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report (schema: docs/bench.md).")
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Also write the JSON report here.")
@_memory_guard("run", context_option=True)
def bench(model, prompt_tokens, gen_tokens, repeats, thread_counts, dtype, compare, baseline, skip_build, backend,
          lm_head, as_json, output):
    """Measure load time, prefill/decode tok/s, TTFT, peak RSS and GB/s (medians over fresh processes)."""
    from pathlib import Path

    from qwen_runner.bench import BenchOptions, check_report, format_report, run_bench, write_report
    from qwen_runner.checkpoint import resolve_model_dir
    from qwen_runner.threads import active_config

    if backend != "native" and lm_head != S.DEFAULT_LM_HEAD:
        raise QwenRunnerError(f"--lm-head {lm_head} needs the native backend",
                              "drop --lm-head, or use --backend native")
    if backend != "native" and baseline:
        raise QwenRunnerError(f"--baseline needs the native backend (--backend {backend} has no ready tier to compare)",
                              "drop --baseline, or bench each checkpoint with --backend ipex separately")
    options = BenchOptions(resolve_model_dir(model), prompt_tokens, gen_tokens, repeats,
                           thread_counts or [active_config().threads], dtype, tuple(dict.fromkeys(compare)),
                           resolve_model_dir(baseline) if baseline else None, measure_build=not skip_build,
                           backend=backend, lm_head=lm_head)
    report = run_bench(options, S.load_settings().cache_dir, progress=lambda m: log.info("bench: %s", m))
    problems = check_report(report)
    if problems:
        raise QwenRunnerError(f"bench produced an inconsistent report: {problems[0]}", "rerun with -v")
    if output:
        write_report(report, Path(output))
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


def main(argv: list[str] | None = None) -> None:
    """Entry point: expected errors become one line and an exit code; --debug shows tracebacks."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="qwen-runner", standalone_mode=False)
    except QwenRunnerError as err:
        if debug:
            raise
        hint = f" (hint: {err.hint})" if err.hint else ""
        click.echo(f"error: {err.message}{hint}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except Exception as err:  # noqa: BLE001 - last resort: one line, never a traceback by default
        if debug:
            raise
        click.echo(f"internal error: {type(err).__name__}: {err} (hint: rerun with --debug for the traceback)", err=True)
        sys.exit(1)
