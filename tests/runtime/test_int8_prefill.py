"""The int8 prefill graph of a bundle: steps of many tokens run it where AMX or AVX-512 VNNI runs, the
main graph elsewhere (runtime/engine_ort.py)."""

import pytest

from llmc.kernels import fused_cpu
from llmc.runtime import engine_ort
from llmc.runtime.llm import LLM
from llmc.runtime.sequence import SamplingParams
from tests.helpers import TEXT, edit_manifest, write_yaml

needs_int8 = pytest.mark.skipif(not fused_cpu.int8_backend(), reason="this CPU has neither AMX nor AVX-512 VNNI + BF16")


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, tiny_checkpoint):
    from llmc.compiler.pipeline import build
    from llmc.compiler.spec import load_spec

    work = tmp_path_factory.mktemp("int8-build")
    (work / "calibration.txt").write_text(" ".join([TEXT] * 20))
    return build(load_spec(write_yaml(work / "model.yaml", name="tiny-int8", source=str(tiny_checkpoint),
                                      kv_cache={"block_size": 4}, int8_prefill=True, output="out",
                                      calibration={"texts": ["calibration.txt"], "n_samples": 4, "seq_len": 64})))


@needs_int8
def test_long_steps_run_the_int8_graph_and_agree_with_fp32(int8_bundle, tiny_bundle):
    prompt = list(range(3, 83))  # 80 tokens: one prefill step of the int8 graph
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=5)
    llm = LLM(int8_bundle, max_num_batched_tokens=256)
    llm.engine.int8_min_tokens = engine_ort.PREFILL_MIN_TOKENS  # decodes on the main graph, whatever was measured
    out = llm.generate([prompt], params)[0]
    assert llm.engine.path_counts["int8"] == [1, 80] and llm.engine.path_counts["main"][0] == 7
    assert f"int8 {fused_cpu.int8_backend()} (llmc.Int8Linear)" in llm.engine.gemm_path
    ref = LLM(tiny_bundle, max_num_batched_tokens=256).generate([prompt], params)[0]
    first, ref_first = dict(out.logprobs[0].top), dict(ref.logprobs[0].top)  # the prefill step's distribution
    assert out.token_ids[0] == ref.token_ids[0]
    shared = set(first) & set(ref_first)
    assert len(shared) >= 4 and max(abs(first[t] - ref_first[t]) for t in shared) < 0.05


@pytest.mark.skipif(not fused_cpu.avx512_vnni_available(), reason="this CPU has no AVX-512 VNNI + BF16")
def test_the_vnni_backend_runs_the_int8_graph_where_asked_for(int8_bundle, tiny_bundle, monkeypatch):
    """LLMC_INT8_BACKEND=avx512-vnni: the VNNI kernel even on an AMX CPU; the same first token as fp32."""
    monkeypatch.setenv(fused_cpu.INT8_BACKEND_ENV, "avx512-vnni")
    llm = LLM(int8_bundle, max_num_batched_tokens=256)
    assert llm.engine.int8_backend == "AVX-512 VNNI" and "int8 AVX-512 VNNI" in llm.engine.gemm_path
    prompt = list(range(3, 83))
    out = llm.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert llm.engine.path_counts["int8"][0] >= 1
    ref = LLM(tiny_bundle).generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert out.token_ids[0] == ref.token_ids[0]


def test_asked_for_no_int8_backend_the_bundle_runs_the_main_graph(int8_bundle, monkeypatch):
    monkeypatch.setenv(fused_cpu.INT8_BACKEND_ENV, "none")
    llm = LLM(int8_bundle)
    assert llm.engine.int8_session is None and "main graph" in llm.engine.gemm_path


def test_without_amx_the_bundle_runs_the_main_graph(int8_bundle, tiny_bundle, monkeypatch):
    monkeypatch.setattr(engine_ort, "int8_backend", lambda: None)
    llm = LLM(int8_bundle)
    out = llm.generate([list(range(3, 83))], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert llm.engine.path_counts["int8"] == [0, 0] and "main graph" in llm.engine.gemm_path
    ref = LLM(tiny_bundle).generate([list(range(3, 83))], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert out.token_ids == ref.token_ids  # the same fp32 graph as the bundle without the int8 one


@needs_int8
@pytest.mark.parametrize("int8_from,expected", [(None, 1), (4, 4), (8, 8), (100, engine_ort.PREFILL_MIN_TOKENS)])
def test_the_crossover_is_the_smallest_batch_from_which_int8_stays_faster(int8_bundle, monkeypatch, int8_from,
                                                                          expected):
    """calibrate_int8 times decode batches on both graphs (here with made-up timings)."""
    llm = LLM(int8_bundle)
    engine = llm.engine

    def fake_timed(fn, session, inputs, pool):
        batch = len(inputs.input_ids)
        int8_wins = int8_from is None or batch >= int8_from
        return 1.0 if (session is engine.int8_session) == int8_wins else 2.0

    monkeypatch.setattr(engine_ort, "_timed", fake_timed)
    engine.calibrate_int8(llm.pool)
    assert engine.int8_min_tokens == expected
    assert ("every step" in engine.gemm_path) == (expected == 1)


@needs_int8
def test_with_int8_from_one_token_every_step_runs_the_int8_graph(int8_bundle, tiny_bundle):
    llm = LLM(int8_bundle)
    llm.engine.int8_min_tokens = 1
    prompts = [list(range(3, 40)), list(range(50, 60))]
    out = llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    assert llm.engine.path_counts["main"] == [0, 0] and llm.engine.path_counts["int8"][0] > 0
    ref = LLM(tiny_bundle).generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    assert [o.token_ids[0] for o in out] == [o.token_ids[0] for o in ref]


def test_the_int8_graph_records_its_outlier_channels_and_old_formats_are_refused(int8_bundle, tmp_path):
    """The act_outliers pass is in the manifest; an int8 graph of the earlier format (activation scales
    per block of 64) is refused with a rebuild hint, not run through a mismatched kernel."""
    from llmc.artifacts.bundle import load_bundle
    from llmc.errors import BundleError

    manifest = load_bundle(int8_bundle).manifest
    record = manifest.pass_record("act_outliers").extra
    assert record["channels"] == 128 and record["linears"] >= 1 and record["step_gain_max"] >= 1.0
    assert manifest.engines["onnxruntime"].prefill.linear_format == engine_ort.INT8_LINEAR_FORMAT
    copy = edit_manifest(int8_bundle, tmp_path / "old",
                         lambda m: m["engines"]["onnxruntime"]["prefill"].pop("linear_format"))
    with pytest.raises(BundleError, match=r"int8 graph scaled activations per block of 64.*rebuild it"):
        engine_ort.OrtEngine(load_bundle(copy))
