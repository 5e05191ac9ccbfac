"""Speculative decoding: greedy output equals plain greedy output; sampled output keeps the target's
distribution (and the statistical test catches a broken acceptance rule); rejected slots are freed."""

import numpy as np
import pytest

from llmc.compiler.pipeline import build
from llmc.compiler.spec import load_spec
from llmc.runtime import llm as llm_module
from llmc.runtime.llm import LLM
from llmc.runtime.sequence import SamplingParams
from tests.helpers import assert_same_or_near_tie, write_yaml

# chi-square critical values at significance 0.001, by degrees of freedom
CHI2_999 = {3: 16.27, 35: 66.62}
PROMPTS = ["The capital of France is", "Paged attention keeps the KV cache in fixed-size blocks. Paged attention",
           "Continuous batching lets", "The capital of Italy is Rome. The capital of"]


def _bundle(tmp_path_factory, name, source, speculative, draft_source=None, draft_quant=None):
    work = tmp_path_factory.mktemp(name)
    if draft_source is not None:
        write_yaml(work / "draft.yaml", name=f"{name}-draft", source=str(draft_source),
                   **({"quantization": draft_quant} if draft_quant else {}))
        speculative = {**speculative, "draft": "draft.yaml"}
    spec = load_spec(write_yaml(work / "model.yaml", name=name, source=str(source), output="out",
                                kv_cache={"block_size": 4}, speculative=speculative))
    return build(spec)


@pytest.fixture(scope="module")
def ngram_bundle(tmp_path_factory, tiny_checkpoint):
    return _bundle(tmp_path_factory, "ngram", tiny_checkpoint, {"method": "ngram", "num_tokens": 8})


@pytest.fixture(scope="module")
def draft_bundle(tmp_path_factory, tiny_checkpoint):
    """The tiny model drafting for itself at 8 bits (a random tiny model is too fragile for 4)."""
    return _bundle(tmp_path_factory, "draft", tiny_checkpoint, {"method": "draft", "num_tokens": 8},
                   tiny_checkpoint, {"method": "rtn", "bits": 8, "group_size": 32, "lm_head": False})


@pytest.fixture(scope="module")
def same_draft_bundle(tmp_path_factory, tiny_checkpoint):
    """The unquantized model drafting for itself: every greedy draft must be accepted."""
    return _bundle(tmp_path_factory, "same", tiny_checkpoint, {"method": "draft", "num_tokens": 4}, tiny_checkpoint)


@pytest.fixture(scope="module")
def other_draft_bundle(tmp_path_factory, tiny_checkpoint):
    """The tiny model at 4 bits drafting: q near p but not equal, so both acceptance and residual matter."""
    return _bundle(tmp_path_factory, "int4", tiny_checkpoint, {"method": "draft", "num_tokens": 2},
                   tiny_checkpoint, {"method": "rtn", "bits": 4, "group_size": 32, "lm_head": False})


def _greedy(llm, prompts, max_tokens=24):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    return llm.generate(prompts, params)


@pytest.mark.parametrize("which", ["ngram_bundle", "draft_bundle"])
def test_greedy_equals_plain_greedy_for_every_k(which, request):
    bundle = request.getfixturevalue(which)
    plain = _greedy(LLM(bundle, speculation=False), PROMPTS)
    for k in range(1, 9):
        llm = LLM(bundle, num_spec_tokens=k, adaptive_speculation=False)
        outs = _greedy(llm, PROMPTS)
        for out, ref in zip(outs, plain):
            assert_same_or_near_tie(out.token_ids, ref.token_ids, ref.logprobs)
        assert llm.speculation.stats.proposed > 0 and llm.speculation.stats.accepted > 0
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks  # every slot came back
    if which == "draft_bundle":
        assert llm.speculation.stats.acceptance_rate > 0.5  # an 8-bit copy of the target mostly agrees with it


def test_identical_draft_is_always_accepted(same_draft_bundle):
    """The draft's own KV bookkeeping (catch-up, rollback to the accepted prefix) is exact: a draft
    equal to the target proposes the target's own greedy tokens, so nothing is ever rejected."""
    for k in (1, 3, 4):
        llm = LLM(same_draft_bundle, num_spec_tokens=k, adaptive_speculation=False)
        _greedy(llm, PROMPTS, max_tokens=30)
        stats = llm.speculation.stats
        assert stats.proposed > 20 and stats.accepted == stats.proposed, stats


@pytest.mark.parametrize("which,pools", [("ngram_bundle", 1), ("draft_bundle", 2)])
def test_greedy_equal_across_preemption(which, pools, request):
    bundle = request.getfixturevalue(which)
    prompts = PROMPTS * 3
    plain = _greedy(LLM(bundle, speculation=False), prompts, max_tokens=40)
    # 40 blocks of 4 tokens cannot hold 12 sequences of ~50 tokens: the scheduler must preempt
    per_block = 2 * 2 * 2 * 16 * 4 * 4 * pools  # K+V, 2 layers, 2 KV heads, head_dim 16, 4 tokens, fp32
    llm = LLM(bundle, kv_cache_memory=40 * per_block, num_spec_tokens=4, adaptive_speculation=False)
    outs = _greedy(llm, prompts, max_tokens=40)
    assert llm.scheduler.num_preemptions > 0 and llm.speculation.stats.accepted > 0
    for out, ref in zip(outs, plain):
        assert_same_or_near_tie(out.token_ids, ref.token_ids, ref.logprobs)


