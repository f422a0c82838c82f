"""Loading from the ready tier: nothing is converted, nothing is copied.

The model is built on the meta device (no memory), each ready shard is opened with
``torch.load(mmap=True, weights_only=True)`` (its tensors are views of file-backed, evictable pages) and
``load_state_dict(assign=True)`` adopts them as the parameters. Start-up cost is then independent of the
model size. The currency check here is the cheap one (manifest, versions, source headers, shard sizes);
``qwen-runner cache verify`` recomputes every checksum.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from qwen_runner import settings as S
from qwen_runner.cache import manifest as M
from qwen_runner.cache.build import locate
from qwen_runner.cache.store import READY, CachePaths, read_manifest
from qwen_runner.errors import CacheError

log = logging.getLogger(__name__)


def build_hint(model_dir: Path, dtype: str, backend: str = "native", lm_head: str = S.DEFAULT_LM_HEAD) -> str:
    extra = "" if backend == "native" else f" --backend {backend}"
    extra += "" if lm_head == S.DEFAULT_LM_HEAD else f" --lm-head {lm_head}"
    return f"run `qwen-runner build-cache {model_dir} --dtype {dtype}{extra}`"


def find_ready(model_dir: Path, dtype: str, backend: str = "native", root: Path | None = None,
               lm_head: str = S.DEFAULT_LM_HEAD) -> tuple[CachePaths, dict | None, list[M.Problem]]:
    """(paths, manifest, problems) for the ready tier of this checkpoint; no problems means current.
    ``lm_head``: the ``--lm-head`` format wanted (its own variant folder; the manifest must agree)."""
    paths, files = locate(model_dir, dtype, backend, root, lm_head)
    try:
        manifest = read_manifest(paths.manifest)
    except CacheError as err:
        return paths, None, [M.Problem(M.MANIFEST, err.message, True)]
    if manifest is None:
        changed = _older_entry(paths, model_dir, files)
        if changed:
            return paths, None, [changed]
    return paths, manifest, M.check(paths, manifest, files, dtype, backend, full=False, lm_head=lm_head)


def _older_entry(paths: CachePaths, model_dir: Path, files: list[dict]) -> M.Problem | None:
    """A cache built from an earlier version of this same checkpoint (another fingerprint folder)."""
    from qwen_runner.cache.store import iter_entries

    for folder, manifest in iter_entries(paths.root):
        if folder.name != paths.variant or not manifest:
            continue
        if manifest.get("source", {}).get("path") == str(model_dir):
            problem = M.check_source(manifest, files)
            if problem:
                return problem
    return None


# nn.init functions that module constructors call. On the meta device they do nothing useful, yet
# torch 2.13's meta kernel for normal_ is a Python ref that imports torch._dynamo: measured 1.4 s of a
# 1.6 s meta construction of the demo model. Every parameter is replaced by a mapped tensor anyway.
_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "trunc_normal_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def _no_init():
    """Skip weight initialization while the model is built on the meta device."""
    from torch.nn import init

    saved = {name: getattr(init, name) for name in _INIT_FUNCTIONS}
    for name in saved:
        setattr(init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, func in saved.items():
            setattr(init, name, func)


def load_ready_model(paths: CachePaths, manifest: dict, config: dict):
    """The runnable model from the ready shards (mmap + assign)."""
    import torch

    from qwen_runner.models import build_model

    state: dict = {}
    for unit in manifest["units"]:
        shard = paths.shard(READY, unit)
        try:
            part = torch.load(shard, mmap=True, weights_only=True, map_location="cpu")
        except Exception as err:  # noqa: BLE001 - any unreadable shard is the same user problem
            raise CacheError(f"{READY}/{shard.name}: cannot load ({type(err).__name__})",
                             f"run `qwen-runner cache verify {manifest['source']['path']}` and rebuild") from None
        state.update(part)
    for name, source in manifest.get("ties", {}).items():
        state[name] = state[source]
    with _no_init():
        return build_model(config, state.items())


def find_ready_chain(model_dir: Path, dtype: str, backend: str = "native", root: Path | None = None,
                     lm_head: str = S.DEFAULT_LM_HEAD) -> tuple[CachePaths, dict | None, list[M.Problem]]:
    """``find_ready`` for ``dtype``, else for a lower dtype whose build fell back from ``dtype`` (its
    kernels raised while building): the entry `build-cache` left for this request."""
    from qwen_runner import precision

    found = find_ready(model_dir, dtype, backend, root, lm_head)
    lower = precision.next_dtype(dtype)
    while found[2] and lower is not None:
        paths, manifest, problems = find_ready(model_dir, lower, backend, root, lm_head)
        failed = {f["dtype"] for f in ((manifest or {}).get("precision") or {}).get("fallbacks", [])}
        if not problems and dtype in failed:
            log.info("using the %s ready tier: the %s build fell back to it", lower, dtype)
            return paths, manifest, problems
        lower = precision.next_dtype(lower)
    return found


def ready_tier_exists(model_dir: Path | str, dtype: str = "auto", backend: str = "native",
                      lm_head: str = S.DEFAULT_LM_HEAD) -> bool:
    """Planner hook: whether a current ready tier exists for this checkpoint (cheap checks only)."""
    from qwen_runner.cache.build import resolve_dtype

    _paths, _manifest, problems = find_ready_chain(Path(model_dir).resolve(), resolve_dtype(dtype), backend,
                                                   lm_head=lm_head)
    return not problems


def current_ready(model_dir: Path, dtype: str, backend: str = "native",
                  lm_head: str = S.DEFAULT_LM_HEAD) -> tuple[CachePaths, dict] | None:
    """The current ready tier's (paths, manifest), or None (and the reason logged, with how to build it).
    A lower dtype's entry counts when the build for ``dtype`` fell back to it (``find_ready_chain``)."""
    paths, manifest, problems = find_ready_chain(model_dir, dtype, backend, lm_head=lm_head)
    if problems:
        first = problems[0]
        level = logging.INFO if manifest is None and first.file == M.MANIFEST else logging.WARNING
        log.log(level, "ready tier not used (%s); loading from the checkpoint. To load in seconds: %s",
                first.line(), build_hint(model_dir, dtype, backend, lm_head))
        return None
    return paths, manifest


def ready_spec(model_dir: Path, dtype: str, backend: str = "native"):
    """The checkpoint's ModelSpec as the current ready tier's manifest recorded it (no header is read),
    or None when there is no current ready tier or it predates the record."""
    _paths, manifest, problems = find_ready_chain(model_dir, dtype, backend)
    if problems or not manifest.get("spec"):
        return None
    return M.spec_from_record(manifest["spec"], model_dir)


def open_ready(model_dir: Path, dtype: str, backend: str = "native", with_manifest: bool = False,
               lm_head: str = S.DEFAULT_LM_HEAD):
    """The model from the current ready tier, or None (and the reason logged, with how to build it).
    ``with_manifest``: ``(model, manifest)`` instead (the manifest says which dtype it holds).
    ``lm_head``: the ``--lm-head`` format wanted; only an entry built with it is used."""
    from qwen_runner.models.loader import read_config

    found = current_ready(model_dir, dtype, backend, lm_head)
    if found is None:
        return (None, None) if with_manifest else None
    paths, manifest = found
    log.info("loading the ready tier %s", paths.dir)
    model = load_ready_model(paths, manifest, read_config(model_dir))
    return (model, manifest) if with_manifest else model
