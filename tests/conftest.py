"""Shared fixtures: where the built models live, and running the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("QWEN_RUNNER_MODELS", REPO / "models"))


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`qwen-runner ARGS` in a fresh process, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "qwen_runner", *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
    )


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Every test (and every CLI it spawns) uses a throwaway cache, never the user's real one."""
    path = tmp_path_factory.mktemp("qwen-runner-cache")
    previous = os.environ.get("QWEN_RUNNER_CACHE")
    os.environ["QWEN_RUNNER_CACHE"] = str(path)
    # The C++ kernels compile once per checkout (~1-2 min), not once per test session.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".pytest_cache" / "torch_extensions"))
    yield path
    if previous is None:
        os.environ.pop("QWEN_RUNNER_CACHE", None)
    else:
        os.environ["QWEN_RUNNER_CACHE"] = previous


def default_sigint() -> None:
    """``preexec_fn`` for children that must see Ctrl-C: a job started in the background (nohup, ``&``,
    some CI runners) inherits SIGINT ignored, and Python then keeps ignoring it; restore the default so
    the child behaves as in a user's terminal."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def normal_floats():
    """``runtime.open_model`` flushes denormals for the whole process (a CLI run's choice); tests that
    call it in-process must not leave it set for the next test (hypothesis refuses to run under it)."""
    yield
    if "torch" in sys.modules:
        sys.modules["torch"].set_flush_denormal(False)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def models_dir() -> Path:
    if not MODELS.is_dir():
        pytest.fail(f"{MODELS} missing: run `make models` (make test builds them first)")
    return MODELS


def model_path(name: str) -> Path:
    path = MODELS / name
    if not (path / "config.json").is_file():
        pytest.fail(f"{path} missing: run `make models` (make test builds them first)")
    return path
