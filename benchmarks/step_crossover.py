"""Decode-step time of a bundle's main graph and its int8 graph by batch size: the crossover that
`PREFILL_MIN_TOKENS` (runtime/engine_ort.py) sets, measured on this machine.

    python benchmarks/step_crossover.py out/smollm2-135m-int8-prefill [--batches 1,2,4,8,16,32] [--context 400]

Each batch of sequences is prefilled to `--context` tokens, then the same decode step is timed on each
graph (best of `--repeats`), the graphs alternating.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def decode_inputs(llm, batch: int, context: int):
    """Prefill `batch` sequences to `context` tokens; return one decode step's inputs for all of them."""
    from llmc.runtime.sequence import SamplingParams
    from llmc.runtime.step_inputs import build_step_inputs

    rng = np.random.default_rng(batch)
    seqs = [llm.add_request(rng.integers(100, 20000, size=context).tolist(),
                            SamplingParams(max_tokens=64, ignore_eos=True)) for _ in range(batch)]
    while any(s.num_computed_tokens < context for s in seqs):
        llm.step()
    plan = llm.scheduler.schedule()
    return build_step_inputs(plan.scheduled, llm.pool.block_size)


def best_seconds(engine, session, inputs, pool, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.run_session(session, inputs, pool)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    from llmc.runtime.llm import LLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--batches", default="1,2,4,8,16,32")
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for batch in (int(b) for b in args.batches.split(",")):
        llm = LLM(args.bundle, verify=False, max_num_seqs=batch, enable_prefix_caching=False)
        engine = llm.engine
        if engine.int8_session is None:
            raise SystemExit(f"{args.bundle} has no int8 graph this CPU runs")
        inputs = decode_inputs(llm, batch, args.context)
        row = {"batch": batch, "context": args.context}
        for _ in range(2):  # warm both, then measure
            for name, session in (("main_ms", engine.session), ("int8_ms", engine.int8_session)):
                row[name] = round(1000 * best_seconds(engine, session, inputs, llm.pool, args.repeats), 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
