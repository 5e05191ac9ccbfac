"""The Triton kernels against their torch references, under TRITON_INTERPRET=1 on the CPU (on a GPU where
there is one): fresh random inputs each run (the seed is in every failure message), block tables with holes,
contexts ending inside blocks, grouped-query heads, int4 weights with and without zero points."""

import random

import numpy as np
import pytest

from tests.helpers import triton_or_skip

torch, DEVICE, DTYPE = triton_or_skip("the Triton kernels are")

from llmc.kernels.quant import QuantizedWeight  # noqa: E402
from llmc.kernels.triton import reference  # noqa: E402
from llmc.kernels.triton.int4_gemm import int4_matmul  # noqa: E402
from llmc.kernels.triton.paged_attention import paged_decode, paged_prefill  # noqa: E402

TOL = 2e-2 if DTYPE == torch.float16 else 1e-4


@pytest.fixture
def seed():
    return random.randrange(2**31)


def _pools(rng, num_blocks, block_size, kv_heads, head_dim):
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return (torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(DEVICE, DTYPE),
            torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(DEVICE, DTYPE))


def _tables(rng, context_lens, block_size, num_blocks):
    """Each sequence's blocks drawn without replacement from the pool (holes between them, any order), padded
    with a block id the sequence does not own."""
    needed = [-(-c // block_size) for c in context_lens]
    ids = rng.permutation(num_blocks)[:sum(needed)]
    width = max(needed) + 2
    tables = np.full((len(context_lens), width), num_blocks - 1, dtype=np.int32)
    at = 0
    for s, n in enumerate(needed):
        tables[s, :n] = ids[at:at + n]
        at += n
    return torch.from_numpy(tables).to(DEVICE)


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(8, 2, 32), (6, 6, 16), (9, 3, 64)])
def test_paged_decode_matches_the_reference(seed, heads, kv_heads, head_dim):
    rng = np.random.default_rng(seed)
    block_size, num_blocks = 4, 96
    context_lens = [1, 7, int(rng.integers(20, 90))]  # one block, inside a block, several splits
    key_pool, value_pool = _pools(rng, num_blocks, block_size, kv_heads, head_dim)
    tables = _tables(rng, context_lens, block_size, num_blocks)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    q = torch.from_numpy(rng.standard_normal((3, heads, head_dim), dtype=np.float32)).to(DEVICE, DTYPE)
    starts = torch.arange(4, dtype=torch.int32, device=DEVICE)
    expected = reference.paged_attention_ref(q.cpu(), key_pool.cpu(), value_pool.cpu(), tables.cpu(), lens.cpu(),
                                             starts.cpu(), head_dim ** -0.5)
    got = paged_decode(q, key_pool, value_pool, tables, lens, head_dim ** -0.5, tokens_per_split=16, block_n=16)
    torch.testing.assert_close(got.cpu().float(), expected.float(), atol=TOL, rtol=TOL,
                               msg=lambda m: f"seed {seed}: {m}")


def test_a_graph_sized_split_grid_touches_nothing_past_each_context(seed, monkeypatch):
    """A CUDA graph launches the split grid of the longest context it serves: splits past a sequence's context
    write no partials and the merge reads none (here the partial buffers start as NaN, which any such read would
    spread); a context of 0 (a padding row) gives zeros."""
    rng = np.random.default_rng(seed)
    heads, kv_heads, head_dim, block_size, num_blocks = 4, 2, 16, 4, 64
    context_lens = [0, 5, int(rng.integers(17, 60))]
    key_pool, value_pool = _pools(rng, num_blocks, block_size, kv_heads, head_dim)
    tables = _tables(rng, [max(c, 1) for c in context_lens], block_size, num_blocks)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    q = torch.from_numpy(rng.standard_normal((3, heads, head_dim), dtype=np.float32)).to(DEVICE, DTYPE)
    expected = reference.paged_attention_ref(q[1:].cpu(), key_pool.cpu(), value_pool.cpu(), tables[1:].cpu(),
                                             lens[1:].cpu(), torch.arange(3, dtype=torch.int32), head_dim ** -0.5)
    full = torch.full
    monkeypatch.setattr(torch, "empty", lambda *shape, **kw: full(shape, float("nan"), **kw))
    got = paged_decode(q, key_pool, value_pool, tables, lens, head_dim ** -0.5, tokens_per_split=16, block_n=16,
                       max_context=256)  # 16 splits, of which these contexts use 0, 1 and 2-4
    assert not got[0].any()
    torch.testing.assert_close(got[1:].cpu().float(), expected.float(), atol=TOL, rtol=TOL,
                               msg=lambda m: f"seed {seed}: {m}")


