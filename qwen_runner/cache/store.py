"""The cache on disk: where it lives, atomic shard and manifest writes, the lock, checksums, verification.

A crash at any instant must leave either the old state or the new one, never a half-written file that
is later believed. Every file is therefore written to a temp file in the same folder, flushed, fsynced,
renamed over its final name, and the folder fsynced (the rename itself is only durable then). The
manifest is the one source of truth: a shard counts only when the manifest lists it with this size and
checksum, so a shard renamed into place just before a crash (manifest not yet updated) is rebuilt.

Layout (docs/cache.md)::

    <cache>/<model-name>-<fingerprint>/<dtype>-<backend>/
        manifest.json  .lock  raw/  optimized/  ready/<unit>.pt
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qwen_runner import settings as S
from qwen_runner.errors import CacheError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = ".lock"
TMP_MARK = ".tmp-"
SHARD_SUFFIX = ".pt"
RAW, OPTIMIZED, READY = "raw", "optimized", "ready"
TIERS = (RAW, OPTIMIZED, READY)
HASH_NAME = "sha256"
# Where the crash test hook can fire (ENV_CACHE_CRASH_AT), in the order a shard write passes them.
MID_TEMP, AFTER_TEMP, AFTER_RENAME, MID_MANIFEST, AFTER_MANIFEST = (
    "mid-temp", "after-temp", "after-rename", "mid-manifest", "after-manifest",
)
CRASH_POINTS = (MID_TEMP, AFTER_TEMP, AFTER_RENAME, MID_MANIFEST, AFTER_MANIFEST)
# The mid-temp crash point fires at this write() call into a shard's temp file (torch.save issues dozens),
# and a manifest is written in this many pieces so the mid-manifest point can fall between them.
_MID_WRITE_CALL = 2
_MANIFEST_PIECES = 2


# ------------------------------------------------------------------------------------ crash hook


class _CrashHook:
    """SIGKILL this process at the N-th pass through one named point (tests only; off unless the env var is set)."""

    def __init__(self, spec: str | None):
        self.point, self.remaining = None, 0
        if spec:
            point, _, count = spec.partition(":")
            if point not in CRASH_POINTS:
                raise CacheError(f"{S.ENV_CACHE_CRASH_AT}={spec!r}: unknown crash point", f"one of {', '.join(CRASH_POINTS)}")
            self.point, self.remaining = point, int(count or 1)

    def __call__(self, point: str) -> None:
        if point != self.point:
            return
        self.remaining -= 1
        if self.remaining == 0:
            log.debug("crash hook: SIGKILL at %s", point)
            os.kill(os.getpid(), signal.SIGKILL)


_crash = _CrashHook(os.environ.get(S.ENV_CACHE_CRASH_AT))


def reset_crash_hook(spec: str | None) -> None:
    """Re-read the crash spec (for in-process tests)."""
    global _crash
    _crash = _CrashHook(spec)


# ---------------------------------------------------------------------------------- atomic writes


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) private to the user; an existing folder is tightened to 0700."""
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):  # parents too: Path.mkdir(parents=True) would give them the umask's mode
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=S.CACHE_DIR_MODE)
        os.chmod(folder, S.CACHE_DIR_MODE)
    if path not in missing:
        os.chmod(path, S.CACHE_DIR_MODE)
    return path


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable: the folder entry is only on disk after the folder is fsynced."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """A write-only file wrapper that checksums what passes through (no second read of the shard)."""

    def __init__(self, file):
        self.file = file
        self.digest = hashlib.new(HASH_NAME)
        self.size = 0
        self.writes = 0

    def write(self, data) -> int:
        self.digest.update(data)
        written = self.file.write(data)
        self.size += memoryview(data).nbytes
        self.writes += 1
        if self.writes == _MID_WRITE_CALL:
            _crash(MID_TEMP)
        return written

    def flush(self) -> None:
        self.file.flush()


def atomic_write(path: Path, produce: Callable[[_HashingWriter], None], *, manifest: bool = False) -> tuple[int, str]:
    """Write ``path`` via temp file + fsync + rename + folder fsync; return (size, checksum).

    The temp file is created exclusively with mode 0600 and removed on any error; its descriptor is
    closed on every path (``os.fdopen`` owns it from the moment it succeeds).
    """
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, S.CACHE_FILE_MODE)
    try:
        try:
            file = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        with file:
            writer = _HashingWriter(file)
            produce(writer)
            file.flush()
            os.fsync(file.fileno())
        if not manifest:
            _crash(AFTER_TEMP)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if not manifest:
        _crash(AFTER_RENAME)
    fsync_dir(path.parent)
    return writer.size, writer.digest.hexdigest()


def save_shard(tensors: dict, path: Path) -> tuple[int, str]:
    """torch.save ``tensors`` atomically; deterministic (same tensors -> same bytes: torch 2.13's zip
    records carry a fixed 1980 timestamp and a content-derived serialization id, checked by the tests)."""
    import torch

    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise ValueError(f"shard tensor {name} is not contiguous")  # its storage would be saved whole
    return atomic_write(path, lambda w: torch.save(tensors, w))


def write_json(path: Path, data: dict) -> None:
    """Atomically write JSON (sorted keys: the same manifest content gives the same bytes)."""
    text = (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()

    def produce(writer: _HashingWriter) -> None:
        half = len(text) // _MANIFEST_PIECES
        writer.file.write(text[:half])
        writer.file.flush()
        _crash(MID_MANIFEST)
        writer.file.write(text[half:])

    atomic_write(path, produce, manifest=True)
    _crash(AFTER_MANIFEST)


def remove_stale_temps(folder: Path) -> int:
    """Delete temp files a killed builder left behind (only called under the lock)."""
    removed = 0
    if folder.is_dir():
        for entry in folder.rglob(f"*{TMP_MARK}*"):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed += 1
    return removed


def file_checksum(path: Path) -> str:
    """Streaming checksum of a file (never the whole file in memory)."""
    digest = hashlib.new(HASH_NAME)
    with open(path, "rb") as f:
        while chunk := f.read(S.CACHE_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- lock


class CacheLock:
    """An exclusive ``flock`` on the variant folder's ``.lock`` file.

    flock is released by the kernel when the holder dies (SIGKILL included), so a crashed build never
    leaves a stale lock. The lock file is never deleted (deleting it would let two holders lock two
    different inodes). ``wait=False`` refuses at once, naming the holder's pid.
    """

    def __init__(self, folder: Path, wait: bool = False):
        self.path = ensure_dir(folder) / LOCK
        self.wait = wait
        self.fd: int | None = None

    def __enter__(self) -> CacheLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, S.CACHE_FILE_MODE)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise CacheError(
                    f"another build-cache (pid {holder}) is building {self.path.parent}",
                    "wait for it to finish, or rerun with --wait to queue behind it",
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def is_locked(folder: Path) -> bool:
    """Whether a builder holds ``folder``'s lock right now (for `cache ls` / `cache rm`)."""
    path = folder / LOCK
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


