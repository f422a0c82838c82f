"""The memory planner: verdicts and advice, CLI refusals before loading, and estimates vs measured RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qwen_runner import planner as P
from qwen_runner import settings as S
from qwen_runner.checkpoint import inspect_checkpoint

from tests.conftest import REPO, model_path, run_cli

sys.path.insert(0, str(REPO / "scripts"))
import make_giant_skeleton as skeleton  # noqa: E402

GIB = S.GIB
RSS_TOLERANCE = 0.15


@pytest.fixture(scope="module")
def next80b(tmp_path_factory):
    return skeleton.make_skeleton("qwen3-next-80b-a3b-int4", tmp_path_factory.mktemp("skeletons"))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != S.ENV_MEMORY_BUDGET}
    return {**env, **extra}


@pytest.mark.parametrize("text, expected", [("24G", 24 * GIB), ("24GiB", 24 * GIB), ("512m", 512 * S.MIB),
                                            ("1.5T", int(1.5 * 1024 * GIB)), ("4096", 4096)])
def test_parse_size(text, expected):
    assert P.parse_size(text) == expected


def test_parse_size_rejects_nonsense():
    with pytest.raises(Exception, match="not understood"):
        P.parse_size("lots")


def test_demo_fits_a_big_box_and_is_refused_by_a_small_one():
    spec = inspect_checkpoint(model_path("demo"))
    roomy = P.make_plan(spec, P.detect_host("64G"), 4096, "bf16", ready_tier=False)
    assert {s.verdict for s in roomy.stages.values()} == {P.OK}
    small = P.make_plan(spec, P.detect_host("1G"), 4096, "bf16", ready_tier=False)
    run = small.stages[P.RUN]
    assert run.verdict == P.REFUSE and run.peak > GIB
    swap = [a for a in run.advice if "setup/swap.sh add" in a]
    assert swap, run.advice
    gib = int(swap[0].split("swap.sh add ")[1].split("G")[0])
    assert (gib * GIB) >= run.peak - GIB  # the advised swap covers the shortfall


def test_max_context_advice_fits():
    spec = inspect_checkpoint(model_path("demo"))
    host = P.detect_host("3G")
    plan = P.make_plan(spec, host, 1_000_000, "bf16", ready_tier=False)
    advice = [a for a in plan.stages[P.RUN].advice if "--max-context" in a]
    assert advice, plan.stages[P.RUN].advice
    fit = int(advice[0].split("--max-context ")[1].split()[0])
    assert 0 < fit < 1_000_000 and fit % S.CONTEXT_ADVICE_STEP == 0
    assert P.make_plan(spec, host, fit, "bf16", ready_tier=False).stages[P.RUN].verdict == P.OK


def test_80b_on_a_24g_box(next80b):
    spec = inspect_checkpoint(next80b)
    host = P.detect_host("24G")
    plan = P.make_plan(spec, host, 4096, "bf16", ready_tier=False)
    build, run = plan.stages[P.BUILD], plan.stages[P.RUN]
    # Streaming build: one layer in flight, far below the model's size (the old script needed 160 GB).
    assert build.verdict == P.OK and build.peak < 8 * GIB
    assert run.verdict == P.REFUSE and any("build the ready tier first" in a for a in run.advice)
    assert any("tok/s at the disk read speed measured now" in a for a in run.advice)
    ready = P.make_plan(spec, host, 4096, "bf16", ready_tier=True).stages[P.RUN]
    assert ready.verdict == P.TIGHT and "run from mmap" in ready.reason
    # Recurrent state: 36 linear-attention layers x 32 heads x 128 x 128 fp32 (+ conv windows).
    assert run.items["recurrent + conv state"] >= 36 * 32 * 128 * 128 * 4


def test_plan_cli_on_80b_skeleton(next80b):
    # Its speed (the issue asks for < 2 s) is measured by scripts/bench_plan.py, not asserted here:
    # a timed unit test on a shared 2-core box fails whenever a neighbour is busy.
    result = run_cli("plan", str(next80b), "--json", env=_env())
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    model = report["model"]
    assert abs(model["total_bytes"] - model["file_data_bytes"]) <= 1e-3 * model["file_data_bytes"]
    assert model["active_bytes_per_token"] > 0 and set(report["stages"]) == {"build", "run"}


def test_plan_table():
    result = run_cli("plan", str(model_path("tiny-qwen3-moe")), "--memory-budget", "8G", env=_env())
    assert result.returncode == 0, result.stderr
    for word in ("stage", "build", "run", "active", "KV cache (4096 tokens)", "budget override 8.0 GiB"):
        assert word in result.stdout, word


_PROBE = (
    "import sys\n"
    "from qwen_runner.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "finally:\n"
    "    print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\n"
)


@pytest.mark.parametrize("command, via_env", [("chat", False), ("build-cache", True), ("bench", False)])
def test_heavy_commands_refuse_before_loading(command, via_env):
    args = [command, str(model_path("demo"))]
    # The demo's streaming build needs ~0.2 GiB (measured, tests/test_build_memory.py); running it ~2 GiB.
    budget = "128M" if command == "build-cache" else "1G"
    env = _env(**{S.ENV_MEMORY_BUDGET: budget}) if via_env else _env()
    if not via_env:
        args += ["--memory-budget", budget]
    result = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=120)
    assert result.returncode == 3, result.stderr
    error, probe = result.stderr.strip().splitlines()
    assert error.startswith("error: refusing to ") and "setup/swap.sh add" in error and "--force" in error
    assert probe == "torch imported: False"  # nothing was loaded


def test_force_skips_the_refusal():
    result = run_cli("build-cache", str(model_path("tiny-qwen3-moe")), "--memory-budget", "1M", "--force", env=_env())
    assert result.returncode != 3 and "refusing" not in result.stderr


def test_bad_budget_is_a_clean_error():
    result = run_cli("plan", str(model_path("tiny-qwen3-moe")), env=_env(**{S.ENV_MEMORY_BUDGET: "plenty"}))
    assert result.returncode == 1 and "not understood" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-qwen3-next", "demo"])
def test_run_estimate_matches_measured_peak_rss(name):
    """Peak RSS of a process that loads the model with our code and decodes, vs the planner's run estimate."""
    max_context, dtype = 4096, "bf16"
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "helpers" / "measure_run_rss.py"), str(model_path(name)), str(max_context), dtype],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=_env(),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    spec = inspect_checkpoint(model_path(name))
    plan = P.make_plan(spec, P.detect_host("64G"), max_context, dtype, ready_tier=False)
    run = plan.stages[P.RUN]
    # The cache the model allocates is exactly what the planner itemizes (KV + Qwen3-Next state).
    assert run.items[f"KV cache ({max_context} tokens)"] + run.items["recurrent + conv state"] == measured["cache_nbytes"]
    error = (run.peak - measured["peak_rss"]) / measured["peak_rss"]
    assert abs(error) <= RSS_TOLERANCE, f"estimate {run.peak} vs measured {measured['peak_rss']}: {error:+.1%}"
