"""Prefill tokens/s of bundles on a burst of prompts (the serving workload's prompts, one token out),
the bundles alternating in one process so that the machine's phases fall on all of them.

    python benchmarks/prefill_burst.py out/a out/b [--rounds 7]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    from llmc.runtime.llm import LLM
    from llmc.runtime.sequence import SamplingParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--num-prompts", type=int, default=64)
    args = parser.parse_args()
    llms = [LLM(b, kv_cache_memory="1GiB") for b in args.bundles]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 40000, rng.integers(30, 501)).tolist() for _ in range(args.num_prompts)]
    total = sum(map(len, prompts))
    seconds: dict[str, list[float]] = {b: [] for b in args.bundles}
    for r in range(args.rounds):
        shifted = [[(t + r) % 40000 for t in p] for p in prompts]  # new tokens each round: no prefix-cache hits
        for bundle, llm in zip(args.bundles, llms):
            start = time.perf_counter()
            llm.generate(shifted, SamplingParams(max_tokens=1))
            seconds[bundle].append(time.perf_counter() - start)
    for bundle in args.bundles:
        warm = seconds[bundle][1:]  # the first round pays page faults
        print(f"{bundle}: {total} prompt tokens, {total * len(warm) / sum(warm):.0f} tok/s over rounds 2-{args.rounds} "
              f"(each: {', '.join(str(round(total / s)) for s in seconds[bundle])})")
    if len(args.bundles) == 2:
        a, b = (sum(seconds[x][1:]) for x in args.bundles)
        print(f"time {args.bundles[1]} / {args.bundles[0]}: {b / a:.3f}")


if __name__ == "__main__":
    main()
