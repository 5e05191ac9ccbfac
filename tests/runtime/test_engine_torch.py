"""The cuda target's engine (torch + the Triton kernels) against the onnxruntime engine of the same bundle, step
by step: prompts in chunks, then decodes, over holed block tables. On a machine without CUDA it runs on the CPU
under TRITON_INTERPRET=1 (float32); `--device cuda` without CUDA is a clear error."""


import numpy as np
import pytest

from tests.helpers import triton_or_skip, write_yaml

torch, DEVICE, _ = triton_or_skip("the cuda engine is")

from llmc.artifacts.bundle import load_bundle  # noqa: E402
from llmc.errors import ConfigError  # noqa: E402
from llmc.runtime.engine_ort import OrtEngine  # noqa: E402
from llmc.runtime.engine_torch import TorchEngine, TorchKVPool, check_cuda  # noqa: E402
from llmc.runtime.kv_pool import KVPool  # noqa: E402
from llmc.runtime.sampler import SamplingRows, draw, nucleus  # noqa: E402
from llmc.runtime.sequence import SamplingParams  # noqa: E402
from llmc.runtime.step_inputs import Chunk, layout_step  # noqa: E402


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


def _steps(rng):
    """Prefill chunks (one after cached tokens, ending inside a block), then decodes of both sequences."""
    prompts = [rng.integers(3, 300, 9).tolist(), rng.integers(3, 300, 13).tolist()]
    tables = [[7, 2, 30, 11, 25, 3], [19, 0, 33, 8, 14, 27, 5]]  # holes, any order
    steps = [[Chunk(prompts[0], 0, tables[0], 1), Chunk(prompts[1][:8], 0, tables[1], 1)],
             [Chunk(prompts[1][8:], 8, tables[1], 1)]]
    tokens = [prompts[0] + [5], prompts[1] + [6]]
    for n in range(4):
        steps.append([Chunk([tokens[0][-1]], len(tokens[0]) - 1, tables[0], 1),
                      Chunk([tokens[1][-1]], len(tokens[1]) - 1, tables[1], 1)])
        tokens = [t + [40 + n] for t in tokens]
    steps.append([Chunk([tokens[1][-1]], len(tokens[1]) - 1, tables[1], 1)])  # one sequence alone
    return steps


def _torch_pool(geo, block_size):
    return TorchKVPool(geo, 40, block_size, "float32" if DEVICE == "cpu" else "float16", device=DEVICE)


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graphs"])
def test_steps_match_the_onnxruntime_engine(bundle, cuda_graphs):
    geo, block_size = bundle.geometry, bundle.block_size
    ort_engine = OrtEngine(bundle)
    torch_engine = TorchEngine(bundle, device=DEVICE, cuda_graphs=cuda_graphs, max_num_seqs=5)
    ort_pool, torch_pool = KVPool(geo, 40, block_size), _torch_pool(geo, block_size)
    for chunks in _steps(np.random.default_rng(0)):
        inputs = layout_step(chunks, block_size)
        expected = ort_engine.step(inputs, ort_pool)
        got = torch_engine.step(inputs, torch_pool)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 2e-2 * max(1.0, np.abs(expected).max())  # float16 weights
        assert (got.argmax(-1) == expected.argmax(-1)).all()
        # the same step again (it rewrites the same K/V), its tokens picked on the device: argmax, and samples
        np.testing.assert_array_equal(torch_engine.step_sample(inputs, torch_pool, SamplingRows.greedy(len(got))),
                                      got.argmax(-1))
        rows = SamplingRows.greedy(len(got))
        rows.temperature[:], rows.top_k[:], rows.top_p[:] = 1.5, 40, 0.9
        rows.uniform[:] = np.random.default_rng().random(len(got))
        params = SamplingParams(temperature=1.5, top_k=40, top_p=0.9)
        np.testing.assert_array_equal(torch_engine.step_sample(inputs, torch_pool, rows),
                                      [draw(*nucleus(row, params), u) for row, u in zip(got, rows.uniform)])
    assert (torch_engine.graphs is not None) == cuda_graphs
    if cuda_graphs:
        assert sorted(torch_engine.graphs._replays) == [1, 2]  # decodes of two and of one ran as replays


