"""`llmc inspect`: a bundle's manifest in words, read from its typed sections."""

from __future__ import annotations

from llmc.artifacts.bundle import Bundle
from llmc.artifacts.geometry import human_bytes
from llmc.artifacts.manifest import Engine, Speculative


def _engine_lines(target: str, engine: Engine) -> list[str]:
    skipped = f"; engine not built: {engine.skipped}" if engine.skipped else ""
    level, block = engine.accuracy_level, engine.activation_block_size
    kernels = (f"; MatMulNBits accuracy level {level}" if level is not None else "") + (
        f", int8 activation blocks of {block}" if block else "")
    lines = [f"engine    {target}: {engine.dir}/{engine.graph or engine.weights} (attention {engine.attention_op}"
             f"{kernels}){skipped}"]
    if engine.prefill:
        p = engine.prefill
        lines.append(f"          + {engine.dir}/{p.graph} for steps of many tokens ({p.linear_op}: weights "
                     f"{p.weights_format}, activations {p.activations}; on AMX where the CPU has it)")
    if engine.decode:
        d = engine.decode
        lines.append(f"          + {engine.dir}/{d.graph} for steps of few tokens ({d.linear_op}: {d.linear_format}; "
                     "where the CPU has AVX-512 VNNI)")
    return lines


def _plan_here(bundle: Bundle) -> str:
    """Whether the TensorRT plan loads on this machine (its TensorRT version and GPU)."""
    from llmc.artifacts.tensorrt_plan import check_plan, this_machine
    from llmc.errors import BundleError

    engine = bundle.manifest.engines["tensorrt"]
    built = f"TensorRT {engine.tensorrt}, compute capability {engine.compute_capability or '?'}"
    try:
        check_plan(bundle, *this_machine())
    except BundleError as err:
        return f"plan built with {built}; not loadable here: {str(err).split(': ', 1)[-1]}"
    return f"plan built with {built}; loads here"


def _speculative_line(spec: Speculative) -> str:
    if spec.method == "draft":
        draft = spec.draft
        drafter = (f"draft model {draft.name} ({draft.engine.dir}, passes: "
                   f"{', '.join(p.name for p in draft.passes) or 'none'}; vocabulary of "
                   f"{spec.pairing.extra['tokens_compared']:,} tokens checked)")
    else:
        drafter = f"n-gram lookup (n = {spec.ngram.max_n}..{spec.ngram.min_n})"
    return f"speculate {drafter}, k <= {spec.num_tokens}, {'adaptive' if spec.adaptive else 'fixed'}"


def describe(bundle: Bundle) -> list[str]:
    """The lines `llmc inspect` prints: model, KV cache, engines, passes, quality, speculation, files."""
    m = bundle.manifest
    geo, kv = m.model, m.kv_cache
    lines = [f"bundle    {bundle.path}",
             f"name      {m.name}  (llmc {m.llmc_version}, schema {m.schema_version}, {m.created_at})"]
    lines += [f"source    {m.source.kind}: {f.name}  sha256 {f.sha256[:16]}…  {human_bytes(f.size)}"
              for f in m.source.files]
    lines.append(f"model     {geo.architecture}: {geo.num_layers} layers, hidden {geo.hidden_size}, "
                 f"{geo.num_heads} heads / {geo.num_kv_heads} KV heads x {geo.head_dim}, "
                 f"vocab {geo.vocab_size}, context {geo.max_position}")
    lines.append(f"kv cache  block {kv.block_size} tokens, {kv.dtype}, {kv.bytes_per_token:,} bytes/token")
    for target, engine in m.engines.items():
        lines += _engine_lines(target, engine)
        if target == "tensorrt" and engine.plan:
            lines.append(f"          {_plan_here(bundle)}")
    lines.append(f"passes    {', '.join(p.name for p in m.passes) or 'none'}")
    lines += [f"          {p.name}: {p.num_quantized} linears, {p.bits}-bit groups of {p.group_size}, "
              f"mean relative weight error {p.mean_rel_weight_error:.4f}"
              for p in m.passes if p.num_quantized is not None]
    quality = m.quality.eval
    if quality:
        source = (f", source {quality.reference_perplexity:.3f}, KL {quality.kl_from_reference:.4f}"
                  if quality.kl_from_reference is not None else "")
        lines.append(f"quality   perplexity {quality.perplexity:.3f}{source} on {quality.windows} held-out "
                     f"windows of {quality.window_tokens} tokens (report.json has the per-layer errors)")
    if m.speculative:
        lines.append(_speculative_line(m.speculative))
    lines.append("timings   " + ", ".join(f"{k} {v:.1f}s" for k, v in m.timings_s.items()))
    lines += [f"  {f.sha256[:12]}  {human_bytes(f.size):>10}  {rel}" for rel, f in m.files.items()]
    total = sum(f.size for f in m.files.values())
    lines.append(f"verified  {len(m.files)} files, {human_bytes(total)}: all sha256 checksums match")
    return lines