# ------------------------------------------------------------------------------------------ paths


@dataclass(frozen=True)
class CachePaths:
    """The folders of one cache entry: (source fingerprint, dtype, backend)."""

    root: Path  # the cache dir
    model_key: str  # <model-name>-<fingerprint>
    variant: str  # <dtype>-<backend>

    @property
    def model_dir(self) -> Path:
        return self.root / self.model_key

    @property
    def dir(self) -> Path:
        return self.model_dir / self.variant

    @property
    def manifest(self) -> Path:
        return self.dir / MANIFEST

    def tier(self, tier: str) -> Path:
        return self.dir / tier

    def shard(self, tier: str, unit: str) -> Path:
        return self.dir / tier / f"{unit}{SHARD_SUFFIX}"


def cache_paths(model_name: str, fingerprint: str, dtype: str, backend: str, root: Path | None = None,
                lm_head: str = S.DEFAULT_LM_HEAD) -> CachePaths:
    """An entry's folders; a non-default lm_head format (``--lm-head int4``) is its own variant,
    ``<dtype>-<backend>-head4``, so it never replaces or is mistaken for the default entry."""
    root = S.default_cache_dir() if root is None else Path(root).resolve()
    suffix = S.LM_HEAD_VARIANT_SUFFIX.get(lm_head)
    variant = f"{dtype}-{backend}" + (f"-{suffix}" if suffix else "")
    return CachePaths(root, f"{model_name}-{fingerprint[:S.CACHE_FINGERPRINT_CHARS]}", variant)


def iter_entries(root: Path | None = None) -> Iterator[tuple[Path, dict | None]]:
    """Every variant folder under the cache dir with its manifest (None when unreadable)."""
    root = S.default_cache_dir() if root is None else root
    if not root.is_dir():
        return
    for manifest in sorted(root.glob(f"*/*/{MANIFEST}")):
        try:
            data = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            data = None
        yield manifest.parent, data if isinstance(data, dict) else None


def read_manifest(path: Path) -> dict | None:
    """The manifest, None if absent; a corrupt one is a CacheError naming it and the fix."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise CacheError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise CacheError(f"{path} is not a valid manifest", "remove it with `qwen-runner cache rm` and rebuild")
    return data


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
