"""End-to-end decode throughput on a GPU: llmc's CUDA engine (through LLM: scheduler, sampler, Triton kernels)
against transformers' generate with a static cache and torch.compile, on the same random weights of
SmolLM2-135M's and a 1B Llama's shapes, at batch 1 / 16 / 64. llmc runs the float16 build (the same weights)
and an int4 build (RTN, groups of 128) of them; the int4 build also with synchronous steps (async scheduling off:
what overlapping the host with the GPU is worth, and a check that it changes no token). One JSON file, written
after every measurement.

    python benchmarks/gpu_e2e.py --out gpu_e2e.json --budget-s 330     # on the GPU machine (gpu_check.sh)
    TRITON_INTERPRET=1 python benchmarks/gpu_e2e.py --dry-run          # here: tiny shapes on the CPU

Target (issue 16): >= 1.5x transformers + torch.compile at batch 1 and 64.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch
from gpu_kernels import guarded  # this script's directory is on sys.path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}
TINY = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=320, rope_theta=10000.0)}


def write_checkpoint(directory: Path, shape: dict) -> Path:
    """A random Llama checkpoint (float16, transformers' initialization) with a small BPE tokenizer."""
    import transformers

    # tests/helpers.py by its path: the repository root on sys.path would shadow the `kernels` package that
    # transformers >= 5.25 imports with llmc's kernels/ directory
    spec = importlib.util.spec_from_file_location("llmc_test_helpers", ROOT / "tests" / "helpers.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    helpers.write_tiny_tokenizer(directory)  # 320 tokens: prompts are token ids, the model's vocabulary is its own
    config = transformers.LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=True,
                                      rms_norm_eps=1e-5, eos_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.float16).save_pretrained(directory)
    return directory


def build_bundle(checkpoint: Path, out: Path, name: str, int4: bool) -> Path:
    from llmc.compiler.pipeline import build
    from llmc.compiler.spec import parse_spec

    data = {"name": name, "source": str(checkpoint), "targets": ["cuda"], "output": str(out),
            "kv_cache": {"block_size": 16, "dtype": "float16"}}
    if int4:
        data["quantization"] = {"method": "rtn", "group_size": 128, "lm_head": False}
    return build(parse_spec(data, out))


def host_syncs(llm, prompts: list[list[int]]) -> dict:
    """Where the host waited for the GPU during 8 steps (torch's sync debug mode: each synchronizing operation
    warns from its call site). With async scheduling only the reads of the picks in flight should."""
    import warnings

    from llmc.runtime.sequence import SamplingParams

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = sorted({f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0][:120]}" for w in caught})
    return {"warnings": len(caught), "sites": sites[:12]}


def llmc_decode(bundle: Path, batch: int, prompt_len: int, new_tokens: int, device: str,
                cuda_graphs: bool = True, async_scheduling: bool = True) -> dict:
    from llmc.runtime import engine_torch_loader
    from llmc.runtime.llm import LLM
    from llmc.runtime.sequence import SamplingParams

    engine_torch_loader.TORCH_DEVICE = device
    llm = LLM(bundle, device="cuda", max_num_seqs=max(batch, 1), max_num_batched_tokens=max(batch * prompt_len, 256),
              kv_cache_memory="4GiB" if device == "cuda" else "16MiB", speculation=False, cuda_graphs=cuda_graphs,
              async_scheduling=async_scheduling)
    vocab = min(llm.geometry.vocab_size, 300)
    same = torch.Generator().manual_seed(batch)  # the same prompts for every llmc run of this batch
    prompts = torch.randint(3, vocab, (batch, prompt_len), generator=same).tolist()
    llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))  # Triton's compiles, first allocations
    before = llm.stats().timing
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    wall = time.perf_counter() - start
    timing = llm.stats().timing.since(before)
    syncs = guarded(host_syncs, llm, prompts) if device == "cuda" and async_scheduling and cuda_graphs else None
    return {"host_syncs": syncs, "output_tok_s": sum(len(o.token_ids) for o in outputs) / wall,
            "decode_tok_s": batch * timing.decode_steps / timing.decode_s if timing.decode_s else None,
            "decode_step_ms": 1e3 * timing.decode_s / max(timing.decode_steps, 1),
            "host_share": 1 - timing.engine_s / timing.total_s if timing.total_s else None,  # outside engine calls
            "tokens": [o.token_ids for o in outputs]}


