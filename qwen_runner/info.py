"""`qwen-runner info`: what hardware, threads, backends and kernels are in use, and why."""

from __future__ import annotations

import os
import platform

from qwen_runner import __version__, hardware, kernels, precision
from qwen_runner.backends import backend_statuses
from qwen_runner import settings as S
from qwen_runner.settings import load_settings
from qwen_runner.threads import active_config

GIB = 1 << 30


def int4_kernel() -> dict:
    """Whether torch's CPU int4 weight-only matmul op exists in this build."""
    import torch

    available = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    return {"name": "aten._weight_int4pack_mm_for_cpu", "available": available}


def probed_precision(isa: dict) -> dict:
    """The dtype chain as the native backend's probe walks it here (a kernel that raises steps down)."""
    from qwen_runner.backends import get_backend

    choice = precision.choose_dtype(isa)
    record = precision.ChainRecord(choice.dtype, choice.reason)
    precision.walk_chain(record, "probe", get_backend("native").probe)
    return record.as_dict()


def cache_precisions() -> list[dict]:
    """Per cache entry: backend and the dtype its build ended with (with any steps down the chain), and
    ``lm_head`` when the entry holds a non-default head (``--lm-head int4``)."""
    from qwen_runner.cache import list_entries
    from qwen_runner.cache.manifest import manifest_lm_head

    out = []
    for entry in list_entries():
        m = entry.manifest or {}
        if m.get("dtype") and m.get("precision"):
            out.append({"entry": entry.folder.parent.name + "/" + entry.folder.name, "backend": m.get("backend"),
                        "dtype": m["dtype"], "precision": m["precision"]})
            if manifest_lm_head(m) != S.DEFAULT_LM_HEAD:
                out[-1]["lm_head"] = m["lm_head"]
    return out


def collect_info() -> dict:
    import torch

    from qwen_runner.models.matmul import prefill_gemm_status

    cpu = hardware.detect_cpu()
    memory = hardware.detect_memory()
    threads = active_config()
    choice = precision.choose_dtype(cpu.isa)
    probed = probed_precision(cpu.isa)
    return {
        "qwen_runner": __version__,
        "python": platform.python_version(),
        "cpu": {
            "model": cpu.model,
            "vendor": cpu.vendor,
            "arch": cpu.arch,
            "isa": cpu.isa,
            "logical_cores": cpu.logical_cores,
            "physical_cores": cpu.physical_cores,
            "usable_cores": cpu.usable_cores,
        },
        "numa": [hardware.as_dict(node) for node in cpu.numa_nodes],
        "memory": {**hardware.as_dict(memory), "usable": memory.usable},
        "torch": {
            "version": torch.__version__,
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn": torch.backends.mkldnn.is_available(),
        },
        "openmp": {
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            **threads.as_dict(),
        },
        "backends": [status.as_dict() for status in backend_statuses()],
        "compute": {
            "dtype": choice.dtype,
            "reason": choice.reason,
            "fallback_chain": list(precision.CHAIN[precision.CHAIN.index(choice.dtype):]),
            "probed": probed,
            "matmul_kernel": precision.matmul_kernel(choice.dtype, cpu.isa),
            "int4_kernel": int4_kernel(),
            "decode_kernel": kernels.status(),
            "prefill_gemm": prefill_gemm_status(choice.dtype),
        },
        "cache_dir": str(load_settings().cache_dir),
        "cache_precision": cache_precisions(),
    }


def _gib(value: int | None) -> str:
    return "unlimited" if value is None else f"{value / GIB:.1f} GiB"


def format_info(info: dict) -> str:
    cpu, mem, tor, omp, comp = info["cpu"], info["memory"], info["torch"], info["openmp"], info["compute"]
    isa = " ".join(f"{flag}{'+' if on else '-'}" for flag, on in cpu["isa"].items())
    lines = [
        f"qwen-runner {info['qwen_runner']}  (python {info['python']})",
        f"CPU       {cpu['model']} [{cpu['vendor']}, {cpu['arch']}]",
        f"ISA       {isa}",
        f"cores     {cpu['physical_cores']} physical, {cpu['logical_cores']} logical, {cpu['usable_cores']} usable by this process",
    ]
    for node in info["numa"]:
        lines.append(f"NUMA      node {node['node']}: cpus {node['cpus']}, memory {_gib(node['memory_total'])}")
    lines += [
        f"memory    {_gib(mem['total'])} total, {_gib(mem['available'])} available, "
        f"swap {_gib(mem['swap_total'])} ({_gib(mem['swap_free'])} free), cgroup limit {_gib(mem['cgroup_limit'])}",
        f"torch     {tor['version']}, {tor['threads']} threads ({omp['threads_source']}), "
        f"capability {tor['cpu_capability']}, oneDNN {'yes' if tor['mkldnn'] else 'no'}",
        f"OpenMP    OMP_NUM_THREADS={omp['OMP_NUM_THREADS']} OMP_WAIT_POLICY={omp['OMP_WAIT_POLICY']} "
        f"({omp['wait_policy_source']})",
    ]
    for backend in info["backends"]:
        state = "usable" if backend["usable"] else "installed, unusable" if backend["installed"] else "absent"
        version = f" {backend['version']}" if backend["version"] else ""
        lines.append(f"backend   {backend['name']}{version}: {state} - {backend['detail']}")
    int4 = comp["int4_kernel"]
    lines += [
        f"dtype     {comp['dtype']} - {comp['reason']} (fallback chain: {' -> '.join(comp['fallback_chain'])})",
        f"kernels   matmul: {comp['matmul_kernel']}; int4: {int4['name']} "
        f"({'available' if int4['available'] else 'missing'})",
        f"decode    one-row bf16 and int4 matmuls + fused MoE: {comp['decode_kernel']['kernel']} "
        f"- {comp['decode_kernel']['reason']}",
        f"prefill   multi-row matmuls: {comp['prefill_gemm']['kernel']} - {comp['prefill_gemm']['reason']}",
        f"cache     {info['cache_dir']}",
    ]
    probed = precision.ChainRecord.from_dict(comp["probed"])
    if probed.fallbacks:
        lines.insert(-2, f"probe     {probed.summary()}")
    for entry in info.get("cache_precision", []):
        head = entry.get("lm_head")
        head = f"; lm_head {head['format']} (group {head.get('group')})" if head else ""
        summary = precision.ChainRecord.from_dict(entry["precision"]).summary()
        lines.append(f"          {entry['entry']}: {summary}{head}")
    return "\n".join(lines)
