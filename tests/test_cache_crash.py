"""Crash safety: SIGKILL the builder, then nothing partial is ever accepted and a rerun is byte-identical.

The builder runs as `qwen-runner build-cache` in a subprocess and kills itself at a named point
(``QWEN_RUNNER_CACHE_CRASH_AT=POINT:N``, see qwen_runner/cache/store.py) or is killed from outside at a
random moment. Afterwards: every shard the manifest lists verifies; the cache is not reported ready
unless it is complete; a rerun finishes, leaves no temp file, and its ready tier equals a clean build's.
The default suite covers 3 points; the slow suite (`make test-slow`, CI) covers 20+.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen_runner import settings as S
from qwen_runner.cache import build_cache, find_ready
from qwen_runner.cache import manifest as M
from qwen_runner.cache.store import READY, read_manifest
from tests.conftest import REPO, model_path

TINY = "tiny-qwen3-moe"
DTYPE = "bf16"
UNITS = 6  # embed, 4 layers, head: every crash point below is passed at least this often

DEFAULT_POINTS = ["mid-temp:2", "after-rename:3", "mid-manifest:4"]
SLOW_POINTS = [f"{point}:{n}" for point in ("mid-temp", "after-temp", "after-rename", "mid-manifest", "after-manifest")
               for n in (1, 3, 6)] + ["after-manifest:7", "mid-manifest:7"]  # 7th manifest write: the final one
RANDOM_KILLS = 5
# External kills land between process start and this many seconds (a build takes ~2-3 s here).
RANDOM_KILL_WINDOW = (0.5, 4.0)


@pytest.fixture(scope="module")
def clean_build(tmp_path_factory) -> dict[str, bytes]:
    """The reference: an uninterrupted build's ready shards."""
    result = build_cache(model_path(TINY), DTYPE, root=tmp_path_factory.mktemp("clean"), progress=False)
    return {p.name: p.read_bytes() for p in sorted(result.paths.tier(READY).iterdir())}


def _builder(root: Path, crash_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ, S.ENV_CACHE: str(root)}
    if crash_at:
        env[S.ENV_CACHE_CRASH_AT] = crash_at
    return subprocess.Popen([sys.executable, "-m", "qwen_runner", "build-cache", str(model_path(TINY)), "--dtype", DTYPE],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _check_after_crash_then_rerun(root: Path, clean: dict[str, bytes]) -> None:
    path = model_path(TINY).resolve()
    paths, manifest, problems = find_ready(path, DTYPE)
    on_disk = read_manifest(paths.manifest)
    if on_disk is not None:  # the manifest is always whole JSON (old or new), never half-written
        for rel, entry in on_disk["shards"].items():  # everything it lists is complete and verified
            assert M.check_shard(paths.dir / rel, rel, entry, full=True) is None, rel
        if not on_disk["complete"]:
            assert problems, "an incomplete build must not be reported ready"
    result = build_cache(path, DTYPE, root=root, progress=False)
    assert result.complete
    assert {p.name: p.read_bytes() for p in sorted(paths.tier(READY).iterdir())} == clean
    assert not list(paths.dir.rglob("*.tmp-*"))
    assert not find_ready(path, DTYPE, root=root)[2]


def _crash_at(point: str, tmp_path: Path, clean, monkeypatch) -> None:
    root = tmp_path / "cache"
    monkeypatch.setenv(S.ENV_CACHE, str(root))
    proc = _builder(root, point)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    _check_after_crash_then_rerun(root, clean)


@pytest.mark.parametrize("point", DEFAULT_POINTS)
def test_crash_at_named_point(point, tmp_path, clean_build, monkeypatch):
    _crash_at(point, tmp_path, clean_build, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("point", SLOW_POINTS)
def test_crash_at_named_point_slow(point, tmp_path, clean_build, monkeypatch):
    _crash_at(point, tmp_path, clean_build, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(RANDOM_KILLS))
def test_killed_from_outside_at_a_random_moment(seed, tmp_path, clean_build, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(S.ENV_CACHE, str(root))
    proc = _builder(root)
    time.sleep(random.Random(seed).uniform(*RANDOM_KILL_WINDOW))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    _check_after_crash_then_rerun(root, clean_build)


def test_crash_twice_then_finish(tmp_path, clean_build, monkeypatch):
    """Two crashes in a row (the second during the resumed build) still converge."""
    root = tmp_path / "cache"
    monkeypatch.setenv(S.ENV_CACHE, str(root))
    for point in ("after-temp:2", "mid-temp:2"):
        proc = _builder(root, point)
        proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL
    _check_after_crash_then_rerun(root, clean_build)
