"""Logprobs of generated and prompt tokens against transformers' log-softmax on the same tokens (fp32 bundle),
and what penalties, logit_bias and min_tokens do to the distribution sampled from."""

import numpy as np
import pytest
import torch
import transformers

from llmc.errors import RequestError
from llmc.runtime.llm import LLM
from llmc.runtime.logits_processors import process
from llmc.runtime.sequence import SamplingParams

TOL = 2e-3  # onnxruntime vs torch, fp32


@pytest.fixture(scope="module")
def llm(tiny_bundle):
    return LLM(tiny_bundle, max_num_seqs=4, max_num_batched_tokens=16)  # prompts run in several chunks


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()

    def log_softmax(ids: list[int]) -> np.ndarray:  # [len(ids), vocab]: row i predicts token i + 1
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits.double(), dim=-1).numpy()
    return log_softmax


def test_generated_and_prompt_logprobs_match_transformers(llm, reference):
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 300, 37).tolist()
    out = llm.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2))[0]
    expected = reference(prompt + out.token_ids)
    assert [lp.token for lp in out.prompt_logprobs] == prompt[1:]
    for i, lp in enumerate(out.prompt_logprobs):  # prompt token i + 1, predicted at position i
        assert lp.logprob == pytest.approx(expected[i, prompt[i + 1]], abs=TOL)
        assert [t for t, _ in lp.top] == list(np.argsort(-expected[i], kind="stable")[:2])
    for j, lp in enumerate(out.logprobs):
        row = expected[len(prompt) - 1 + j]
        assert lp.token == out.token_ids[j] and lp.logprob == pytest.approx(row[lp.token], abs=TOL)
        assert len(lp.top) == 3 and lp.top[0][1] == pytest.approx(row.max(), abs=TOL)


def test_scoring_a_prompt_generates_nothing_and_ignores_the_prefix_cache(llm, reference):
    prompt = list(range(5, 45))
    llm.generate([prompt], SamplingParams(max_tokens=2))  # its blocks are now cached
    out = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert out.token_ids == [] and out.finish_reason == "length" and len(out.prompt_logprobs) == len(prompt) - 1
    expected = reference(prompt)
    assert [lp.logprob for lp in out.prompt_logprobs] == pytest.approx(
        [expected[i, prompt[i + 1]] for i in range(len(prompt) - 1)], abs=TOL)
    assert all(lp.top == [] for lp in out.prompt_logprobs)


def test_streamed_deltas_carry_their_tokens_logprobs(llm):
    params = SamplingParams(max_tokens=5, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    whole = llm.generate([[7, 8, 9, 10]], params)[0]
    deltas = list(llm.stream([7, 8, 9, 10], params))
    assert [lp for d in deltas for lp in d.logprobs] == whole.logprobs
    assert deltas[0].prompt_logprobs == whole.prompt_logprobs and all(d.prompt_logprobs is None for d in deltas[1:])


def test_max_tokens_zero_needs_prompt_logprobs():
    with pytest.raises(RequestError, match="0 only to score the prompt"):
        SamplingParams(max_tokens=0)


def test_penalties_bias_and_min_tokens_against_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=50).astype(np.float32)
    prompt, output = [1, 2, 3], [3, 4, 4, 4]
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.5,
                            logit_bias={7: 5.0, 8: -100.0}, min_tokens=6)
    out = process(logits, params, prompt, output, stop_ids=[0, 9])
    expected = logits.astype(np.float64).copy()
    for t in {1, 2, 3, 4}:  # repetition: prompt and output tokens
        expected[t] = expected[t] / 1.5 if expected[t] > 0 else expected[t] * 1.5
    expected[3] -= 0.25 * 1 + 0.5
    expected[4] -= 0.25 * 3 + 0.5
    expected[7] += 5.0
    expected[8] -= 100.0
    expected[[0, 9]] = -np.inf  # 4 tokens < min_tokens 6: EOS and stop tokens banned
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert np.isfinite(process(logits, params, prompt, output + [5, 6], stop_ids=[0, 9])[[0, 9]]).all()


def test_logit_bias_steers_greedy_decoding(llm):
    forced = 123
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True, logit_bias={forced: 100.0},
                                                   logprobs=0))[0]
    assert out.token_ids == [forced] * 4
    assert all(lp.logprob < 0 for lp in out.logprobs)  # reported from the model's own distribution


def test_min_tokens_holds_off_a_stop_token(llm):
    first = llm.generate([[11, 12, 13]], SamplingParams(max_tokens=1))[0].token_ids[0]
    stopped = llm.generate([[11, 12, 13]], SamplingParams(max_tokens=5, stop_token_ids=(first,)))[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop"
    held = llm.generate([[11, 12, 13]], SamplingParams(max_tokens=5, stop_token_ids=(first,), min_tokens=3,
                                                       ignore_eos=True))[0]
    assert first not in held.token_ids[:3] and len(held.token_ids) >= 3


def test_a_tiny_repetition_penalty_keeps_the_logits_finite():
    """A penalty near 0 divides positive logits into overflow (a fuzzed request found it): clipped, not NaN."""
    logits = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    out = process(logits, SamplingParams(repetition_penalty=5e-324), [0, 1], [], stop_ids=[])
    assert np.isfinite(out).all() and out.argmax() == 0
