"""What the LLM loop costs the host per step with no model: the engine's step returns ready logits (rows the model
produced for random prompts; or, as the cuda engine's launch_sample, ready token ids), so what remains is the
scheduler, the step layout, sampling and detokenizing. On a GPU the device-token path runs this while the device
runs the step before (async scheduling); the logits path makes the device wait for it. Greedy and sampled requests
(temperature 0.8 with top-p 0.9; temperature 1 alone, the OpenAI API's default) are measured both ways.

    python benchmarks/host_overhead.py out/smollm2-135m-int4 --batches 1 64
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from llmc.runtime.llm import LLM
from llmc.runtime.sequence import SamplingParams


def _model_logits(llm: LLM, rng: np.random.Generator) -> np.ndarray:
    """Logits rows [R, vocab] the model produced while decoding random prompts."""
    rows, run = [], llm.engine.step

    def recording(inputs, pool):
        logits = run(inputs, pool)
        rows.append(logits)
        return logits

    llm.engine.step = recording
    llm.generate([rng.integers(10, 1000, 32).tolist() for _ in range(8)], SamplingParams(max_tokens=16))
    return np.concatenate(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each; the median is reported (a shared VM)")
    args = parser.parse_args()
    llm = LLM(args.bundle, max_num_seqs=max(args.batches), speculation=False)
    rng = np.random.default_rng(0)
    real = _model_logits(llm, rng)  # [R, vocab]: sampling costs what the model's distributions make it cost

    ready = {}

    def step(inputs, pool):  # [N, vocab], made once per N
        n = len(inputs.logits_index)
        if n not in ready:
            ready[n] = real[np.arange(n) % len(real)]
        return ready[n]

    class ReadyPicks:  # token ids, as the cuda engine's device sampler returns them
        def __init__(self, n: int):
            self.ids = rng.integers(10, 1000, n)
            self.on_device, self.wait_s = torch.from_numpy(self.ids), 0.0

        def tokens(self) -> np.ndarray:
            return self.ids

    def launch_sample(inputs, pool, rows, previous=None):
        return ReadyPicks(len(inputs.logits_index))

    llm.engine.step = step
    requests = {"greedy": SamplingParams(max_tokens=args.new_tokens, ignore_eos=True),
               "sampled": SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, temperature=0.8, top_p=0.9),
               "t=1": SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, temperature=1.0)}  # OpenAI's default
    for path in ("logits", "device tokens"):
        if path == "device tokens":
            llm.engine.launch_sample = launch_sample
        for (kind, params), batch in itertools.product(requests.items(), args.batches):
            prompts = [rng.integers(10, 1000, 32).tolist() for _ in range(batch)]
            llm.generate(prompts, params)  # warm
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                llm.generate(prompts, params)
                runs.append(time.perf_counter() - start)
            seconds = float(np.median(runs))
            print(f"{path:>13}, {kind:>7}, batch {batch}: {1e3 * seconds / args.new_tokens:.3f} ms a step on the host "
                  f"({1e6 * seconds / (batch * args.new_tokens):.1f} us a token; fastest run "
                  f"{1e3 * min(runs) / args.new_tokens:.3f} ms)")


if __name__ == "__main__":
    main()
