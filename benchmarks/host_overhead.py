"""What the LLM loop costs the host per step with no model: the engine's step returns ready random logits (or,
as the cuda engine's step_greedy, ready token ids), so what remains is the scheduler, the step layout, sampling
and detokenizing. On a GPU this is the time the device waits between steps (llmc does not overlap them yet).

    python benchmarks/host_overhead.py out/smollm2-135m-int4 --batches 1 64
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from llmc.runtime.llm import LLM
from llmc.runtime.sequence import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each; the median is reported (a shared VM)")
    args = parser.parse_args()
    llm = LLM(args.bundle, max_num_seqs=max(args.batches), speculation=False)
    rng, ready = np.random.default_rng(0), {}

    def step(inputs, pool):  # [N, vocab], made once per N
        n = len(inputs.logits_index)
        if n not in ready:
            ready[n] = rng.standard_normal((n, llm.geometry.vocab_size), dtype=np.float32)
        return ready[n]

    def step_greedy(inputs, pool):  # [N] token ids, as the cuda engine's device argmax returns them
        return rng.integers(10, 1000, len(inputs.logits_index))

    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    for path in ("logits", "greedy tokens"):
        llm.engine.step = step
        if path == "greedy tokens":
            llm.engine.step_greedy = step_greedy
        for batch in args.batches:
            prompts = [rng.integers(10, 1000, 32).tolist() for _ in range(batch)]
            llm.generate(prompts, params)  # warm
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                llm.generate(prompts, params)
                runs.append(time.perf_counter() - start)
            seconds = float(np.median(runs))
            print(f"{path:>13}, batch {batch}: {1e3 * seconds / args.new_tokens:.3f} ms a step on the host "
                  f"({1e6 * seconds / (batch * args.new_tokens):.1f} us a token; fastest run "
                  f"{1e3 * min(runs) / args.new_tokens:.3f} ms)")


if __name__ == "__main__":
    main()
