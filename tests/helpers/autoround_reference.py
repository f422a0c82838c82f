"""Reference run for the int4 parity tests: transformers + auto-round on an AutoRound checkpoint.

    python tests/helpers/autoround_reference.py MODEL DTYPE OUT.pt PROMPT_IDS(comma-separated) NEW_TOKENS

Run as its own process: loading an AutoRound checkpoint makes auto-round patch transformers
process-wide, which silently breaks plain models loaded later in the same process.
Writes ``{"logits": [T, vocab] fp32 of the prompt, "tokens": greedy continuation}``.
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM


BACKEND = "torch"


def main() -> None:
    model_dir, dtype, out, prompt, new_tokens = sys.argv[1:6]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    ids = torch.tensor([[int(t) for t in prompt.split(",")]])
    from transformers import AutoRoundConfig

    # auto-round's plain torch backend dequantizes in the model dtype: in fp32 it is exact, while the
    # default CPU kernel (auto-round-lib) rounds internally and the chaotic tiny models amplify that.
    # auto_round:auto_awq (asym) has no torch backend: auto-round's choice there.
    packing = json.load(open(f"{model_dir}/config.json"))["quantization_config"].get("packing_format", "")
    backend = AutoRoundConfig(backend="auto" if "awq" in packing else BACKEND)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map="cpu", quantization_config=backend)
    # auto-round casts the whole model to fp16 when one chosen backend lists no fp32 (Qwen3-Next here);
    # its torch kernels run in any dtype, so cast back to the dtype asked for.
    model.to(dtype).eval()
    with torch.inference_mode():
        logits = model(ids).logits[0].float()
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0,
                                   max_new_tokens=int(new_tokens),
                                   min_new_tokens=int(new_tokens), do_sample=False)
    torch.save({"logits": logits, "tokens": generated[0, ids.shape[1]:].tolist()}, out)


if __name__ == "__main__":
    main()
