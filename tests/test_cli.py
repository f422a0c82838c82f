"""The CLI contract: subcommands listed, bad input is one line + hint + non-zero exit."""

from __future__ import annotations

import json
import os

import pytest

from qwen_runner.cli import main

SUBCOMMANDS = ("info", "plan", "build-cache", "cache", "chat", "generate", "bench")


def test_help_lists_every_subcommand(cli):
    result = cli("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert f"  {name} " in result.stdout, name


def test_missing_model_is_one_line_with_hint(cli):
    result = cli("chat", "/no/such/path")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "/no/such/path" in lines[0] and "hint:" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_directory_without_config_is_refused(cli, tmp_path):
    result = cli("chat", str(tmp_path))
    assert result.returncode != 0
    assert "config.json" in result.stderr and "Traceback" not in result.stderr


def test_debug_shows_the_traceback(cli):
    result = cli("--debug", "chat", "/no/such/path")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ModelNotFoundError" in result.stderr


def test_bad_thread_count_is_a_clean_error(cli):
    result = cli("--threads", "0", "info")
    assert result.returncode == 1
    assert result.stderr.startswith("error: --threads 0") and "Traceback" not in result.stderr


def test_bad_env_setting_is_a_clean_error(cli):
    result = cli("info", env={**os.environ, "QWEN_RUNNER_THREADS": "many"})
    assert result.returncode == 1
    assert "QWEN_RUNNER_THREADS" in result.stderr and "Traceback" not in result.stderr


def test_unknown_option_is_a_usage_error(cli):
    result = cli("info", "--bogus")
    assert result.returncode == 2 and "No such option" in result.stderr


def test_info_json_has_every_field(cli):
    result = cli("--threads", "1", "info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert set(info) >= {"cpu", "numa", "memory", "torch", "openmp", "backends", "compute", "cache_dir"}
    cpu = info["cpu"]
    assert set(cpu["isa"]) >= {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                               "amx_int8", "amx_fp16"}
    assert cpu["physical_cores"] >= 1 and cpu["logical_cores"] >= cpu["physical_cores"]
    assert info["numa"] and all(node["cpus"] for node in info["numa"])
    memory = info["memory"]
    assert memory["total"] >= memory["available"] > 0 and "swap_total" in memory and "cgroup_limit" in memory
    # threads were set before torch loaded OpenMP, and the wait policy was chosen deliberately
    assert info["torch"]["threads"] == 1 and info["openmp"]["OMP_NUM_THREADS"] == "1"
    assert info["openmp"]["OMP_WAIT_POLICY"] in ("PASSIVE", "ACTIVE")
    assert {b["name"] for b in info["backends"]} == {"native", "ipex", "auto-round-lib"}
    assert all({"installed", "usable", "version", "detail"} <= set(b) for b in info["backends"])
    compute = info["compute"]
    assert compute["dtype"] in ("fp16", "bf16", "fp32") and compute["reason"]
    assert compute["fallback_chain"][0] == compute["dtype"] and compute["fallback_chain"][-1] == "fp32"
    assert compute["int4_kernel"]["available"] in (True, False)


def test_info_text_names_the_choices(cli):
    result = cli("info")
    assert result.returncode == 0, result.stderr
    for word in ("CPU", "ISA", "NUMA", "OMP_WAIT_POLICY", "backend", "dtype", "kernels"):
        assert word in result.stdout


def test_main_in_process_exits_with_the_error_code(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "/no/such/path"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("error: model not found")


LM_HEAD_COMMANDS = {"build-cache": [], "chat": ["--prompt", "hi"], "generate": ["--prompt", "hi"], "bench": []}


@pytest.mark.parametrize("command", sorted(LM_HEAD_COMMANDS))
def test_lm_head_option_is_offered_and_bad_values_are_one_line(cli, command):
    from tests.conftest import model_path

    assert "--lm-head [checkpoint|int4]" in cli(command, "--help").stdout
    result = cli(command, str(model_path("tiny-qwen3-moe")), "--lm-head", "int3", *LM_HEAD_COMMANDS[command])
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: --lm-head int3: not one of checkpoint, int4")
    assert "Traceback" not in result.stderr


def test_lm_head_int4_builds_its_own_entry_and_generates(cli, tmp_path):
    from tests.conftest import model_path

    env = {**os.environ, "QWEN_RUNNER_CACHE": str(tmp_path / "cache")}
    model = str(model_path("tiny-qwen3-moe"))
    built = cli("build-cache", model, "--dtype", "bf16", "--lm-head", "int4", env=env)
    assert built.returncode == 0, built.stderr
    assert "bf16-native-head4" in built.stdout
    run = cli("-v", "generate", model, "--dtype", "bf16", "--lm-head", "int4", "--prompt", "hi", "--max-tokens", "3",
              env=env)
    assert run.returncode == 0, run.stderr
    assert "(ready tier)" in run.stderr  # the head4 entry was used, not the checkpoint
    listed = cli("cache", "ls", model, env=env)
    assert "/bf16-native-head4 " in listed.stdout and "/bf16-native " not in listed.stdout  # the default: not built
