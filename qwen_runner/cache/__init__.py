"""The tiered cache: raw -> optimized -> ready, built once, mmapped by every run (docs/cache.md).

- ``store``: where entries live, atomic writes, the lock, checksums.
- ``manifest``: source fingerprint, versions, per-shard checksums, currency checks.
- ``build``: the streaming, resumable builder.
- ``load``: the ready tier as a model (meta device + mmap + assign).
- ``admin`` (this file): `cache ls|verify|rm`.

Importing this package is cheap (no torch): the planner probes it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from qwen_runner.cache import manifest as M
from qwen_runner.cache.build import BuildResult, build_cache, locate, resolve_dtype
from qwen_runner.cache.load import build_hint, find_ready, open_ready, ready_tier_exists
from qwen_runner.cache.store import READY, CachePaths, dir_size, is_locked, iter_entries
from qwen_runner.errors import CacheError


@dataclass
class Entry:
    folder: Path
    manifest: dict | None
    size: int
    locked: bool

    @property
    def state(self) -> str:
        m = self.manifest
        if m is None:
            return "unreadable manifest"
        if self.locked:
            return "building"
        if m.get("complete"):
            return f"{m.get('target')} complete"
        limit = m.get("layers_limit")
        return f"partial (--layers {limit})" if limit is not None else "interrupted"


def list_entries(model_dir: Path | None = None, root: Path | None = None) -> list[Entry]:
    """Every cache entry, or those built from ``model_dir``."""
    out = []
    for folder, manifest in iter_entries(root):
        if model_dir is not None and (manifest or {}).get("source", {}).get("path") != str(model_dir):
            continue
        out.append(Entry(folder, manifest, dir_size(folder), is_locked(folder)))
    return out


def verify(model_dir: Path, root: Path | None = None) -> tuple[list[Entry], list[tuple[Entry, M.Problem]]]:
    """Full check (every checksum) of each entry built from ``model_dir``: (entries, problems)."""
    entries = list_entries(model_dir, root)
    files = M.source_files(model_dir)
    problems = []
    for entry in entries:
        m = entry.manifest
        if m is None:
            problems.append((entry, M.Problem(M.MANIFEST, "unreadable manifest", True)))
            continue
        paths = CachePaths(entry.folder.parent.parent, entry.folder.parent.name, entry.folder.name)
        for problem in M.check(paths, m, files, m["dtype"], m["backend"], full=True, tier=m.get("target", READY),
                               lm_head=M.manifest_lm_head(m)):
            problems.append((entry, problem))
    return entries, problems


def remove(entries: list[Entry]) -> int:
    """Delete entries (refusing one a builder is writing); returns bytes freed."""
    freed = 0
    for entry in entries:
        if is_locked(entry.folder):
            raise CacheError(f"{entry.folder} is being built right now", "wait for build-cache to finish, then retry")
        freed += entry.size
        shutil.rmtree(entry.folder)
        parent = entry.folder.parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
    return freed


__all__ = ["BuildResult", "Entry", "build_cache", "build_hint", "find_ready", "list_entries", "locate",
           "open_ready", "ready_tier_exists", "remove", "resolve_dtype", "verify"]
