"""The optional IPEX backend: ``ipex.llm.optimize`` on the transformers model (Qwen3-MoE only).

IPEX 2.8 was Intel's last release; it pins torch 2.8 and validates transformers 4.51.3, so it runs
in its own env (``make ipex-venv`` -> ``.venv-ipex``). IPEX repacks weights at load time (it has no
cache tier of ours). An int4 (AutoRound/GPTQ-packed) checkpoint becomes IPEX weight-only int4
(``low_precision_checkpoint``); a float one runs in the chosen dtype. Kernel errors walk the same
fp16 -> bf16 -> fp32 chain as native (``runtime.open_model``).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from qwen_runner.backends import IPEX_REQUIREMENT, ipex_status
from qwen_runner.backends.base import Backend
from qwen_runner.backends.native import probe_kernels
from qwen_runner.errors import ContextOverflowError, UnsupportedModelError

log = logging.getLogger(__name__)

SUPPORTED = ("Qwen3MoeForCausalLM",)  # what ipex.llm.optimize 2.8 has a fused path for, of ours
WOQ_GROUP_SIZE = 128


class HFCache:
    """transformers' past_key_values (IPEX's own format after llm.optimize) plus the token count."""

    def __init__(self, max_context: int):
        self.max_context, self.length, self.past = max_context, 0, None

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_context:
            raise ContextOverflowError(f"{self.length} cached + {new_tokens} new tokens exceed the context of "
                                       f"{self.max_context}")

    def truncate(self, n: int) -> bool:
        """IPEX's cache cannot be cut: only a no-op succeeds (callers then start a fresh cache)."""
        return n == self.length


class IpexModel:
    """Our model interface (``make_cache``, ``forward(ids [1, T], cache, last_only)``) over an IPEX model."""

    architecture = "Qwen3MoeForCausalLM (ipex)"

    def __init__(self, hf_model, dtype):
        self.hf, self.dtype = hf_model, dtype

    def make_cache(self, max_context: int) -> HFCache:
        return HFCache(max_context)

    def __call__(self, input_ids, cache: HFCache, last_only: bool = False):
        return self.forward(input_ids, cache, last_only)

    def forward(self, input_ids, cache: HFCache, last_only: bool = False):
        import torch

        length = input_ids.shape[-1]
        cache.check_room(length)
        total = cache.length + length
        with torch.inference_mode(), torch.autocast("cpu", enabled=self.dtype != torch.float32, dtype=self.dtype):
            out = self.hf(input_ids=input_ids, attention_mask=torch.ones((1, total), dtype=torch.long),
                          position_ids=torch.arange(cache.length, total).unsqueeze(0),
                          past_key_values=cache.past, use_cache=True, return_dict=True)
        cache.past, cache.length = out.past_key_values, total
        logits = out.logits[:, -1:] if last_only else out.logits
        return logits.float()

    def eval(self):
        return self


def _hf_config(path: Path, config: dict):
    """transformers 4.51's config of a checkpoint that 5.x may have written: 5.x writes
    ``num_local_experts`` where 4.51 reads ``num_experts`` (default 128), and ``rope_parameters``
    where 4.51 reads ``rope_theta`` (default 10000: silently different logits, cosine 0.995 here)."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path)
    if "num_local_experts" in config and "num_experts" not in config:
        hf_config.num_experts = config["num_local_experts"]
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        hf_config.rope_theta = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
        hf_config.rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if getattr(hf_config, "quantization_config", None) is not None:
        del hf_config.quantization_config  # IPEX takes the int4 weights itself (low_precision_checkpoint)
    return hf_config


def _woq_int4(path: Path, quant: dict, dtype: str) -> dict:
    """ipex.llm.optimize kwargs for an int4 GPTQ-packed (AutoRound auto_gptq) checkpoint; the int4
    matmuls compute in the chain's dtype (lowp_mode), so a dtype that raises steps down here too."""
    import intel_extension_for_pytorch as ipex
    from safetensors.torch import load_file

    q = ipex.quantization
    group = int(quant.get("group_size", WOQ_GROUP_SIZE))
    lowp = {"fp16": q.WoqLowpMode.FP16, "bf16": q.WoqLowpMode.BF16, "fp32": q.WoqLowpMode.NONE}[dtype]
    qconfig = q.get_weight_only_quant_qconfig_mapping(weight_dtype=q.WoqWeightDtype.INT4, lowp_mode=lowp,
                                                      group_size=group)
    state = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(shard))
    low = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": bool(quant.get("desc_act", False)),
           "sym": bool(quant.get("sym", True))}
    return {"quantization_config": qconfig, "low_precision_checkpoint": (state, low)}


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


class IpexBackend(Backend):
    name = "ipex"
    has_cache_layout = False

    def status(self):
        return ipex_status()

    def install_hint(self) -> str:
        return f"needs {IPEX_REQUIREMENT}: `make ipex-venv`, then `.venv-ipex/bin/qwen-runner ... --backend ipex`"

    def probe(self, dtype: str) -> None:
        probe_kernels(dtype)

    def load(self, path: Path, dtype: str):
        import intel_extension_for_pytorch as ipex
        import torch
        from transformers import AutoModelForCausalLM

        from qwen_runner.checkpoint import inspect_checkpoint
        from qwen_runner.models.loader import load_tokenizer, read_config
        from qwen_runner.precision import DtypeChoice

        config = read_config(path)
        arch = (config.get("architectures") or ["?"])[0]
        if arch not in SUPPORTED:
            raise UnsupportedModelError(f"backend ipex supports {', '.join(SUPPORTED)} only, not {arch}",
                                        "run it with --backend native")
        torch_dtype = DtypeChoice(dtype, "").torch_dtype()
        quant = config.get("quantization_config")
        with _quiet_transformers():  # an int4 checkpoint's float weights are "missing": IPEX fills them next
            model = AutoModelForCausalLM.from_pretrained(path, config=_hf_config(path, config), torch_dtype=torch_dtype)
        model.eval()
        extra = _woq_int4(path, quant, dtype) if quant and int(quant.get("bits", 16)) == 4 else {}
        model = ipex.llm.optimize(model, dtype=torch_dtype, inplace=True, deployment_mode=False, **extra)
        log.info("ipex.llm.optimize applied (%s%s)", dtype, ", weight-only int4" if extra else "")
        return IpexModel(model, torch_dtype), load_tokenizer(path), inspect_checkpoint(path)


BACKEND = IpexBackend()
