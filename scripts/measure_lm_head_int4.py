#!/usr/bin/env python
"""Accuracy of the RTN int4 lm_head (``--lm-head int4``) against the 16-bit head, per group size.

One teacher-forced forward over real text (this repository's README and docs) captures the final
normed hidden states (the lm_head's input); the 16-bit head and an int4 copy per group size then map the
same hidden states to logits. Reported per group: logits cosine (median and min over positions) and
top-1 agreement (the greedy next token the two heads pick at each position), the int4 head's top-1 inside
the 16-bit head's top 5, and the mean KL divergence of the int4 head's next-token distribution from the
16-bit one's. For scale, the same figures for the 16-bit head computed in fp32 (weights and hidden
upcast) against the bf16 head: the noise the bf16 head itself already has. ``--time`` adds the one-row
(decode) head matmul time per group on this process's threads, against the 16-bit head.

    python scripts/measure_lm_head_int4.py models/demo models/bench-qwen3-moe-int4 --tokens 512
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEXT_FILES = ("README.md", "docs/cache.md", "docs/quantization.md")


def compare(out, ref) -> dict:
    import torch

    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    top5 = ref.topk(5, dim=-1).indices
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {"cosine_median": cos.median().item(), "cosine_min": cos.min().item(),
            "top1_agreement": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "top1_in_ref_top5": (top5 == out.argmax(-1, keepdim=True)).any(-1).float().mean().item(),
            "kl_mean": kl.mean().item()}


def timed(fn, repeats: int = 20) -> float:
    import time

    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(model_dir: Path, tokens: int, dtype_name: str, groups: list[int], time_it: bool = False) -> dict:
    import torch

    from qwen_runner.models import load
    from qwen_runner.models.quantized import int4_mm, quantize_lm_head

    dtype = getattr(torch, dtype_name)
    model, tokenizer, _ = load(model_dir, dtype)
    text = "\n\n".join((REPO / name).read_text() for name in TEXT_FILES)
    ids = tokenizer.encode(text)[:tokens]
    captured = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
    with torch.inference_mode():
        model(torch.tensor([ids]), model.make_cache(len(ids) + 1))
    hook.remove()
    hidden = captured[0].reshape(len(ids), -1)
    weight = model.lm_head.weight
    with torch.inference_mode():
        ref = model.lm_head(hidden).float()
        rows = {"fp32_head_vs_16bit": compare(hidden.float() @ weight.float().t(), ref)}
        if time_it:
            one = hidden[-1:].contiguous()
            rows["fp32_head_vs_16bit"]["decode_ms_16bit"] = timed(lambda: model.lm_head(one)) * 1e3
        for group in groups:
            packed, sz = quantize_lm_head(weight, dtype, group)
            used = packed.shape[-1] * 2 // sz.shape[0]
            out = int4_mm(hidden, packed, sz).float()
            rows[str(group)] = {"group_used": used, **compare(out, ref), "head_bytes": packed.nbytes + sz.nbytes}
            if time_it:
                rows[str(group)]["decode_ms"] = timed(lambda: int4_mm(one, packed, sz)) * 1e3
    return {"model": model_dir.name, "dtype": dtype_name, "tokens": len(ids), "head_shape": list(weight.shape),
            "head_bytes_16bit": weight.nbytes, "groups": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--groups", default="32,64,128")
    parser.add_argument("--time", action="store_true", help="also time the one-row head matmul per group")
    args = parser.parse_args()
    for model_dir in args.models:
        print(json.dumps(measure(model_dir, args.tokens, args.dtype, [int(g) for g in args.groups.split(",")],
                                 args.time)))


if __name__ == "__main__":
    main()
