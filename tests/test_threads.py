"""Threads and OpenMP policy: precedence, and that they reach torch (set before import)."""

from __future__ import annotations

import json
import os

import pytest

from qwen_runner import threads
from qwen_runner.errors import QwenRunnerError


def test_flag_beats_env_beats_omp():
    env = {"QWEN_RUNNER_THREADS": "3", "OMP_NUM_THREADS": "5"}
    assert threads.configure_threads(2, env).threads_source == "--threads"
    env = {"QWEN_RUNNER_THREADS": "3", "OMP_NUM_THREADS": "5"}
    config = threads.configure_threads(None, env)
    assert (config.threads, config.threads_source) == (3, "QWEN_RUNNER_THREADS")
    assert env["OMP_NUM_THREADS"] == "3" and env["MKL_NUM_THREADS"] == "3"
    config = threads.configure_threads(None, {"OMP_NUM_THREADS": "5"})
    assert (config.threads, config.threads_source) == (5, "OMP_NUM_THREADS")


def test_default_is_physical_cores():
    config = threads.configure_threads(None, {})
    assert config.threads == threads.default_thread_count() >= 1
    assert config.threads_source == "physical cores"


def test_wait_policy_default_and_overrides():
    env: dict[str, str] = {}
    config = threads.configure_threads(1, env)
    assert (config.wait_policy, config.wait_policy_source) == ("PASSIVE", "qwen-runner default")
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    config = threads.configure_threads(1, {"OMP_WAIT_POLICY": "active"})
    assert (config.wait_policy, config.wait_policy_source) == ("ACTIVE", "OMP_WAIT_POLICY")
    config = threads.configure_threads(1, {"QWEN_RUNNER_OMP_WAIT_POLICY": "active"})
    assert (config.wait_policy, config.wait_policy_source) == ("ACTIVE", "QWEN_RUNNER_OMP_WAIT_POLICY")


def test_bad_values_are_refused():
    with pytest.raises(QwenRunnerError):
        threads.configure_threads(0, {})
    with pytest.raises(QwenRunnerError):
        threads.configure_threads(None, {"QWEN_RUNNER_OMP_WAIT_POLICY": "sometimes"})


def test_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert threads._cgroup_cpu_limit(tmp_path) == 3
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads._cgroup_cpu_limit(tmp_path) is None


def test_threads_reach_torch_in_a_fresh_process(cli):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    info = json.loads(cli("--threads", "1", "info", "--json", env=env).stdout)
    assert info["torch"]["threads"] == 1
    assert info["openmp"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert info["openmp"]["wait_policy_source"] == "qwen-runner default"
