"""Starting from the ready tier reads no safetensors header and never imports transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_runner import settings as S
from qwen_runner.cache import build_cache
from qwen_runner.cache import manifest as M
from qwen_runner.checkpoint import inspect_checkpoint
from tests.conftest import REPO, model_path

TINY = "tiny-qwen3-next"


@pytest.fixture
def built(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(S.ENV_CACHE, str(root))
    build_cache(model_path(TINY), "bf16", progress=False)
    return root


def _no_inspect(monkeypatch):
    import qwen_runner.checkpoint as C

    def refuse(*_args, **_kwargs):
        raise AssertionError("the ready path must not inspect the checkpoint")

    monkeypatch.setattr(C, "inspect_checkpoint", refuse)


def test_manifest_spec_round_trips_everything_the_planner_reads():
    path = model_path(TINY).resolve()
    spec = inspect_checkpoint(path)
    restored = M.spec_from_record(json.loads(json.dumps(M.spec_record(spec))), path)
    assert restored.summary() == spec.summary()
    assert restored.config == spec.config and restored.quant == spec.quant and restored.shards == spec.shards
    assert restored.largest_unit_bytes == spec.largest_unit_bytes
    assert restored.largest_tensor_bytes == spec.largest_tensor_bytes
    assert restored.kv_bytes_per_token(2) == spec.kv_bytes_per_token(2)
    assert restored.recurrent_state_bytes(4, 2) == spec.recurrent_state_bytes(4, 2) > 0
    assert M.spec_from_record({"config": {}}, path) is None


def test_open_model_from_ready_tier_reads_the_spec_from_the_manifest(built, monkeypatch):
    from qwen_runner.runtime import open_model

    expected = inspect_checkpoint(model_path(TINY).resolve()).summary()
    _no_inspect(monkeypatch)
    loaded = open_model(str(model_path(TINY)), "bf16")
    assert loaded.from_ready and loaded.spec.summary() == expected


def test_planner_run_check_uses_the_manifest_spec(built, monkeypatch):
    from qwen_runner.planner import RUN, require

    _no_inspect(monkeypatch)
    plan = require(str(model_path(TINY)), RUN, compute_dtype="bf16", budget="64G")
    assert plan.stages[RUN].verdict == "ok"


def test_changed_checkpoint_is_not_trusted(built, tmp_path, monkeypatch):
    """The spec is only as good as the fingerprint: a different config.json makes the ready tier stale."""
    import shutil

    from qwen_runner.cache.load import ready_spec

    copy = tmp_path / "copy" / TINY
    shutil.copytree(model_path(TINY), copy)
    build_cache(copy, "bf16", progress=False)
    assert ready_spec(copy.resolve(), "bf16") is not None
    config = json.loads((copy / "config.json").read_text())
    config["max_position_embeddings"] += 1
    (copy / "config.json").write_text(json.dumps(config))
    assert ready_spec(copy.resolve(), "bf16") is None


def test_generate_from_ready_tier_imports_no_transformers_or_safetensors(built):
    code = (
        "import sys\n"
        "from qwen_runner.cli import main\n"
        f"main(['-v', 'generate', {str(model_path(TINY))!r}, '--prompt', 'Hi', '--max-tokens', '2', '--dtype', 'bf16'])\n"
        "print('imported:', sorted(m for m in ('transformers', 'safetensors') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True, timeout=300)
    assert "ready tier" in out.stderr
    # Only what the ready path uses: no transformers, and no safetensors (no checkpoint tensor is read).
    assert out.stdout.strip().splitlines()[-1] == "imported: []"
