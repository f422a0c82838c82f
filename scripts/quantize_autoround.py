#!/usr/bin/env python
"""Quantize a checkpoint with auto-round itself (RTN, iters=0), offline, into an AutoRound checkpoint.

    python scripts/quantize_autoround.py SRC OUT [--bits 4] [--group-size 128] [--asym]
        [--recipe plain|mixed] [--format auto_round|auto_gptq] [--keep-16bit SUBSTRING ...]

Run it as its own process (make_test_models.py does): auto-round patches transformers process-wide
and silently breaks plain models loaded later in the same process.

Recipes:
* ``plain``: every linear at ``--bits`` except routers (``mlp.gate``), ``shared_expert_gate`` and
  lm_head, which stay 16-bit (auto-round's defaults for MoE routers, made explicit).
* ``mixed``: routed experts at ``--bits``, every other linear int8, routers/gates/lm_head 16-bit.

Learned the hard way:
* auto-round's ``layer_config`` regex keys did not reach every layer, so overrides are expanded to the
  explicit layer names of the model here;
* a linear whose input is not a multiple of the group size (or too few outputs to pack) is kept
  16-bit explicitly, e.g. the tiny Qwen3-Next's ``in_proj_ba`` (8 outputs) -- otherwise auto-round
  skips it with a warning and the config would not say so;
* the ``auto_round`` packing stores zero points as-is, ``auto_gptq`` stores them minus 1; our reader
  (qwen_runner.models.quantized) handles both, and tests compare against auto-round's own kernels.

Calibration text is local (this repository's README and docs): RTN does not need much, and there is
no dataset hub here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("quantize_autoround")

REPO = Path(__file__).resolve().parent.parent
ROUTER_SUFFIXES = (".mlp.gate", ".shared_expert_gate")
PACK_MIN_OUT = 16  # outputs per int32 qzeros word at 2 bits; smaller layers stay 16-bit
CALIBRATION_SAMPLES = 8
CALIBRATION_SEQLEN = 64


def calibration_text() -> list[str]:
    """Paragraphs from the repository's own docs: local, deterministic, English + code."""
    text = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if path.is_file():
            text += [p for p in path.read_text().split("\n\n") if len(p) > 200]
    if not text:
        text = ["The quick brown fox jumps over the lazy dog. " * 40]
    return (text * CALIBRATION_SAMPLES)[:CALIBRATION_SAMPLES]


def layer_plan(model, bits: int, group_size: int, sym: bool, recipe: str, keep: list[str]) -> dict[str, dict]:
    """Explicit per-layer config for every nn.Linear (auto-round's regex keys missed layers)."""
    import torch

    plan = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name == "lm_head" or name.endswith(ROUTER_SUFFIXES) or any(k in name for k in keep):
            plan[name] = {"bits": 16, "data_type": "float"}
            continue
        if module.in_features % group_size or module.out_features < PACK_MIN_OUT:
            log.info("%s: %s too small for group %d, kept 16-bit", name, tuple(module.weight.shape), group_size)
            plan[name] = {"bits": 16, "data_type": "float"}
            continue
        layer_bits = bits if recipe == "plain" or ".experts." in name else 8
        plan[name] = {"bits": layer_bits, "group_size": group_size, "sym": sym}
    return plan


def quantize(src: Path, out: Path, bits: int, group_size: int, sym: bool, recipe: str, fmt: str,
             keep: list[str]) -> None:
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(src)
    plan = layer_plan(model, bits, group_size, sym, recipe, keep)
    threads = torch.get_num_threads()
    rounder = AutoRound(
        model, tokenizer, bits=bits, group_size=group_size, sym=sym, iters=0, disable_opt_rtn=True, layer_config=plan,
        dataset=calibration_text(), nsamples=CALIBRATION_SAMPLES, seqlen=CALIBRATION_SEQLEN, device_map="cpu",
    )
    rounder.quantize_and_save(str(out), format=fmt)
    _flatten(out)
    torch.set_num_threads(threads)  # auto-round resets the thread count
    check_config(out, fmt)


def _flatten(out: Path) -> None:
    """auto-round saves into ``OUT/<model>-w4g128/``; move the files up to OUT."""
    if (out / "config.json").exists():
        return
    (sub,) = [p for p in out.iterdir() if (p / "config.json").exists()]
    for item in sub.iterdir():
        item.rename(out / item.name)
    sub.rmdir()


def check_config(out: Path, fmt: str) -> None:
    """Fail unless the written config says what we expect the runner to read."""
    config = json.loads((out / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") not in ("auto-round", "gptq"):
        raise RuntimeError(f"{out}: unexpected quantization_config {qc}")
    log.info("%s: %s packing %s, %d per-layer overrides", out.name, qc.get("quant_method"),
             qc.get("packing_format", fmt), len(qc.get("extra_config") or {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--asym", action="store_true")
    parser.add_argument("--recipe", choices=("plain", "mixed"), default="plain")
    parser.add_argument("--format", dest="fmt", choices=("auto_round", "auto_gptq"), default="auto_round")
    parser.add_argument("--keep-16bit", action="append", default=[], help="substring of layer names kept 16-bit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quantize(args.src, args.out, args.bits, args.group_size, not args.asym, args.recipe, args.fmt, args.keep_16bit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
