"""Serving benchmark: the same mixed-length workload through the HTTP API with streaming.

Systems, one at a time, each on a fresh server:
  llmc continuous batching, llmc static batching (same engine), llama.cpp's llama-server
  (-np 16, continuous batching, on the SmolLM2 Q4_1 GGUF), and transformers (offline static
  batches of 16 with `generate`; it has no server).

    python benchmarks/serving_vs_llamacpp.py out/smollm2-135m --llama-server PATH/llama-server

Workload: 64 requests queued at once, prompts uniform 30-500 tokens, outputs uniform 30-250
tokens (fixed: EOS ignored), seed 0. Results go to benchmarks/results/serving.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from llmc.artifacts.bundle import load_bundle
from llmc.runtime import bench as b

PARALLEL = 16


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def _run_server(name: str, cmd: list[str], port: int, workload) -> dict:
    print(f"== {name}", file=sys.stderr)
    proc = _serve(cmd, port)
    try:
        result = b.run_online(f"http://127.0.0.1:{port}", workload, float("inf"))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"system": name, **result}


def _transformers_static(hf_dir: str, workload) -> dict:
    """transformers generate in static batches of PARALLEL (left-padded), fp32."""
    import torch
    import transformers

    print("== transformers static batches", file=sys.stderr)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    traces = []
    start = time.perf_counter()
    for i in range(0, len(workload), PARALLEL):
        batch = workload[i:i + PARALLEL]
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.tensor([[0] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch])
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch])
        steps = max(r.max_tokens for r in batch)
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)  # prefill + 1 token
            prefill = time.perf_counter() - t0
            t1 = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
            end = time.perf_counter()
        # generate() streams nothing: place each request's tokens at the batch's measured pace
        # (first token after one prefill, then evenly), counting the extra timing prefill as overhead.
        per_token = max(0.0, end - t1 - prefill) / max(1, steps - 1)
        for r in batch:
            times = [t1 + prefill + k * per_token for k in range(r.max_tokens)]
            traces.append(b.RequestTrace(start, times, len(r.prompt_ids)))
    return {"system": f"transformers {transformers.__version__} static batches of {PARALLEL} (offline)",
            **b.summarize(traces, time.perf_counter() - start), "note": "token times interpolated per batch"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--skip", nargs="*", default=[], help="llmc, static, llamacpp, transformers")
    parser.add_argument("--out", default="benchmarks/results/serving.json")
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    workload = b.make_workload(args.num_requests, (30, 500), (30, 250), bundle.geometry.vocab_size, seed=0)
    expected = sum(r.max_tokens for r in workload)
    llmc = [sys.executable, "-c", "from llmc.cli import main; main()", "serve", args.bundle,
            "--max-num-seqs", str(PARALLEL), "--kv-cache-memory", "2GiB", "--max-waiting", "1024"]
    results = []
    if "llmc" not in args.skip:
        port = _free_port()
        results.append(_run_server("llmc continuous batching", llmc + ["--port", str(port)], port, workload))
    if "static" not in args.skip:
        port = _free_port()
        results.append(_run_server("llmc static batching (same engine)",
                                   llmc + ["--port", str(port), "--policy", "static"], port, workload))
    if "llamacpp" not in args.skip and args.llama_server:
        gguf = bundle.manifest.source.path
        port = _free_port()
        cmd = [args.llama_server, "-m", gguf, "--port", str(port), "-np", str(PARALLEL), "-c", str(PARALLEL * 1024),
               "-t", str(len(os.sched_getaffinity(0))), "--cont-batching"]
        results.append(_run_server(f"llama.cpp llama-server -np {PARALLEL} (Q4_1)", cmd, port, workload))
    if "transformers" not in args.skip:
        from llmc.compiler.importer import cache_root

        hf_dir = next((cache_root() / "gguf").glob("*/COMPLETE")).parent
        results.append(_transformers_static(str(hf_dir), workload))
    report = {"workload": {"requests": len(workload), "prompt_len": "30-500", "output_len": "30-250",
                           "expected_output_tokens": expected,
                           "prompt_tokens": sum(len(r.prompt_ids) for r in workload)},
              "machine": f"{os.cpu_count()} cores", "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(b.to_json(report))
    print(f"{'system':58s} {'out tok/s':>9s} {'TTFT p50':>9s} {'TPOT p50':>9s} {'done':>5s} {'tokens':>7s}")
    for r in results:
        print(f"{r['system'][:58]:58s} {r['output_tok_s']:9.1f} {r['ttft_ms']['p50'] / 1000:8.1f}s "
              f"{r['tpot_ms']['p50']:7.1f}ms {r['completed']:5d} {r['output_tokens']:7d}")
    print(json.dumps({"expected_output_tokens": expected}))


if __name__ == "__main__":
    main()
