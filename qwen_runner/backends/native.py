"""The default backend: stock PyTorch CPU kernels (oneDNN/MKL matmuls, torch's SDPA).

Its optimized tier is our own layout (fused qkv and gate+up, experts stacked ``[E, ...]``) cast to the
chosen dtype; its ready tier is the optimized tier made contiguous, so nothing is written twice.
"""

from __future__ import annotations

import re
from pathlib import Path

from qwen_runner.backends import native_status
from qwen_runner.backends.base import Backend, Units

_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.")
EMBED_UNIT, HEAD_UNIT = "embed", "head"
PROBE_SIZE = 64  # tiny: the probe is about whether the kernels exist for a dtype, not their speed


def layer_unit(index: int) -> str:
    return f"layer-{index:03d}"


def probe_kernels(dtype: str) -> None:
    """One call of each kernel family the models run (linear, batched matmul, SDPA, norms, softmax)."""
    import torch
    import torch.nn.functional as F

    from qwen_runner.precision import TORCH_DTYPE_NAMES

    t = getattr(torch, TORCH_DTYPE_NAMES[dtype])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, PROBE_SIZE, generator=g).to(t)
    w = torch.randn(3, PROBE_SIZE, PROBE_SIZE, generator=g).to(t)
    with torch.inference_mode():
        F.linear(x, w[0])
        torch.bmm(x.expand(3, -1, -1), w)
        q = x.view(1, 2, 2, PROBE_SIZE // 2).transpose(1, 2)
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
        F.rms_norm(x.float(), (PROBE_SIZE,)).to(t)
        torch.softmax(x.float(), -1)
        F.silu(x) * x


class NativeBackend(Backend):
    name = "native"

    def status(self):
        return native_status()

    def probe(self, dtype: str) -> None:
        probe_kernels(dtype)

    def optimize(self, model_dir: Path, config: dict, dtype: str, units: list[str],
                 lm_head: str = "checkpoint") -> Units:
        """Our layout in the chosen dtype, grouped per unit from the streaming converter."""
        from qwen_runner.models import model_state_from_checkpoint
        from qwen_runner.precision import DtypeChoice

        wanted = set(units)
        state = model_state_from_checkpoint(model_dir, DtypeChoice(dtype, "").torch_dtype(), config, lm_head)
        current, bucket = None, {}
        try:
            for name, tensor in state:
                match = _LAYER_RE.match(name)
                if match:
                    unit = layer_unit(int(match.group(1)))
                else:
                    unit = EMBED_UNIT if current in (None, EMBED_UNIT) else HEAD_UNIT
                if unit != current and bucket:
                    yield current, bucket
                    bucket = {}
                if unit not in wanted:  # a --layers N partial build: stop converting
                    return
                current = unit
                bucket[name] = tensor
            if bucket:
                yield current, bucket
        finally:
            state.close()

    def ready(self, optimized: Units, dtype: str) -> Units:
        """Contiguity only (a view would drag its whole storage into the shard)."""
        for unit, tensors in optimized:
            ready = {name: t.contiguous() for name, t in tensors.items()}
            del tensors  # neither name may keep this unit alive while the next one is converted
            yield unit, ready
            del ready

    def prepare(self, model, dtype: str):
        return model.eval()


BACKEND = NativeBackend()
