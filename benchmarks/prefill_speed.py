"""Prefill tokens/s of bundles, one step per prompt, same machine, same run (bundles alternate).

    python benchmarks/prefill_speed.py out/smollm2-135m out/smollm2-135m-int8-prefill [--tokens 512] [--rounds 3]

Reports each bundle's GEMM path (`OrtEngine.gemm_path`), so an int8 prefill graph that did not run shows.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def prefill_seconds(llm, tokens: int) -> float:
    """Wall time of one prefill step of `tokens` random tokens (and its first sampled token)."""
    from llmc.runtime.sequence import SamplingParams

    prompt = np.random.default_rng(tokens).integers(100, 20000, size=tokens).tolist()
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=1))
    return time.perf_counter() - start


def main() -> None:
    from llmc.runtime.llm import LLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    llms = {b: LLM(b, verify=False, max_num_batched_tokens=max(2048, args.tokens), enable_prefix_caching=False)
            for b in args.bundles}
    for llm in llms.values():
        prefill_seconds(llm, 64)  # warm-up
    times = {b: [] for b in llms}
    for _ in range(args.rounds):
        for bundle, llm in llms.items():
            times[bundle].append(prefill_seconds(llm, args.tokens))
    for bundle, llm in llms.items():
        best = min(times[bundle])
        print(json.dumps({"bundle": bundle, "tokens": args.tokens, "prefill_s": [round(t, 3) for t in times[bundle]],
                          "prefill_tok_s": round(args.tokens / best, 1), "gemm_path": llm.engine.gemm_path}))


if __name__ == "__main__":
    main()
