"""The `llmc` command line. Thin: parse options, call the library, print results.

Build-side modules (torch, transformers, onnx) are imported inside the commands that need
them, so `llmc run` / `llmc inspect` stay on the light serving path.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import click

from llmc import __version__
from llmc.artifacts.geometry import human_bytes
from llmc.engine_options import engine_options
from llmc.errors import LlmcError
from llmc.runtime.engine_config import EngineConfig


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="[llmc] %(message)s", stream=sys.stderr)


@click.group()
@click.version_option(__version__, prog_name="llmc")
def cli() -> None:
    """llmc: compile a Hugging Face checkpoint into a verified bundle, then serve it."""


@cli.command()
@click.argument("model_yaml", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Write the bundle under DIR (DIR/<name>) instead of the yaml's `output:`.")
@click.option("-q", "--quiet", is_flag=True, help="Only print the bundle path.")
def build(model_yaml: Path, output: Path | None, quiet: bool) -> None:
    """Build a bundle from MODEL_YAML (import, passes, engines, manifest)."""
    _setup_logging(0 if quiet else 1)
    from llmc.compiler.pipeline import build as run_build
    from llmc.compiler.spec import load_spec

    start = time.perf_counter()
    spec = load_spec(model_yaml)
    if output is not None:
        spec = spec.model_copy(update={"output": str(output.resolve())})
    out = run_build(spec)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    if quiet:
        click.echo(str(out))
    else:
        click.echo(f"built {out} ({human_bytes(size)}) in {time.perf_counter() - start:.1f}s")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.")
def inspect(bundle: Path, as_json: bool) -> None:
    """Show what is inside BUNDLE and verify every file's checksum."""
    from llmc.artifacts.bundle import MANIFEST, load_bundle
    from llmc.inspect_bundle import describe

    loaded = load_bundle(bundle, verify=True)
    if as_json:
        click.echo((loaded.path / MANIFEST).read_text())
        return
    for line in describe(loaded):
        click.echo(line)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", required=True, help="The prompt (or the user message with --chat).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the bundle's chat template.")
@click.option("--system", default=None, help="System message (with --chat).")
@click.option("--max-tokens", default=128, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=int)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@engine_options(kv_cache_memory="256MiB", max_num_seqs=1)
@click.option("-v", "--verbose", count=True)
def run(bundle: Path, prompt: str, chat: bool, system: str | None, max_tokens: int, temperature: float,
        top_k: int, top_p: float, seed: int | None, stop: tuple[str, ...], engine: EngineConfig, verbose: int) -> None:
    """Generate from BUNDLE, streaming tokens to the terminal."""
    _setup_logging(verbose)
    from llmc.runtime.llm import LLM
    from llmc.runtime.sequence import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop=stop)
    llm = LLM(bundle, engine)
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt = llm.tokenizer.encode_chat(messages)
    for chunk in llm.stream(prompt, params):
        click.echo(chunk.text, nl=False)
        sys.stdout.flush()
    click.echo()


@cli.command(name="eval")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--text", "texts", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Held-out text file (repeatable).")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Bundle or checkpoint to measure KL from (default: a quantized bundle's source).")
@click.option("--seq-len", default=512, show_default=True, type=int, help="Tokens per window.")
@click.option("--max-windows", default=16, show_default=True, type=int)
@click.option("--chunk-tokens", type=click.IntRange(min=1), default=None,
              help="Score each window this many tokens a step (later tokens read K/V from the pool, as when "
                   "serving); default: a window a step.")
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "--verbose", count=True)
def eval_command(bundle: Path, texts: tuple[Path, ...], reference: Path | None, seq_len: int, max_windows: int,
                 chunk_tokens: int | None, as_json: bool, verbose: int) -> None:
    """Perplexity of BUNDLE on held-out text, and KL from the unquantized model."""
    _setup_logging(verbose)
    from llmc.eval_bundle import eval_bundle

    for text in texts:
        if not text.is_file():
            raise click.BadParameter(f"{text}: no such file", param_hint="--text")
    result = eval_bundle(bundle, list(texts), reference, seq_len, max_windows, chunk_tokens)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['windows']} windows x {result['window_tokens']} tokens ({result['predicted_tokens']:,} "
               f"predictions) from {len(texts)} file(s)")
    click.echo(f"perplexity: {result['perplexity']:.3f}")
    if result["reference"]:
        click.echo(f"reference perplexity: {result['reference_perplexity']:.3f} ({result['reference']})")
        click.echo(f"mean KL(reference || bundle): {result['kl_from_reference']:.4f} nats/token")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", envvar="LLMC_API_KEY", default=None, help="Require 'Authorization: Bearer KEY' "
              "(env LLMC_API_KEY); /health stays open.")
@click.option("--served-model-name", default=None, help="Model id clients send (default: the bundle name).")
@engine_options()
@click.option("--max-waiting", default=256, show_default=True, type=int, help="Queued requests before 429s.")
@click.option("--drain-timeout", default=30.0, show_default=True, type=float,
              help="Seconds SIGTERM lets in-flight requests finish (new ones get 503).")
