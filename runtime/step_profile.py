"""Where engine step time goes: onnxruntime's own profiler over a run, grouped into GEMMs, attention and
the rest of the graph, per graph (main / int8), plus the time a step spends outside the graph.

`llmc bench --profile` turns it on. The profiler times every node, which costs a little: read the
fractions, not the throughput, of a profiled run.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

# onnxruntime op types by where their time goes (kernels of the step graphs, and what onnxruntime
# fuses them into).
GEMM_OPS = frozenset({"Gemm", "MatMul", "FusedMatMul", "MatMulNBits", "MatMulInteger", "MatMulIntegerToFloat",
                      "DynamicQuantizeMatMul", "Int8Linear", "Int8LinearSwiGLU", "Int8LinearSplit3",
                      "Int8LinearGLU"})
ATTENTION_OPS = frozenset({"PagedAttention"})


def category(op_type: str) -> str:
    """gemm, attention or other."""
    return "gemm" if op_type in GEMM_OPS else "attention" if op_type in ATTENTION_OPS else "other"


def summarize_profile(path: str | Path, skip_runs: int = 0) -> dict:
    """One session's profile (onnxruntime's JSON trace) -> runs, graph milliseconds per run, and the
    share of node time per category and per op type (the top 8); the first skip_runs runs left out."""
    events = json.loads(Path(path).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    start = runs[skip_runs - 1]["ts"] + runs[skip_runs - 1]["dur"] if 0 < skip_runs <= len(runs) else 0
    runs = runs[skip_runs:]
    by_op: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            by_op[e.get("args", {}).get("op_name", "?")] += e["dur"]
    node_us = sum(by_op.values())
    by_category: Counter[str] = Counter()
    for op, us in by_op.items():
        by_category[category(op)] += us
    graph_ms = sum(e["dur"] for e in runs) / 1000.0
    return {"runs": len(runs), "graph_ms_per_run": graph_ms / len(runs) if runs else 0.0,
            "fraction": {c: by_category[c] / node_us if node_us else 0.0 for c in ("gemm", "attention", "other")},
            "top_ops": {op: round(us / node_us, 4) for op, us in by_op.most_common(8)} if node_us else {}}


def step_time_report(profiles: dict[str, str], engine_seconds: dict[str, float], total_s: float,
                     skip_runs: dict[str, int] | None = None) -> dict:
    """The bench report's `step_time`: per graph its profile summary and the seconds its steps spent
    outside the graph (binding inputs, copying outputs, writing K/V), and the host's share of the run
    (scheduling, sampling, detokenizing: everything but engine calls). skip_runs: per graph, the runs
    at the start of its trace that were not steps of the run (the engine's calibration)."""
    graphs = {}
    for name, path in profiles.items():
        summary = summarize_profile(path, (skip_runs or {}).get(name, 0))
        if not summary["runs"]:
            continue  # a graph no step ran
        graph_s = summary["graph_ms_per_run"] * summary["runs"] / 1000.0
        summary["outside_graph_s"] = max(0.0, engine_seconds.get(name, 0.0) - graph_s)
        graphs[name] = summary
    engine_s = sum(engine_seconds.values())
    return {"graphs": graphs, "engine_s": engine_s, "host_s": max(0.0, total_s - engine_s)}
