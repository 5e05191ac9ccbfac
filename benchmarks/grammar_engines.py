"""Per-token cost of the two maintained grammar engines on a bundle's tokenizer: llguidance (what llmc uses) and
xgrammar, computing the next-token bitmask and advancing past a token, over the same token walks through JSON
schemas. Also what each imports (the serving path must stay torch-free).

    python benchmarks/grammar_engines.py out/smollm2-135m-int4 [--walks 20]

xgrammar is not an llmc dependency: it requires torch, transformers and triton. Put its wheels on PYTHONPATH
(`pip download --no-deps xgrammar apache-tvm-ffi`, unzip them into a folder) in an environment with torch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SCHEMAS = [Path(__file__).parent / "schemas" / "records.json"]
INLINE = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "email": {"type": "string", "maxLength": 40},
                                           "tags": {"type": "array", "maxItems": 5, "items": {"type": "string",
                                                                                              "maxLength": 10}}},
          "required": ["name", "age", "email", "tags"], "additionalProperties": False}


def _allowed(mask_words: np.ndarray, vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(mask_words.view(np.uint8), bitorder="little")[:vocab])


def _walk(fill, accept, stopped, vocab: int, mask: np.ndarray, rng) -> tuple[int, float]:
    """One random walk to the grammar's end (each step a uniformly drawn allowed token); (tokens, seconds spent
    in the engine: computing masks and advancing)."""
    tokens, seconds = 0, 0.0
    while not stopped() and tokens < 400:
        start = time.perf_counter()
        fill()
        seconds += time.perf_counter() - start
        token = int(rng.choice(_allowed(mask, vocab)))
        start = time.perf_counter()
        accept(token)
        seconds += time.perf_counter() - start
        tokens += 1
    return tokens, seconds


def time_llguidance(tokenizer_json: str, vocab: int, schema: dict, walks: int) -> dict:
    import llguidance

    start = time.perf_counter()
    tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    template = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema(
        schema, defaults={"whitespace_flexible": False}), log_level=0)
    compile_s = time.perf_counter() - start
    mask, rng, tokens, seconds = np.zeros((vocab + 31) // 32, dtype=np.int32), np.random.default_rng(0), 0, 0.0
    for _ in range(walks):
        m = template.deep_copy()
        n, s = _walk(lambda m=m: m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes), m.consume_token,
                     m.is_stopped, vocab, mask, rng)
        tokens, seconds = tokens + n, seconds + s
    return {"tokenizer_setup_s": setup, "compile_s": compile_s, "tokens": tokens,
            "us_per_token": 1e6 * seconds / tokens}


def time_xgrammar(tokenizer_json: str, vocab: int, schema: dict, walks: int) -> dict:
    import transformers
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(transformers.PreTrainedTokenizerFast(tokenizer_file=tokenizer_json),
                                              vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    compile_s = time.perf_counter() - start
    bitmask = xgr.allocate_token_bitmask(1, vocab)  # a torch tensor [1, words]
    mask, rng, tokens, seconds = bitmask.numpy()[0], np.random.default_rng(0), 0, 0.0
    for _ in range(walks):
        m = xgr.GrammarMatcher(compiled)
        n, s = _walk(lambda m=m: m.fill_next_token_bitmask(bitmask), m.accept_token, m.is_terminated, vocab, mask,
                     rng)
        tokens, seconds = tokens + n, seconds + s
    return {"tokenizer_setup_s": setup, "compile_s": compile_s, "tokens": tokens,
            "us_per_token": 1e6 * seconds / tokens}


def imports_of(module: str) -> dict:
    """Import time and whether torch / transformers came with it (a fresh interpreter)."""
    code = (f"import sys, time; t = time.perf_counter(); import {module}; "
            "print(time.perf_counter() - t, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1]}
    seconds, torch, transformers = out.stdout.split()
    return {"import_s": float(seconds), "imports_torch": torch == "True",
            "imports_transformers": transformers == "True"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--walks", type=int, default=20)
    args = parser.parse_args()
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    tokenizer_json, vocab = str(args.bundle / "tokenizer" / "tokenizer.json"), manifest["model"]["vocab_size"]
    report = {"bundle": str(args.bundle), "vocab_size": vocab, "engines": {}}
    for name, module, timer in (("llguidance", "llguidance", time_llguidance),
                                ("xgrammar", "xgrammar", time_xgrammar)):
        entry = report["engines"][name] = imports_of(module)
        if "error" in entry:
            continue
        entry["schemas"] = []
        for schema in [json.loads(p.read_text()) for p in SCHEMAS] + [INLINE]:
            entry["schemas"].append(timer(tokenizer_json, vocab, schema, args.walks))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