@click.option("--max-request-bytes", default="1MiB", show_default=True, help="Largest request body (413 beyond).")
@click.option("--allowed-hosts", default="", help="Comma-separated Host names answered besides localhost ones "
              "(behind a proxy); '*' answers any.")
@click.option("--cors-origins", default="", help="Comma-separated browser origins allowed to call the API "
              "(CORS is off by default).")
@click.option("-v", "--verbose", count=True)
def serve(bundle: Path, host: str, port: int, api_key: str | None, served_model_name: str | None,
          engine: EngineConfig, max_waiting: int, drain_timeout: float, max_request_bytes: str,
          allowed_hosts: str, cors_origins: str, verbose: int) -> None:
    """Serve BUNDLE over an OpenAI-compatible HTTP API."""
    _setup_logging(verbose)
    from llmc.runtime.async_engine import AsyncEngine
    from llmc.runtime.block_manager import blocks_needed
    from llmc.runtime.http_guard import is_loopback
    from llmc.runtime.kv_pool import parse_bytes
    from llmc.runtime.llm import LLM
    from llmc.runtime.server import ServerConfig
    from llmc.runtime.server import serve as run_server

    config = ServerConfig(api_key=api_key, max_request_bytes=parse_bytes(max_request_bytes),
                          allowed_hosts=_csv(allowed_hosts), cors_origins=_csv(cors_origins),
                          drain_timeout_s=drain_timeout)

    llm = LLM(bundle, engine)
    pool, context = llm.pool, llm.geometry.max_position
    pools = [p for p in (pool, llm.draft_pool) if p is not None]  # a draft model's pool shares the block ids
    total = sum(p.keys.nbytes + p.values.nbytes for p in pools)
    per_token = total // (pool.num_blocks * pool.block_size)
    with_draft = " with the draft's" if len(pools) > 1 else ""
    click.echo(f"KV cache: {pool.num_blocks} blocks x {pool.block_size} tokens = {pool.num_blocks * pool.block_size:,} "
               f"tokens ({human_bytes(total)}, {per_token:,} bytes/token{with_draft}); "
               f"max concurrency at full context ({context:,} tokens): "
               f"{pool.num_blocks // blocks_needed(context, pool.block_size)}")
    if pool.num_blocks * pool.block_size < context:
        click.echo(f"warning: the KV cache holds {pool.num_blocks * pool.block_size:,} tokens, less than one "
                   f"sequence at full context ({context:,}); longer sequences end with finish_reason "
                   "'kv_cache_full' (raise --kv-cache-memory)", err=True)
    if not is_loopback(host) and not api_key:
        click.echo(f"warning: serving on {host} without an API key: anyone who can reach this address can use "
                   "the server (set --api-key or LLMC_API_KEY)", err=True)
    name = served_model_name or llm.bundle.manifest.name
    click.echo(f"serving '{name}' on http://{host}:{port}/v1 ({engine.policy} batching, up to {engine.max_num_seqs} "
               "sequences"
               f"{', API key required' if api_key else ''}{_spec_summary(llm)}); Ctrl-C or SIGTERM drains and stops")
    run_server(AsyncEngine(llm, max_waiting), name, host, port, config)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _spec_summary(llm) -> str:
    if llm.speculation is None:
        return ""
    section, policy = llm.bundle.manifest.speculative, llm.speculation.policy
    drafter = section.draft.name if section.method == "draft" else "n-gram lookup"
    return f", speculative decoding: {drafter}, k <= {policy.k_max} ({'adaptive' if policy.adaptive else 'fixed'})"


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise click.BadParameter(f"{text!r}: use MIN:MAX, e.g. 30:500") from None


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--mode", type=click.Choice(["offline", "online"]), default="offline", show_default=True,
              help="offline: Python API, all queued at once; online: HTTP streaming with Poisson arrivals.")
@click.option("--num-requests", default=64, show_default=True, type=int)
@click.option("--prompt-len", default="30:500", show_default=True, help="Prompt tokens MIN:MAX (uniform).")
@click.option("--output-len", default="30:250", show_default=True, help="Output tokens MIN:MAX (uniform, EOS ignored).")
@click.option("--rate", default="inf", show_default=True, help="Online: requests/s (Poisson), or inf.")
@click.option("--url", default=None, help="Online: an already running OpenAI-compatible server.")
@engine_options(kv_cache_memory="2GiB")
@click.option("--sweep", default=None, help="Offline sweep, e.g. max_num_seqs=1,2,4,8,16 (writes JSON + PNG).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", "out_path", default="bench.json", show_default=True, type=click.Path(path_type=Path))
@click.option("--profile", is_flag=True,
              help="Offline: profile every step with onnxruntime's profiler and report where step time goes "
                   "(GEMMs, attention, the rest, outside the graph, host).")
@click.option("--structured", default=None, metavar="json_object|SCHEMA.json",
              help="Offline: constrain every request (any JSON object, or a JSON schema file) and report the "
                   "constraints' cost per token.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Every request's temperature (0: greedy); request i is seeded with i.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Every request's top-p.")