def transformers_decode(checkpoint: Path, batch: int, prompt_len: int, new_tokens: int, device: str) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float16 if device == "cuda" else torch.float32).to(device).eval()
    if device == "cuda":  # transformers' fast path: a static cache and the compiled forward
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(3, 300, (batch, prompt_len), device=device)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def generate(n: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    generate(new_tokens)  # compiles (and captures the CUDA graphs) for this batch
    one, whole = generate(1), generate(new_tokens)
    return {"output_tok_s": batch * new_tokens / whole, "decode_tok_s": batch * (new_tokens - 1) / (whole - one),
            "decode_step_ms": 1e3 * (whole - one) / (new_tokens - 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_e2e.json")
    parser.add_argument("--budget-s", type=float, default=330.0, help="stop measuring past this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run (and TRITON_INTERPRET=1) to check the steps here")
    # the targets' batches (1 and 64) for both models first, batch 16 last: the time budget may end the run early
    shapes, batches = (TINY, [1, 4]) if args.dry_run else (SHAPES, [1, 64, 16])
    prompt_len, new_tokens = (16, 8) if args.dry_run else (128, 128)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "prompt_len": prompt_len, "new_tokens": new_tokens, "results": []}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmc-gpu-e2e-") as work:
        built: dict[str, tuple[Path, dict[str, Path]]] = {}  # model -> (checkpoint, bundles), built when first needed
        for batch, (name, shape) in itertools.product(batches, shapes.items()):
            if time.perf_counter() - start > args.budget_s:
                report["stopped"] = f"time budget of {args.budget_s:.0f} s reached before {name} batch {batch}"
                break
            if name not in built:
                checkpoint = write_checkpoint(Path(work) / name, shape)
                built[name] = checkpoint, {
                    "llmc-fp16": build_bundle(checkpoint, Path(work) / "out", f"{name}-fp16", int4=False),
                    "llmc-int4": build_bundle(checkpoint, Path(work) / "out", f"{name}-int4", int4=True)}
            checkpoint, bundles = built[name]
            row = {"model": name, "batch": batch, "transformers_compile": guarded(
                transformers_decode, checkpoint, batch, prompt_len, new_tokens, device)}
            runs = [(label, bundle, True, True) for label, bundle in bundles.items()]
            # what async scheduling is worth (the host's work under the GPU's) at the targets' batches
            runs.append(("llmc-int4-sync", bundles["llmc-int4"], True, False))
            if batch == 1:  # what the decode CUDA graphs are worth where the host matters most
                runs.append(("llmc-int4-eager", bundles["llmc-int4"], False, True))
            for label, bundle, graphs, overlap in runs:
                row[label] = guarded(llmc_decode, bundle, batch, prompt_len, new_tokens, device, graphs, overlap)
                if "decode_tok_s" in row[label] and "decode_tok_s" in row["transformers_compile"]:
                    row[f"{label}_vs_transformers"] = (row[label]["decode_tok_s"] or 0) / row[
                        "transformers_compile"]["decode_tok_s"]
            tokens = {label: row[label].pop("tokens", None) for label, *_ in runs}  # not for the report
            if tokens["llmc-int4"] is not None and tokens["llmc-int4-sync"] is not None:  # greedy, the same weights:
                row["async_tokens_match_sync"] = tokens["llmc-int4"] == tokens["llmc-int4-sync"]  # overlap changes none
            report["results"].append(row)
            Path(args.out).write_text(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps([{k: v for k, v in r.items() if k.endswith(("_vs_transformers", "_match_sync"))
                       or k in ("model", "batch")}
                      for r in report["results"]], indent=2))


if __name__ == "__main__":
    main()
