"""int8 KV pools (kv_cache.dtype int8): the engine returns int8 codes of the calibration's static
per-channel scales, the runtime stores them, and attention reads them back (llmc's kernel folds the
scales into the queries and the output)."""

import numpy as np
import pytest

from llmc.artifacts.bundle import load_bundle
from llmc.runtime.llm import LLM
from llmc.runtime.sequence import SamplingParams
from tests.helpers import TEXT, write_yaml

PROMPT = list(range(3, 83))


@pytest.fixture(scope="module")
def kv8_bundle(tmp_path_factory, tiny_checkpoint):
    from llmc.compiler.pipeline import build
    from llmc.compiler.spec import load_spec

    work = tmp_path_factory.mktemp("kv8-build")
    (work / "calibration.txt").write_text(" ".join([TEXT] * 20))
    return build(load_spec(write_yaml(work / "model.yaml", name="tiny-kv8", source=str(tiny_checkpoint),
                                      kv_cache={"block_size": 4, "dtype": "int8"}, output="out",
                                      calibration={"texts": ["calibration.txt"], "n_samples": 4, "seq_len": 64})))


def test_the_bundle_records_int8_pools_and_their_scales_pass(kv8_bundle, tiny_bundle):
    manifest, fp32 = load_bundle(kv8_bundle).manifest, load_bundle(tiny_bundle).manifest
    assert manifest.kv_cache.dtype == "int8"
    assert manifest.kv_cache.bytes_per_token * 4 == fp32.kv_cache.bytes_per_token
    scales = manifest.pass_record("kv_scales").extra
    assert scales["layers"] == manifest.model.num_layers and scales["key_range_max"] > 0


def test_decoding_from_int8_pools_stays_close_to_fp32(kv8_bundle, tiny_bundle):
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=5)
    llm = LLM(kv8_bundle, max_num_batched_tokens=256)
    out = llm.generate([PROMPT], params)[0]
    assert llm.pool.keys.dtype == np.int8 and np.count_nonzero(llm.pool.keys) > 0
    ref = LLM(tiny_bundle, max_num_batched_tokens=256).generate([PROMPT], params)[0]
    # The prefill step reads no pool (its own K/V stay float): the same distribution as fp32.
    first, ref_first = dict(out.logprobs[0].top), dict(ref.logprobs[0].top)
    assert out.token_ids[0] == ref.token_ids[0]
    assert max(abs(first[t] - ref_first[t]) for t in set(first) & set(ref_first)) < 1e-4
    # Decodes read every earlier token from the int8 pools: close, not equal.
    gaps = []
    for step in range(1, 8):
        got, want = dict(out.logprobs[step].top), dict(ref.logprobs[step].top)
        shared = set(got) & set(want)
        assert len(shared) >= 3
        gaps.append(max(abs(got[t] - want[t]) for t in shared))
    assert 1e-4 < max(gaps) < 0.25

