"""Backends and the dtype chain: injected CPU feature sets and raising kernels walk every step
(fp16 -> bf16 -> fp32, and fp32 raising -> one clear error) at probe, build and first forward."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from qwen_runner import hardware, precision, runtime
from qwen_runner.backends import get_backend, native
from qwen_runner.cache import build_cache, list_entries
from qwen_runner.errors import BackendUnavailableError, KernelError
from tests.conftest import model_path

FP16_CPU = {"amx_fp16", "amx_bf16", "avx512_bf16", "avx512_fp16", "avx512f"}  # chooses fp16
BF16_CPU = {"avx512_bf16", "avx512f"}  # chooses bf16


@pytest.fixture
def cpu(monkeypatch):
    """Inject a CPU feature set: ``cpu({"avx512_bf16"})``."""
    real = hardware.detect_cpu()

    def inject(flags: set[str]):
        isa = {flag: flag in flags for flag in hardware.ISA_FLAGS}
        monkeypatch.setattr(hardware, "detect_cpu", lambda *a, **k: dataclasses.replace(real, isa=isa))

    return inject


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_RUNNER_CACHE", str(tmp_path))
    return tmp_path


def raising_for(dtypes: set[str], original=None):
    """A kernel that raises like torch does for a dtype it lacks, and runs ``original`` otherwise."""

    def kernel(*args):
        dtype = next(a for a in args if a in precision.CHAIN)
        if dtype in dtypes:
            raise RuntimeError(f"\"addmm_impl_cpu_\" not implemented for '{dtype}' (injected)")
        return original(*args) if original else None

    return kernel


# ------------------------------------------------------------------------------------ walk_chain


def test_walk_chain_steps_down_with_a_warning_per_step(caplog):
    record = precision.ChainRecord("fp16", "test")
    with caplog.at_level(logging.WARNING):
        result = precision.walk_chain(record, "build", raising_for({"fp16", "bf16"}, lambda d: f"ran {d}"))
    assert result == "ran fp32" and record.final == "fp32"
    assert [(f["dtype"], f["stage"]) for f in record.fallbacks] == [("fp16", "build"), ("bf16", "build")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "falling back to bf16" in warnings[0] and "falling back to fp32" in warnings[1]
    assert "fell back from fp16" in record.summary()


def test_walk_chain_fp32_raising_is_a_clear_error():
    record = precision.ChainRecord("bf16", "test")
    with pytest.raises(KernelError) as err:
        precision.walk_chain(record, "first forward", raising_for(set(precision.CHAIN)))
    message = str(err.value)
    assert "fp32 kernels failed at first forward" in message and "bf16 -> fp32" in message
    assert "\n" not in message and err.value.hint


def test_walk_chain_lets_other_errors_through():
    def boom(dtype):
        raise MemoryError("not a dtype problem")

    record = precision.ChainRecord("bf16", "test")
    with pytest.raises(MemoryError):
        precision.walk_chain(record, "build", boom)
    assert record.fallbacks == [] and record.final == "bf16"


# ------------------------------------------------------------------------------------ registry


def test_registry_native_default_and_unknown_names():
    backend = get_backend()
    assert backend.name == "native" and backend.status().usable and backend.has_cache_layout
    backend.probe("bf16")  # the real kernels run at every dtype on this CPU
    with pytest.raises(BackendUnavailableError, match="known: native, ipex"):
        get_backend("onnx")


def test_ipex_missing_says_which_versions(monkeypatch):
    from qwen_runner import backends

    monkeypatch.setattr(backends, "_dist_version", lambda name: None)
    with pytest.raises(BackendUnavailableError) as err:
        get_backend("ipex").require()
    assert "torch 2.8" in str(err.value) and "intel-extension-for-pytorch 2.8" in str(err.value)
    assert "make ipex-venv" in err.value.hint


def test_ipex_mismatched_torch_is_one_line_from_the_cli(cli):
    from qwen_runner.backends import ipex_status

    if ipex_status().usable:
        pytest.skip("IPEX is usable in this env (tests/test_backend_ipex.py covers it)")
    result = cli("generate", str(model_path("tiny-qwen3-moe")), "--prompt", "hi", "--backend", "ipex")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: backend ipex is unusable here") and "torch 2.8" in lines[0]
    result = cli("build-cache", str(model_path("tiny-qwen3-moe")), "--backend", "ipex")
    assert result.returncode != 0 and "torch 2.8" in result.stderr


# ---------------------------------------------------------------------- the chain through the CLI paths


def test_cpu_features_decide_the_build_dtype(cpu, cache_root):
    cpu(BF16_CPU)
    result = build_cache(model_path("tiny-qwen3-moe"), layers=1, root=cache_root)
    manifest = json.loads(result.paths.manifest.read_text())
    assert manifest["dtype"] == "bf16" and manifest["precision"]["chosen"] == "bf16"
    assert manifest["precision"]["fallbacks"] == [] and manifest["precision"]["reason"]


def test_build_walks_fp16_probe_then_bf16_build_down_to_fp32(cpu, cache_root, monkeypatch, caplog):
    """fp16 chosen from the features; the probe raises for fp16, the bf16 build raises: fp32 is built,
    the manifest records both steps, and `chat`'s auto dtype finds that fp32 entry (not the checkpoint)."""
    cpu(FP16_CPU)
    backend = native.BACKEND
    monkeypatch.setattr(backend, "probe", raising_for({"fp16"}, native.probe_kernels))
    monkeypatch.setattr(backend, "optimize", raising_for({"bf16"}, type(backend).optimize.__get__(backend)))
    with caplog.at_level(logging.WARNING):
        result = build_cache(model_path("tiny-qwen3-moe"), "auto")
    assert result.complete and result.paths.dir.name == "fp32-native"
    record = json.loads(result.paths.manifest.read_text())["precision"]
    assert record["chosen"] == "fp16" and record["final"] == "fp32"
    assert [(f["dtype"], f["stage"]) for f in record["fallbacks"]] == [("fp16", "probe"), ("bf16", "build")]
    assert sum("falling back" in r.getMessage() for r in caplog.records) == 2

    loaded = runtime.open_model(str(model_path("tiny-qwen3-moe")), "auto")
    assert loaded.from_ready and loaded.dtype.dtype == "fp32"
    assert [f["dtype"] for f in loaded.precision.fallbacks] == ["fp16", "bf16"]

    from qwen_runner.info import cache_precisions

    shown = [e for e in cache_precisions() if e["entry"].endswith("fp32-native")]
    assert shown and shown[0]["precision"]["final"] == "fp32"


