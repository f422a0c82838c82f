"""`qwen-runner bench`: the JSON report's schema and sanity (never a speed threshold), and bad runs."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys

import pytest

from qwen_runner.bench import SCHEMA, check_report
from tests.conftest import REPO, default_sigint, model_path

QUICK = ["--repeat", "1", "--prompt-tokens", "8", "--gen-tokens", "4", "--threads", "1"]


def bench_json(name: str, *extra: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "qwen_runner", "bench", str(model_path(name)), "--json", *QUICK,
                             *extra], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def report():
    return bench_json("tiny-qwen3-moe", "--dtype", "bf16", "--compare", "transformers", "--compare", "transformers-fp32",
                      "--baseline", str(model_path("tiny-qwen2-moe")))


def test_report_schema_and_sanity(report):
    assert check_report(report) == []
    assert report["schema"] == SCHEMA and report["complete"] is True
    assert report["config"]["threads"] == [1] and report["config"]["dtype"] in ("bf16", "fp32", "fp16")
    env = report["environment"]
    assert env["omp_wait_policy"] and env["versions"]["torch"] and "amx_bf16" in env["isa"]
    assert len(env["load_average_start"]) == 3
    assert env["prefill_gemm"] in ("fp32 sgemm on widened bf16 weights", "oneDNN bf16 GEMM")
    assert env["precision"]["chosen"] == "bf16" and env["precision"]["final"] == "bf16"
    assert report["bandwidth_gbps"]["1"]["median"] > 0


def test_every_configuration_is_measured(report):
    dtype = report["config"]["dtype"]
    rows = {(r["model"], r["impl"], r["source"], r["dtype"]): r for r in report["results"]}
    assert set(rows) == {
        ("main", "qwen-runner", "ready", dtype), ("main", "qwen-runner", "raw", dtype), ("main", "build", "build", dtype),
        ("main", "transformers", "checkpoint", dtype), ("main", "transformers", "checkpoint", "fp32"),
        ("baseline", "qwen-runner", "ready", dtype), ("baseline", "transformers", "checkpoint", dtype),
        ("baseline", "transformers", "checkpoint", "fp32"),
    }
    assert report["baseline"].endswith("tiny-qwen2-moe")
    ours = rows[("main", "qwen-runner", "ready", dtype)]
    # consistency: the first token comes after loading, prefill is part of TTFT
    assert ours["start_to_first_token_s"]["median"] > ours["load_s"]["median"]
    assert ours["gbps"]["median"] > 0 and 0 < ours["bandwidth_fraction"] < 1.5
    assert ours["peak_rss_bytes"]["median"] > 100 << 20
    metrics = {(r["metric"], r["what"]) for r in report["ratios"]}
    for other in ("transformers", "transformers fp32", "qwen-runner baseline", "transformers baseline",
                  "transformers baseline fp32"):
        assert ("decode_tps", f"qwen-runner / {other}") in metrics
    assert ("start_to_first_token_s", "raw / ready") in metrics


def test_build_row_measures_a_full_build(report):
    """The build row is a fresh build-cache from an empty cache: its time and peak RSS, nothing generated."""
    build = next(r for r in report["results"] if r["source"] == "build")
    assert build["build_s"]["median"] > 0 and build["peak_rss_bytes"]["median"] > 100 << 20
    assert build["decode_tps"] is None and build["gbps"] is None


def test_fp32_row_reads_twice_the_bytes(report):
    """GB/s of a transformers fp32 row counts fp32 weights: bytes/token twice our bf16 ones."""
    rows = {(r["model"], r["impl"], r["dtype"]): r for r in report["results"] if r["source"] != "build"}
    fp32 = rows[("main", "transformers", "fp32")]
    assert fp32["gbps"]["median"] == pytest.approx(
        fp32["decode_tps"]["median"] * 2 * report["active_bytes_per_token"] / 1e9, rel=1e-6)


def test_bad_baseline_is_one_line(cli):
    result = cli("bench", str(model_path("tiny-qwen3-moe")), "--baseline", "/no/such/model", *QUICK)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "/no/such/model" in result.stderr


@pytest.mark.parametrize("name", ["tiny-qwen2-moe", "tiny-qwen3-next"])
def test_other_architectures(name):
    assert check_report(bench_json(name)) == []


def test_check_report_catches_nonsense(report):
    bad = copy.deepcopy(report)
    bad["results"][0]["decode_tps"]["median"] = float("nan")
    assert check_report(bad)
    bad = copy.deepcopy(report)
    bad["results"][0]["decode_tps"]["min"] = bad["results"][0]["decode_tps"]["max"] + 1
    assert check_report(bad)
    bad = copy.deepcopy(report)
    bad["complete"] = False
    assert check_report(bad)
    assert check_report({"schema": SCHEMA})


def test_bad_model_path_is_one_line(cli):
    result = cli("bench", "/no/such/model", "--json")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_planner_refusal(cli):
    result = cli("bench", str(model_path("tiny-qwen3-moe")), "--memory-budget", "1M")
    assert result.returncode == 3 and "refusing" in result.stderr and result.stdout == ""


def test_ctrl_c_writes_no_partial_report(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.Popen([sys.executable, "-m", "qwen_runner", "-v", "bench", str(model_path("tiny-qwen3-moe")),
                             "--output", str(out), *QUICK], cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, preexec_fn=default_sigint)
    for line in proc.stderr:
        if "repeat 1/1" in line:  # a measurement is in flight
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_lm_head_int4_is_in_the_env_block(report):
    """`--lm-head int4` runs MODEL with the RTN int4 head: the env block says so, and bytes/token count it."""
    import torch

    from qwen_runner import settings as S
    from qwen_runner.models import load

    assert "lm_head" not in report["environment"]  # the default head: nothing to say
    head4 = bench_json("tiny-qwen3-moe-int4", "--dtype", "bf16", "--no-build", "--lm-head", "int4")
    assert check_report(head4) == []
    assert head4["environment"]["lm_head"] == {"model": "main", "format": "int4", "method": "rtn-asym-minmax",
                                               "group": S.LM_HEAD_INT4_GROUP}
    assert {r["source"] for r in head4["results"]} == {"ready", "raw"}
    default, _, _ = load(model_path("tiny-qwen3-moe-int4"), torch.bfloat16)
    assert head4["active_bytes_per_token"] < default.decode_weight_bytes()
