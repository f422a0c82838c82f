"""What a cache entry claims to be, and whether it still is.

The manifest records the cache format version, the source fingerprint (file names, sizes and
header hashes of the checkpoint), the tool/torch/transformers/backend versions, CPU features, dtype,
and per shard its size and checksum. ``check`` compares all of it with the present and returns
``Problem``s, each naming the file at fault and the fix, so the CLI can print one line per problem and
the builder can rebuild exactly the stale shards.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from qwen_runner import __version__
from qwen_runner import settings as S
from qwen_runner.cache.store import HASH_NAME, MANIFEST, READY, CachePaths, file_checksum

SAFETENSORS_HEADER_LEN = 8
# Besides the weights, these checkpoint files decide what the cache holds.
SOURCE_EXTRA_FILES = ("config.json", "model.safetensors.index.json")
# Fields that must match for the cache to be current; a change in any of them makes every shard stale.
LAYOUT_FIELDS = ("format_version", "dtype", "backend", "versions", "lm_head")


@dataclass(frozen=True)
class Problem:
    """One reason a cache entry is not (fully) usable."""

    file: str  # relative to the variant folder: "manifest.json", "ready/layer-007.pt", or a source file
    message: str
    stale_all: bool = False  # True: every shard must be rebuilt, not just ``file``

    def line(self) -> str:
        return f"{self.file}: {self.message}"


# ------------------------------------------------------------------------------------- fingerprint


def _header_digest(path: Path) -> str:
    """Hash of a safetensors file's header (names, dtypes, shapes, offsets); reads no tensor data."""
    digest = hashlib.new(HASH_NAME)
    with open(path, "rb") as f:
        head = f.read(SAFETENSORS_HEADER_LEN)
        digest.update(head)
        if len(head) == SAFETENSORS_HEADER_LEN:
            (length,) = struct.unpack("<Q", head)
            digest.update(f.read(min(length, os_size(path))))
    return digest.hexdigest()


def os_size(path: Path) -> int:
    return path.stat().st_size


_SOURCE_MEMO: dict[tuple, list[dict]] = {}


def source_files(model_dir: Path) -> list[dict]:
    """Per checkpoint file: name, size and a hash (header only for weights; whole file for small JSON).

    Memoized per process on every file's (name, size, mtime, inode): the planner and the loader both ask
    on one start, and hashing the 80B checkpoint's headers takes ~0.2 s.
    """
    extra = [model_dir / name for name in SOURCE_EXTRA_FILES if (model_dir / name).is_file()]
    paths = sorted(model_dir.glob("*.safetensors")) + extra
    key = (str(model_dir), *((p.name, st.st_size, st.st_mtime_ns, st.st_ino) for p in paths for st in [p.stat()]))
    hit = _SOURCE_MEMO.get(key)
    if hit is None:
        hit = _SOURCE_MEMO[key] = _source_files(model_dir)
    return [dict(f) for f in hit]


def _source_files(model_dir: Path) -> list[dict]:
    files = []
    for path in sorted(model_dir.glob("*.safetensors")):
        files.append({"name": path.name, "size": os_size(path), "header_" + HASH_NAME: _header_digest(path)})
    for name in SOURCE_EXTRA_FILES:
        path = model_dir / name
        if path.is_file():
            files.append({"name": name, "size": os_size(path), "header_" + HASH_NAME: file_checksum(path)})
    return files


def fingerprint(files: list[dict]) -> str:
    return hashlib.new(HASH_NAME, json.dumps(files, sort_keys=True).encode()).hexdigest()


def source_changes(old: list[dict], new: list[dict]) -> str | None:
    """A short description of how the checkpoint changed (None if it did not)."""
    before = {f["name"]: f for f in old}
    after = {f["name"]: f for f in new}
    for name in sorted(before.keys() | after.keys()):
        a, b = before.get(name), after.get(name)
        if a is None:
            return f"{name} was added"
        if b is None:
            return f"{name} was removed"
        if a["size"] != b["size"]:
            return f"{name} changed size ({a['size']} -> {b['size']} bytes)"
        if a != b:
            return f"{name} changed (its header differs)"
    return None


