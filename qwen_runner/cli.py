"""The `qwen-runner` command: parse, call one function, print. Nothing else lives here.

torch is imported only inside commands, after ``configure_threads`` has exported the
OpenMP settings (OpenMP reads them once, when torch loads it).
"""

from __future__ import annotations

import json
import logging
import sys

import click

from qwen_runner import __version__
from qwen_runner.errors import NotBuiltYetError, QwenRunnerError

log = logging.getLogger("qwen_runner")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _not_built(command: str, issue: int) -> NotBuiltYetError:
    return NotBuiltYetError(
        f"`qwen-runner {command}` is not built yet",
        f"it is tracked as issue {issue}; `qwen-runner info` works today",
    )


def _model_option(func):
    return click.argument("model", metavar="MODEL")(func)


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


@cli.command()
@_model_option
@click.option("--max-context", type=int, default=None, help="Context length to plan the KV/state cache for.")
@click.option("--json", "as_json", is_flag=True)
def plan(model: str, max_context: int | None, as_json: bool) -> None:
    """Will MODEL fit? Per-stage memory peaks and advice (not built yet)."""
    from qwen_runner.checkpoint import resolve_model_dir

    resolve_model_dir(model)
    raise _not_built("plan", 3)


@cli.command("build-cache")
@_model_option
@click.option("--dtype", default="auto", show_default=True)
@click.option("--backend", default="native", show_default=True)
@click.option("--force", is_flag=True)
def build_cache(model: str, dtype: str, backend: str, force: bool) -> None:
    """Convert MODEL once into the mmap-able ready tier (not built yet)."""
    from qwen_runner.checkpoint import resolve_model_dir

    resolve_model_dir(model)
    raise _not_built("build-cache", 6)


@cli.command()
@click.argument("action", type=click.Choice(["ls", "verify", "rm"]))
@click.argument("model", required=False)
def cache(action: str, model: str | None) -> None:
    """List, verify or remove cached tiers (not built yet)."""
    raise _not_built(f"cache {action}", 6)


@cli.command()
@_model_option
@click.option("--prompt", default=None, help="One-shot question instead of the REPL.")
@click.option("--system", default=None, help="System prompt.")
def chat(model: str, prompt: str | None, system: str | None) -> None:
    """Chat with MODEL in a streaming REPL (not built yet)."""
    from qwen_runner.checkpoint import resolve_model_dir

    resolve_model_dir(model)
    raise _not_built("chat", 8)


@cli.command()
@_model_option
@click.option("--prompt", required=True)
@click.option("--max-tokens", type=int, default=128, show_default=True)
def generate(model: str, prompt: str, max_tokens: int) -> None:
    """Raw completion of --prompt, no chat template (not built yet)."""
    from qwen_runner.checkpoint import resolve_model_dir

    resolve_model_dir(model)
    raise _not_built("generate", 8)


@cli.command()
@_model_option
@click.option("--json", "as_json", is_flag=True)
def bench(model: str, as_json: bool) -> None:
    """Measure prefill/decode speed, load time and peak memory (not built yet)."""
    from qwen_runner.checkpoint import resolve_model_dir

    resolve_model_dir(model)
    raise _not_built("bench", 9)


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
