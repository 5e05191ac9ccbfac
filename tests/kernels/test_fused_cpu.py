"""llmc's fused CPU kernel for llmc.PagedAttention: same results as the op's ONNX function body and torch,
clear errors, and a clean fallback when it cannot be built."""

import logging
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from llmc.compiler.emit_onnx import EmitOptions, emit_onnx
from llmc.compiler.importer import import_checkpoint
from llmc.kernels import fused_cpu
from tests.helpers import ort_options, profiled_op_types, write_tiny_checkpoint

BLOCK, NUM_BLOCKS = 6, 64  # 6: the kernel's 64-key chunks end inside blocks


# Head geometries: the tiny model's (head size 16: the kernel's generic loops), SmolLM2's (64, 3 query
# heads per KV head) and head size 128 with 2 (the grouped loops with constant sizes).
HEADS = {"d16-g2": {}, "d64-g3": dict(hidden_size=384, num_attention_heads=6, num_key_value_heads=2),
         "d128-g2": dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=2)}


@pytest.fixture(scope="module", params=[("float32", "d16-g2"), ("float16", "d16-g2"), ("int8", "d16-g2"),
                                        ("float32", "d64-g3"), ("float16", "d64-g3"), ("int8", "d64-g3"),
                                        ("float32", "d128-g2")], ids="-".join)
def engine(request, tiny_checkpoint, tmp_path_factory):
    """(model, step graph, KV dtype, KV scales) over float32, float16 and int8 pools and several head geometries."""
    kv_dtype, heads = request.param
    work = tmp_path_factory.mktemp("fused")
    checkpoint = write_tiny_checkpoint(work / "ckpt", **HEADS[heads]) if HEADS[heads] else tiny_checkpoint
    model = import_checkpoint(checkpoint, work_dir=work).model
    geo, rng = model.geo, np.random.default_rng(2)
    scales = {i: tuple(rng.uniform(0.01, 0.03, geo.num_kv_heads * geo.head_dim).astype(np.float32) for _ in range(2))
              for i in range(geo.num_layers)} if kv_dtype == "int8" else None
    entry = emit_onnx(model, work / "engine", options=EmitOptions(kv_dtype=kv_dtype), kv_scales=scales)
    return model, work / "engine" / entry["graph"], kv_dtype, scales


def _random_pool(rng, shape, kv_dtype):
    if kv_dtype == "int8":
        return rng.integers(-127, 128, shape, dtype=np.int8)
    return rng.standard_normal(shape, dtype=np.float32).astype(kv_dtype)


def _pool_values(pools, scales):
    """The pools as float32 tensors for the torch model (int8 codes times their channels' scales)."""
    out = []
    for i, (k, v) in enumerate(pools):
        if scales is not None:
            shape = k.shape[2:]
            k, v = k * scales[i][0].reshape(shape), v * scales[i][1].reshape(shape)
        out.append((torch.from_numpy(k.astype(np.float32)), torch.from_numpy(v.astype(np.float32))))
    return out