@click.option("--unseeded", is_flag=True,
              help="Sampled requests carry no seed (vLLM 0.32 for CPU fails on a seeded request whose prompt is "
                   "prefilled in chunks).")
def bench(bundle: Path, mode: str, num_requests: int, prompt_len: str, output_len: str, rate: str, url: str | None,
          engine: EngineConfig, sweep: str | None, seed: int, out_path: Path, profile: bool,
          structured: str | None, temperature: float, top_p: float, unseeded: bool) -> None:
    """Benchmark BUNDLE: tokens/s, TTFT, TPOT, inter-token latency, KV usage and waste."""
    _setup_logging(1)
    from llmc.artifacts.bundle import load_bundle
    from llmc.runtime import bench as b
    from llmc.runtime.llm import LLM

    loaded = load_bundle(bundle)
    workload = b.make_workload(num_requests, _range(prompt_len), _range(output_len), loaded.geometry.vocab_size, seed)
    settings = {"max_num_seqs": engine.max_num_seqs, "max_num_batched_tokens": engine.max_num_batched_tokens}
    make = lambda profile_dir=None, **kw: LLM(loaded, engine, profile_dir=profile_dir, **kw)  # noqa: E731
    sampling = b.BenchSampling(temperature, top_p, seeded=not unseeded)
    if profile and (sweep or mode != "offline"):
        raise click.BadParameter("--profile goes with --mode offline (no --sweep)")
    if sweep:
        key, _, values = sweep.partition("=")
        if key not in settings:
            raise click.BadParameter(f"--sweep: {key!r} is not one of {', '.join(settings)}")
        results = []
        for value in (int(v) for v in values.split(",")):
            click.echo(f"sweep {key}={value} ...", err=True)
            results.append({key: value, **b.run_offline(make(**{key: value}), workload, sampling=sampling)})
        plot = b.plot_sweep(results, key, str(out_path.with_suffix(".png")))
        report = {"workload": {"requests": num_requests, "prompt_len": prompt_len, "output_len": output_len},
                  "sweep": results, "plot": plot}
    elif mode == "offline":
        with tempfile.TemporaryDirectory(prefix="llmc-profile-") as traces:
            llm = make(profile_dir=traces if profile else None)
            report = {"mode": "offline", **settings, "policy": engine.policy,
                      **b.run_offline(llm, workload, _structured(structured), sampling)}
    else:
        report = {"mode": "online", **_online(b, make, workload, url, float(rate), loaded.manifest.name, seed,
                                              sampling)}
    out_path.write_text(b.to_json(report))
    click.echo(b.to_json(report))
    click.echo(f"wrote {out_path}", err=True)


def _structured(option: str | None):
    """--structured as a StructuredOutput."""
    from llmc.runtime.sequence import StructuredOutput

    if option is None:
        return None
    if option == "json_object":
        return StructuredOutput("json_object", '{"type": "object"}')
    path = Path(option)
    if not path.is_file():
        raise click.BadParameter(f"{option}: give json_object or a JSON schema file", param_hint="--structured")
    return StructuredOutput("json_schema", path.read_text())


def _online(b, make, workload, url, rate, name, seed, sampling) -> dict:
    if url:
        return b.run_online(url.rstrip("/"), workload, rate, None, seed, sampling)
    from llmc.runtime.async_engine import AsyncEngine
    from llmc.runtime.server import serve_in_thread

    with serve_in_thread(AsyncEngine(make(), max_waiting=len(workload)), name) as local_url:
        return b.run_online(local_url, workload, rate, name, seed, sampling)


@cli.command("kv-size")
@click.argument("target", required=False, type=click.Path(path_type=Path))
@click.option("--layers", type=int, help="Number of layers (explicit geometry).")
@click.option("--heads", type=int, help="Query heads (explicit geometry; informative).")
@click.option("--kv-heads", type=int, help="KV heads (= heads for multi-head attention).")
@click.option("--head-dim", type=int, help="Head dimension.")
@click.option("--dtype", default=None, help="KV dtype: fp16, bf16, fp32, fp8, int8 (default: the target's, else fp16).")
@click.option("--context", type=int, help="Tokens per request (default: the model's context, else 4096).")
@click.option("--batch", default=1, show_default=True, type=int, help="Concurrent requests.")
@click.option("--block-size", type=int, help="Round each request up to whole KV blocks.")
def kv_size(target: Path | None, layers, heads, kv_heads, head_dim, dtype, context, batch, block_size) -> None:
    """KV-cache bytes per token, per request and per batch, for TARGET or explicit geometry.

    TARGET is a model.yaml, a bundle directory, an HF config.json or checkpoint directory.
    """
    from llmc.kv_report import kv_report, resolve_geometry

    geo = resolve_geometry(target, layers, heads, kv_heads, head_dim, dtype, context, block_size)
    click.echo(kv_report(geo, batch))


def main() -> None:
    """Console entry point: user errors print one paragraph and exit non-zero, no traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except LlmcError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
