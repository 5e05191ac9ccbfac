"""Shared fixtures: a tiny random checkpoint and its bundle, built once per session."""

from __future__ import annotations

import pytest

from tests.helpers import write_tiny_checkpoint, write_yaml


@pytest.fixture(scope="session", autouse=True)
def global_thread_pool():
    """onnxruntime's process-wide thread pool, made first as in every llmc process that runs an engine, so tests
    pass in any order (tests/helpers.session_options: every session in tests runs on it)."""
    import os

    from llmc.runtime import engine_ort

    engine_ort._use_global_thread_pool(len(os.sched_getaffinity(0)))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """HF directory of a tiny random Llama (GQA 4/2 heads, 2 layers)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_checkpoint):
    """A bundle built from the tiny checkpoint with block size 4 (so sequences span many blocks)."""
    from llmc.compiler.pipeline import build
    from llmc.compiler.spec import load_spec

    work = tmp_path_factory.mktemp("tiny-build")
    spec = load_spec(write_yaml(work / "model.yaml", name="tiny", source=str(tiny_checkpoint),
                                kv_cache={"block_size": 4}, output="out"))
    return build(spec)