def test_graph_padding_rows_write_and_read_nothing(bundle):
    """Decodes of 3 sequences padded to 4 rows: the same logits and the same pools, slot for slot, as eager; a
    step of one-token chunks where one wants no logits gives the others' rows only."""
    geo, block_size = bundle.geometry, bundle.block_size
    eager = TorchEngine(bundle, device=DEVICE, cuda_graphs=False)
    graphs = TorchEngine(bundle, device=DEVICE, cuda_graphs=True, max_num_seqs=4)
    pools = [_torch_pool(geo, block_size) for _ in range(2)]
    tables = [[3, 9, 1], [20, 4], [12, 30, 31, 2]]
    prompts = [list(range(10, 19)), [7, 8, 9, 10, 11], list(range(40, 53))]
    steps = [[Chunk(p, 0, t, 1) for p, t in zip(prompts, tables)]]
    steps += [[Chunk([60 + n], len(p) + n, t, 1) for p, t in zip(prompts, tables)] for n in range(2)]
    # one-token chunks where one wants no logits (a prompt's chunk cut by the token budget): 2 rows, not 3
    steps.append([Chunk([70 + i], len(p) + 2, t, int(i != 1)) for i, (p, t) in enumerate(zip(prompts, tables))])
    for chunks in steps:
        inputs = layout_step(chunks, block_size)
        np.testing.assert_allclose(graphs.step(inputs, pools[1]), eager.step(inputs, pools[0]), rtol=1e-5, atol=1e-5)
    assert list(graphs.graphs._replays) == [4]
    for name in ("keys", "values"):
        torch.testing.assert_close(getattr(pools[1], name), getattr(pools[0], name), rtol=0, atol=0)


def test_projections_stored_differently_are_refused():
    from llmc.errors import BundleError
    from llmc.runtime.engine_torch import fuse_projections

    w = {"norm": torch.ones(4), "layers.0.q_proj.weight": torch.ones(4, 4), "layers.0.k_proj.weight": torch.ones(2, 4),
         "layers.0.v_proj.packed": torch.ones(2, 1, 2, dtype=torch.uint8), "layers.0.v_proj.scale": torch.ones(2, 1)}
    with pytest.raises(BundleError, match="q_proj, k_proj, v_proj are stored in different formats"):
        fuse_projections(w, 1)


def test_fused_projections_keep_each_part_and_its_bias():
    from llmc.runtime.engine_torch import fuse_projections

    q, k, v, bias_k = torch.randn(4, 3), torch.randn(2, 3), torch.randn(2, 3), torch.randn(2)
    gate, up = torch.randn(5, 3), torch.randn(5, 3)
    w = fuse_projections({"norm": torch.ones(3), "layers.0.q_proj.weight": q, "layers.0.k_proj.weight": k,
                          "layers.0.k_proj.bias": bias_k, "layers.0.v_proj.weight": v,
                          "layers.0.gate_proj.weight": gate, "layers.0.up_proj.weight": up}, 1)
    x = torch.randn(1, 3)
    fused = x @ w["layers.0.qkv_proj.weight"].T + w["layers.0.qkv_proj.bias"]
    torch.testing.assert_close(fused, torch.cat([x @ q.T, x @ k.T + bias_k, x @ v.T], dim=1))
    torch.testing.assert_close(x @ w["layers.0.gate_up_proj.weight"].T, torch.cat([x @ gate.T, x @ up.T], dim=1))
    assert not any(name.startswith(("layers.0.q_proj", "layers.0.gate_proj")) for name in w)


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


