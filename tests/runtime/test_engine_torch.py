"""The cuda target's engine (torch + the Triton kernels) against the onnxruntime engine of the same bundle, step
by step: prompts in chunks, then decodes, over holed block tables. On a machine without CUDA it runs on the CPU
under TRITON_INTERPRET=1 (float32); `--device cuda` without CUDA is a clear error."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
pytest.importorskip("triton", reason="triton is not installed: the cuda engine is not tested here")

from llmc.artifacts.bundle import load_bundle  # noqa: E402
from llmc.errors import ConfigError  # noqa: E402
from llmc.runtime.engine_ort import OrtEngine  # noqa: E402
from llmc.runtime.engine_torch import TorchEngine, TorchKVPool, check_cuda  # noqa: E402
from llmc.runtime.kv_pool import KVPool  # noqa: E402
from llmc.runtime.step_inputs import Chunk, layout_step  # noqa: E402
from tests.helpers import write_yaml  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_checkpoint):
    from llmc.compiler.pipeline import build
    from llmc.compiler.spec import load_spec

    work = tmp_path_factory.mktemp("cuda-target")
    spec = load_spec(write_yaml(work / "model.yaml", name="tiny-cuda", source=str(tiny_checkpoint), output="out",
                                targets=["onnxruntime", "cuda"], kv_cache={"block_size": 4},
                                quantization={"method": "rtn", "group_size": 32, "accuracy_level": 0}))
    return load_bundle(build(spec))


def test_the_cuda_target_is_recorded_with_int4_linears(bundle):
    entry = bundle.manifest.engines["cuda"]
    assert entry.format == "safetensors" and entry.graph is None and entry.kv_update == "in_place"
    assert len(entry.quantized_linears) == 2 * 7  # every body linear as int4; the 8-bit head as float16
    assert (bundle.engine_dir("cuda") / entry.weights).is_file()


def test_steps_match_the_onnxruntime_engine(bundle):
    geo, block_size = bundle.geometry, bundle.block_size
    ort_engine, torch_engine = OrtEngine(bundle), TorchEngine(bundle, device=DEVICE)
    ort_pool = KVPool(geo, 40, block_size)
    torch_pool = TorchKVPool(geo, 40, block_size, "float32" if DEVICE == "cpu" else "float16", device=DEVICE)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 300, 9).tolist(), rng.integers(3, 300, 13).tolist()]
    tables = [[7, 2, 30, 11, 25, 3], [19, 0, 33, 8, 14, 27, 5]]  # holes, any order
    steps = [[Chunk(prompts[0], 0, tables[0], 1), Chunk(prompts[1][:8], 0, tables[1], 1)],  # prefill chunks
             [Chunk(prompts[1][8:], 8, tables[1], 1)]]  # a chunk after cached tokens, ending inside a block
    tokens = [prompts[0] + [5], prompts[1] + [6]]
    for n in range(4):  # decodes of both
        steps.append([Chunk([tokens[0][-1]], len(tokens[0]) - 1, tables[0], 1),
                      Chunk([tokens[1][-1]], len(tokens[1]) - 1, tables[1], 1)])
        tokens = [t + [40 + n] for t in tokens]
    for chunks in steps:
        inputs = layout_step(chunks, block_size)
        expected = ort_engine.step(inputs, ort_pool)
        got = torch_engine.step(inputs, torch_pool)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 2e-2 * max(1.0, np.abs(expected).max())  # float16 weights
        assert (got.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ConfigError, match="torch sees no CUDA device"):
        check_cuda()


def test_llm_on_the_cuda_engine_generates_what_the_cpu_engine_does(bundle, monkeypatch):
    """`LLM(bundle, device="cuda")` shares the scheduler, block manager and sampler: greedy generations of a batch
    (prefix caching, chunked prefill) match the onnxruntime engine's, up to near-ties."""
    from llmc.runtime import engine_torch_loader
    from llmc.runtime.llm import LLM
    from llmc.runtime.sequence import SamplingParams
    from tests.helpers import assert_same_or_near_tie

    if not torch.cuda.is_available():
        monkeypatch.setattr(engine_torch_loader, "TORCH_DEVICE", "cpu")
    prompts = [[5, 17, 33, 40] * 3, [5, 17, 33, 40] * 3 + [7, 8], list(range(50, 80))]
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=2)
    on_cuda = LLM(bundle, device="cuda", max_num_seqs=4, max_num_batched_tokens=16, kv_cache_memory="2MiB")
    assert on_cuda.engine.attention == "llmc Triton kernels"
    reference = LLM(bundle, max_num_seqs=4, kv_cache_memory="2MiB").generate(prompts, params)
    on_cuda.generate(prompts[:1], SamplingParams(max_tokens=1))  # its blocks are cached for the batch
    for out, ref in zip(on_cuda.generate(prompts, params), reference):
        assert_same_or_near_tie(out.token_ids, ref.token_ids, ref.logprobs, tol=5e-2)
    assert on_cuda.stats().prefix_cache.hit_tokens > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_llm_device_cuda_without_cuda_is_a_clear_error(bundle):
    from llmc.runtime.llm import LLM

    with pytest.raises(ConfigError, match="--device cuda: torch sees no CUDA device"):
        LLM(bundle, device="cuda")