def test_paged_prefill_matches_the_reference_with_causal_masks(seed):
    """A fresh prompt, a chunk after cached tokens (ending inside a block) and a 4-token verification, together."""
    rng = np.random.default_rng(seed)
    heads, kv_heads, head_dim, block_size, num_blocks = 4, 2, 32, 4, 64
    query_lens, context_lens = [9, 6, 4], [9, 6 + int(rng.integers(5, 40)), 4 + int(rng.integers(1, 30))]
    key_pool, value_pool = _pools(rng, num_blocks, block_size, kv_heads, head_dim)
    tables = _tables(rng, context_lens, block_size, num_blocks)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    starts = torch.tensor(np.cumsum([0] + query_lens), dtype=torch.int32, device=DEVICE)
    q = torch.from_numpy(rng.standard_normal((sum(query_lens), heads, head_dim), dtype=np.float32)).to(DEVICE, DTYPE)
    expected = reference.paged_attention_ref(q.cpu(), key_pool.cpu(), value_pool.cpu(), tables.cpu(), lens.cpu(),
                                             starts.cpu(), head_dim ** -0.5)
    got = paged_prefill(q, key_pool, value_pool, tables, lens, starts, head_dim ** -0.5, max(query_lens),
                        block_m=16, block_n=16)
    torch.testing.assert_close(got.cpu().float(), expected.float(), atol=TOL, rtol=TOL,
                               msg=lambda m: f"seed {seed}: {m}")


def test_decode_and_prefill_agree_on_one_query():
    rng = np.random.default_rng(0)
    key_pool, value_pool = _pools(rng, 32, 4, 2, 16)
    tables = _tables(rng, [13, 30], 4, 32)
    lens = torch.tensor([13, 30], dtype=torch.int32, device=DEVICE)
    q = torch.from_numpy(rng.standard_normal((2, 4, 16), dtype=np.float32)).to(DEVICE, DTYPE)
    starts = torch.arange(3, dtype=torch.int32, device=DEVICE)
    torch.testing.assert_close(paged_decode(q, key_pool, value_pool, tables, lens, 0.25, tokens_per_split=8),
                               paged_prefill(q, key_pool, value_pool, tables, lens, starts, 0.25, 1),
                               atol=TOL, rtol=TOL)


def _quantized(rng, n, k, group, zero_points) -> QuantizedWeight:
    blocks = -(-k // group)
    codes = rng.integers(0, 16, (n, blocks, group), dtype=np.uint8)
    codes.reshape(n, -1)[:, k:] = 0  # K padded up to whole groups
    scale = rng.uniform(0.01, 0.1, (n, blocks)).astype(np.float32)
    zero = rng.integers(0, 16, (n, blocks), dtype=np.uint8) if zero_points else None
    return QuantizedWeight(codes, scale, zero, 4, group, k)


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("zero_points", [True, False], ids=["zero-points", "symmetric"])
@pytest.mark.parametrize("split_k", [1, None, 3], ids=["whole-k", "split-k-auto", "split-k-3"])
@pytest.mark.parametrize("block_k", [32, 64], ids=["one-group-a-step", "two-groups-a-step"])
def test_int4_matmul_matches_the_reference(seed, m, zero_points, split_k, block_k):
    rng = np.random.default_rng(seed)
    n, k, group = 80, 99, 32  # N not a tile multiple, K not a group multiple (and odd: half a byte)
    qw = _quantized(rng, n, k, group, zero_points)
    packed = torch.from_numpy(qw.packed()).to(DEVICE)
    scale = torch.from_numpy(qw.scale).to(DEVICE, DTYPE)
    zero = torch.from_numpy(qw.zero).to(DEVICE) if zero_points else None
    # the reference's dequantization is llmc's own (numpy) one
    np.testing.assert_allclose(reference.dequantize_int4(packed.cpu(), scale.cpu().float(), None if zero is None
                                                         else zero.cpu(), group, k).numpy(), qw.dequantize(),
                               rtol=1e-6)
    x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32)).to(DEVICE, DTYPE)
    expected = reference.int4_matmul_ref(x.cpu(), packed.cpu(), scale.cpu(), None if zero is None else zero.cpu(),
                                         group, k)
    got = int4_matmul(x, packed, scale, zero, group, k, block_n=32, block_k=block_k, split_k=split_k)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got.cpu().float(), expected.float(), atol=TOL * 10, rtol=TOL,
                               msg=lambda msg: f"seed {seed}: {msg}")
    parts = int4_matmul(x, packed, scale, zero, group, k, block_n=32, block_k=block_k, split_k=split_k, reduce=False)
    assert parts.shape[1:] == (m, n) and (parts.shape[0] == 1) == (split_k == 1)  # [S, M, N], for a consumer to sum
    torch.testing.assert_close(parts.cpu().float().sum(0), expected.float(), atol=TOL * 10, rtol=TOL,
                               msg=lambda msg: f"seed {seed}: {msg}")


def test_split_k_fills_the_sms_only_when_the_grid_is_small():
    from llmc.kernels.triton.int4_gemm import split_k_for

    assert split_k_for(tiles=24, k=576, block_k=64, num_sms=132) == 9  # SmolLM2's up projection at batch 1
    assert split_k_for(tiles=128, k=2048, block_k=64, num_sms=132) == 3  # a 1B model's
    assert split_k_for(tiles=264, k=2048, block_k=64, num_sms=132) == 1
