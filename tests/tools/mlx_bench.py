#!/usr/bin/env python3
"""Baseline for `kimi-actors bench`: mlx-lm's own engine (CPU) on the same checkpoint and machine.
Prefills N pseudo-random tokens in one call, then decodes M tokens greedily through the KV cache.
Test tooling only (needs `mlx`, `mlx-lm`). Prints one JSON object.

Usage: python tests/tools/mlx_bench.py MODEL_DIR [PROMPT_TOKENS] [DECODE_TOKENS]
"""
import json, sys, time
import mlx.core as mx
from mlx_lm.utils import load_model
from mlx_lm.models.cache import make_prompt_cache

model_dir = sys.argv[1]
n_prompt = int(sys.argv[2]) if len(sys.argv) > 2 else 64
n_decode = int(sys.argv[3]) if len(sys.argv) > 3 else 16
mx.set_default_device(mx.cpu)
import pathlib
model, config = load_model(pathlib.Path(model_dir))
prompt = mx.array([[(i * 7919) % config["vocab_size"] for i in range(n_prompt)]])
warm = make_prompt_cache(model)
mx.eval(model(prompt[:, :4], cache=warm))
cache = make_prompt_cache(model)
t = time.perf_counter()
logits = model(prompt, cache=cache)
mx.eval(logits)
prefill = time.perf_counter() - t
tok = mx.argmax(logits[0, -1])
t = time.perf_counter()
for _ in range(n_decode):
    logits = model(tok.reshape(1, 1), cache=cache)
    tok = mx.argmax(logits[0, -1])
    mx.eval(tok)
decode = time.perf_counter() - t
print(json.dumps({"engine": "mlx-lm", "mlx": mx.__version__, "prefill_tok_s": n_prompt / prefill,
                  "decode_tok_s": n_decode / decode}))
