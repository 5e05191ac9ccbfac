"""KVPool.write: slice writes per run of consecutive slots equal a plain scatter."""

import numpy as np
import pytest

from llmc.artifacts.geometry import ModelGeometry
from llmc.runtime.kv_pool import KVPool


@pytest.mark.parametrize("slots", [[5], [8, 9, 10, 11, 12], [3, 40, 41, 7, 8, 9, 63, 0], [17, 16, 15]])
def test_write_matches_a_scatter(slots):
    geo = ModelGeometry.from_dict({"architecture": "LlamaForCausalLM", "num_layers": 2, "hidden_size": 8,
                                   "num_heads": 2, "num_kv_heads": 2, "head_dim": 4, "intermediate_size": 16,
                                   "vocab_size": 10, "max_position": 64, "rope_theta": 10000.0,
                                   "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False})
    pool = KVPool(geo, num_blocks=16, block_size=4)
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2, len(slots), 2, 4)).astype(np.float32)  # [layers, T, KVH, D]
    values = rng.standard_normal((2, len(slots), 2, 4)).astype(np.float32)
    pool.write(keys, values, np.asarray(slots, dtype=np.int64))
    expected_k, expected_v = np.zeros((2, 64, 2, 4), np.float32), np.zeros((2, 64, 2, 4), np.float32)
    for t, slot in enumerate(slots):
        expected_k[:, slot] = keys[:, t]
        expected_v[:, slot] = values[:, t]
    assert np.array_equal(pool.keys.reshape(2, 64, 2, 4), expected_k)
    assert np.array_equal(pool.values.reshape(2, 64, 2, 4), expected_v)
