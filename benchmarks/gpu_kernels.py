"""The Triton kernels on a GPU: each against its torch reference at real model shapes, decode attention's
bandwidth against the device's copy bandwidth, the int4 GEMV against torch's fp16 matmul, and the device sampler
against the host's. One JSON file.

    python benchmarks/gpu_kernels.py --out gpu_kernels.json          # on the GPU machine (gpu_check.sh)
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --dry-run    # here: every step on tiny shapes, CPU

Targets (issue 16): decode attention >= 60% of copy bandwidth at >= 1k tokens of context; int4 GEMV >= 2x the
fp16 matmul at batch 1.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from functools import partial

import numpy as np
import torch

# (name, heads, kv_heads, head_dim, hidden, intermediate): SmolLM2-135M and a ~1B Llama (TinyLlama / Llama-3.2-1B)
MODELS = [("smollm2-135m", 9, 3, 64, 576, 1536), ("llama-1b", 32, 8, 64, 2048, 8192)]
ATTENTION_CONFIGS = [(32, 256), (64, 256), (64, 512), (128, 512)]  # (block_n, tokens_per_split); default first
# (block_n, block_k, split_k): the default first; split_k 1 says what splitting K (and summing its partial products:
# here a launch, in the engine none) is worth at batch 1
INT4_CONFIGS = [(64, 64, None), (64, 64, 1), (32, 128, None), (64, 128, None), (128, 128, None), (64, 256, None)]


def _timer(device: str):
    """Median milliseconds of fn (triton's do_bench on a GPU; wall time of a few runs on the CPU)."""
    if device == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100))

    def wall(fn):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return float(np.median(times))
    return wall


def _attention_case(rng, heads, kv_heads, head_dim, seqs, context, block_size, dtype, device):
    blocks_per_seq = -(-context // block_size)
    num_blocks = seqs * blocks_per_seq + 1
    pools = [torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2)]
    tables = torch.from_numpy(rng.permutation(num_blocks - 1)[:seqs * blocks_per_seq].reshape(seqs, -1)
                              .astype(np.int32)).to(device)
    lens = torch.full((seqs,), context, dtype=torch.int32, device=device)
    q = torch.randn(seqs, heads, head_dim, dtype=dtype, device=device)
    return q, pools[0], pools[1], tables, lens


def check_attention(device, dtype, timer, sizes) -> list[dict]:
    """Correctness at each model's shapes, then decode bandwidth at batch x context."""
    from llmc.kernels.triton import reference
    from llmc.kernels.triton.paged_attention import paged_decode, paged_prefill

    rng, results = np.random.default_rng(0), []
    for name, heads, kv_heads, head_dim, _, _ in MODELS:
        q, kp, vp, tables, lens = _attention_case(rng, heads, kv_heads, head_dim, 4, sizes["check_context"], 16,
                                                  dtype, device)
        starts = torch.arange(5, dtype=torch.int32, device=device)
        expected = reference.paged_attention_ref(q.cpu().float(), kp.cpu().float(), vp.cpu().float(), tables.cpu(),
                                                 lens.cpu(), starts.cpu(), head_dim ** -0.5)
        decode = paged_decode(q, kp, vp, tables, lens, head_dim ** -0.5).cpu().float()
        prefill = paged_prefill(q, kp, vp, tables, lens, starts, head_dim ** -0.5, 1).cpu().float()
        entry = {"model": name, "decode_max_abs_err": _err(decode, expected),
                 "prefill_max_abs_err": _err(prefill, expected)}
        for seqs, context in sizes["bandwidth"]:
            q, kp, vp, tables, lens = _attention_case(rng, heads, kv_heads, head_dim, seqs, context, 16, dtype,
                                                      device)
            ms = timer(partial(paged_decode, q, kp, vp, tables, lens, head_dim ** -0.5))
            kv_bytes = 2 * seqs * context * kv_heads * head_dim * kp.element_size()
            entry[f"decode_b{seqs}_ctx{context}"] = {"ms": ms, "kv_gb_s": kv_bytes / ms / 1e6}
        results.append(entry)
    return results


