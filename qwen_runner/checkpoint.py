"""Resolving and inspecting a checkpoint without loading its weights."""

from __future__ import annotations

from pathlib import Path

from qwen_runner.errors import ModelNotFoundError

CONFIG_FILE = "config.json"


def resolve_model_dir(model: str) -> Path:
    """A user's MODEL argument -> the checkpoint directory, resolved and checked."""
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model not found: {model} (no such file or directory)")
    path = path.resolve()
    if not path.is_dir():
        raise ModelNotFoundError(f"model path is not a directory: {path}")
    if not (path / CONFIG_FILE).is_file():
        raise ModelNotFoundError(f"no {CONFIG_FILE} in {path}: not a Hugging Face checkpoint directory")
    return path
