"""Prefill tokens/s of bundles on a burst of prompts (`llmc bench`'s default workload's prompts, one token out),
the bundles alternating in one process so that the machine's phases fall on all of them.

    python benchmarks/prefill_burst.py out/a out/b [--rounds 7]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    from llmc.runtime.bench import make_workload
    from llmc.runtime.llm import LLM
    from llmc.runtime.sequence import SamplingParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--num-prompts", type=int, default=64)
    args = parser.parse_args()
    # no prefix caching: every round computes every prompt token again
    llms = [LLM(b, kv_cache_memory="1GiB", enable_prefix_caching=False) for b in args.bundles]
    workload = make_workload(args.num_prompts, (30, 500), (1, 1), llms[0].geometry.vocab_size)  # llmc bench's, seed 0
    prompts = [request.prompt_ids for request in workload]
    total = sum(map(len, prompts))
    seconds: dict[str, list[float]] = {b: [] for b in args.bundles}
    for _ in range(args.rounds):
        for bundle, llm in zip(args.bundles, llms):
            start = time.perf_counter()
            llm.generate(prompts, SamplingParams(max_tokens=1))
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
