"""Decode tokens/s at batch 1 and 8, side by side: llmc bundles (fp32, int4), onnxruntime-genai's builds of
the same model, and llama.cpp on the model's own Q4_1 GGUF. One system at a time, same machine, same run.

    python benchmarks/int4_decode.py out/smollm2-135m out/smollm2-135m-int4 \
        --ortgenai /work/peers/ortgenai/venv/bin/python /work/peers/ortgenai/smollm2-int4 \
        --llama-server PATH/llama-server --out benchmarks/results/int4_decode.json

Greedy, EOS ignored, the prompt of decode_speed.py; decode rate excludes the prompt (time after the first
token). This machine's speed drifts by up to ~25% over minutes (shared host), so systems are measured in
turn, round after round (--rounds), and the summary reports each one's median and range.
onnxruntime-genai runs benchmarks/ortgenai_peer.py in its own venv. llama.cpp: a fresh llama-server with
-np B slots gets B concurrent /completion requests; its own timings (predicted_n, predicted_ms) give the
decode rate: sum of tokens / the longest decode time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from decode_speed import PROMPT, llmc_decode  # noqa: E402
from serving_vs_llamacpp import _free_port, _serve  # noqa: E402


def ortgenai_decode(python: str, model: str, batch: int, tokens: int) -> dict:
    out = subprocess.run([python, str(Path(__file__).parent / "ortgenai_peer.py"), "decode", model,
                          "--batch", str(batch), "--tokens", str(tokens)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"system": f"onnxruntime-genai ({Path(model).name})", "batch": batch,
            "decode_tok_s": result["decode_tok_s"]}


def llamacpp_decode(server: str, gguf: str, batch: int, tokens: int) -> dict:
    port = _free_port()
    proc = _serve([server, "-m", gguf, "--port", str(port), "-np", str(batch), "-c", str(batch * 512),
                   "-t", str(len(os.sched_getaffinity(0)))], port)
    try:
        def one(_):
            body = {"prompt": PROMPT, "n_predict": tokens, "ignore_eos": True, "temperature": 0, "cache_prompt": False}
            return httpx.post(f"http://127.0.0.1:{port}/completion", json=body, timeout=600).json()["timings"]
        one(0)  # warm-up
        with concurrent.futures.ThreadPoolExecutor(batch) as pool:
            timings = list(pool.map(one, range(batch)))
    finally:
        proc.terminate()
        proc.wait()
    return {"system": f"llama.cpp llama-server ({Path(gguf).name})", "batch": batch,
            "decode_tok_s": sum(t["predicted_n"] - 1 for t in timings) / max(t["predicted_ms"] for t in timings) * 1000}


def summarize(results: list[dict]) -> list[dict]:
    """Median (and range) over rounds per system and batch, with the ratio to llama.cpp's median."""
    rows = []
    for batch in sorted({r["batch"] for r in results}):
        systems = dict.fromkeys(r["system"] for r in results if r["batch"] == batch)
        medians = {name: statistics.median(r["decode_tok_s"] for r in results
                                           if r["batch"] == batch and r["system"] == name) for name in systems}
        peer = next((m for name, m in medians.items() if name.startswith("llama.cpp")), None)
        for name, median in medians.items():
            runs = [r["decode_tok_s"] for r in results if r["batch"] == batch and r["system"] == name]
            rows.append({"system": name, "batch": batch, "median_tok_s": round(median, 1), "min": round(min(runs), 1),
                         "max": round(max(runs), 1), "rounds": len(runs),
                         "vs_llama_cpp": round(median / peer, 3) if peer else None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--ortgenai", nargs="+", default=[], help="its venv's python, then model dirs")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="each round measures every system once, in turn")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runs = []
    for batch in args.batches:
        for round_index in range(args.rounds):
            measured = [{**llmc_decode(bundle, batch, args.tokens), "system": f"llmc ({Path(bundle).name})"}
                        for bundle in args.bundles]
            measured += [ortgenai_decode(args.ortgenai[0], model, batch, args.tokens) for model in args.ortgenai[1:]]
            if args.llama_server:
                from llmc.artifacts.bundle import load_bundle

                gguf = load_bundle(args.bundles[0], verify=False).manifest.source.path
                measured.append(llamacpp_decode(args.llama_server, gguf, batch, args.tokens))
            for result in measured:
                runs.append({**result, "round": round_index})
                print(json.dumps(runs[-1]), flush=True)
    summary = summarize(runs)
    for row in summary:
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"machine": f"{os.cpu_count()} cores", "tokens": args.tokens,
                                        "rounds": args.rounds, "summary": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