def test_ngram_lookup_proposes_what_followed_the_latest_match():
    from llmc.runtime.drafters import NgramDrafter

    drafter = NgramDrafter(min_n=1, max_n=3)
    assert drafter.lookup([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 3) == [7, 5, 1]  # latest 3-gram match wins
    assert drafter.lookup([4, 5, 6, 4], 2) == [5, 6]  # falls back to a 1-gram
    assert drafter.lookup([1, 2, 3], 4) == []
    assert drafter.lookup([256, 1, 256], 2) == [1, 256]  # byte patterns that straddle ints never match


# -- the sampling distribution -------------------------------------------------------------------
def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def _verify_always_accept(target_logits, draft, params, rng):
    """A broken rule: keep every draft, whatever p says."""
    from llmc.runtime.sampler import filtered_probs

    return [*draft.tokens, int(rng.choice(target_logits.shape[-1], p=filtered_probs(target_logits[-1], params)))]


def _verify_resample_from_p(target_logits, draft, params, rng):
    """A broken rule: on rejection resample from p itself instead of norm(max(0, p - q))."""
    from llmc.runtime.sampler import filtered_probs
    from llmc.runtime.speculative import _draft_probs

    out = []
    for i, token in enumerate(draft.tokens):
        p = filtered_probs(target_logits[i], params)
        q = _draft_probs(draft, i, p.shape[0])
        if rng.random() < min(1.0, p[token] / q[token]):
            out.append(token)
            continue
        return [*out, int(rng.choice(p.shape[0], p=p))]
    return [*out, int(rng.choice(p.shape[0], p=filtered_probs(target_logits[-1], params)))]


def _first_two_tokens_statistic(rule) -> float:
    """Chi-square of the joint distribution of the first two emitted tokens against p0 x p1 (35 df)."""
    from llmc.runtime.speculative import Draft

    rng = np.random.default_rng(0)
    vocab = 6
    target_logits = np.log(np.array([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04], [0.05, 0.1, 0.15, 0.2, 0.2, 0.3],
                                     [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]]))
    q = np.array([[0.05, 0.05, 0.1, 0.2, 0.3, 0.3], [0.4, 0.3, 0.1, 0.1, 0.05, 0.05]])
    params = SamplingParams(temperature=1.0)
    counts = np.zeros((vocab, vocab))
    for _ in range(20000):
        tokens = [int(rng.choice(vocab, p=q[i])) for i in range(2)]
        out = rule(target_logits, Draft(tokens, q), params, rng)
        if len(out) == 1:  # rejected at once: the next step drafts and verifies position 1 afresh
            out += rule(target_logits[1:], Draft([int(rng.choice(vocab, p=q[1]))], q[1:]), params, rng)[:1]
        counts[out[0], out[1]] += 1
    p = np.exp(target_logits)
    return _chi2(counts.ravel(), np.outer(p[0], p[1]).ravel())


def test_acceptance_rule_keeps_the_target_distribution_and_the_test_catches_broken_rules():
    from llmc.runtime.speculative import verify

    assert _first_two_tokens_statistic(verify) < CHI2_999[35]
    assert _first_two_tokens_statistic(_verify_always_accept) > CHI2_999[35]
    assert _first_two_tokens_statistic(_verify_resample_from_p) > CHI2_999[35]


def _second_token_statistic(bundle) -> float:
    """Sample 3 tokens many times with a draft model (k up to 2); condition on the most common first
    token t and compare the second token's distribution with the target's p(. | prompt, t), top-4."""
    prompt = "The capital of France is"
    llm = LLM(bundle, num_spec_tokens=2, adaptive_speculation=False)
    samples = []
    for seed in range(250):
        params = SamplingParams(max_tokens=3, temperature=1.0, top_k=4, n=16, seed=seed, ignore_eos=True)
        samples.extend(out.token_ids for out in llm.generate([prompt], params))
    assert llm.speculation.stats.proposed > 1000
    first = max(set(s[0] for s in samples), key=[s[0] for s in samples].count)
    seconds = [s[1] for s in samples if s[0] == first]
    ids = llm.tokenizer.encode(prompt) + [first]
    reference = LLM(bundle, speculation=False).generate([ids], SamplingParams(max_tokens=1, logprobs=4))[0]
    top = reference.logprobs[0].top  # the 4 most likely next tokens, as top_k = 4 keeps them
    p = np.exp([lp for _, lp in top])
    p /= p.sum()
    counts = np.array([seconds.count(token) for token, _ in top], dtype=np.float64)
    assert len(seconds) > 800
    if counts.sum() < len(seconds):  # tokens outside the target's top 4: impossible under p
        return float("inf")
    return _chi2(counts, p)