def copy_bandwidth(device, timer, size_mb) -> float:
    """GB/s of a device-to-device copy (bytes read + written)."""
    src = torch.empty(size_mb * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def check_int4(device, dtype, timer, sizes) -> list[dict]:
    """int4 GEMV / GEMM vs the reference and vs torch's fp16 matmul of the same (dequantized) weight."""
    from llmc.kernels.triton.int4_gemm import int4_matmul

    results = []
    for name, n, k, group, packed, scale, zero, weight in _int4_cases(np.random.default_rng(1), dtype, device, sizes):
        for m in sizes["batches"]:
            x = torch.randn(m, k, dtype=dtype, device=device)
            got = int4_matmul(x, packed, scale, zero, group, k)
            err = _err(got, x.float() @ weight.float().T)
            int4_ms = timer(partial(int4_matmul, x, packed, scale, zero, group, k))
            # as the engine calls it: a split's partial products are summed by the next kernel's loads
            partials_ms = timer(partial(int4_matmul, x, packed, scale, zero, group, k, reduce=False))
            fp16_ms = timer(partial(torch.matmul, x, weight.T))
            results.append({"model": name, "m": m, "n": n, "k": k, "max_abs_err": err, "int4_ms": int4_ms,
                            "int4_partials_ms": partials_ms, "fp16_matmul_ms": fp16_ms,
                            "speedup_vs_fp16": fp16_ms / int4_ms, "speedup_vs_fp16_partials": fp16_ms / partials_ms})
    return results


def sweep_attention(device, dtype, timer, sizes) -> list[dict]:
    """Decode attention's bandwidth over its tile sizes (keys a step, keys a split) at the largest batches, so one
    run says which defaults the device wants."""
    from llmc.kernels.triton.paged_attention import paged_decode

    rng, results = np.random.default_rng(2), []
    for name, heads, kv_heads, head_dim, _, _ in MODELS:
        for seqs, context in sizes["sweep_attention"]:
            q, kp, vp, tables, lens = _attention_case(rng, heads, kv_heads, head_dim, seqs, context, 16, dtype,
                                                      device)
            kv_bytes = 2 * seqs * context * kv_heads * head_dim * kp.element_size()
            for block_n, tokens_per_split in ATTENTION_CONFIGS:
                ms = timer(partial(paged_decode, q, kp, vp, tables, lens, head_dim ** -0.5,
                                   tokens_per_split=tokens_per_split, block_n=block_n))
                results.append({"model": name, "seqs": seqs, "context": context, "block_n": block_n,
                                "tokens_per_split": tokens_per_split, "ms": ms, "kv_gb_s": kv_bytes / ms / 1e6})
    return results


def sweep_int4(device, dtype, timer, sizes) -> list[dict]:
    """The batch-1 int4 GEMV over its tile sizes (output features a program, K columns a step) and with K whole,
    against the fp16 matmul, at each model's projection shapes."""
    from llmc.kernels.triton.int4_gemm import int4_matmul

    results = []
    for name, n, k, group, packed, scale, zero, weight in _int4_cases(np.random.default_rng(3), dtype, device, sizes):
        x = torch.randn(1, k, dtype=dtype, device=device)
        fp16_ms = timer(partial(torch.matmul, x, weight.T))
        for block_n, block_k, split_k in INT4_CONFIGS:
            ms = timer(partial(int4_matmul, x, packed, scale, zero, group, k, block_n=block_n, block_k=block_k,
                               split_k=split_k))
            results.append({"model": name, "n": n, "k": k, "block_n": block_n, "block_k": block_k,
                            "split_k": split_k or "auto", "int4_ms": ms, "fp16_matmul_ms": fp16_ms,
                            "speedup_vs_fp16": fp16_ms / ms})
    return results


def check_layer_ops(device, dtype) -> list[dict]:
    """The fused elementwise kernels (add + RMSNorm, rotary + KV write, SwiGLU) against their references."""
    from llmc.kernels.triton import reference
    from llmc.kernels.triton.layer_ops import add_rms_norm, rope_write_kv, silu_mul

    results = []
    for name, heads, kv_heads, head_dim, hidden, intermediate in MODELS:
        tokens, num_blocks, block_size = 64, 16, 16
        x, weight = torch.randn(tokens, hidden, dtype=dtype, device=device), torch.randn(hidden, dtype=dtype,
                                                                                         device=device)
        residual = torch.randn_like(x)
        expected_residual = residual.clone()
        norm = add_rms_norm(x, weight, 1e-5, residual)
        norm_ref = reference.add_rms_norm_ref(x, weight, 1e-5, expected_residual)
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
        angles = torch.rand(4096, head_dim // 2, device=device) * 6.3
        positions = torch.randint(0, 4096, (tokens,), dtype=torch.int32, device=device)
        slots = torch.randperm(num_blocks * block_size, device=device)[:tokens].to(torch.int32)
        pools = [torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device) for _ in "kv"]
        pools_ref = [p.clone() for p in pools]
        q = rope_write_kv(qkv, angles.cos(), angles.sin(), positions, slots, *pools, heads, kv_heads)
        q_ref = reference.rope_write_kv_ref(qkv, angles.cos(), angles.sin(), positions, slots, *pools_ref, heads,
                                            kv_heads)
        gate_up = torch.randn(tokens, 2 * intermediate, dtype=dtype, device=device)
        results.append({"model": name, "add_rms_norm_max_abs_err": _err(norm, norm_ref),
                        "residual_max_abs_err": _err(residual, expected_residual), "rope_q_max_abs_err": _err(q, q_ref),
                        "rope_pools_max_abs_err": max(_err(a, b) for a, b in zip(pools, pools_ref)),
                        "silu_mul_max_abs_err": _err(silu_mul(gate_up), reference.silu_mul_ref(gate_up))})
    return results


def _int4_cases(rng, dtype, device, sizes):
    """Each model's up and down projection shapes as (model, N, K, group, packed, scale, zero, weight): random int4
    codes with scales and zero points, and their dequantized weight [N, K] in dtype."""
    from llmc.kernels.triton import reference

    for name, _, _, _, hidden, intermediate in MODELS:
        for n, k in ((intermediate, hidden), (hidden, intermediate)):
            n, k = n // sizes["shrink"], k // sizes["shrink"]
            group = 128 if k % 128 == 0 else 32
            blocks = -(-k // group)
            packed = torch.from_numpy(rng.integers(0, 256, (n, blocks, group // 2), dtype=np.uint8)).to(device)
            scale = torch.rand(n, blocks, dtype=dtype, device=device) * 0.02
            zero = torch.from_numpy(rng.integers(0, 16, (n, blocks), dtype=np.uint8)).to(device)
            yield name, n, k, group, packed, scale, zero, reference.dequantize_int4(packed, scale, zero, group,
                                                                                   k).to(dtype)


def check_sampling(device, timer, sizes) -> list[dict]:
    """The device sampler (runtime/device_sampler.py) at batch x vocab: the tokens the host sampler picks for the
    same rows and uniforms, and its time against the argmax alone and against copying the logits to the host
    (what a step that samples on the host pays before numpy starts)."""
    from llmc.runtime.device_sampler import sample_rows
    from llmc.runtime.sampler import SamplingRows, draw, nucleus
    from llmc.runtime.sequence import SamplingParams

    rng, results = np.random.default_rng(0), []
    for batch, vocab in sizes["sampling"]:
        logits = (torch.randn(batch, vocab, device=device) * 4).to(torch.float16 if device == "cuda" else torch.float32)
        host_logits = logits.float().cpu().numpy()
        entry = {"batch": batch, "vocab": vocab,
                 "argmax_ms": timer(partial(sample_rows, logits, SamplingRows.greedy(batch))),
                 "logits_to_host_ms": timer(lambda rows=logits: rows.float().cpu())}
        for name, params in (("top_p", SamplingParams(temperature=0.8, top_p=0.9)),
                             ("top_k_top_p", SamplingParams(temperature=0.8, top_k=50, top_p=0.95))):
            rows = SamplingRows(np.full(batch, params.temperature), np.full(batch, params.top_k, np.int64),
                                np.full(batch, params.top_p), rng.random(batch))
            got = sample_rows(logits, rows).cpu().numpy()
            expected = [draw(*nucleus(row, params), u) for row, u in zip(host_logits, rows.uniform)]
            entry[name] = {"ms": timer(partial(sample_rows, logits, rows)),
                           "rows_unlike_host": int((got != np.array(expected)).sum())}
        results.append(entry)
    return results


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def guarded(measure, *args):
    """measure(*args), or {"error": ...}: a failure on the lent machine must not lose the other numbers (gpu_e2e.py
    guards its measurements with this too)."""
    try:
        return measure(*args)
    except Exception as error:  # noqa: BLE001 - recorded in the report, and the run goes on
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}"[:2000]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_kernels.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run (and TRITON_INTERPRET=1) to check the steps here")
    dtype = torch.float32 if args.dry_run else torch.float16
    sizes = ({"check_context": 37, "bandwidth": [(2, 64)], "sweep_attention": [(2, 64)], "batches": [1],
              "shrink": 16, "copy_mb": 8, "sampling": [(4, 1000)]}
             if args.dry_run else
             {"check_context": 1037, "bandwidth": [(1, 1024), (16, 1024), (64, 1024), (16, 4096), (64, 4096)],
              "sweep_attention": [(16, 1024), (64, 4096)], "batches": [1, 16, 64], "shrink": 1, "copy_mb": 1024,
              "sampling": [(64, 49152), (64, 128256)]})
    timer = _timer(device)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "dtype": str(dtype)}
    report["copy_gb_s"] = copy_bandwidth(device, timer, sizes["copy_mb"])
    report["layer_ops"] = guarded(check_layer_ops, device, dtype)
    report["attention"] = guarded(check_attention, device, dtype, timer, sizes)
    report["int4"] = guarded(check_int4, device, dtype, timer, sizes)
    report["attention_sweep"] = guarded(sweep_attention, device, dtype, timer, sizes)
    report["int4_sweep"] = guarded(sweep_int4, device, dtype, timer, sizes)
    report["sampling"] = guarded(check_sampling, device, timer, sizes)
    summary = report["summary"] = {}
    if isinstance(report["attention"], list):
        best = max(v["kv_gb_s"] for e in report["attention"] for key, v in e.items() if key.startswith("decode_b"))
        summary["decode_attention_best_fraction_of_copy"] = best / report["copy_gb_s"]
    if isinstance(report["int4"], list):
        summary["int4_gemv_best_speedup"] = max(r["speedup_vs_fp16"] for r in report["int4"] if r["m"] == 1)
        summary["int4_gemv_best_speedup_partials"] = max(r["speedup_vs_fp16_partials"] for r in report["int4"]
                                                         if r["m"] == 1)
    if isinstance(report["attention_sweep"], list):
        best = max(report["attention_sweep"], key=lambda r: r["kv_gb_s"])
        summary["decode_attention_sweep_best"] = {**best, "fraction_of_copy": best["kv_gb_s"] / report["copy_gb_s"]}
    if isinstance(report["int4_sweep"], list):
        summary["int4_gemv_sweep_best"] = max(report["int4_sweep"], key=lambda r: r["speedup_vs_fp16"])
    if isinstance(report["sampling"], list):
        summary["sampling"] = [{key: e[key] for key in ("batch", "vocab", "argmax_ms", "logits_to_host_ms")}
                               | {"top_p_ms": e["top_p"]["ms"], "rows_unlike_host": e["top_p"]["rows_unlike_host"]
                                  + e["top_k_top_p"]["rows_unlike_host"]} for e in report["sampling"]]
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
