"""The Backend interface: what a backend does between the checkpoint and the decode loop.

A backend turns the raw tier into its optimized tier (layout, packing, dtype), adapts the
optimized tier into what the runtime mmaps (ready), and provides the runtime ops (``prepare``
binds its kernels to a loaded model). ``probe`` runs its kernels once on tiny inputs so a dtype
it cannot run is found before minutes of building, not after.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from qwen_runner.backends import BackendStatus
from qwen_runner.errors import BackendUnavailableError

Units = Iterator[tuple[str, dict]]


class Backend:
    """Base class; ``native`` implements every method, others override what they change."""

    name = ""
    # Whether `build-cache` can write this backend's layout (False: it optimizes at load time).
    has_cache_layout = True

    def status(self) -> BackendStatus:
        raise NotImplementedError

    def require(self) -> None:
        """Raise a one-line error (what is needed, how to get it) when this backend is unusable here."""
        status = self.status()
        if not status.usable:
            raise BackendUnavailableError(f"backend {self.name} is unusable here: {status.detail}", self.install_hint())

    def install_hint(self) -> str:
        return "run `qwen-runner info` to see which backends are usable here"

    def probe(self, dtype: str) -> None:
        """Run this backend's kernels once at ``dtype`` on tiny inputs; raises what they raise."""

    def optimize(self, model_dir: Path, config: dict, dtype: str, units: list[str],
                 lm_head: str = "checkpoint") -> Units:
        """Raw checkpoint -> optimized tier: ``(unit, {param: tensor})`` in build order (``lm_head``:
        settings.LM_HEAD_FORMATS, ``int4`` stores an RTN int4 copy of the head)."""
        raise NotImplementedError

    def ready(self, optimized: Units, dtype: str) -> Units:
        """Optimized tier -> ready tier (what the runtime mmaps)."""
        return optimized

    def prepare(self, model, dtype: str):
        """Runtime ops: bind this backend's kernels to a loaded model; returns the model to run."""
        return model

    def load(self, path: Path, dtype: str):
        """``(model, tokenizer, spec)`` for backends that do not load from our cache (None: use the cache)."""
        return None
