#!/usr/bin/env python3
"""Writes a HF `tokenizer.json` equivalent to a model directory's `tiktoken.model` (Kimi regex, the specials of
`tokenizer_config.json`), using transformers' own TikTokenConverter. Test tooling only: the output is committed
as tests/fixtures/hf-tokenizer/ and checked against the tiktoken reference ids.

Usage: python tests/tools/hf_tokenizer_json.py tests/fixtures/tiny-kimi-bf16 tests/fixtures/hf-tokenizer
"""
import json, pathlib, shutil, sys
from transformers.convert_slow_tokenizer import TikTokenConverter

KIMI_PATTERN = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
cfg = json.load(open(src / "tokenizer_config.json"))
specials = [v["content"] for k, v in sorted(cfg["added_tokens_decoder"].items(), key=lambda kv: int(kv[0]))]
tok = TikTokenConverter(vocab_file=str(src / "tiktoken.model"), pattern=KIMI_PATTERN,
                        extra_special_tokens=specials).converted()
out.mkdir(parents=True, exist_ok=True)
tok.save(str(out / "tokenizer.json"))
for f in ("tokenizer_config.json", "generation_config.json"):
    shutil.copy(src / f, out / f)
print("wrote", out / "tokenizer.json")
