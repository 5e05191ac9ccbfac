"""`llmc build`: BuildSpec -> import -> passes -> emit -> bundle, each stage logged and timed."""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from llmc.artifacts import bundle as bundle_io
from llmc.artifacts.geometry import KV_FORMULA, kv_bytes_per_token
from llmc.compiler.emit_onnx import emit_onnx
from llmc.compiler.importer import import_checkpoint
from llmc.compiler.spec import BuildSpec
from llmc.compiler.tokenizer_meta import tokenizer_manifest
from llmc.passes.base import run_passes
from llmc.passes.quant_rtn import QuantRTN

log = logging.getLogger(__name__)

# Head-major pools: gathering a sequence's blocks yields [KVH, S, L, D] directly (no transpose copy).
KV_LAYOUT = "[num_kv_heads, num_blocks, block_size, head_dim] per layer, separate K and V pools"
STAGES = 4


def build_passes(spec: BuildSpec) -> list:
    """The ordered pass list for a spec (one flat list, phase by phase)."""
    passes = []
    # -- quantization ---------------------------------------------------------------------------
    if spec.quantization is not None:
        q = spec.quantization
        passes.append(QuantRTN(q.bits, q.group_size, q.symmetric, q.lm_head, q.zero_point))
    return passes


@contextmanager
def _stage(timings: dict, index: int, name: str):
    log.info("[%d/%d] %s", index, STAGES, name)
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)
    log.info("[%d/%d] %s done in %.1fs", index, STAGES, name, timings[name])


def build(spec: BuildSpec) -> Path:
    """Run the whole build; returns the bundle directory."""
    source = spec.source_path()  # a missing checkpoint fails before anything is written
    final = spec.output_dir()
    staging = bundle_io.staging_dir(final)
    timings: dict[str, float] = {}
    try:
        with _stage(timings, 1, "import"):
            ir = import_checkpoint(source, spec.max_context, spec.allow_pickle, work_dir=staging)
        with _stage(timings, 2, "passes"):
            passes = run_passes(ir, build_passes(spec))
        engines = {}
        with _stage(timings, 3, "emit"):
            for target in spec.targets:
                engine_dir = staging / "engines" / target
                level = spec.quantization.accuracy_level if spec.quantization else 0
                engines[target] = {"dir": f"engines/{target}",
                                   **emit_onnx(ir.model, engine_dir, ir.quantized, level)}
        with _stage(timings, 4, "bundle"):
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
                                                                   geo.head_dim, spec.kv_cache.dtype)},
                "engines": engines,
                "tokenizer": tokenizer_manifest(ir.tokenizer_dir, "tokenizer"),
                "passes": passes,
                "notes": ir.notes,
            }
            manifest["timings_s"] = dict(timings)
            (staging / "report.json").write_text(json.dumps({"timings_s": timings, "notes": ir.notes}, indent=2))
            bundle_io.write_bundle(staging, final, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("bundle written to %s", final)
    return final
