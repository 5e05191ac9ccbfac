"""onnxruntime-genai as a benchmark peer on CPU: decode speed and the mixed serving workload (offline).

Runs in its own venv (onnxruntime-genai, numpy) and does not import llmc. Models come from its model builder:
`python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p fp32|int4 -e cpu`.

    python benchmarks/ortgenai_peer.py workload --out /tmp/workload.json   # the 64 requests of serving_vs_llamacpp
    python benchmarks/ortgenai_peer.py decode MODEL_DIR [--batch 1|8] [--tokens 128]
    python benchmarks/ortgenai_peer.py serve MODEL_DIR --requests /tmp/workload.json [--parallel 16]

decode: greedy, EOS ignored, fixed prompt; decode_tok_s = batch * (tokens - 1) / (time from the first generated
token to the last), so prompt processing is excluded (as in benchmarks/decode_speed.py).
serve: onnxruntime-genai has no HTTP server: all requests are queued at t=0 and run offline through og.Generator
in static batches of --parallel (16), greedy, EOS ignored (min_length = max_length). Prompts are right-padded with
the pad token (Tokenizer.encode_batch's layout; left padding gives wrong tokens; trailing pad ids are masked, so
a prompt must not end in the pad id: the workload's ids are >= 100). A batch runs until its longest
request is done; each request counts only its own max_tokens. TTFT p50 is reported from t=0 (as in the llmc
serving results) and from the start of the request's batch (prefill of the padded batch + first token).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

log = logging.getLogger("ortgenai_peer")
PROMPT = "The history of the printing press begins"


def load(model_dir: str, threads: int = 0) -> og.Model:
    config = og.Config(model_dir)
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def generator(model: og.Model, rows: list[list[int]], new_tokens: int) -> og.Generator:
    """A greedy generator over right-padded rows; every row makes exactly new_tokens tokens (EOS masked)."""
    width = max(len(r) for r in rows)
    pad = og.Tokenizer(model).pad_token_id
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=width + new_tokens, min_length=width + new_tokens, do_sample=False,
                              batch_size=len(rows))
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([r + [pad] * (width - len(r)) for r in rows], dtype=np.int32))  # runs the prefill
    return gen


def decode(args) -> dict:
    model = load(args.model, args.threads)
    prompt = og.Tokenizer(model).encode(PROMPT).tolist()
    for tokens in (4, args.tokens):  # warm-up, then the measured run
        gen = generator(model, [prompt] * args.batch, tokens)
        gen.generate_next_token()  # only samples the first token from the prefill's logits
        start, steps = time.perf_counter(), 0
        while not gen.is_done():
            gen.generate_next_token()
            steps += 1
        elapsed = time.perf_counter() - start
    assert steps == args.tokens - 1, steps
    return {"system": f"onnxruntime-genai {og.__version__}", "model": args.model, "batch": args.batch,
            "tokens": args.tokens, "decode_tok_s": args.batch * steps / elapsed, "ms_per_step": 1000 * elapsed / steps}


def serve_static(model: og.Model, reqs: list[dict], t0: float, parallel: int) -> list[dict]:
    traces = []
    for i in range(0, len(reqs), parallel):
        batch, times, begin = reqs[i:i + parallel], [], time.perf_counter()
        gen = generator(model, [r["prompt_ids"] for r in batch], max(r["max_tokens"] for r in batch))
        while not gen.is_done():
            gen.generate_next_token()
            times.append(time.perf_counter())
        traces += [{"batch_start": begin, "times": times[:r["max_tokens"]]} for r in batch]
        log.info("batch %d/%d done (%.0f s)", i // parallel + 1, -(-len(reqs) // parallel), time.perf_counter() - t0)
    return traces


def serve(args) -> dict:
    reqs = json.loads(Path(args.requests).read_text())
    model = load(args.model, args.threads)
    warm = generator(model, [[100] * 16] * args.parallel, 2)
    while not warm.is_done():
        warm.generate_next_token()
    t0 = time.perf_counter()
    traces = serve_static(model, reqs, t0, args.parallel)
    duration = time.perf_counter() - t0
    got = [len(t["times"]) for t in traces]
    assert got == [r["max_tokens"] for r in reqs], "a request made other than max_tokens tokens"

    def p50(values: list[float]) -> float | None:
        return float(np.percentile(np.asarray(values) * 1000.0, 50)) if values else None

    return {"system": f"onnxruntime-genai {og.__version__} static batches of {args.parallel} (offline)",
            "model": args.model, "requests": len(reqs), "output_tokens": sum(got), "duration_s": duration,
            "output_tok_s": sum(got) / duration, "ttft_p50_ms": p50([t["times"][0] - t0 for t in traces]),
            "ttft_from_batch_start_p50_ms": p50([t["times"][0] - t["batch_start"] for t in traces]),
            "tpot_p50_ms": p50([(t["times"][-1] - t["times"][0]) / (len(t["times"]) - 1) for t in traces
                                if len(t["times"]) > 1])}


def workload(args) -> None:
    """The recipe of runtime/bench.make_workload(n, (30, 500), (30, 250), vocab, seed): identical requests."""
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(30, 501, size=args.num_requests)
    outputs = rng.integers(30, 251, size=args.num_requests)
    reqs = [{"prompt_ids": rng.integers(100, args.vocab_size, size=int(p)).tolist(), "max_tokens": int(o)}
            for p, o in zip(prompts, outputs)]
    Path(args.out).write_text(json.dumps(reqs))
    log.info("%d requests, %d output tokens -> %s", len(reqs), sum(r["max_tokens"] for r in reqs), args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    dec, srv, wl = sub.add_parser("decode"), sub.add_parser("serve"), sub.add_parser("workload")
    for p in (dec, srv):
        p.add_argument("model", help="onnxruntime-genai model dir (genai_config.json)")
        p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    dec.add_argument("--batch", type=int, default=1)
    dec.add_argument("--tokens", type=int, default=128)
    srv.add_argument("--requests", required=True, help='JSON list of {"prompt_ids": [...], "max_tokens": n}')
    srv.add_argument("--parallel", type=int, default=16, help="requests per static batch")
    wl.add_argument("--out", required=True)
    wl.add_argument("--num-requests", type=int, default=64)
    wl.add_argument("--vocab-size", type=int, default=49152)
    wl.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.mode == "workload":
        return workload(args)
    print(json.dumps(decode(args) if args.mode == "decode" else serve(args)))


if __name__ == "__main__":
    main()
