"""The runtime end to end on a tiny bundle: batching, preemption, streaming, stop rules, errors."""

import numpy as np
import pytest

from llmc.errors import RequestError
from llmc.runtime.llm import LLM
from llmc.runtime.sequence import SamplingParams
from tests.helpers import assert_same_or_near_tie

BYTES_PER_BLOCK = 2 * 2 * 2 * 16 * 4 * 4  # K and V x layers x kv heads x head dim x fp32 x block of 4


def _prompts(vocab, n=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=int(length)).tolist() for length in rng.integers(2, 40, size=n)]


@pytest.fixture(scope="module")
def alone(tiny_bundle):
    """Each prompt generated on its own (greedy), with top-2 logprobs for the near-tie check."""
    llm = LLM(tiny_bundle, kv_cache_memory="1MiB", max_num_seqs=1)
    params = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=2)
    prompts = _prompts(llm.geometry.vocab_size)
    return prompts, [llm.generate([p], params)[0] for p in prompts]


def _check_same(outputs, reference):
    for out, ref in zip(outputs, reference):
        assert_same_or_near_tie(out.token_ids, ref.token_ids, ref.logprobs)


def test_continuous_batching_equals_alone(tiny_bundle, alone):
    prompts, reference = alone
    llm = LLM(tiny_bundle, kv_cache_memory="1MiB", max_num_seqs=8, max_num_batched_tokens=32)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    _check_same(outputs, reference)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_staggered_arrivals_join_between_steps(tiny_bundle, alone):
    prompts, reference = alone
    llm = LLM(tiny_bundle, kv_cache_memory="1MiB", max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    seqs = []
    for prompt in prompts:  # a new request arrives every two steps while others decode
        seqs.append(llm.add_request(prompt, params))
        llm.step()
        llm.step()
    while any(not s.is_finished for s in seqs):
        llm.step()
    for seq, ref in zip(seqs, reference):
        assert_same_or_near_tie(seq.output_ids, ref.token_ids, ref.logprobs)


def test_preemption_under_a_tiny_pool(tiny_bundle, alone):
    prompts, reference = alone
    llm = LLM(tiny_bundle, kv_cache_memory=20 * BYTES_PER_BLOCK, max_num_batched_tokens=32)
    assert llm.pool.num_blocks == 20
    outputs = llm.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    assert llm.scheduler.num_preemptions > 0
    _check_same(outputs, reference)
    assert llm.block_manager.num_free_blocks == 20 and sum(llm.block_manager.ref_counts) == 0


def test_stream_concatenates_to_generate(tiny_bundle):
    llm = LLM(tiny_bundle)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    full = llm.generate(["The capital of"], params)[0]
    chunks = list(llm.stream("The capital of", params))
    assert "".join(c.text for c in chunks) == full.text
    assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    assert [t for c in chunks for t in c.token_ids] == full.token_ids


def test_stop_string_truncates_and_is_not_streamed(tiny_bundle):
    llm = LLM(tiny_bundle)
    base = llm.generate(["Paged"], SamplingParams(max_tokens=30, ignore_eos=True))[0].text
    assert len(base) > 6
    stop = base[3:6]
    out = llm.generate(["Paged"], SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == base[: base.find(stop)]
    streamed = "".join(c.text for c in llm.stream("Paged", SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop])))
    assert streamed == out.text


def test_stop_token_and_max_tokens(tiny_bundle):
    llm = LLM(tiny_bundle)
    out = llm.generate(["Paged"], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    stop_id = out.token_ids[2]
    out2 = llm.generate(["Paged"], SamplingParams(max_tokens=5, ignore_eos=True, stop_token_ids=[stop_id]))[0]
    assert out2.token_ids == out.token_ids[: out.token_ids.index(stop_id) + 1] and out2.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(tiny_bundle):
    llm = LLM(tiny_bundle)
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=7, ignore_eos=True)
    a, b = llm.generate(["The", "The"], [params, params])
    c = llm.generate(["The"], SamplingParams(max_tokens=20, temperature=1.0, seed=8, ignore_eos=True))[0]
    assert a.token_ids == b.token_ids != c.token_ids


def test_chat_template(tiny_bundle):
    llm = LLM(tiny_bundle)
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_bad_requests(tiny_bundle):
    llm = LLM(tiny_bundle, kv_cache_memory=4 * BYTES_PER_BLOCK)
    with pytest.raises(RequestError, match="context is 512"):
        llm.add_request([5] * 600)
    with pytest.raises(RequestError, match="KV cache holds only 16"):
        llm.add_request([5] * 40)
    with pytest.raises(RequestError, match="empty"):
        llm.add_request("")
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(RequestError, match="temperature"):
        SamplingParams(temperature=-1)


