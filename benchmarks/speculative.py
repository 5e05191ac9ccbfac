"""Speculative decoding on SmolLM2-135M (fp32 target), side by side: no speculation, n-gram lookup and an
int4 draft model, each with adaptive k and with a fixed k; batch 1 per prompt, then 16+ concurrent requests.

    llmc build examples/smollm2-135m-spec-draft.yaml && llmc build examples/smollm2-135m-spec-ngram.yaml
    python benchmarks/speculative.py out/smollm2-135m-spec-draft out/smollm2-135m-spec-ngram \
        --out benchmarks/results/speculative.json

Greedy, EOS ignored. Batch 1: decode tokens/s after the first token, the acceptance rate, mean accepted
drafts per verification, the mean k the policy chose, and whether the tokens equal plain greedy decoding.
Concurrent: all requests queued at once (random-token prompts, `llmc bench`'s offline workload), output
tokens/s. One configuration at a time; the configurations take turns round after round (--rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from llmc.runtime import bench
from llmc.runtime.llm import LLM
from llmc.runtime.sequence import SamplingParams

LICENSE = Path("/usr/share/common-licenses/BSD")
PROMPTS = {
    "copy": "Repeat the following text exactly, word for word:\n\n" + (
        LICENSE.read_text()[:700] if LICENSE.is_file() else "Redistribution and use in source and binary forms."),
    "story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "explain": "Explain how a printing press works, step by step.",
}


def configs(draft_bundle: str, ngram_bundle: str) -> dict[str, dict]:
    return {"none": {"bundle": draft_bundle, "speculation": False},
            "ngram adaptive": {"bundle": ngram_bundle},
            "ngram k=4": {"bundle": ngram_bundle, "num_spec_tokens": 4, "adaptive_speculation": False},
            "draft adaptive": {"bundle": draft_bundle},
            "draft k=4": {"bundle": draft_bundle, "num_spec_tokens": 4, "adaptive_speculation": False}}


def make_llm(config: dict, max_num_seqs: int) -> LLM:
    return LLM(config["bundle"], verify=False, kv_cache_memory="768MiB", max_num_seqs=max_num_seqs,
               **{k: v for k, v in config.items() if k != "bundle"})


def decode_one(llm: LLM, prompt: str, tokens: int) -> dict:
    """Batch-1 decode rate of one chat prompt, with this LLM's speculation counters for the run."""
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    llm.generate([ids], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up (and the policy's first costs)
    before = replace(llm.speculation.stats) if llm.speculation else None
    seq = llm.add_request(ids, SamplingParams(max_tokens=tokens, ignore_eos=True))
    llm.step()  # prefill + first token
    start = time.perf_counter()
    while not seq.is_finished:
        llm.step()
    elapsed = time.perf_counter() - start
    output = list(seq.output_ids)
    llm.release(seq)
    return {"decode_tok_s": (len(output) - 1) / elapsed, "tokens": output,
            "speculation": bench.spec_delta(before, llm.speculation.stats) if llm.speculation else None}


def concurrent(llm: LLM, workload) -> dict:
    report = bench.run_offline(llm, workload)
    return {"output_tok_s": report["output_tok_s"], "speculation": report["speculation"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("draft_bundle")
    parser.add_argument("ngram_bundle")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--parts", nargs="+", choices=["batch1", "concurrent"], default=["batch1", "concurrent"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    setups = configs(args.draft_bundle, args.ngram_bundle)
    runs = []
    for round_index in range(args.rounds if "batch1" in args.parts else 0):
        for name, config in setups.items():
            llm = make_llm(config, 1)
            for prompt_name, prompt in PROMPTS.items():
                result = decode_one(llm, prompt, args.tokens)
                runs.append({"round": round_index, "config": name, "prompt": prompt_name, **result})
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "tokens"}), flush=True)
    for concurrency in args.concurrency if "concurrent" in args.parts else []:
        workload = bench.make_workload(concurrency, (30, 200), (64, 128), 49152, seed=0)
        for round_index in range(args.rounds):
            for name, config in setups.items():
                if "k=4" in name:
                    continue  # fixed k under load is not a configuration anyone should serve with
                result = concurrent(make_llm(config, concurrency), workload)
                runs.append({"round": round_index, "config": name, "concurrency": concurrency, **result})
                print(json.dumps(runs[-1]), flush=True)
    summary = summarize(runs)
    for row in summary:
        print(json.dumps(row), flush=True)
    if args.out:
        for run in runs:
            run.pop("tokens", None)
        args.out.write_text(json.dumps({"tokens": args.tokens, "rounds": args.rounds, "summary": summary,
                                        "runs": runs}, indent=2))


def summarize(runs: list[dict]) -> list[dict]:
    """Medians over rounds; batch-1 rows get their speed-up over no speculation and token equality."""
    rows = []
    plain = {r["prompt"]: r["tokens"] for r in runs if r.get("prompt") and r["config"] == "none"}
    for prompt in dict.fromkeys(r["prompt"] for r in runs if r.get("prompt")):
        base = statistics.median(r["decode_tok_s"] for r in runs if r.get("prompt") == prompt and r["config"] == "none")
        for config in dict.fromkeys(r["config"] for r in runs if r.get("prompt") == prompt):
            mine = [r for r in runs if r.get("prompt") == prompt and r["config"] == config]
            speed = statistics.median(r["decode_tok_s"] for r in mine)
            spec = mine[-1]["speculation"] or {}
            rows.append({"batch": 1, "prompt": prompt, "config": config, "decode_tok_s": round(speed, 1),
                         "speedup": round(speed / base, 3), "acceptance_rate": spec.get("acceptance_rate"),
                         "mean_accepted": spec.get("mean_accepted"), "mean_k": spec.get("mean_k"),
                         "same_tokens_as_plain": all(r["tokens"] == plain[prompt] for r in mine)})
    for concurrency in dict.fromkeys(r["concurrency"] for r in runs if r.get("concurrency")):
        mine = [r for r in runs if r.get("concurrency") == concurrency]
        base = statistics.median(r["output_tok_s"] for r in mine if r["config"] == "none")
        for config in dict.fromkeys(r["config"] for r in mine):
            speed = statistics.median(r["output_tok_s"] for r in mine if r["config"] == config)
            spec = [r for r in mine if r["config"] == config][-1]["speculation"] or {}
            rows.append({"concurrency": concurrency, "config": config, "output_tok_s": round(speed, 1),
                         "vs_none": round(speed / base, 3), "acceptance_rate": spec.get("acceptance_rate"),
                         "mean_k": spec.get("mean_k")})
    return rows


if __name__ == "__main__":
    main()
