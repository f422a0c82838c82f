"""`--backend ipex` in .venv-ipex (torch 2.8 + IPEX 2.8 + transformers 4.51.3: `make test-ipex`).

Skipped wherever IPEX is not usable (the main env); there the one-line error is tested instead
(tests/test_backends.py). References: plain transformers 4.51 in this env (computed before IPEX is
imported), and the main env's transformers 5.23 (+ auto-round for the int4 checkpoint, which this
suite makes with auto-round RTN) in a separate process: $QWEN_RUNNER_REFERENCE_PYTHON, else
.venv/bin/python; those tests skip when neither exists.

With QWEN_RUNNER_REQUIRE_IPEX=1 (set by `make test-ipex`, which CI runs) each of those skips is a
failure instead: in .venv-ipex a missing piece must not pass as "skipped".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qwen_runner.backends import ipex_status

REQUIRED = os.environ.get("QWEN_RUNNER_REQUIRE_IPEX") == "1"


def skip_or_fail(reason: str):
    """A skip, or with QWEN_RUNNER_REQUIRE_IPEX=1 a failure."""
    if REQUIRED:
        pytest.fail(f"{reason} (QWEN_RUNNER_REQUIRE_IPEX=1: required here)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module", autouse=True)
def ipex_usable():
    """Module-scoped so that it runs before int4_checkpoint (an auto-round run) where IPEX is missing."""
    status = ipex_status()
    if not status.usable:
        skip_or_fail(f"IPEX not usable here: {status.detail}")


MODEL = "tiny-qwen3-moe"
PROMPT = [785, 6722, 315, 9625, 374]  # ordinary token ids
STEPS = 16


def reference(dtype):
    """Plain transformers: greedy tokens and the last prompt position's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_runner.backends.ipex import _hf_config
    from qwen_runner.models.loader import read_config
    from tests.conftest import model_path

    path = model_path(MODEL)
    model = AutoModelForCausalLM.from_pretrained(path, config=_hf_config(path, read_config(path)), torch_dtype=dtype)
    with torch.inference_mode():
        ids = torch.tensor([PROMPT])
        logits = model(ids).logits[0, -1].float()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False,
                             pad_token_id=0)
    return out[0, len(PROMPT):].tolist(), logits


def ours(dtype: str):
    import torch

    from qwen_runner.runtime import open_model
    from tests.conftest import model_path

    loaded = open_model(str(model_path(MODEL)), dtype, "ipex")
    cache = loaded.model.make_cache(len(PROMPT) + STEPS + 1)
    logits = loaded.model(torch.tensor([PROMPT]), cache, last_only=True)[0, -1]
    first, tokens = logits, []
    for _ in range(STEPS):
        tokens.append(int(logits.argmax()))
        logits = loaded.model(torch.tensor([[tokens[-1]]]), cache, last_only=True)[0, -1]
    return loaded, tokens, first


def test_ipex_matches_transformers_fp32_and_bf16():
    import torch

    ref_tokens, ref_logits = reference(torch.float32)
    loaded, tokens, logits = ours("fp32")
    assert loaded.backend == "ipex" and loaded.dtype.dtype == "fp32" and not loaded.precision.fallbacks
    assert tokens == ref_tokens
    assert torch.nn.functional.cosine_similarity(logits, ref_logits, dim=0) > 0.9999
    _loaded, _tokens, bf16_logits = ours("bf16")
    assert torch.nn.functional.cosine_similarity(bf16_logits, ref_logits, dim=0) > 0.99


def test_ipex_kernel_error_walks_down_the_chain(monkeypatch):
    import intel_extension_for_pytorch as ipex
    import torch

    real = ipex.llm.optimize

    def optimize(model, dtype=torch.float32, **kwargs):
        if dtype == torch.bfloat16:
            raise RuntimeError("injected: no bf16 kernel")
        return real(model, dtype=dtype, **kwargs)

    monkeypatch.setattr(ipex.llm, "optimize", optimize)
    loaded, tokens, _logits = ours("bf16")
    assert loaded.dtype.dtype == "fp32" and loaded.precision.fallbacks[0]["dtype"] == "bf16"
    assert len(tokens) == STEPS


def test_ipex_refuses_other_architectures():
    from qwen_runner.errors import UnsupportedModelError
    from qwen_runner.runtime import open_model
    from tests.conftest import model_path

    with pytest.raises(UnsupportedModelError, match="backend ipex supports Qwen3MoeForCausalLM only"):
        open_model(str(model_path("tiny-qwen3-next")), "fp32", "ipex")


