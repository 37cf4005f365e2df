#!/usr/bin/env python3
"""Writes tests/fixtures/mlx-affine-golden.json: for every bit width and group size, a small matrix quantized by
MLX (`mx.quantize`), its packed words, scales, biases and MLX's own dequantization, plus one matmul with MLX's
`quantized_matmul`. Test tooling only (needs `mlx`); the JSON is committed.

Usage: python tests/tools/mlx_affine_golden.py tests/fixtures/mlx-affine-golden.json
"""
import json, sys
import mlx.core as mx
import numpy as np

mx.random.seed(11)
cases = []
for bits in [2, 3, 4, 5, 6, 8]:
    for group in [32, 64, 128]:
        rows, cols = 3, 256
        w = mx.random.normal((rows, cols))
        x = mx.random.normal((2, cols))
        q, s, b = mx.quantize(w, group_size=group, bits=bits)
        deq = mx.dequantize(q, s, b, group_size=group, bits=bits)
        y = mx.quantized_matmul(x, q, s, b, transpose=True, group_size=group, bits=bits)
        cases.append({
            "bits": bits, "group": group, "rows": rows, "cols": cols,
            "packed_u32": np.array(q).astype(np.uint32).flatten().tolist(),
            "scales": np.array(s).flatten().tolist(), "biases": np.array(b).flatten().tolist(),
            "dequantized": np.array(deq).flatten().tolist(),
            "x": np.array(x).flatten().tolist(), "y": np.array(y).flatten().tolist(),
        })
json.dump({"mlx": mx.__version__, "cases": cases}, open(sys.argv[1], "w"))