def test_sampled_tokens_follow_the_target_distribution(other_draft_bundle):
    assert _second_token_statistic(other_draft_bundle) < CHI2_999[3]


@pytest.mark.parametrize("broken_rule", [_verify_always_accept, _verify_resample_from_p])
def test_end_to_end_statistic_catches_broken_rules(other_draft_bundle, monkeypatch, broken_rule):
    monkeypatch.setattr(llm_module, "verify", broken_rule)
    assert _second_token_statistic(other_draft_bundle) > CHI2_999[3]


# -- adaptive k, metrics, bench ------------------------------------------------------------------
def test_adaptive_k_drafts_when_steps_are_flat_and_stops_when_they_are_compute_bound():
    from llmc.runtime.sequence import Sequence
    from llmc.runtime.spec_policy import SpecPolicy

    seqs = [Sequence(f"r{i}", [1, 2, 3], SamplingParams()) for i in range(16)]
    flat = SpecPolicy(k_max=6)
    for tokens in (1, 4, 8, 16, 64):  # memory-bound: the step costs the same whatever it holds
        flat.target.add(tokens, 0.030)
    flat.draft.add(1, 0.003)
    for seq in seqs[:1]:
        for _ in range(10):
            flat.acceptance.update(seq, 4, 4)
    assert flat.choose_k(seqs[:1]) == 6  # high acceptance, flat cost: draft the most
    bound = SpecPolicy(k_max=6)
    for tokens in (1, 16, 32, 64, 128):  # compute-bound: time grows with every token
        bound.target.add(tokens, 0.002 + 0.002 * tokens)
    bound.draft.add(16, 0.004)
    assert bound.choose_k(seqs) == 0  # 16 sequences: verifying drafts costs more than it yields
    low = SpecPolicy(k_max=6)
    low.target.add(1, 0.030)
    low.target.add(8, 0.034)
    low.draft.add(1, 0.010)
    for _ in range(10):
        low.acceptance.update(seqs[0], 4, 0)  # nothing accepted
    assert low.choose_k(seqs[:1]) == 0


def test_admission_pays_a_draft_catch_up_only_when_it_is_repaid():
    from llmc.runtime.sequence import Sequence
    from llmc.runtime.spec_policy import SpecPolicy

    def policy(fixed, per_token):
        p = SpecPolicy(k_max=4, prior_acceptance=0.8)
        for tokens in (1, 64):
            p.target.add(tokens, fixed + per_token * tokens)
            p.draft.add(tokens, 0.3 * (fixed + per_token * tokens))
        return p

    long_output = Sequence("a", [1] * 50, SamplingParams(max_tokens=500))
    short_output = Sequence("b", [1] * 50, SamplingParams(max_tokens=3))
    memory_bound = policy(0.030, 0.0002)
    assert memory_bound.admit(long_output, num_decoding=1, lag=50)
    assert not memory_bound.admit(short_output, num_decoding=1, lag=4000)  # catch-up never repaid
    assert not policy(0.002, 0.002).admit(long_output, num_decoding=32, lag=50)  # compute-bound batch


def test_metrics_and_bench_report_speculation(ngram_bundle):
    from llmc.runtime import bench
    from llmc.runtime.async_engine import AsyncEngine

    llm = LLM(ngram_bundle, num_spec_tokens=4, adaptive_speculation=False)
    workload = bench.make_workload(6, (20, 40), (10, 30), llm.geometry.vocab_size, seed=0)
    report = bench.run_offline(llm, workload)
    assert report["output_tokens"] == sum(req.max_tokens for req in workload)  # k+1 tokens per step counted
    spec = report["speculation"]
    assert spec["proposed"] > 0 and spec["accepted"] <= spec["proposed"] and spec["last_k"] == 4
    engine = AsyncEngine(llm)
    engine._update_gauges()
    body = engine.metrics.render()
    assert f"llmc_spec_accepted_tokens_total {llm.speculation.stats.accepted}" in body
    assert f"llmc_spec_draft_tokens_total {llm.speculation.stats.proposed}" in body
    assert "llmc_spec_acceptance_rate" in body and "llmc_spec_verify_seconds_total" in body


def test_n_samples_with_a_cached_prompt_still_fork(ngram_bundle):
    """A prompt whose blocks are all cached leaves one token to compute: that step must still fork n."""
    llm = LLM(ngram_bundle, num_spec_tokens=4, adaptive_speculation=False)
    prompt = llm.tokenizer.encode(PROMPTS[1])[:17]  # 4 full blocks of 4 + 1 token
    llm.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))
    outs = llm.generate([prompt], SamplingParams(max_tokens=6, n=3, temperature=1.0, seed=1, ignore_eos=True))
    assert len(outs) == 3 and all(len(o.token_ids) == 6 for o in outs)
