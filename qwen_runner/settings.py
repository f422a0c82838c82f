"""All defaults and environment variables in one place.

Every tunable the tool reads from the environment is named here; code elsewhere
asks ``load_settings()`` instead of reading ``os.environ`` itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qwen_runner.errors import QwenRunnerError

# Environment variables the tool honours.
ENV_CACHE = "QWEN_RUNNER_CACHE"
ENV_THREADS = "QWEN_RUNNER_THREADS"
ENV_WAIT_POLICY = "QWEN_RUNNER_OMP_WAIT_POLICY"
ENV_MEMORY_BUDGET = "QWEN_RUNNER_MEMORY_BUDGET"

# OpenMP's own variables, which we set before torch is imported.
OMP_NUM_THREADS = "OMP_NUM_THREADS"
OMP_WAIT_POLICY = "OMP_WAIT_POLICY"
MKL_NUM_THREADS = "MKL_NUM_THREADS"

# PASSIVE: idle OpenMP workers sleep instead of spinning. On a shared 2-core box
# the default (spinning) policy made 2-thread decode-size matmuls ~10x slower,
# see docs/threads.md for the measurement that chose this default.
DEFAULT_WAIT_POLICY = "PASSIVE"
WAIT_POLICIES = ("PASSIVE", "ACTIVE")

APP_NAME = "qwen-runner"


@dataclass(frozen=True)
class Settings:
    cache_dir: Path
    threads: int | None
    wait_policy: str
    memory_budget: str | None


def default_cache_dir(env: dict[str, str] | None = None) -> Path:
    """``$QWEN_RUNNER_CACHE``, else ``$XDG_CACHE_HOME/qwen-runner``, else ``~/.cache/qwen-runner``."""
    env = os.environ if env is None else env
    if env.get(ENV_CACHE):
        return Path(env[ENV_CACHE]).expanduser().resolve()
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / APP_NAME).resolve()


def load_settings(env: dict[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    threads = env.get(ENV_THREADS) or None
    if threads is not None and not (threads.isdigit() and int(threads) > 0):
        raise QwenRunnerError(f"{ENV_THREADS}={threads!r} is not a positive integer", f"unset it or set e.g. {ENV_THREADS}=4")
    wait_policy = env.get(ENV_WAIT_POLICY, DEFAULT_WAIT_POLICY).upper()
    if wait_policy not in WAIT_POLICIES:
        raise QwenRunnerError(f"{ENV_WAIT_POLICY}={wait_policy!r} is not one of {', '.join(WAIT_POLICIES)}")
    return Settings(
        cache_dir=default_cache_dir(env),
        threads=int(threads) if threads else None,
        wait_policy=wait_policy,
        memory_budget=env.get(ENV_MEMORY_BUDGET) or None,
    )
