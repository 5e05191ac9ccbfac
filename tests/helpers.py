"""Test helpers: tiny random Llama-family checkpoints with a real (tiny) tokenizer."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from pathlib import Path


def triton_or_skip(what: str):
    """For a test module of Triton kernels: (torch, device, dtype) with TRITON_INTERPRET=1 set where there is no
    GPU (it must be set before triton is first imported, so call this before importing llmc's Triton code); the
    module is skipped, saying so, where torch or triton is missing. dtype: float16 on a GPU, float32 in the
    interpreter (it has no half-precision dot)."""
    import pytest

    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels run on numpy
    pytest.importorskip("triton", reason=f"triton is not installed: {what} not tested here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch, device, torch.float16 if device == "cuda" else torch.float32


TEXT = ("The capital of France is Paris. The capital of Italy is Rome. Paged attention keeps the KV cache "
        "in fixed-size blocks. Continuous batching lets new requests join between steps. ") * 20
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_tokenizer(directory: Path, vocab_size: int = 320) -> int:
    """Train a byte-level BPE on a fixed text; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "bos_token": None, "chat_template": CHAT_TEMPLATE}))
    return tok.get_vocab_size()


def write_tiny_checkpoint(directory: Path, arch: str = "llama", seed: int = 0, tokenizer_vocab: int = 320,
                          **overrides) -> Path:
    """A random HF checkpoint (config.json + safetensors + tokenizer) of a tiny Llama-family model."""
    import torch
    import transformers

    vocab = write_tiny_tokenizer(directory, tokenizer_vocab)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=0)
    common.update(overrides)
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
              "mistral": transformers.MistralConfig}[arch](**common)
    torch.manual_seed(seed)
    model = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
             "mistral": transformers.MistralForCausalLM}[arch](config)
    with torch.no_grad():  # larger weights than the default init, so logits are far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "bias" in str(p):
                p.normal_(0, 0.02)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def write_yaml(path: Path, **fields) -> Path:
    """A model.yaml from keyword fields."""
    import yaml

    path.write_text(yaml.safe_dump(fields))
    return path


def edit_manifest(bundle: Path, copy_to: Path, edit) -> Path:
    """A copy of `bundle` whose manifest.json went through `edit(dict)` (its checksum rewritten to match): a
    bundle as another llmc, or a hand edit, would leave it."""
    import hashlib
    import shutil

    from llmc.artifacts.bundle import MANIFEST, MANIFEST_CHECKSUM

    copy = shutil.copytree(bundle, copy_to)
    manifest = json.loads((copy / MANIFEST).read_text())
    edit(manifest)
    body = json.dumps(manifest).encode()
    (copy / MANIFEST).write_bytes(body)
    (copy / MANIFEST_CHECKSUM).write_text(hashlib.sha256(body).hexdigest())
    return copy


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, or None when one is a prefix of the other."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


def assert_same_or_near_tie(tokens: list[int], ref_tokens: list[int], ref_logprobs, tol: float = 1e-3) -> None:
    """Token-for-token equality, except a divergence where the reference's top-2 logits are < tol apart."""
    i = first_divergence(tokens, ref_tokens)
    if i is None:
        assert len(tokens) == len(ref_tokens), f"{len(tokens)} tokens vs {len(ref_tokens)}"
        return
    (_, lp1), (_, lp2) = ref_logprobs[i].top[:2]
    gap = lp1 - lp2
    assert gap < tol, f"outputs diverge at token {i} where the top-2 logit gap is {gap:.2e} (not a near-tie)"


def step_graph_vs_torch(graph_path, model, n: int = 21, options=None):
    """One prefill step of n random tokens through an emitted step graph and through the torch model.

    Returns (onnx logits, torch logits), both [n, vocab].
    """
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(graph_path), options or session_options(), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, model.geo.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
    kv = model.new_kv_cache(8, 4)
    i32 = torch.int32
    inputs = {"input_ids": ids, "positions": torch.arange(n), "block_tables": torch.arange(6, dtype=i32)[None],
              "context_lens": torch.tensor([n], dtype=i32), "query_start": torch.tensor([0, n], dtype=i32),
              "logits_index": torch.arange(n)}
    feeds = {k: v.numpy() for k, v in inputs.items()}
    for i, (k, v) in enumerate(kv):
        feeds[f"key_pool_{i}"], feeds[f"value_pool_{i}"] = k.numpy().copy(), v.numpy().copy()
    logits = session.run(None, feeds)[0]
    return logits, model(slot_mapping=torch.arange(n), kv_cache=kv, **inputs).numpy()


def session_options():
    """onnxruntime session options on the process's global thread pool (tests/conftest.py creates it at the start,
    as llmc's engines do): once it exists, onnxruntime refuses sessions with threads of their own."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.use_per_session_threads = False
    return options


def ort_options(fused: bool, profile_prefix=None):
    """onnxruntime session options running llmc.PagedAttention as llmc's fused CPU kernel (fused=True; skipped
    when this machine has no C++ compiler, fails when the library does not build) or as its ONNX function body."""
    import pytest

    from llmc.kernels import fused_cpu

    options = session_options()
    if fused:
        if fused_cpu._compiler() is None:
            pytest.skip("no C++ compiler here: llmc's fused CPU kernels cannot be built")
        assert fused_cpu.register_fused_kernels(options), "the fused CPU kernels did not build or load (see the log)"
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    return options


@functools.cache
def emulated_amx_library() -> Path:
    """llmc's kernel library built with its AMX kernels on a scalar model of the tiles
    (kernels/cpu/amx_emulation.h), so that they run, slowly, on CPUs without AMX; once per test run."""
    import pytest

    from llmc.kernels import fused_cpu

    compiler = fused_cpu._compiler()
    if compiler is None:
        pytest.skip("no C++ compiler here: llmc's kernels cannot be built")
    target = Path(tempfile.mkdtemp(prefix="llmc-amx-emulation-")) / fused_cpu.LIBRARY
    fused_cpu.compile_library(target, compiler, ("-DLLMC_AMX_EMULATION",))
    return target


def int8_backend_env(kernels: str):
    """For kernels="native-vnni", LLMC_INT8_BACKEND=avx512-vnni while the block runs (the kernels read it
    when a session creates them): the VNNI GEMM even where the CPU has AMX."""
    from unittest import mock

    from llmc.kernels.fused_cpu import INT8_BACKEND_ENV

    if kernels != "native-vnni":
        return contextlib.nullcontext()
    return mock.patch.dict(os.environ, {INT8_BACKEND_ENV: "avx512-vnni"})


def kernel_options(kernels: str):
    """Session options for `kernels`: "native" (the library engines load: AMX or AVX-512 VNNI, the CPU's
    best), "native-vnni" (the same library; create the session inside int8_backend_env), "emulated-amx"
    (emulated_amx_library: the AMX kernels on any CPU) or "function-body"."""
    if kernels != "emulated-amx":
        return ort_options(kernels in ("native", "native-vnni"))
    options = session_options()
    options.register_custom_ops_library(str(emulated_amx_library()))
    return options


def profiled_op_types(session) -> set[str]:
    """Op types of the nodes a profiled session ran."""
    import json

    events = json.loads(open(session.end_profiling()).read())
    return {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}
