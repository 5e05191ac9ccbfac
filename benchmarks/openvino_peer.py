"""OpenVINO GenAI's offline continuous-batching pipeline on llmc's bench workload (throughput only: its
blocking `generate` reports no per-token times), to compare with `llmc bench --mode offline` in the same
run. Runs in the OpenVINO venv of ../shared/peers/setup.sh openvino; the workload comes as JSON from llmc:

    python -c "import json; from llmc.runtime import bench as b; json.dump([{'prompt_ids': r.prompt_ids,
        'max_tokens': r.max_tokens} for r in b.make_workload(64, (30, 500), (30, 250), 49152, 0)],
        open('/tmp/workload.json', 'w'))"
    ~/peers/ov-venv/bin/python benchmarks/openvino_peer.py ~/peers/ov-smollm2-int4 /tmp/workload.json [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("workload")
    parser.add_argument("--precision", default="bf16", help="INFERENCE_PRECISION_HINT (bf16 runs on AMX)")
    args = parser.parse_args()
    workload = json.load(open(args.workload))
    pipe = ov_genai.ContinuousBatchingPipeline(args.model_dir, ov_genai.SchedulerConfig(), "CPU",
                                               {"INFERENCE_PRECISION_HINT": args.precision})
    inputs, configs = [], []
    for req in workload:
        inputs.append(ov.Tensor(np.asarray([req["prompt_ids"]], dtype=np.int64)))
        config = ov_genai.GenerationConfig()
        config.max_new_tokens = config.min_new_tokens = req["max_tokens"]
        config.ignore_eos = True
        configs.append(config)
    pipe.generate(inputs[:2], configs[:2])  # warm-up
    start = time.perf_counter()
    results = pipe.generate(inputs, configs)
    duration = time.perf_counter() - start
    out_tokens = sum(len(r.m_generation_ids[0]) for r in results)
    print(json.dumps({"system": f"OpenVINO GenAI {ov_genai.__version__} ContinuousBatchingPipeline",
                      "model": args.model_dir,
                      "precision": args.precision, "requests": len(workload), "output_tokens": out_tokens,
                      "expected_tokens": sum(r["max_tokens"] for r in workload), "duration_s": duration,
                      "output_tok_s": out_tokens / duration}))


if __name__ == "__main__":
    main()
