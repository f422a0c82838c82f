"""Load MODEL with our model code, allocate the cache for MAX_CONTEXT, decode a few tokens; print JSON.

Run in a fresh process by tests/test_planner.py so the peak RSS (VmHWM) is this run's alone:
    python tests/helpers/measure_run_rss.py MODEL MAX_CONTEXT DTYPE
"""

from __future__ import annotations

import json
import sys

from qwen_runner.memory import peak_rss_bytes
from qwen_runner.threads import configure_threads

PROMPT_TOKENS = 16
DECODE_TOKENS = 8


def main() -> None:
    model_dir, max_context, dtype_name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    configure_threads(1)
    import torch

    from qwen_runner.models import load

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype_name]
    model, _tokenizer, _spec = load(model_dir, dtype=dtype)
    cache = model.make_cache(max_context)
    ids = torch.arange(100, 100 + PROMPT_TOKENS).reshape(1, -1)
    for _ in range(DECODE_TOKENS):
        logits = model(ids, cache, last_only=True)
        ids = logits[:, -1].argmax(-1, keepdim=True)
    peak = peak_rss_bytes()  # VmHWM: ru_maxrss would include the forking test process
    print(json.dumps({"peak_rss": peak, "cache_nbytes": cache.nbytes()}))


if __name__ == "__main__":
    main()
