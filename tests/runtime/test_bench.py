"""`llmc bench`: the workload is exact and the report's numbers add up (offline, online, sweep)."""

import json

import onnxruntime as ort
import pytest

from llmc.kernels import fused_cpu
from llmc.runtime import bench as b
from llmc.runtime.llm import LLM
from tests.server_harness import served, wait_idle


@pytest.fixture(scope="module")
def workload():
    return b.make_workload(6, (5, 30), (3, 9), vocab_size=300, seed=1)


def test_workload_is_seeded_and_in_range(workload):
    assert workload == b.make_workload(6, (5, 30), (3, 9), vocab_size=300, seed=1)
    assert all(5 <= len(r.prompt_ids) <= 30 and 3 <= r.max_tokens <= 9 for r in workload)


def test_offline_report(tiny_bundle, workload):
    report = b.run_offline(LLM(tiny_bundle, max_num_seqs=4, max_num_batched_tokens=32), workload)
    assert report["completed"] == 6 and report["output_tokens"] == sum(r.max_tokens for r in workload)
    assert report["prompt_tokens"] == sum(len(r.prompt_ids) for r in workload)
    assert 0 < report["ttft_ms"]["p50"] <= report["ttft_ms"]["p99"]
    assert report["output_tok_s"] == pytest.approx(report["output_tokens"] / report["duration_s"])
    assert 0 <= report["kv_waste_mean"] < 1 and 0 < report["kv_usage_peak"] <= 1
    assert 0 <= report["host_overhead_fraction"] < 1
    fused = fused_cpu.register_fused_kernels(ort.SessionOptions())  # wherever a C++ compiler builds them
    assert report["attention"] == ("llmc fused CPU kernel" if fused else "ONNX function body")


def test_online_report_over_http(tiny_bundle, workload):
    with served(LLM(tiny_bundle, max_num_seqs=4)) as (url, engine):
        report = b.run_online(url, workload, rate=50.0, seed=0)
        wait_idle(engine)
    assert report["completed"] == 6 and report["output_tokens"] == sum(r.max_tokens for r in workload)


def test_sweep_writes_json_and_png(tiny_bundle, tmp_path):
    from tests.test_cli import llmc

    out = tmp_path / "sweep.json"
    result = llmc("bench", tiny_bundle, "--num-requests", 4, "--prompt-len", "5:20", "--output-len", "2:5",
                  "--sweep", "max_num_seqs=1,2", "--kv-cache-memory", "8MiB", "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [r["max_num_seqs"] for r in report["sweep"]] == [1, 2]
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_profiled_run_reports_where_step_time_goes(tiny_bundle, workload, tmp_path):
    llm = LLM(tiny_bundle, max_num_seqs=4, max_num_batched_tokens=32, profile_dir=tmp_path)
    report = b.run_offline(llm, workload)
    calls = report["engine_calls_by_path"]
    step_time = report["step_time"]
    main = step_time["graphs"]["main"]
    assert main["runs"] == calls["main"]["calls"] > 0  # one profiled graph run per engine call
    assert sum(main["fraction"].values()) == pytest.approx(1.0)
    assert main["fraction"]["gemm"] > 0 and main["fraction"]["attention"] > 0  # MatMul/Gemm, PagedAttention
    assert 0 <= main["outside_graph_s"] < calls["main"]["seconds"]
    assert step_time["engine_s"] == pytest.approx(calls["main"]["seconds"])
    assert step_time["engine_s"] + step_time["host_s"] == pytest.approx(report["duration_s"], rel=0.01)


def test_an_unprofiled_run_has_no_step_time(tiny_bundle, workload):
    report = b.run_offline(LLM(tiny_bundle, max_num_seqs=4, max_num_batched_tokens=32), workload)
    assert report["step_time"] is None and report["engine_calls_by_path"]["main"]["seconds"] > 0


def test_profile_categories_and_skipped_runs(tmp_path):
    from llmc.compiler import onnx_int8_linear as il
    from llmc.runtime.step_profile import category, summarize_profile

    assert [category(op) for op in ("Int8Linear", "MatMulNBits", "PagedAttention", "Add")] == \
        ["gemm", "gemm", "attention", "other"]
    assert {category(op) for op in il.FUNCTIONS} == {"gemm"}  # every int8 linear variant the graphs use
    node = lambda ts, op, dur: {"cat": "Node", "name": f"n_{ts}_kernel_time", "ts": ts, "dur": dur,  # noqa: E731
                                "args": {"op_name": op}}
    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 100}, node(10, "Gemm", 50),
              {"cat": "Session", "name": "model_run", "ts": 200, "dur": 40}, node(210, "Gemm", 10),
              node(220, "PagedAttention", 30)]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(events))
    whole, later = summarize_profile(trace), summarize_profile(trace, skip_runs=1)
    assert whole["runs"] == 2 and whole["fraction"]["gemm"] == pytest.approx(60 / 90)
    assert later["runs"] == 1 and later["graph_ms_per_run"] == pytest.approx(0.04)
    assert later["fraction"] == {"gemm": 0.25, "attention": 0.75, "other": 0.0}


def test_constrained_offline_report_has_the_constraint_cost(tiny_bundle, workload):
    """--structured json_object: every output is JSON, and the report counts the constrained tokens."""
    import json as json_lib

    from llmc.runtime.sequence import StructuredOutput

    llm = LLM(tiny_bundle, max_num_seqs=4)
    bias_free = StructuredOutput("json_schema", json_lib.dumps(
        {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
         "required": ["n"], "additionalProperties": False}))
    report = b.run_offline(llm, workload, bias_free)
    constraint = report["constraint"]
    assert constraint["kind"] == "json_schema" and constraint["tokens"] == report["output_tokens"] > 0
    assert 0 < constraint["fraction_of_step_time"] < 1 and constraint["ms_per_token"] > 0
    assert b.run_offline(llm, workload)["constraint"] is None


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_a_sampled_workload_samples_every_request(tiny_bundle, workload, monkeypatch, mode):
    """`--temperature` / `--top-p`: every request samples with them, request i seeded with i, and the report says so."""
    llm = LLM(tiny_bundle, max_num_seqs=4)
    seen, add = [], llm.add_request

    def spy(prompt, params=None, request_id=None):
        seen.append(params)
        return add(prompt, params, request_id)

    monkeypatch.setattr(llm, "add_request", spy)
    sampling = b.BenchSampling(temperature=0.8, top_p=0.9)
    if mode == "offline":
        report = b.run_offline(llm, workload, sampling=sampling)
    else:
        with served(llm) as (url, engine):
            report = b.run_online(url, workload, seed=0, sampling=sampling)
            wait_idle(engine)
    assert report["sampling"] == {"temperature": 0.8, "top_p": 0.9, "seeded": True}
    assert report["output_tokens"] == sum(r.max_tokens for r in workload)
    assert sorted(p.seed for p in seen) == list(range(len(workload)))
    assert all(p.temperature == 0.8 and p.top_p == 0.9 for p in seen)


def test_an_unseeded_sampled_workload_sends_no_seed(tiny_bundle, workload, monkeypatch):
    llm = LLM(tiny_bundle, max_num_seqs=4)
    seen, add = [], llm.add_request
    monkeypatch.setattr(llm, "add_request", lambda prompt, params=None, request_id=None: seen.append(params) or add(
        prompt, params, request_id))
    b.run_offline(llm, workload, sampling=b.BenchSampling(temperature=0.8, seeded=False))
    assert len(seen) == len(workload) and all(p.seed is None and p.temperature == 0.8 for p in seen)
