"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): qkv bias, no q/k norm, and a shared expert.

The shared expert is a dense SwiGLU MLP every token runs, scaled by
``sigmoid(shared_expert_gate(x))`` and added to the routed experts' output. Everything
else is the Qwen3-MoE decoder, so this file only translates the config.
"""

from __future__ import annotations

import dataclasses

from qwen_runner.models import qwen3_moe
from qwen_runner.models.qwen3_moe import ModelArgs, checkpoint_state  # noqa: F401 - re-exported API

ARCHITECTURE = "Qwen2MoeForCausalLM"


def args_from_config(config: dict) -> ModelArgs:
    base = qwen3_moe.args_from_config({**config, "attention_bias": config.get("qkv_bias", True)})
    return dataclasses.replace(
        base,
        qk_norm=False,
        shared_expert_intermediate_size=config.get("shared_expert_intermediate_size") or None,
    )


class Model(qwen3_moe.Model):
    architecture = ARCHITECTURE
    args_from_config = staticmethod(args_from_config)
