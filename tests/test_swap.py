"""setup/swap.sh: the exact dry-run steps, and each refusal (nothing here changes the host's swap)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "setup" / "swap.sh"


def swap(*args: str, user: int | None = None) -> subprocess.CompletedProcess:
    cmd = ["bash", str(SCRIPT), *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def test_dry_run_add_prints_the_exact_steps():
    result = swap("--dry-run", "add", "8G")
    assert result.returncode == 0, result.stderr
    steps = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert steps == [
        "+ fallocate -l 8589934592 -- /swapfile-qwen-runner",
        "+ chmod 600 -- /swapfile-qwen-runner",
        "+ mkswap -- /swapfile-qwen-runner",
        "+ swapon -- /swapfile-qwen-runner",
    ]
    assert not os.path.exists("/swapfile-qwen-runner")


def test_dry_run_quotes_odd_paths(tmp_path):
    target = tmp_path / "my swap; rm -rf x"
    result = swap("--dry-run", "--path", str(target), "add", "1G")
    assert result.returncode == 0, result.stderr
    assert "+ mkswap -- " + str(target).replace(" ", "\\ ").replace(";", "\\;") in result.stdout
    assert not target.exists()


@pytest.mark.parametrize("size", ["8X", "-1G", "G", "0"])
def test_refuses_bad_sizes(size):
    result = swap("--dry-run", "add", size)
    assert result.returncode == 2 and "error:" in result.stderr


def test_never_overwrites_an_existing_file(tmp_path):
    existing = tmp_path / "swapfile"
    existing.write_text("precious")
    result = swap("--dry-run", "--path", str(existing), "add", "1G")
    assert result.returncode == 1 and "refusing to overwrite" in result.stderr
    assert existing.read_text() == "precious"


def test_refuses_without_enough_free_disk(tmp_path):
    result = swap("--dry-run", "--path", str(tmp_path / "swapfile"), "add", "100000T")
    assert result.returncode == 1 and "not enough free disk" in result.stderr


def test_refuses_to_remove_a_file_that_is_not_active_swap(tmp_path):
    existing = tmp_path / "notswap"
    existing.write_text("data")
    result = swap("--dry-run", "--path", str(existing), "remove")
    assert result.returncode == 1 and "not an active swap file" in result.stderr and existing.exists()


def test_unknown_option_and_missing_action():
    assert swap("--frobnicate").returncode == 2
    assert swap().returncode == 2


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to drop to nobody")
def test_refuses_non_root():
    result = swap("add", "1G", user=65534)
    assert result.returncode == 1 and "must run as root" in result.stderr


def test_status_runs_without_root():
    assert swap("status").returncode == 0