def test_refused_prompt_leaves_nothing_queued(tiny_bundle):
    llm = LLM(tiny_bundle)
    with pytest.raises(RequestError, match="context is 512"):
        llm.generate([[5] * 10, [5] * 600])
    assert not llm.scheduler.has_unfinished()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_abort_frees_blocks_mid_generation(tiny_bundle):
    llm = LLM(tiny_bundle)
    seq = llm.add_request([5] * 30, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        llm.step()
    assert seq.block_table and not seq.is_finished
    llm.abort(seq)
    assert seq.finish_reason == "abort" and not llm.scheduler.has_unfinished()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def _shared_prefix_prompts(vocab, seed=1):
    rng = np.random.default_rng(seed)
    system = rng.integers(3, vocab, size=22).tolist()  # a shared "system prompt" of 5.5 blocks
    return [system + rng.integers(3, vocab, size=int(n)).tolist() for n in rng.integers(1, 12, size=8)]


def test_prefix_caching_changes_nothing_but_work(tiny_bundle):
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2)
    prompts = _shared_prefix_prompts(300)
    off = LLM(tiny_bundle, enable_prefix_caching=False, max_num_batched_tokens=24)
    reference = off.generate(prompts, params)
    on = LLM(tiny_bundle, enable_prefix_caching=True, max_num_batched_tokens=24)
    first = on.generate(prompts[:1], params)  # warms the cache with the shared prefix
    outputs = on.generate(prompts, params)
    assert on.block_manager.stats.hit_tokens >= 7 * 20  # every later prompt reused >= 5 full blocks
    _check_same(first + outputs, reference[:1] + reference)
    assert on.block_manager.num_free_blocks == on.block_manager.num_blocks


def test_n_samples_share_the_prompt_blocks(tiny_bundle):
    llm = LLM(tiny_bundle, max_num_batched_tokens=64)
    prompt = list(range(3, 33))  # 30 tokens: 7 full blocks of 4 and a partial one
    single = llm.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    greedy = llm.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True, n=3))
    assert [o.index for o in greedy] == [0, 1, 2] and all(o.token_ids == single.token_ids for o in greedy)
    seq = llm.add_request(prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=3, n=3, ignore_eos=True))
    llm.step()
    assert len(seq.children) == 2
    shared = set(seq.block_table) & set(seq.children[0].block_table) & set(seq.children[1].block_table)
    assert len(shared) >= 7  # the full prompt blocks are shared, not copied
    while not all(s.is_finished for s in (seq, *seq.children)):
        llm.step()
    samples = [s.output_ids for s in (seq, *seq.children)]
    assert len({tuple(s) for s in samples}) > 1  # independent samples
    llm.release(seq)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_float16_kv_cache_holds_twice_the_blocks_and_generates_the_same(tiny_checkpoint, tmp_path, alone):
    """kv_cache: {dtype: float16}: the same budget holds twice the blocks; greedy output equals the float32
    bundle's except where its top-2 logits are within fp16 rounding of each other."""
    from llmc.compiler.pipeline import build
    from llmc.compiler.spec import load_spec
    from tests.helpers import write_yaml

    spec = load_spec(write_yaml(tmp_path / "model.yaml", name="tiny-kv16", source=str(tiny_checkpoint),
                                kv_cache={"block_size": 4, "dtype": "float16"}, output="out"))
    bundle = build(spec)
    llm = LLM(bundle, kv_cache_memory="1MiB", max_num_seqs=8, max_num_batched_tokens=32)
    assert llm.pool.keys.dtype == np.float16 and llm.pool.num_blocks == 2 * ((1 << 20) // BYTES_PER_BLOCK)
    prompts, reference = alone
    outputs = llm.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    for out, ref in zip(outputs, reference):
        assert_same_or_near_tie(out.token_ids, ref.token_ids, ref.logprobs, tol=2e-2)


def test_engine_config_and_field_overrides(tiny_bundle):
    """LLM(bundle, EngineConfig(...), **fields): the config's values with the fields replaced; an unknown field
    is refused by name."""
    from llmc.runtime.engine_config import EngineConfig

    llm = LLM(tiny_bundle, EngineConfig(max_num_seqs=3, policy="static"), max_num_batched_tokens=77,
              enable_prefix_caching=False)
    assert llm.config == EngineConfig(max_num_seqs=3, policy="static", max_num_batched_tokens=77,
                                      enable_prefix_caching=False)
    assert (llm.scheduler.max_num_seqs, llm.scheduler.max_num_batched_tokens) == (3, 77)
    assert not llm.block_manager.enable_prefix_caching
    with pytest.raises(TypeError, match="max_num_sequences"):
        LLM(tiny_bundle, max_num_sequences=4)


def test_stats_is_one_snapshot(tiny_bundle):
    """LLM.stats(): the scheduler's, block manager's and engine's state at one moment, copied."""
    llm = LLM(tiny_bundle, kv_cache_memory="4MiB")
    before = llm.stats()
    llm.add_request([5, 6, 7, 8, 9], SamplingParams(max_tokens=3, ignore_eos=True))
    assert (llm.stats().running, llm.stats().waiting) == (0, 1)
    llm.step()
    now = llm.stats()
    assert (now.running, now.waiting, now.preemptions) == (1, 0, 0) and now.kv_usage > 0
    assert now.timing.steps == 1 and before.timing.steps == 0  # the earlier snapshot is a copy
    assert (now.engine_calls["main"].calls, now.engine_calls["main"].tokens) == (1, 5)
    assert now.speculation is None and now.prefix_cache.queried_tokens >= 0
