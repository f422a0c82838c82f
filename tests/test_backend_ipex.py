"""`--backend ipex` in .venv-ipex (torch 2.8 + IPEX 2.8 + transformers 4.51.3: `make test-ipex`).

Skipped wherever IPEX is not usable (the main env); there the one-line error is tested instead
(tests/test_backends.py). The reference is plain transformers in the same env, computed before
IPEX is imported.
"""

from __future__ import annotations

import pytest

from qwen_runner.backends import ipex_status

pytestmark = pytest.mark.skipif(not ipex_status().usable, reason=f"IPEX not usable here: {ipex_status().detail}")

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
