"""The int4 decode graph of an int4 bundle: its linears as llmc.Int4Linear where the CPU runs the kernel
(AVX-512 VNNI), the MatMulNBits graph elsewhere or when asked (runtime/engine_ort.py)."""


import pytest

from llmc.artifacts.bundle import load_bundle
from llmc.errors import BundleError
from llmc.kernels import fused_cpu
from llmc.runtime import engine_ort
from llmc.runtime.llm import LLM
from llmc.runtime.sequence import SamplingParams
from tests.helpers import edit_manifest, write_yaml

needs_int4 = pytest.mark.skipif(not fused_cpu.int4_available(), reason="this CPU has no AVX-512 VNNI")
PROMPTS = [list(range(3, 40)), list(range(50, 60)), list(range(100, 107))]


def _build(work, tiny_checkpoint, name: str, **quantization):
    from llmc.compiler.pipeline import build
    from llmc.compiler.spec import load_spec

    return build(load_spec(write_yaml(work / f"{name}.yaml", name=name, source=str(tiny_checkpoint), output="out",
                                      kv_cache={"block_size": 4},
                                      quantization={"method": "rtn", "group_size": 32, **quantization})))


@pytest.fixture(scope="module")
def int4_bundle(tmp_path_factory, tiny_checkpoint):
    return _build(tmp_path_factory.mktemp("int4-build"), tiny_checkpoint, "tiny-int4", lm_head_bits=4)


def _generate(bundle, prompts, **engine):
    llm = LLM(bundle, **engine)
    return llm, llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True, logprobs=5))


def _assert_same_tokens(out, ref, near_tie: float):
    """Greedy tokens equal up to the first step whose reference top-2 log-probabilities are closer than
    near_tie (where the two computations may pick either); the first step's top-5 within 0.05."""
    for o, r in zip(out, ref):
        first, ref_first = dict(o.logprobs[0].top), dict(r.logprobs[0].top)
        shared = set(first) & set(ref_first)
        assert len(shared) >= 4 and max(abs(first[t] - ref_first[t]) for t in shared) < 0.05
        for step, (token, ref_token) in enumerate(zip(o.token_ids, r.token_ids)):
            if token != ref_token:
                (best, best_lp), (second, second_lp) = r.logprobs[step].top[:2]
                assert token == second and best_lp - second_lp < near_tie, (step, r.logprobs[step].top[:2])
                break


@needs_int4
def test_steps_run_the_int4_decode_graph_and_agree_with_matmulnbits(int4_bundle, monkeypatch):
    llm, out = _generate(int4_bundle, PROMPTS)
    assert llm.engine.int4_decode and "llmc.Int4Linear" in llm.engine.gemm_path
    assert llm.engine.path_counts["main"][0] > 0
    monkeypatch.setenv(engine_ort.INT4_DECODE_ENV, "0")
    ref_llm, ref = _generate(int4_bundle, PROMPTS)
    assert not ref_llm.engine.int4_decode and "MatMulNBits" in ref_llm.engine.gemm_path
    # the same int8 activation blocks; float16 scales and offsets instead of float32 (~5e-4 of each weight)
    _assert_same_tokens(out, ref, near_tie=0.05)


@needs_int4
def test_a_batch_decodes_as_each_sequence_alone(int4_bundle):
    """Steps of 2 and 3 rows (the kernel's row passes) give each sequence what it gets alone."""
    _, batched = _generate(int4_bundle, PROMPTS)
    alone = [_generate(int4_bundle, [p])[1][0] for p in PROMPTS]
    _assert_same_tokens(batched, alone, near_tie=1e-3)


def test_without_the_kernel_the_bundle_runs_the_matmulnbits_graph(int4_bundle, monkeypatch):
    monkeypatch.setattr(engine_ort, "int4_available", lambda: False)
    llm, out = _generate(int4_bundle, PROMPTS[:1])
    assert not llm.engine.int4_decode and "MatMulNBits" in llm.engine.gemm_path
    assert len(out[0].token_ids) == 8


def test_the_decode_graph_is_recorded_and_can_be_left_out(int4_bundle, tmp_path, tiny_checkpoint):
    decode = load_bundle(int4_bundle).manifest.engines["onnxruntime"].decode
    assert decode.linear_op == "llmc.Int4Linear" and decode.linear_format == engine_ort.INT4_LINEAR_FORMAT
    assert (int4_bundle / "engines" / "onnxruntime" / decode.graph).is_file()
    without = _build(tmp_path, tiny_checkpoint, "tiny-int4-plain", int4_decode=False)
    assert load_bundle(without).manifest.engines["onnxruntime"].decode is None
    level0 = _build(tmp_path, tiny_checkpoint, "tiny-int4-level0", accuracy_level=0)  # fp32 compute asked for
    assert load_bundle(level0).manifest.engines["onnxruntime"].decode is None


def test_a_decode_graph_of_another_format_is_refused(int4_bundle, tmp_path):
    copy = edit_manifest(int4_bundle, tmp_path / "other", lambda m: m["engines"]["onnxruntime"]["decode"].update(
        linear_format="int4 groups, float32 scales"))
    with pytest.raises(BundleError, match=r"int4 decode graph has a format this runtime does not read.*rebuild it"):
        engine_ort.OrtEngine(load_bundle(copy))
