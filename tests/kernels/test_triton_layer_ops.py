"""The CUDA engine's fused elementwise kernels (add + RMSNorm, rotary + KV write, SwiGLU) against their torch
references, under TRITON_INTERPRET=1 on the CPU (on a GPU where there is one), with fresh random inputs."""

import random

import numpy as np
import pytest

from tests.helpers import triton_or_skip

torch, DEVICE, DTYPE = triton_or_skip("the Triton kernels are")

from llmc.kernels.triton import reference  # noqa: E402
from llmc.kernels.triton.layer_ops import add_rms_norm, rope_write_kv, silu_mul  # noqa: E402

TOL = 2e-2 if DTYPE == torch.float16 else 1e-5


@pytest.fixture
def rng():
    seed = random.randrange(2**31)
    return np.random.default_rng(seed)


def _tensor(rng, *shape, scale=1.0):
    return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * scale).to(DEVICE, DTYPE)


@pytest.mark.parametrize("hidden", [64, 96])  # 96: not a power of two, the row is masked
def test_add_rms_norm_matches_the_reference_and_updates_the_residual(rng, hidden):
    x, weight = _tensor(rng, 5, hidden), _tensor(rng, hidden)
    torch.testing.assert_close(add_rms_norm(x, weight, 1e-5), reference.add_rms_norm_ref(x, weight, 1e-5),
                               atol=TOL, rtol=TOL)
    residual = _tensor(rng, 5, hidden, scale=3.0)
    residual_ref = residual.clone()
    got = add_rms_norm(x, weight, 1e-5, residual=residual)
    expected = reference.add_rms_norm_ref(x, weight, 1e-5, residual=residual_ref)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL)
    torch.testing.assert_close(residual, residual_ref, atol=TOL, rtol=TOL)  # the sum, written back


def test_rope_write_kv_rotates_and_writes_only_real_slots(rng):
    heads, kv_heads, head_dim, block_size, num_blocks, tokens = 6, 2, 16, 4, 10, 5
    qkv = _tensor(rng, tokens, (heads + 2 * kv_heads) * head_dim)
    angles = rng.uniform(0, 6.3, (64, head_dim // 2)).astype(np.float32)
    cos, sin = (torch.from_numpy(f(angles)).to(DEVICE) for f in (np.cos, np.sin))
    positions = torch.tensor(rng.integers(0, 64, tokens), dtype=torch.int32, device=DEVICE)
    slots = torch.tensor(rng.permutation(num_blocks * block_size)[:tokens], dtype=torch.int32, device=DEVICE)
    slots[2] = -1  # a padding row: writes nothing
    pools = [_tensor(rng, num_blocks, block_size, kv_heads, head_dim) for _ in range(2)]
    pools_ref = [p.clone() for p in pools]
    got = rope_write_kv(qkv, cos, sin, positions, slots, *pools, heads, kv_heads)
    expected = reference.rope_write_kv_ref(qkv, cos, sin, positions, slots, *pools_ref, heads, kv_heads)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL)
    for pool, pool_ref in zip(pools, pools_ref):
        torch.testing.assert_close(pool, pool_ref, atol=TOL, rtol=TOL)
    # the reference itself: position 0 is no rotation, and a norm-preserving one elsewhere
    q0 = reference.rope_write_kv_ref(qkv[:1], cos * 0 + 1, sin * 0, positions[:1], slots[:1] * 0 - 1,
                                     *pools_ref, heads, kv_heads)
    torch.testing.assert_close(q0.reshape(1, -1), qkv[:1, :heads * head_dim])
    torch.testing.assert_close(expected.float().norm(dim=-1), qkv[:, :heads * head_dim].float()
                               .view(tokens, heads, head_dim).norm(dim=-1), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("inter", [48, 1500])  # 1500: two tiles, the second masked
def test_silu_mul_matches_the_reference(rng, inter):
    gate_up = _tensor(rng, 3, 2 * inter, scale=2.0)
    torch.testing.assert_close(silu_mul(gate_up), reference.silu_mul_ref(gate_up), atol=TOL, rtol=TOL)


def test_each_op_adds_up_split_k_partials_as_it_loads_them(rng):
    """Given int4_matmul's unsummed partial products [S, T, N] (float32), each op gives what it gives on their sum,
    in the dtype asked for."""
    heads, kv_heads, head_dim, tokens, hidden, inter = 4, 2, 16, 3, 40, 24

    def parts(width):
        return torch.from_numpy(rng.standard_normal((3, tokens, width), dtype=np.float32)).to(DEVICE)

    x, weight, residual = parts(hidden), _tensor(rng, hidden), _tensor(rng, tokens, hidden)
    residual_ref = residual.clone()
    got = add_rms_norm(x, weight, 1e-5, residual, out_dtype=DTYPE)
    assert got.dtype == DTYPE and got.shape == (tokens, hidden)
    torch.testing.assert_close(got, reference.add_rms_norm_ref(x.sum(0), weight, 1e-5, residual_ref, DTYPE),
                               atol=TOL, rtol=TOL)
    torch.testing.assert_close(residual, residual_ref, atol=TOL, rtol=TOL)

    qkv = parts((heads + 2 * kv_heads) * head_dim)
    angles = torch.from_numpy(rng.uniform(0, 6.3, (8, head_dim // 2)).astype(np.float32)).to(DEVICE)
    positions = torch.tensor([0, 5, 7], dtype=torch.int32, device=DEVICE)
    slots = torch.tensor([3, -1, 9], dtype=torch.int32, device=DEVICE)
    pools = [_tensor(rng, 4, 4, kv_heads, head_dim) for _ in range(2)]
    pools_ref = [p.clone() for p in pools]
    got = rope_write_kv(qkv, angles.cos(), angles.sin(), positions, slots, *pools, heads, kv_heads, out_dtype=DTYPE)
    expected = reference.rope_write_kv_ref(qkv.sum(0), angles.cos(), angles.sin(), positions, slots, *pools_ref,
                                           heads, kv_heads, DTYPE)
    assert got.dtype == DTYPE
    torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL)
    for pool, pool_ref in zip(pools, pools_ref):
        torch.testing.assert_close(pool, pool_ref, atol=TOL, rtol=TOL)

    gate_up = parts(2 * inter)
    got = silu_mul(gate_up, out_dtype=DTYPE)
    assert got.dtype == DTYPE and got.shape == (tokens, inter)
    torch.testing.assert_close(got, reference.silu_mul_ref(gate_up.sum(0), DTYPE), atol=TOL, rtol=TOL)