def test_first_forward_error_reloads_one_step_down(cpu, cache_root, monkeypatch):
    cpu(BF16_CPU)
    real = runtime.first_forward

    def first_forward(model):
        if model.dtype != __import__("torch").float32:
            raise NotImplementedError("no bf16 kernel for this op (injected)")
        real(model)

    monkeypatch.setattr(runtime, "first_forward", first_forward)
    loaded = runtime.open_model(str(model_path("tiny-qwen3-moe")), "auto")
    assert loaded.dtype.dtype == "fp32" and not loaded.from_ready
    assert loaded.precision.fallbacks[0]["dtype"] == "bf16"
    assert loaded.precision.fallbacks[0]["stage"] == "first forward"


def test_fp32_raising_at_first_forward_is_a_clear_error(cpu, cache_root, monkeypatch):
    cpu(set())  # no 16-bit instructions: fp32 from the start

    def first_forward(model):
        raise RuntimeError("broken sgemm (injected)")

    monkeypatch.setattr(runtime, "first_forward", first_forward)
    with pytest.raises(KernelError, match="fp32 kernels failed at first forward"):
        runtime.open_model(str(model_path("tiny-qwen3-moe")), "auto")


def test_info_shows_the_probed_chain(cpu, monkeypatch):
    from qwen_runner.info import collect_info, format_info

    cpu(BF16_CPU)
    monkeypatch.setattr(native.BACKEND, "probe", raising_for({"bf16"}, native.probe_kernels))
    report = collect_info()
    assert report["compute"]["dtype"] == "bf16" and report["compute"]["probed"]["final"] == "fp32"
    assert "probe     fp32 (fell back from bf16" in format_info(report)


def test_list_entries_still_reads_manifests_with_precision(cpu, cache_root):
    cpu(BF16_CPU)
    build_cache(model_path("tiny-qwen3-moe"), layers=1)
    assert any((e.manifest or {}).get("precision", {}).get("final") == "bf16" for e in list_entries())


def test_every_dtype_raising_in_build_cache_is_one_line(cpu, cache_root, monkeypatch, capsys):
    """fp32 raising too, from the CLI: exit 1 and one line naming the stage and the steps, no traceback."""
    from qwen_runner.cli import main

    cpu(BF16_CPU)
    monkeypatch.setattr(native.BACKEND, "probe", raising_for(set(precision.CHAIN)))
    with pytest.raises(SystemExit) as exit_:
        main(["build-cache", str(model_path("tiny-qwen3-moe"))])
    code, err = exit_.value.code, capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert "no dtype works here: fp32 kernels failed at probe" in lines[0] and "bf16 -> fp32" in lines[0]
    assert "hint:" in lines[0]
