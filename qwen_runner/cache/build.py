"""The streaming builder: checkpoint -> raw -> optimized -> ready, one unit (layer, embeddings, head) at a time.

Stages, explicit even when a tier is not written to disk:

- ``raw``: the checkpoint's tensors of one unit, normalized (HF names, original dtypes, per-expert
  tensors stacked into ``[E, ...]``). Written only when asked for (``--tier raw``); for float checkpoints the safetensors files
  already are per-tensor mmap-able raw storage, so a copy would add nothing.
- ``optimized``: the backend's layout (``Backend.optimize``; native: our parameter names, fused qkv /
  gate+up, experts stacked, cast to the chosen dtype, streamed per layer).
- ``ready``: exactly what the runtime mmaps (``Backend.ready``). For the ``native`` backend it is the
  optimized tier as is, so the optimized tier is not written twice.

The dtype is the chain's (``precision.walk_chain``): a backend kernel raising at its probe or during
the build moves the build one step down (fp16 -> bf16 -> fp32); the manifest records how.

Only one unit is in flight: peak memory is the runtime baseline plus the largest unit, independent of
the model size. A unit already in the manifest with the right size and checksum is kept, so a rerun after
a crash only builds the rest.
"""

from __future__ import annotations

import logging
import re
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qwen_runner import settings as S
from qwen_runner.backends.native import EMBED_UNIT, HEAD_UNIT, layer_unit
from qwen_runner.cache import manifest as M
from qwen_runner.cache.store import (
    RAW, READY, TIERS, CacheLock, CachePaths, cache_paths, ensure_dir, read_manifest, remove_stale_temps,
    save_shard, write_json,
)
from qwen_runner.errors import BackendUnavailableError, CacheError, QwenRunnerError

log = logging.getLogger(__name__)

BUILD_TARGETS = (RAW, READY)
RAW_DTYPE = "checkpoint"  # the dtype slot of a raw-tier entry's folder name: <model>-<fp>/checkpoint-<backend>/raw
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(.+)$")


@dataclass
class BuildResult:
    paths: CachePaths
    target: str
    units: int
    written: int
    kept: int
    seconds: float
    complete: bool
    bytes_on_disk: int


def choose(dtype: str):
    """The start of the dtype chain: 'auto' -> what this CPU's features pick (precision.choose_dtype)."""
    from qwen_runner import hardware, precision

    try:
        choice = precision.choose_dtype(hardware.detect_cpu().isa, dtype)
    except ValueError as err:
        raise QwenRunnerError(f"--dtype {dtype}: {err}", "use auto, bf16, fp16 or fp32") from None
    return precision.ChainRecord(choice.dtype, choice.reason)


def resolve_dtype(dtype: str) -> str:
    """'auto' -> what `chat` would pick on this CPU, so the default build is the one `chat` loads."""
    return choose(dtype).chosen


def cache_backend(backend: str):
    """The ``Backend`` for a cache build: usable here and with a cache layout, else a one-line error."""
    from qwen_runner.backends import get_backend

    impl = get_backend(backend)
    impl.require()
    if not impl.has_cache_layout:
        raise BackendUnavailableError(f"backend {backend} optimizes the model at load time; it has no cache tier",
                                      f"run chat, generate or bench with --backend {backend} directly")
    return impl


def locate(model_dir: Path, dtype: str, backend: str, root: Path | None = None,
           lm_head: str = S.DEFAULT_LM_HEAD) -> tuple[CachePaths, list[dict]]:
    """The cache entry for this checkpoint (fingerprinted from its headers), dtype, backend and lm_head format."""
    files = M.source_files(model_dir)
    return cache_paths(model_dir.name, M.fingerprint(files), dtype, backend, root, lm_head), files


def planned_units(num_layers: int, layers: int | None) -> list[str]:
    """Shard names in build order; a ``--layers N`` partial build stops after layer N-1 (no head)."""
    if layers is None:
        return [EMBED_UNIT, *map(layer_unit, range(num_layers)), HEAD_UNIT]
    return [EMBED_UNIT, *map(layer_unit, range(min(layers, num_layers)))]


def tier_plan(quantized: bool, target: str) -> dict:
    """Which tiers this build writes, and why the others add nothing (recorded in the manifest).

    Quantized checkpoints take the same path: ``model_state_from_checkpoint`` unpacks and repacks them
    for the int4 kernel (models.quantized), so the ready tier stores the packed layout."""
    if target == RAW:
        return {RAW: {"written": True, "why": "requested with --tier raw"},
                "optimized": {"written": False, "why": "not requested"}, READY: {"written": False, "why": "not requested"}}
    return {
        RAW: {"written": False, "why": "the checkpoint's safetensors already are per-tensor mmap-able raw storage"},
        "optimized": {"written": False, "why": "for the native backend the optimized layout is the ready layout"},
        READY: {"written": True, "why": "what the runtime mmaps"},
    }


