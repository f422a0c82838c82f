"""The tiered cache: build, determinism, loading, resuming, and every way a cache can be wrong.

Small and fast: tiny models (a build takes well under a second in-process); the CLI runs in-process
through ``main`` except where a second process is the point (the lock).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest
import torch

from qwen_runner import settings as S
from qwen_runner.cache import build_cache, find_ready, list_entries, ready_tier_exists, verify
from qwen_runner.cache.build import _Ties
from qwen_runner.cache.store import MANIFEST, READY, CacheLock, file_checksum
from qwen_runner.cli import main
from tests.conftest import model_path, run_cli

TINY = "tiny-qwen3-moe"
TINY_TIED = "tiny-qwen2-moe"


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(S.ENV_CACHE, str(root))
    return root


@pytest.fixture
def tiny_copy(tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may alter."""
    dst = tmp_path / "model" / TINY
    shutil.copytree(model_path(TINY), dst)
    return dst


def cli_main(capsys, *args) -> tuple[int, str, str]:
    """`qwen-runner ARGS` in this process: (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def ready_files(result) -> dict[str, bytes]:
    folder = result.paths.tier(READY)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------------- build


def test_build_writes_private_checksummed_shards_and_a_full_manifest(cache_root):
    result = build_cache(model_path(TINY), "bf16", progress=False)
    assert result.complete and result.written == result.units == 6  # embed, 4 layers, head
    manifest = json.loads(result.paths.manifest.read_text())
    assert manifest["format_version"] == S.CACHE_FORMAT_VERSION
    assert torch.__version__.startswith(manifest["versions"]["torch"])
    assert {"qwen_runner", "torch", "transformers", "backend"} <= manifest["versions"].keys()
    assert manifest["dtype"] == "bf16" and manifest["backend"] == "native" and manifest["cpu_features"]
    names = {f["name"] for f in manifest["source"]["files"]}
    assert {"model.safetensors", "config.json"} <= names
    assert all(f["size"] > 0 and len(f["header_sha256"]) == 64 for f in manifest["source"]["files"])
    assert set(manifest["tiers"]) == {"raw", "optimized", "ready"}
    for rel, entry in manifest["shards"].items():
        path = result.paths.dir / rel
        assert path.stat().st_size == entry["size"] and file_checksum(path) == entry["sha256"]
        assert stat.S_IMODE(path.stat().st_mode) == S.CACHE_FILE_MODE
    for folder in (cache_root, result.paths.model_dir, result.paths.dir, result.paths.tier(READY)):
        assert stat.S_IMODE(folder.stat().st_mode) == S.CACHE_DIR_MODE, folder
    assert result.paths.dir.parent.parent == cache_root.resolve()
    assert not list(result.paths.dir.rglob("*.tmp-*"))


def test_two_builds_are_byte_identical(tmp_path):
    first = build_cache(model_path(TINY), "bf16", root=tmp_path / "a", progress=False)
    second = build_cache(model_path(TINY), "bf16", root=tmp_path / "b", progress=False)
    assert ready_files(first) == ready_files(second)


@pytest.mark.parametrize("name", [TINY, TINY_TIED])
def test_ready_tier_loads_the_same_model_as_the_checkpoint(cache_root, name):
    from qwen_runner.cache import open_ready
    from qwen_runner.models import build_model, model_state_from_checkpoint
    from qwen_runner.models.loader import read_config

    path = model_path(name)
    result = build_cache(path, "fp32", progress=False)
    model = open_ready(path.resolve(), "fp32")
    assert model is not None
    config = read_config(path)
    reference = build_model(config, model_state_from_checkpoint(path, torch.float32, config))
    ids = torch.tensor([[1, 5, 42, 7, 99]])
    assert torch.equal(model(ids, model.make_cache(16)), reference(ids, reference.make_cache(16)))
    manifest = json.loads(result.paths.manifest.read_text())
    if config["tie_word_embeddings"]:  # tied weights stored once, shared again after loading
        assert manifest["ties"] == {"lm_head.weight": "embed_tokens.weight"}
        assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    # Parameters are views of the mmapped shards, not copies.
    shard = torch.load(result.paths.shard(READY, "embed"), mmap=True, weights_only=True)
    assert shard["embed_tokens.weight"].untyped_storage().nbytes() == model.embed_tokens.weight.untyped_storage().nbytes()


def test_ties_only_for_the_same_tensor_object():
    a = torch.ones(4)
    ties = _Ties()
    assert ties.split({"x": a}) == ({"x": a}, {})
    unique, tied = ties.split({"y": a, "z": a.clone()})
    assert tied == {"y": "x"} and list(unique) == ["z"]


def test_raw_tier_stacks_experts_in_checkpoint_dtypes(cache_root):
    result = build_cache(model_path(TINY), "bf16", target="raw", progress=False)
    layer = torch.load(result.paths.shard("raw", "layer-000"), mmap=True, weights_only=True)
    stacked = layer["model.layers.0.mlp.experts.gate_proj.weight"]
    from safetensors import safe_open

    with safe_open(str(model_path(TINY) / "model.safetensors"), "pt") as f:
        e3 = f.get_tensor("model.layers.0.mlp.experts.3.gate_proj.weight")
    assert stacked.dtype == e3.dtype and torch.equal(stacked[3], e3)
    assert not any(".experts.0." in k for k in layer)
    assert not ready_tier_exists(model_path(TINY), "bf16")  # raw only: nothing for chat to mmap


# ---------------------------------------------------------------------------------- stale / resume


def test_rerun_keeps_verified_shards_and_rebuilds_only_the_bad_one(cache_root):
    first = build_cache(model_path(TINY), "bf16", progress=False)
    before = ready_files(first)
    bad = first.paths.shard(READY, "layer-002")
    bad.write_bytes(bad.read_bytes()[:100])
    again = build_cache(model_path(TINY), "bf16", progress=False)
    assert (again.written, again.kept) == (1, 5)
    assert ready_files(again) == before


def test_partial_build_is_not_ready_and_a_full_build_finishes_it(cache_root):
    partial = build_cache(model_path(TINY), "bf16", layers=2, progress=False)
    assert not partial.complete and partial.units == 3  # embed + 2 layers
    _, _, problems = find_ready(model_path(TINY).resolve(), "bf16")
    assert problems and "partial build (--layers 2)" in problems[0].message
    full = build_cache(model_path(TINY), "bf16", progress=False)
    assert full.complete and (full.written, full.kept) == (3, 3)
    assert ready_tier_exists(model_path(TINY), "bf16")


def test_rebuild_flag_discards_everything(cache_root):
    build_cache(model_path(TINY), "bf16", progress=False)
    again = build_cache(model_path(TINY), "bf16", rebuild=True, progress=False)
    assert again.written == again.units


# ---------------------------------------------------------------------- one-line errors, via the CLI


def _one_error_line(code: int, err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code != 0 and len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_truncated_shard(cache_root, capsys):
    result = build_cache(model_path(TINY), "bf16", progress=False)
    shard = result.paths.shard(READY, "layer-001")
    os.truncate(shard, shard.stat().st_size // 2)
    line = _one_error_line(*cli_main(capsys, "cache", "verify", str(model_path(TINY)))[::2])
    assert "ready/layer-001.pt" in line and "truncated" in line and "build-cache" in line
    assert not ready_tier_exists(model_path(TINY), "bf16")  # chat would not use it either


def test_flipped_byte(cache_root, capsys):
    result = build_cache(model_path(TINY), "bf16", progress=False)
    shard = result.paths.shard(READY, "layer-003")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    line = _one_error_line(*cli_main(capsys, "cache", "verify", str(model_path(TINY)))[::2])
    assert "ready/layer-003.pt" in line and "corrupt" in line and "build-cache" in line
    assert build_cache(model_path(TINY), "bf16", progress=False).written == 1  # and the fix works


def test_manifest_from_another_format_version(cache_root, capsys):
    result = build_cache(model_path(TINY), "bf16", progress=False)
    manifest = json.loads(result.paths.manifest.read_text())
    manifest["format_version"] = S.CACHE_FORMAT_VERSION + 1
    result.paths.manifest.write_text(json.dumps(manifest))
    line = _one_error_line(*cli_main(capsys, "cache", "verify", str(model_path(TINY)))[::2])
    assert MANIFEST in line and "format version" in line and "build-cache" in line
    assert build_cache(model_path(TINY), "bf16", progress=False).written == 6  # all stale


def test_changed_source_checkpoint(cache_root, tiny_copy, capsys):
    from safetensors.torch import load_file, save_file

    build_cache(tiny_copy, "bf16", progress=False)
    weights = tiny_copy / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()  # a different checkpoint
    save_file(tensors, weights, metadata={"format": "pt"})
    line = _one_error_line(*cli_main(capsys, "cache", "verify", str(tiny_copy))[::2])
    assert "model.safetensors" in line and "changed" in line and "build-cache" in line
    _, _, problems = find_ready(tiny_copy, "bf16")
    assert problems and "source checkpoint changed" in problems[0].message
    code, out, err = cli_main(capsys, "cache", "rm", str(tiny_copy))
    assert code == 0 and not list_entries(tiny_copy)


def test_cache_ls_and_rm(cache_root, capsys):
    build_cache(model_path(TINY), "bf16", progress=False)
    code, out, _ = cli_main(capsys, "cache", "ls")
    assert code == 0 and "ready complete" in out and TINY in out
    code, out, _ = cli_main(capsys, "cache", "verify", str(model_path(TINY)))
    assert code == 0 and "checksums match" in out
    assert cli_main(capsys, "cache", "rm")[0] != 0  # neither MODEL nor --all
    code, out, _ = cli_main(capsys, "cache", "rm", str(model_path(TINY)))
    assert code == 0 and "removed 1 entry" in out and not list_entries()
    entries, problems = verify(model_path(TINY).resolve())
    assert entries == [] and problems == []


# ------------------------------------------------------------------------------------------- lock


def test_second_concurrent_build_refuses_clearly_or_waits(cache_root):
    first = build_cache(model_path(TINY), "bf16", layers=1, progress=False)
    env = {**os.environ, S.ENV_CACHE: str(cache_root)}
    with CacheLock(first.paths.dir):  # a build in progress, as far as anyone else can tell
        refused = run_cli("build-cache", str(model_path(TINY)), "--dtype", "bf16", env=env)
        assert refused.returncode != 0
        line = refused.stderr.strip().splitlines()[-1]
        assert f"another build-cache (pid {os.getpid()})" in line and "--wait" in line
        assert "Traceback" not in refused.stderr
    # --wait: queue behind the holder, then finish.
    lock = CacheLock(first.paths.dir).__enter__()
    released = threading.Event()

    def release():
        time.sleep(1.0)
        lock.__exit__(None, None, None)
        released.set()

    threading.Thread(target=release, daemon=True).start()
    waited = run_cli("build-cache", str(model_path(TINY)), "--dtype", "bf16", "--wait", env=env)
    assert waited.returncode == 0 and released.is_set(), waited.stderr
    assert "ready tier complete" in waited.stdout
