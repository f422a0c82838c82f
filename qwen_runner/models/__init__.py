"""Our model code, one module per architecture, and ``load()`` that builds a runnable model.

``ARCHITECTURES`` maps config.json's ``architectures[0]`` to the module implementing it,
by module *name*: modules are imported on first use, so a missing or broken one only
affects its own architecture. Each module exposes:

- ``Model``: an ``nn.Module`` with ``Model.from_config(config: dict)`` (the HF config.json
  as a dict), ``make_cache(max_context)``, ``forward(input_ids [1, T], cache, last_only=False)``
  -> float32 logits ``[1, T or 1, vocab]``, ``config_args`` (a dataclass) and ``architecture``.
- ``checkpoint_state(reader, args, dtype)``: yields ``(param_name, tensor)`` from the published
  per-expert checkpoint keys (stacking experts, fusing qkv and gate/up, casting).
"""

from __future__ import annotations

from qwen_runner.models.loader import ARCHITECTURES, build_model, load, model_state_from_checkpoint

__all__ = ["ARCHITECTURES", "build_model", "load", "model_state_from_checkpoint"]
