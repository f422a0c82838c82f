"""What this host is: CPU model and ISA, cores, NUMA, memory limits.

Everything here is read from /proc, /sys and psutil, never guessed; the readers take
their inputs as arguments so tests can inject other machines.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The ISA flags that decide dtype and kernels, as /proc/cpuinfo spells them.
ISA_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "avx512vbmi",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
)


@dataclass(frozen=True)
class NumaNode:
    node: int
    cpus: list[int]
    memory_total: int | None


@dataclass(frozen=True)
class CpuInfo:
    model: str
    vendor: str
    arch: str
    isa: dict[str, bool]
    logical_cores: int
    physical_cores: int
    usable_cores: int
    numa_nodes: list[NumaNode] = field(default_factory=list)

    def has(self, flag: str) -> bool:
        return self.isa.get(flag, False)


@dataclass(frozen=True)
class MemoryInfo:
    total: int
    available: int
    swap_total: int
    swap_free: int
    cgroup_limit: int | None
    cgroup_usage: int | None

    @property
    def usable(self) -> int:
        """Bytes we can still allocate: RAM available, capped by what the cgroup leaves."""
        if self.cgroup_limit is None:
            return self.available
        return min(self.available, max(0, self.cgroup_limit - (self.cgroup_usage or 0)))


def parse_cpuinfo(text: str) -> tuple[str, str, set[str]]:
    """(model name, vendor, flags) from /proc/cpuinfo text; the first processor block is enough."""
    model = vendor = "unknown"
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "vendor_id" and vendor == "unknown":
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, vendor, flags


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def read_numa_nodes(root: Path = Path("/sys/devices/system/node")) -> list[NumaNode]:
    nodes = []
    for path in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        try:
            cpus = parse_cpulist((path / "cpulist").read_text())
        except OSError:
            continue
        memory = None
        try:
            for line in (path / "meminfo").read_text().splitlines():
                if "MemTotal:" in line:
                    memory = int(line.split()[-2]) * 1024
        except (OSError, ValueError):
            pass
        nodes.append(NumaNode(int(path.name[4:]), cpus, memory))
    return nodes


def detect_cpu(cpuinfo_text: str | None = None) -> CpuInfo:
    import psutil

    from qwen_runner.threads import default_thread_count

    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo_text = ""
    model, vendor, flags = parse_cpuinfo(cpuinfo_text)
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    return CpuInfo(
        model=model if model != "unknown" else (platform.processor() or "unknown"),
        vendor=vendor,
        arch=platform.machine(),
        isa={flag: flag in flags for flag in ISA_FLAGS},
        logical_cores=logical,
        physical_cores=psutil.cpu_count(logical=False) or logical,
        usable_cores=default_thread_count(),
        numa_nodes=read_numa_nodes(),
    )


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" means unlimited


def cgroup_memory(root: Path = Path("/sys/fs/cgroup")) -> tuple[int | None, int | None]:
    """(limit, usage) of this process's memory cgroup, v2 or v1; (None, None) when unlimited."""
    limit = _read_int(root / "memory.max")
    usage = _read_int(root / "memory.current")
    if limit is None:  # cgroup v1
        limit = _read_int(root / "memory" / "memory.limit_in_bytes")
        usage = _read_int(root / "memory" / "memory.usage_in_bytes")
        if limit is not None and limit >= 1 << 60:  # v1 spells "unlimited" as a huge number
            limit = None
    return limit, usage if limit is not None else None


def detect_memory() -> MemoryInfo:
    import psutil

    vm, swap = psutil.virtual_memory(), psutil.swap_memory()
    limit, usage = cgroup_memory()
    return MemoryInfo(vm.total, vm.available, swap.total, swap.free, limit, usage)


def as_dict(obj) -> dict:
    return asdict(obj)