def test_calls_pick_their_tokens_on_the_device(bundle, monkeypatch):
    """Calls with nothing that reads logits on the host take launch_sample, greedy and seeded sampled requests
    together, and generate exactly what the logits path (the host's sampler) generates on the same engine; a call
    with a sequence that asks for logprobs, penalizes, or forks n sampled answers from its prompt takes step."""
    from llmc.runtime import engine_torch_loader
    from llmc.runtime.llm import LLM

    if not torch.cuda.is_available():
        monkeypatch.setattr(engine_torch_loader, "TORCH_DEVICE", "cpu")
    llm = LLM(bundle, device="cuda", max_num_seqs=4, max_num_batched_tokens=16, kv_cache_memory="2MiB")
    calls = {"step": 0, "launch_sample": 0}

    def counting(name):
        run = getattr(llm.engine, name)

        def counted(*args):
            calls[name] += 1
            return run(*args)
        return counted

    for name in calls:
        monkeypatch.setattr(llm.engine, name, counting(name))
    prompts = [list(range(20, 31)), [9, 8, 7, 6, 5], list(range(100, 119))]
    seed = int(np.random.default_rng().integers(2**31))
    mixed = [SamplingParams(max_tokens=6, ignore_eos=True),
             SamplingParams(max_tokens=6, ignore_eos=True, temperature=1.2, top_p=0.9, seed=seed),
             SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.8, top_k=5, seed=seed + 1)]
    on_device = [o.token_ids for o in llm.generate(prompts, mixed)]
    assert calls["launch_sample"] > 0 and calls["step"] == 0
    llm._picks_on_device = lambda group: False  # the logits path
    assert [o.token_ids for o in llm.generate(prompts, mixed)] == on_device
    assert calls["step"] > 0
    del llm._picks_on_device
    plain = mixed[0]
    for k, other in enumerate((SamplingParams(max_tokens=6, ignore_eos=True, logprobs=1),
                               SamplingParams(max_tokens=6, ignore_eos=True, presence_penalty=0.5),
                               SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.8, seed=1, n=2))):
        calls.update(step=0, launch_sample=0)
        short = [[40 + k, 41, 42, 43], [50 + k, 51, 52, 53, 54], [60 + k, 61, 62]]  # one call a step, no cache hit
        llm.generate(short, [plain, other, plain])
        assert calls["step"] > 0
    calls.update(step=0, launch_sample=0)
    llm.generate([[70, 71, 72]], SamplingParams(max_tokens=4, ignore_eos=True, n=3))  # greedy samples agree
    assert calls["launch_sample"] > 0 and calls["step"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_llm_device_cuda_without_cuda_is_a_clear_error(bundle):
    from llmc.runtime.llm import LLM

    with pytest.raises(ConfigError, match="--device cuda: torch sees no CUDA device"):
        LLM(bundle, device="cuda")


def _cuda_llm(bundle, monkeypatch, **fields):
    from llmc.runtime import engine_torch_loader
    from llmc.runtime.llm import LLM

    if not torch.cuda.is_available():
        monkeypatch.setattr(engine_torch_loader, "TORCH_DEVICE", "cpu")
    return LLM(bundle, device="cuda", **{"max_num_seqs": 4, "max_num_batched_tokens": 16, "kv_cache_memory": "2MiB",
                                        **fields})


def _placeholder_steps(llm) -> list[int]:
    """Counts, per launch_sample call, the input ids that are placeholders for tokens still in flight."""
    seen, launch = [], llm.engine.launch_sample

    def counted(inputs, pool, rows, previous=None):
        seen.append(int((inputs.input_ids < 0).sum()))
        return launch(inputs, pool, rows, previous)

    llm.engine.launch_sample = counted
    return seen


def test_async_scheduling_generates_what_synchronous_steps_do(bundle, monkeypatch):
    """With the next step queued before this one's tokens are read (placeholders in its inputs, resolved on the
    device), a batch with chunked prefill, prefix-cache hits, greedy and seeded sampled requests, and sequences
    ending mid-flight (max_tokens, a stop token, a stop string, n = 2 greedy samples), and one asking for logprobs
    (its calls read logits on the host) generates the same tokens, texts and finish reasons as synchronous steps
    on the same engine."""
    sync = _cuda_llm(bundle, monkeypatch, async_scheduling=False)
    overlapped = _cuda_llm(bundle, monkeypatch)
    seen = _placeholder_steps(overlapped)
    rng = np.random.default_rng()
    prompts = [rng.integers(3, 300, n).tolist() for n in (5, 21, 9, 3, 14, 4)]
    prompts[3] = prompts[1][:12] + prompts[3]  # shares a cached block with prompt 1
    seed = int(rng.integers(2**31))
    params = [SamplingParams(max_tokens=7, ignore_eos=True),
              SamplingParams(max_tokens=5, ignore_eos=True, temperature=1.1, top_p=0.9, seed=seed),
              SamplingParams(max_tokens=9, ignore_eos=True, temperature=0.7, top_k=4, seed=seed + 1),
              SamplingParams(max_tokens=6, ignore_eos=True, n=2),
              SamplingParams(max_tokens=8, ignore_eos=True),
              SamplingParams(max_tokens=3, ignore_eos=True, logprobs=1)]  # its calls read logits on the host
    free_run = sync.generate(prompts, params)
    params[0] = SamplingParams(max_tokens=7, ignore_eos=True, stop_token_ids=[free_run[0].token_ids[2]])
    text = free_run[-1].text
    params[4] = SamplingParams(max_tokens=8, ignore_eos=True, stop=[text[len(text) // 2:][:2]] if text.strip() else [])
    expected = sync.generate(prompts, params)
    step = overlapped.step

    def each_once():  # a sequence may take its in-flight token and a host-picked call's in one step
        updated = step()
        assert len(set(updated)) == len(updated)
        return updated

    overlapped.step = each_once
    got = overlapped.generate(prompts, params)
    assert [(o.token_ids, o.text, o.finish_reason) for o in got] == [
        (o.token_ids, o.text, o.finish_reason) for o in expected]
    assert expected[0].finish_reason == "stop" and len(expected[0].token_ids) <= 3
    assert max(seen) > 0  # steps did read tokens still in flight
    assert not any(s.pending is not None for s in overlapped.scheduler.running)


def test_async_scheduling_survives_preemption_and_abort(bundle, monkeypatch):
    """A pool too small for the batch preempts sequences whose next token is in flight: they finish with the tokens
    synchronous steps give them. A request aborted with its token in flight ends without it and frees its blocks."""
    sync = _cuda_llm(bundle, monkeypatch, async_scheduling=False, kv_cache_memory="40KiB")
    overlapped = _cuda_llm(bundle, monkeypatch, kv_cache_memory="40KiB")
    seen = _placeholder_steps(overlapped)
    rng = np.random.default_rng()
    prompts = [rng.integers(3, 300, 10).tolist() for _ in range(4)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    expected = sync.generate(prompts, params)
    got = overlapped.generate(prompts, params)
    assert overlapped.scheduler.num_preemptions > 0 and max(seen) > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]

    seq = overlapped.add_request(prompts[0], SamplingParams(max_tokens=50, ignore_eos=True))
    while len(seq.output_ids) < 3:
        overlapped.step()
    assert seq.pending is not None
    overlapped.abort(seq)
    overlapped.step()  # reads the call in flight: the aborted request's token is dropped
    assert seq.pending is None and seq.finish_reason == "abort" and len(seq.output_ids) == 3
    assert overlapped.block_manager.num_free_blocks == overlapped.block_manager.num_blocks
    overlapped.release(seq)


def test_pool_copies_whole_blocks_in_every_layer(bundle):
    """Copy-on-write: each (src, dst) block pair is copied in every layer's K and V pool; other blocks stay."""
    pool = _torch_pool(bundle.geometry, bundle.block_size)
    pool.keys.copy_(torch.randn(pool.keys.shape))
    pool.values.copy_(torch.randn(pool.values.shape))
    before = pool.keys.clone(), pool.values.clone()
    pool.copy_blocks([(3, 9), (12, 4)])
    for now, then in zip((pool.keys, pool.values), before):
        expected = then.clone()
        expected[:, 9], expected[:, 4] = then[:, 3], then[:, 12]
        torch.testing.assert_close(now, expected, rtol=0, atol=0)


def test_streams_over_http_with_async_scheduling(bundle, monkeypatch):
    """The server's step loop on the cuda engine with async scheduling: concurrent streams of different lengths
    each get the text synchronous steps give them, and a stream hung up on mid-flight is aborted with its blocks
    freed."""
    import asyncio
    import json

    import httpx

    from tests.server_harness import served, wait_idle

    sync = _cuda_llm(bundle, monkeypatch, async_scheduling=False, max_num_batched_tokens=64)
    prompt, lengths = "The capital of", [2, 9, 5, 14]
    expected = [sync.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0].text for n in lengths]

    async def stream(client, url, n, hang_up=False):
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
        text, finish = "", None
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"]
                    finish = choice["finish_reason"] or finish
                    if hang_up:
                        break
        return text, finish

    async def go(url):
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[stream(client, url, n) for n in lengths],
                                        stream(client, url, 200, hang_up=True))

    with served(_cuda_llm(bundle, monkeypatch, max_num_batched_tokens=64)) as (url, engine):
        assert engine.llm._async
        results = asyncio.run(go(url))
        wait_idle(engine, timeout=120)
        assert results[:-1] == [(text, "length") for text in expected]
        assert engine.metrics.requests["aborted"] >= 1
        assert engine.llm.block_manager.num_free_blocks == engine.llm.block_manager.num_blocks


def test_async_scheduling_queues_no_step_past_max_tokens(bundle, monkeypatch):
    """A sequence whose token in flight is its last by max_tokens sits the next step out: one prefill and five
    decodes for six tokens, as synchronous steps take (without the hold a seventh step would be queued)."""
    overlapped = _cuda_llm(bundle, monkeypatch)
    seen = _placeholder_steps(overlapped)
    out = overlapped.generate([[5, 6, 7]], SamplingParams(max_tokens=6, ignore_eos=True))
    assert len(out[0].token_ids) == 6 and len(seen) == 6 and seen[1:] == [1] * 5