def _long_step(model, kv_dtype="float32"):
    """One step over random pools: sequence 0 has 40 cached tokens and brings 100 new ones, sequence 1
    prefills 30 (both in tiles of 16 rows), sequence 2 decodes one token after 20 cached (in chunks).
    Large enough that the kernel splits the work over onnxruntime's threads."""
    rng = np.random.default_rng(1)
    geo = model.geo
    shape = (NUM_BLOCKS, BLOCK, geo.num_kv_heads, geo.head_dim)
    pools = [(_random_pool(rng, shape, kv_dtype), _random_pool(rng, shape, kv_dtype)) for _ in range(geo.num_layers)]
    order = rng.permutation(NUM_BLOCKS)
    tables = np.zeros((3, 35), dtype=np.int32)
    tables[0], tables[1, :8], tables[2, :4] = order[:35], order[35:43], order[43:47]
    positions = np.concatenate([np.arange(40, 140), np.arange(0, 30), [20]])
    seq = np.repeat([0, 1, 2], [100, 30, 1])
    inputs = {"input_ids": rng.integers(0, geo.vocab_size, 131), "positions": positions,
              "block_tables": tables, "context_lens": np.array([140, 30, 21], dtype=np.int32),
              "query_start": np.array([0, 100, 130, 131], dtype=np.int32), "logits_index": np.arange(131)}
    slots = tables[seq, positions // BLOCK] * BLOCK + positions % BLOCK
    return inputs, pools, slots


def _feeds(inputs, pools):
    feeds = dict(inputs)
    for i, (k, v) in enumerate(pools):
        feeds[f"key_pool_{i}"], feeds[f"value_pool_{i}"] = k, v
    return feeds


def test_fused_kernel_matches_function_body_and_torch_on_a_long_step(engine, tmp_path):
    model, graph, kv_dtype, scales = engine
    inputs, pools, slots = _long_step(model, kv_dtype)
    fused = ort.InferenceSession(str(graph), ort_options(True, tmp_path / "prof"), providers=["CPUExecutionProvider"])
    body = ort.InferenceSession(str(graph), ort_options(False), providers=["CPUExecutionProvider"])
    got = fused.run(None, _feeds(inputs, pools))
    want = body.run(None, _feeds(inputs, pools))
    assert np.abs(got[0] - want[0]).max() < 1e-4
    # float16: one rounding step apart where fp32 RoPE differs; int8: one code apart at most
    rtol, atol = {"float16": (2e-3, 1e-4), "int8": (0.0, 1.0)}.get(kv_dtype, (0.0, 1e-4))
    for name, a, b in zip(("new_keys", "new_values"), got[1:], want[1:]):
        assert np.allclose(a.astype(np.float32), b.astype(np.float32), rtol=rtol, atol=atol), name
    kv = _pool_values(pools, scales)
    expected = model(slot_mapping=torch.from_numpy(slots), kv_cache=kv,
                     **{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
    assert np.abs(got[0] - expected.numpy()).max() < 1e-4
    if scales is not None:  # the returned codes are the torch model's new K/V on the pools' scales
        geo = model.geo
        for name, codes, pool, j in (("new_keys", got[1], 0, 0), ("new_values", got[2], 1, 1)):
            written = torch.stack([kv[i][pool].reshape(-1, geo.num_kv_heads, geo.head_dim)[slots]
                                   for i in range(geo.num_layers)]).numpy()  # [layers, T, KVH, D]
            step = np.stack([scales[i][j].reshape(geo.num_kv_heads, geo.head_dim) for i in range(geo.num_layers)])
            expected_codes = np.clip(np.round(written / step[:, None]), -127, 127)
            assert np.abs(codes.astype(np.float32) - expected_codes).max() <= 1, name
    assert "PagedAttention" in profiled_op_types(fused)


def test_fused_kernel_rejects_a_block_outside_the_pool(engine):
    model, graph, kv_dtype, _ = engine
    inputs, pools, _ = _long_step(model, kv_dtype)
    inputs["block_tables"][0, 3] = NUM_BLOCKS + 5
    session = ort.InferenceSession(str(graph), ort_options(True), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="llmc.PagedAttention: a block table entry is outside the KV pool"):
        session.run(None, _feeds(inputs, pools))


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """fused_kernels_library() recomputed under this test's environment, with an empty kernel cache."""
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / "cache"))
    fused_cpu.fused_kernels_library.cache_clear()
    yield fused_cpu.fused_kernels_library
    fused_cpu.fused_kernels_library.cache_clear()


def test_switched_off_by_the_environment(fresh_library, monkeypatch):
    monkeypatch.setenv(fused_cpu.ENV_SWITCH, "0")
    assert fresh_library() is None


def test_without_a_compiler_engines_fall_back_with_a_warning(fresh_library, monkeypatch, caplog):
    monkeypatch.setenv("CXX", "no-such-compiler-llmc")
    with caplog.at_level(logging.WARNING, logger="llmc.kernels.fused_cpu"):
        assert fresh_library() is None
    assert "no C++ compiler" in caplog.text and "apt install g++" in caplog.text


def test_a_failing_compile_falls_back_with_the_compiler_message(fresh_library, monkeypatch, tmp_path, caplog):
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake 1.0 && exit 0\necho 'error: broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with caplog.at_level(logging.WARNING, logger="llmc.kernels.fused_cpu"):
        assert fresh_library() is None
    assert "compiling llmc's fused CPU kernels failed" in caplog.text and "error: broken" in caplog.text
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_the_library_is_built_once_and_reused(fresh_library, tmp_path):
    if fused_cpu._compiler() is None:
        pytest.skip("no C++ compiler here")
    path = fresh_library()
    assert path is not None and path.is_file() and str(path).startswith(str(tmp_path / "cache"))
    fused_cpu.fused_kernels_library.cache_clear()
    mtime = path.stat().st_mtime_ns
    assert fresh_library() == path and path.stat().st_mtime_ns == mtime


def test_a_library_onnxruntime_cannot_load_falls_back(monkeypatch, tmp_path, caplog):
    broken = tmp_path / "libbroken.so"
    broken.write_bytes(b"not a shared library")
    monkeypatch.setattr(fused_cpu, "fused_kernels_library", lambda: broken)
    with caplog.at_level(logging.WARNING, logger="llmc.kernels.fused_cpu"):
        assert not fused_cpu.register_fused_kernels(ort.SessionOptions())
    assert "could not load" in caplog.text and "delete that file" in caplog.text


def test_loading_the_library_leaves_the_host_float_math_alone(tmp_path):
    # Linked with -ffast-math, the library would turn on flush-to-zero in the loading thread: 1e-310 -> 0.
    code = ("import onnxruntime as ort; from llmc.kernels.fused_cpu import register_fused_kernels; "
            "assert register_fused_kernels(ort.SessionOptions()); x = float('1e-310'); print(x * 1.0)")
    env = {**os.environ, "LLMC_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert float(out.stdout) == 1e-310
