"""Optimizer backends: the registry, and which are installed here and can actually be used.

``get_backend(name)`` returns a ``Backend`` (``backends/base.py``: the interface); ``native`` is the
default. Backend modules are imported on first use, so a broken optional one affects only itself.

`native` (stock PyTorch) is always usable. `ipex` needs intel-extension-for-pytorch
built for the same torch major.minor (IPEX 2.8 pins torch 2.8); it is probed by package
metadata, never imported blindly, because importing a mismatched IPEX aborts the process.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import asdict, dataclass

BACKENDS = ("native", "ipex")
DEFAULT_BACKEND = "native"
_MODULES = {"native": "qwen_runner.backends.native", "ipex": "qwen_runner.backends.ipex"}
# The one combination IPEX's LLM path is known to work with (IPEX 2.8 was its last release).
IPEX_REQUIREMENT = "torch 2.8 + intel-extension-for-pytorch 2.8 (+ transformers 4.51.3)"


@dataclass(frozen=True)
class BackendStatus:
    name: str
    installed: bool
    usable: bool
    version: str | None
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("+")[0].split(".")[:2])


def native_status() -> BackendStatus:
    import torch

    return BackendStatus("native", True, True, torch.__version__, "stock PyTorch CPU kernels")


def ipex_status(torch_version: str | None = None) -> BackendStatus:
    version = _dist_version("intel-extension-for-pytorch")
    if version is None or importlib.util.find_spec("intel_extension_for_pytorch") is None:
        return BackendStatus("ipex", False, False, None, f"not installed (optional: needs {IPEX_REQUIREMENT}; `make ipex-venv` builds .venv-ipex)")
    torch_version = torch_version or _dist_version("torch") or "?"
    if torch_version == "?" or _major_minor(version) != _major_minor(torch_version):
        return BackendStatus(
            "ipex", True, False, version,
            f"IPEX {version} needs torch {'.'.join(map(str, _major_minor(version)))}.x, found torch {torch_version} "
            f"(use {IPEX_REQUIREMENT}: `make ipex-venv`)",
        )
    return BackendStatus("ipex", True, True, version, f"matches torch {torch_version}")


def kernel_library_status() -> BackendStatus:
    """auto-round-lib's CPU kernels (ark): a candidate int4 kernel, measured against torch's own."""
    version = _dist_version("auto-round-lib")
    installed = version is not None and importlib.util.find_spec("auto_round_kernel") is not None
    detail = "int4/int8 CPU kernels (resets torch threads after use)" if installed else "not installed"
    return BackendStatus("auto-round-lib", installed, installed, version, detail)


def backend_statuses() -> list[BackendStatus]:
    return [native_status(), ipex_status(), kernel_library_status()]


def get_backend(name: str = DEFAULT_BACKEND):
    """The ``Backend`` called ``name`` (unknown names: a one-line error listing the known ones)."""
    import importlib

    from qwen_runner.errors import BackendUnavailableError

    if name not in _MODULES:
        raise BackendUnavailableError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    return importlib.import_module(_MODULES[name]).BACKEND
