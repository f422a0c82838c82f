"""Settings from the environment, and backend probing without importing IPEX."""

from __future__ import annotations

from pathlib import Path

from qwen_runner import backends
from qwen_runner.settings import default_cache_dir


def test_cache_dir_precedence(tmp_path):
    assert default_cache_dir({"QWEN_RUNNER_CACHE": str(tmp_path / "c")}) == tmp_path / "c"
    assert default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "qwen-runner"
    assert default_cache_dir({}) == (Path.home() / ".cache" / "qwen-runner").resolve()


def test_ipex_absent(monkeypatch):
    monkeypatch.setattr(backends, "_dist_version", lambda name: None)
    status = backends.ipex_status("2.13.0")
    assert not status.installed and not status.usable


def test_ipex_with_mismatched_torch_is_unusable_and_says_why(monkeypatch):
    monkeypatch.setattr(backends, "_dist_version", lambda name: "2.8.0+cpu")
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: object())
    status = backends.ipex_status("2.13.0+cpu")
    assert status.installed and not status.usable
    assert "torch 2.8" in status.detail and "2.13.0" in status.detail


def test_ipex_with_matching_torch_is_usable(monkeypatch):
    monkeypatch.setattr(backends, "_dist_version", lambda name: "2.8.0")
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: object())
    assert backends.ipex_status("2.8.0+cpu").usable
