"""Thread and OpenMP set-up, done once, before torch is imported.

OpenMP reads OMP_NUM_THREADS / OMP_WAIT_POLICY when its runtime starts, which
happens on torch's import; setting them later does nothing. The CLI calls
``configure_threads`` before any command imports torch, and library code that
resets torch's thread count (auto-round-lib does) calls ``reassert_threads``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from qwen_runner import settings as S
from qwen_runner.errors import QwenRunnerError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadConfig:
    threads: int
    threads_source: str  # "--threads", env var name, or "physical cores"
    wait_policy: str
    wait_policy_source: str

    def as_dict(self) -> dict:
        return asdict(self)


_active: ThreadConfig | None = None


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` quota (containers), or None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def default_thread_count() -> int:
    """Physical cores this process may use: decode is bandwidth-bound and SMT siblings only contend."""
    import psutil

    logical = psutil.cpu_count(logical=True) or 1
    physical = psutil.cpu_count(logical=False) or logical
    smt = max(1, logical // physical)
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = logical
    count = max(1, allowed // smt)
    quota = _cgroup_cpu_limit()
    return min(count, quota) if quota else count


def configure_threads(requested: int | None = None, env: dict[str, str] | None = None) -> ThreadConfig:
    """Decide thread count and wait policy and export them for OpenMP/MKL.

    Precedence: ``--threads`` > ``QWEN_RUNNER_THREADS`` > ``OMP_NUM_THREADS`` > physical cores.
    The wait policy: ``OMP_WAIT_POLICY`` if the user set it, else ours (``QWEN_RUNNER_OMP_WAIT_POLICY``,
    default PASSIVE).
    """
    global _active
    env = os.environ if env is None else env
    settings = S.load_settings(env)
    if requested is not None and requested < 1:
        raise QwenRunnerError(f"--threads {requested} must be at least 1")
    if requested is not None:
        threads, source = requested, "--threads"
    elif settings.threads is not None:
        threads, source = settings.threads, S.ENV_THREADS
    elif env.get(S.OMP_NUM_THREADS, "").isdigit() and int(env[S.OMP_NUM_THREADS]) > 0:
        threads, source = int(env[S.OMP_NUM_THREADS]), S.OMP_NUM_THREADS
    else:
        threads, source = default_thread_count(), "physical cores"

    if env.get(S.OMP_WAIT_POLICY):
        policy, policy_source = env[S.OMP_WAIT_POLICY].upper(), S.OMP_WAIT_POLICY
    else:
        policy = settings.wait_policy
        policy_source = S.ENV_WAIT_POLICY if S.ENV_WAIT_POLICY in env else "qwen-runner default"

    env[S.OMP_NUM_THREADS] = str(threads)
    env[S.MKL_NUM_THREADS] = str(threads)
    env[S.OMP_WAIT_POLICY] = policy
    if "torch" in sys.modules:
        log.warning("torch was imported before threads were configured; OMP_WAIT_POLICY may not apply")
        reassert_threads(threads)
    _active = ThreadConfig(threads, source, policy, policy_source)
    log.debug("threads: %s", _active)
    return _active


def active_config() -> ThreadConfig:
    """The configuration in force (configuring defaults if nobody did)."""
    return _active if _active is not None else configure_threads()


def reassert_threads(threads: int | None = None) -> None:
    """Put torch back to our thread count; some kernels libraries reset it after running."""
    import torch

    wanted = threads if threads is not None else active_config().threads
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