# --------------------------------------------------------------------------------------- stages


def raw_units(model_dir: Path, spec, units: list[str]) -> Iterator[tuple[str, dict]]:
    """Stage raw: the checkpoint's tensors per unit, per-expert tensors stacked ``[E, ...]`` in expert order."""
    from qwen_runner.checkpoint import EMBEDDING, FINAL_NORM, LM_HEAD
    from qwen_runner.models.loader import CheckpointReader

    by_unit: dict[str, list[str]] = {}
    skipped = 0
    for name, info in spec.tensors.items():
        if info.layer is not None:
            unit = layer_unit(info.layer)
        elif info.role == EMBEDDING:
            unit = EMBED_UNIT
        elif info.role in (FINAL_NORM, LM_HEAD):
            unit = HEAD_UNIT
        else:
            skipped += 1  # e.g. Qwen3-Next's mtp.* (multi-token prediction), never used to decode
            continue
        by_unit.setdefault(unit, []).append(name)
    if skipped:
        log.info("raw tier: %d tensors outside the decoder (e.g. mtp.*) are not cached", skipped)
    reader = CheckpointReader(model_dir)
    for unit in units:
        yield unit, _normalized(reader, sorted(by_unit.get(unit, [])))


def _normalized(reader, names: list[str]) -> dict:
    """One unit's raw tensors; experts stacked without holding more than the stacked result + one tensor."""
    import torch

    out: dict = {}
    experts: dict[str, dict[int, str]] = {}
    for name in names:
        match = _EXPERT_RE.match(name)
        if match:
            experts.setdefault(f"{match.group(1)}.{match.group(3)}", {})[int(match.group(2))] = name
        else:
            out[name] = reader.get(name).contiguous()
    for key in sorted(experts):
        members = experts[key]
        if sorted(members) != list(range(len(members))):
            raise CacheError(f"checkpoint experts of {key} are not numbered 0..{len(members) - 1}",
                             "re-export the checkpoint")
        stacked = None
        for index in range(len(members)):
            tensor = reader.get(members[index])
            if stacked is None:
                stacked = torch.empty((len(members), *tensor.shape), dtype=tensor.dtype)
            stacked[index] = tensor
        out[key] = stacked
    return dict(sorted(out.items()))


class _Ties:
    """Tied weights (lm_head = embedding) are saved once and recorded in the manifest's ``ties``."""

    def __init__(self):
        self.seen: dict[int, tuple[weakref.ref, str]] = {}

    def split(self, tensors: dict) -> tuple[dict, dict]:
        unique, ties = {}, {}
        for name, tensor in tensors.items():
            hit = self.seen.get(id(tensor))
            if hit is not None and hit[0]() is tensor:
                ties[name] = hit[1]
                continue
            self.seen[id(tensor)] = (weakref.ref(tensor), name)
            unique[name] = tensor
        return unique, ties


# ---------------------------------------------------------------------------------------- builder


def _reusable(old: dict | None, paths: CachePaths, files: list[dict], dtype: str, backend: str, target: str,
              rebuild: bool, lm_head: str = S.DEFAULT_LM_HEAD) -> dict:
    """Shards of a previous (possibly crashed) build that are still valid: {rel: entry}."""
    if old is None:
        return {}
    if rebuild:
        log.info("--rebuild: discarding %d existing shards", len(old.get("shards", {})))
        return {}
    problem = M.check_layout(old, dtype, backend, lm_head) or M.check_source(old, files)
    if problem is None and old.get("target") != target:
        problem = M.Problem(M.MANIFEST, f"was built up to the {old.get('target')} tier", True)
    if problem:
        log.warning("%s: everything will be rebuilt", problem.line())
        return {}
    keep = {}
    for rel, entry in old.get("shards", {}).items():
        bad = M.check_shard(paths.dir / rel, rel, entry, full=True)
        if bad:
            log.warning("%s: rebuilding it", bad.line())
        else:
            keep[rel] = entry
    return keep


