"""Batch-1 (and batch-N) decode tokens/s: the llmc bundle vs transformers fp32, same machine, same run.

    python benchmarks/decode_speed.py out/smollm2-135m [--batch 1] [--tokens 128] [--peer transformers]

Greedy, ignore EOS, fixed prompt; decode rate = (generated tokens - 1) / (time after the first token).
Runs the candidates one after another, never at the same time.
"""

from __future__ import annotations

import argparse
import json
import time

PROMPT = "The history of the printing press begins"


def llmc_decode(bundle: str, batch: int, tokens: int) -> dict:
    """Decode rate of the llmc runtime over the bundle's onnxruntime engine."""
    from llmc.runtime.llm import LLM
    from llmc.runtime.sequence import SamplingParams

    llm = LLM(bundle, verify=False, max_num_seqs=batch)
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    llm.generate([PROMPT] * batch, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    seqs = [llm.add_request(PROMPT, params) for _ in range(batch)]
    llm.step()  # prefill + first token
    start, steps = time.perf_counter(), 0
    while any(not s.is_finished for s in seqs):
        llm.step()
        steps += 1
    elapsed = time.perf_counter() - start
    return {"system": "llmc (onnxruntime, fp32)", "batch": batch, "decode_tok_s": batch * steps / elapsed,
            "ms_per_step": 1000 * elapsed / steps, "attention": llm.engine.attention}


def transformers_decode(hf_dir: str, batch: int, tokens: int) -> dict:
    """Decode rate of transformers' generate (fp32, sdpa, its own KV cache)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tok([PROMPT] * batch, return_tensors="pt").input_ids
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        elapsed = time.perf_counter() - start - first
    return {"system": f"transformers {transformers.__version__} (torch, fp32)", "batch": batch,
            "decode_tok_s": batch * (tokens - 1) / elapsed, "ms_per_step": 1000 * elapsed / (tokens - 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--peer", choices=["transformers", "none"], default="transformers")
    args = parser.parse_args()
    results = [llmc_decode(args.bundle, args.batch, args.tokens)]
    if args.peer == "transformers":
        from llmc.compiler.importer import cache_root

        hf_dir = next((cache_root() / "gguf").glob("*/COMPLETE")).parent
        results.append(transformers_decode(str(hf_dir), args.batch, args.tokens))
        results.append({"ratio_llmc_over_transformers": results[0]["decode_tok_s"] / results[1]["decode_tok_s"]})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