# -------------------------------------------------------------------------------------------- spec

# The ModelSpec figures the runtime and the planner use, stored so a start from the ready tier does not
# re-read every safetensors header (1.9 s on the 80B checkpoint). Valid exactly as long as the source
# fingerprint (sizes + header hashes + config.json) matches, which every use checks first.
SPEC_FIELDS = ("bytes_per_layer", "bytes_by_role", "active_by_role", "bytes_by_dtype", "largest_tensor_bytes")


def spec_record(spec) -> dict:
    """A ModelSpec as JSON, without its per-tensor table (222k entries on the 80B)."""
    from dataclasses import asdict

    record = {name: getattr(spec, name) for name in SPEC_FIELDS}
    record.update(config=asdict(spec.config), quant=asdict(spec.quant) if spec.quant else None,
                  shards=[asdict(s) for s in spec.shards], tensor_count=len(spec.tensors))
    return record


def spec_from_record(record: dict, model_dir: Path):
    """The ModelSpec stored by ``spec_record`` (``tensors`` empty); None if the record is unusable."""
    from qwen_runner import quant as Q
    from qwen_runner.checkpoint import ArchConfig, ModelSpec, ShardInfo

    try:
        config = ArchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["config"].items()})
        quant = Q.QuantConfig(**record["quant"]) if record.get("quant") else None
        return ModelSpec(model_dir, config, quant, {}, [ShardInfo(**s) for s in record["shards"]],
                         tensor_count=record["tensor_count"], **{name: record[name] for name in SPEC_FIELDS})
    except (KeyError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------- versions


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def current_versions(backend: str) -> dict:
    """Versions that decide the bytes of a shard. Read from package metadata (importing transformers
    would cost seconds). The native backend is stock torch, so its version is torch's."""
    torch_version = _dist_version("torch")
    backend_version = torch_version if backend == "native" else _dist_version(backend)
    return {"qwen_runner": __version__, "torch": torch_version, "transformers": _dist_version("transformers"),
            "backend": backend_version}


def cpu_features() -> list[str]:
    from qwen_runner.hardware import detect_cpu

    return sorted(flag for flag, present in detect_cpu().isa.items() if present)


def head_record(lm_head: str = S.DEFAULT_LM_HEAD) -> dict:
    """The manifest's ``lm_head``: how the head was stored (a manifest without it: ``checkpoint``)."""
    if lm_head == S.LM_HEAD_INT4:
        return {"format": lm_head, "method": "rtn-asym-minmax", "group": S.LM_HEAD_INT4_GROUP}
    return {"format": lm_head}


def manifest_lm_head(manifest: dict) -> str:
    """The ``--lm-head`` format an entry was built with (entries from before the field: ``checkpoint``)."""
    return (manifest.get("lm_head") or {}).get("format", S.LM_HEAD_CHECKPOINT)


def new_manifest(model_dir: Path, files: list[dict], dtype: str, backend: str, units: list[str],
                 tiers: dict, layers_limit: int | None, target: str, spec=None,
                 lm_head: str = S.DEFAULT_LM_HEAD) -> dict:
    return {
        "format_version": S.CACHE_FORMAT_VERSION,
        "tool": f"qwen-runner {__version__}",
        "versions": current_versions(backend),
        "cpu_features": cpu_features(),
        "dtype": dtype,
        "backend": backend,
        "lm_head": head_record(lm_head),
        "checksum": HASH_NAME,
        "source": {"path": str(model_dir), "name": model_dir.name, "fingerprint": fingerprint(files), "files": files},
        "spec": spec_record(spec) if spec is not None else None,
        "tiers": tiers,
        "target": target,
        "units": units,
        "layers_limit": layers_limit,
        "ties": {},
        "shards": {},
        "complete": False,
    }


# ------------------------------------------------------------------------------------------ checks


def check_layout(manifest: dict, dtype: str, backend: str, lm_head: str = S.DEFAULT_LM_HEAD) -> Problem | None:
    """A manifest written by another format/tool/torch/dtype/backend/lm_head format: every shard is stale."""
    found = manifest.get("format_version")
    if found != S.CACHE_FORMAT_VERSION:
        return Problem(MANIFEST, f"cache format version {found}, this qwen-runner reads version {S.CACHE_FORMAT_VERSION}", True)
    if manifest.get("dtype") != dtype or manifest.get("backend") != backend:
        return Problem(MANIFEST, f"built for {manifest.get('dtype')}/{manifest.get('backend')}, wanted {dtype}/{backend}", True)
    built, wanted = manifest.get("lm_head") or head_record(S.LM_HEAD_CHECKPOINT), head_record(lm_head)
    if built != wanted:
        return Problem(MANIFEST, f"built with lm_head {_head_text(built)}, wanted {_head_text(wanted)}", True)
    now, then = current_versions(backend), manifest.get("versions") or {}
    for key in ("qwen_runner", "torch", "backend"):
        if then.get(key) != now[key]:
            return Problem(MANIFEST, f"built with {key} {then.get(key)}, this is {key} {now[key]}", True)
    return None


def _head_text(record: dict) -> str:
    extra = ", ".join(f"{k} {v}" for k, v in record.items() if k != "format")
    return record.get("format", "?") + (f" ({extra})" if extra else "")


def check_source(manifest: dict, files: list[dict]) -> Problem | None:
    change = source_changes(manifest.get("source", {}).get("files", []), files)
    if change:
        return Problem(change.split(" ", 1)[0], f"source checkpoint changed since the cache was built: {change}", True)
    return None


def check_shards(paths: CachePaths, manifest: dict, full: bool, tier: str | None = None) -> list[Problem]:
    """Shards the manifest lists: present, right size and (``full``) right checksum."""
    problems = []
    for rel, entry in sorted(manifest.get("shards", {}).items()):
        if tier is not None and not rel.startswith(tier + "/"):
            continue
        problem = check_shard(paths.dir / rel, rel, entry, full)
        if problem:
            problems.append(problem)
    return problems


def check_shard(path: Path, rel: str, entry: dict, full: bool) -> Problem | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return Problem(rel, "shard is missing")
    if size < entry["size"]:
        return Problem(rel, f"shard is truncated ({size} of {entry['size']} bytes)")
    if size != entry["size"]:
        return Problem(rel, f"shard has the wrong size ({size} bytes, manifest says {entry['size']})")
    if full and file_checksum(path) != entry[HASH_NAME]:
        return Problem(rel, f"shard is corrupt ({HASH_NAME} checksum mismatch)")
    return None


def check(paths: CachePaths, manifest: dict | None, files: list[dict], dtype: str, backend: str,
          full: bool, tier: str = READY, lm_head: str = S.DEFAULT_LM_HEAD) -> list[Problem]:
    """Everything that keeps ``tier`` of this entry from being current; empty means usable as is."""
    if manifest is None:
        what = "" if lm_head == S.DEFAULT_LM_HEAD else f" with --lm-head {lm_head}"
        return [Problem(MANIFEST, f"no cache built for this model, dtype and backend{what}", True)]
    for problem in (check_layout(manifest, dtype, backend, lm_head), check_source(manifest, files)):
        if problem:
            return [problem]
    if manifest.get("target") != tier:
        return [Problem(MANIFEST, f"this entry was built up to the {manifest.get('target')} tier, not {tier}", True)]
    problems = check_shards(paths, manifest, full, tier)
    if not manifest.get("complete"):
        limit = manifest.get("layers_limit")
        done = sum(1 for rel in manifest.get("shards", {}) if rel.startswith(tier + "/"))
        why = f"a partial build (--layers {limit})" if limit is not None else "an interrupted build"
        problems.append(Problem(MANIFEST, f"{why}: {done} of {len(manifest.get('units', []))} {tier} shards done"))
    return problems