def build_cache(model: str | Path, dtype: str = "auto", backend: str = "native", *, target: str = READY,
                layers: int | None = None, rebuild: bool = False, wait: bool = False, root: Path | None = None,
                progress: bool | None = None, lm_head: str = S.DEFAULT_LM_HEAD) -> BuildResult:
    """Build (or finish, or refresh) the cache entry of ``model`` up to ``target``; see the module doc.

    ``lm_head="int4"`` stores an RTN int4 copy of the head (``quantized.int4_lm_head``) in its own
    variant folder (``<dtype>-<backend>-head4``), recorded in the manifest; the raw tier has no such form.

    The dtype walks down the chain (fp16 -> bf16 -> fp32, logged) when the backend's kernels raise
    at the probe or while building; the manifest's ``precision`` records the choice and every step.
    """
    from qwen_runner import precision
    from qwen_runner.checkpoint import inspect_checkpoint, resolve_model_dir

    if target not in BUILD_TARGETS:
        raise CacheError(f"cannot build tier {target!r}", f"build one of: {', '.join(BUILD_TARGETS)}")
    if layers is not None and layers < 1:
        raise CacheError(f"--layers {layers} must be at least 1")
    if lm_head not in S.LM_HEAD_FORMATS:
        raise CacheError(f"--lm-head {lm_head!r} is not one of {', '.join(S.LM_HEAD_FORMATS)}")
    if target == RAW and lm_head != S.DEFAULT_LM_HEAD:
        raise CacheError(f"--lm-head {lm_head} applies to the ready tier; the raw tier keeps the checkpoint's tensors",
                         f"drop --tier raw, or drop --lm-head {lm_head}")
    impl = cache_backend(backend)
    model_dir = resolve_model_dir(str(model))
    spec = inspect_checkpoint(model_dir)
    tiers = tier_plan(spec.quant is not None, target)
    args = (model_dir, spec, impl, tiers, target, layers, rebuild, wait, root, progress, lm_head)
    if target == RAW:  # the raw tier keeps the checkpoint's own dtypes: one raw entry serves every --dtype
        return _build(*args, RAW_DTYPE, None)
    record = choose(dtype)
    precision.walk_chain(record, "probe", impl.probe, log)
    return precision.walk_chain(record, "build", lambda d: _build(*args, d, record), log)


def _build(model_dir: Path, spec, impl, tiers: dict, target: str, layers: int | None, rebuild: bool, wait: bool,
           root: Path | None, progress: bool | None, lm_head: str, dtype: str, record) -> BuildResult:
    """One build at one dtype (``record``: the dtype chain so far, written into the manifest)."""
    from tqdm import tqdm

    from qwen_runner.models.loader import read_config

    backend = impl.name
    paths, files = locate(model_dir, dtype, backend, root, lm_head)
    start = time.perf_counter()
    with CacheLock(paths.dir, wait=wait):
        if remove_stale_temps(paths.dir):
            log.info("removed temp files of an interrupted build in %s", paths.dir)
        try:
            old = read_manifest(paths.manifest)
        except CacheError as err:
            log.warning("%s: rebuilding everything", err.message)
            old = None
        keep = _reusable(old, paths, files, dtype, backend, target, rebuild, lm_head)
        units = planned_units(spec.config.num_layers, layers)
        manifest = M.new_manifest(model_dir, files, dtype, backend, units, tiers, layers, target, spec, lm_head)
        if record is not None:
            manifest["precision"] = record.as_dict()
        manifest["shards"] = {rel: keep[rel] for rel in (f"{target}/{u}.pt" for u in units) if rel in keep}
        manifest["ties"] = dict((old or {}).get("ties", {})) if manifest["shards"] else {}
        ensure_dir(paths.tier(target))
        write_json(paths.manifest, manifest)  # stale entries leave the manifest before any file is replaced

        if target == RAW:
            stream = raw_units(model_dir, spec, units)
        else:
            stream = impl.ready(impl.optimize(model_dir, read_config(model_dir), dtype, units, lm_head), dtype)
        ties = _Ties()
        written = 0
        # progress=None: a bar only on a terminal (tqdm's own check); the ETA comes from tqdm's rate.
        bar = tqdm(total=len(units), desc=f"{target} tier", unit="shard", disable=None if progress is None else not progress)
        try:
            for unit, tensors in stream:
                unique, tied = ties.split(tensors)
                rel = f"{target}/{unit}.pt"
                bar.set_postfix_str(unit, refresh=False)
                if rel not in manifest["shards"]:
                    try:
                        size, digest = save_shard(unique, paths.dir / rel)
                    except OSError as err:
                        raise CacheError(f"cannot write {paths.dir / rel}: {err.strerror or err}",
                                         "free disk space (or fix permissions), then rerun build-cache: it resumes") from None
                    manifest["shards"][rel] = {"size": size, M.HASH_NAME: digest}
                    manifest["ties"].update(tied)
                    write_json(paths.manifest, manifest)
                    written += 1
                del tensors, unique
                bar.update(1)
        finally:
            bar.close()
        manifest["complete"] = layers is None and all(f"{target}/{u}.pt" in manifest["shards"] for u in units)
        write_json(paths.manifest, manifest)
    from qwen_runner.cache.store import dir_size

    result = BuildResult(paths, target, len(units), written, len(units) - written, time.perf_counter() - start,
                         manifest["complete"], dir_size(paths.tier(target)))
    log.info("%s tier of %s: %d shards written, %d kept, %.1f s", target, model_dir.name, written, result.kept,
             result.seconds)
    return result


__all__ = ["BUILD_TARGETS", "BuildResult", "TIERS", "build_cache", "locate", "resolve_dtype"]