REFERENCE_PYTHON = Path(os.environ.get("QWEN_RUNNER_REFERENCE_PYTHON", Path(__file__).parent.parent / ".venv/bin/python"))
# Runs in the main env: greedy tokens and last-position logits of transformers (+ auto-round) on MODEL.
REFERENCE = """
import json, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.inference_mode():
    torch.save(m(ids).logits[0, -1].float(), sys.argv[3])
    out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(sys.argv[4]), do_sample=False,
                     pad_token_id=0)
print(json.dumps(out[0, ids.shape[1]:].tolist()))
"""
# Runs in the main env: an int4 W4 RTN checkpoint of MODEL made by auto-round (group 16: the tiny model's
# 32-wide down_proj as one group of 32 makes IPEX's int4 prepack fail with an IndexError).
MAKE_INT4 = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from auto_round import AutoRound
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
text = [" ".join(["In the beginning God created the heaven and the earth."] * 8)] * 8
AutoRound(model, AutoTokenizer.from_pretrained(sys.argv[1]), bits=4, group_size=16, sym=True, iters=0, dataset=text,
          seqlen=32, nsamples=8).quantize_and_save(sys.argv[2], format="auto_round")
"""


def main_env(*args: str, timeout: int = 600) -> str:
    if not REFERENCE_PYTHON.exists():
        skip_or_fail(f"no main env for the reference ({REFERENCE_PYTHON}); set QWEN_RUNNER_REFERENCE_PYTHON")
    result = subprocess.run([str(REFERENCE_PYTHON), "-c", *args], capture_output=True, text=True, timeout=timeout,
                            cwd="/tmp")
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def main_env_reference(path: Path, tmp_path: Path):
    import torch

    tokens = json.loads(main_env(REFERENCE, str(path), json.dumps(PROMPT), str(tmp_path / "ref.pt"), str(STEPS)))
    return tokens, torch.load(tmp_path / "ref.pt", weights_only=True)


@pytest.fixture(scope="module")
def int4_checkpoint(tmp_path_factory):
    """auto-round RTN int4 of the tiny Qwen3-MoE, with the original tokenizer files: the ones auto-round
    re-saves with transformers 5 (``extra_special_tokens`` as a list) do not load under 4.51."""
    from tests.conftest import model_path

    out = tmp_path_factory.mktemp("int4")
    main_env(MAKE_INT4, str(model_path(MODEL)), str(out))
    (made,) = [p for p in out.iterdir() if (p / "config.json").is_file()]
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.json"):
        shutil.copy(model_path(MODEL) / name, made / name)
    return made


def test_ipex_matches_transformers_5_on_a_5x_saved_checkpoint(tmp_path):
    """The 5.x-written config (num_local_experts, rope_parameters) read right: same tokens as 5.23."""
    import torch

    from tests.conftest import model_path

    ref_tokens, ref_logits = main_env_reference(model_path(MODEL), tmp_path)
    _loaded, tokens, logits = ours("fp32")
    assert tokens == ref_tokens
    assert torch.nn.functional.cosine_similarity(logits, ref_logits, dim=0) > 0.9999


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_ipex_woq_int4_matches_auto_round(int4_checkpoint, tmp_path, dtype):
    """IPEX weight-only int4 from the AutoRound checkpoint vs transformers + auto-round (separate process)."""
    import torch

    from qwen_runner.runtime import open_model

    ref_tokens, ref_logits = main_env_reference(int4_checkpoint, tmp_path)
    loaded = open_model(str(int4_checkpoint), dtype, "ipex")
    kinds = {type(m).__name__ for m in loaded.model.hf.modules()}
    assert "WeightOnlyQuantizedLinear" in kinds
    cache = loaded.model.make_cache(len(PROMPT) + STEPS + 1)
    logits = loaded.model(torch.tensor([PROMPT]), cache, last_only=True)[0, -1]
    assert torch.nn.functional.cosine_similarity(logits, ref_logits, dim=0) > 0.999
    tokens = []
    for _ in range(STEPS):
        tokens.append(int(logits.argmax()))
        logits = loaded.model(torch.tensor([[tokens[-1]]]), cache, last_only=True)[0, -1]
    assert tokens == ref_tokens
