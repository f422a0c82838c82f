"""The error hierarchy: every failure a user can cause carries a hint.

The CLI prints ``error: <message>`` and ``hint: <hint>`` and exits with
``exit_code``; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations


class QwenRunnerError(Exception):
    """Base class for expected, user-facing failures."""

    exit_code = 1
    default_hint = ""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return self.message


class ModelNotFoundError(QwenRunnerError):
    default_hint = "pass a checkpoint directory containing config.json (e.g. models/demo after `make models`)"


class CheckpointError(QwenRunnerError):
    """The checkpoint exists but is malformed or inconsistent."""

    default_hint = "re-download or re-export the checkpoint; `qwen-runner plan MODEL` checks it without loading"


class UnsupportedModelError(QwenRunnerError):
    default_hint = "supported: Qwen3-Next, Qwen3-MoE and Qwen2-MoE checkpoints (see README)"


class InsufficientMemoryError(QwenRunnerError):
    exit_code = 3
    default_hint = "see `qwen-runner plan MODEL` for advice, or pass --force to try anyway"


class CacheError(QwenRunnerError):
    default_hint = "rebuild it with `qwen-runner build-cache MODEL`"


class BackendUnavailableError(QwenRunnerError):
    default_hint = "run `qwen-runner info` to see which backends are usable here"


class KernelError(QwenRunnerError):
    """Every dtype of the chain (down to fp32) raised in a kernel: nothing left to fall back to."""

    default_hint = "rerun with --debug for the traceback and report it with the output of `qwen-runner info`"


class ContextOverflowError(QwenRunnerError):
    default_hint = "shorten the prompt or raise --max-context"
