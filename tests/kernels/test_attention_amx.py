"""llmc.PagedAttention with bf16_tiles: prefill tiles in bf16, held to a numpy reference of the same
rounding (bf16 queries, keys and values, exact softmax), and to float32 within bf16's error; decodes in
the same step stay float32. Natively the tiles run on AMX where the CPU has it, else on AVX-512 BF16
(VDPBF16PS), and on a scalar model of the AMX tiles everywhere (emulated-amx); on a CPU with neither
the attribute changes nothing (float32 tiles)."""

import numpy as np
import onnxruntime as ort
import pytest

from llmc.compiler import onnx_paged_attention as pa
from llmc.kernels import fused_cpu
from tests.helpers import kernel_options

BLOCK, NUM_BLOCKS, POSITIONS = 6, 96, 512
LOG2E = 1.0 / np.log(2.0)
# (cached, new) tokens per sequence: prefills of several tiles with cached prefixes that end inside
# blocks and chunks, a short prefill (one partial tile) and a decode (float32 chunks, not a tile).
SEQUENCES = [(40, 100), (0, 30), (70, 17), (20, 1)]


def _graph(heads: int, kv_heads: int, head_dim: int, kv_dtype: str, bf16_tiles: bool) -> bytes:
    """One llmc.PagedAttention node over graph inputs, with the step plan of the engine graphs."""
    return pa.build_single_op_model(heads, kv_heads, head_dim, kv_dtype, [NUM_BLOCKS, BLOCK, kv_heads, head_dim],
                                    POSITIONS, bf16_tiles).SerializeToString()


def _step(heads, kv_heads, head_dim, kv_dtype, seed):
    rng = np.random.default_rng(seed)
    T = sum(new for _, new in SEQUENCES)
    shape = (NUM_BLOCKS, BLOCK, kv_heads, head_dim)
    if kv_dtype == "int8":  # codes; a value is code * its channel's scale
        pools = [rng.integers(-127, 128, shape, dtype=np.int8) for _ in range(2)]
        scales = {name: rng.uniform(0.005, 0.03, kv_heads * head_dim).astype(np.float32) for name in pa.SCALES}
    else:
        pools = [rng.standard_normal(shape, dtype=np.float32).astype(kv_dtype) for _ in range(2)]
        scales = {}
    blocks = rng.permutation(NUM_BLOCKS)  # tables with holes: blocks in random order
    width = max((c + n + BLOCK - 1) // BLOCK for c, n in SEQUENCES)
    tables, used = np.zeros((len(SEQUENCES), width), np.int32), 0
    for s, (cached, new) in enumerate(SEQUENCES):
        count = (cached + new + BLOCK - 1) // BLOCK
        tables[s, :count], used = blocks[used:used + count], used + count
    angles = np.arange(POSITIONS)[:, None] * 10000.0 ** (-np.arange(head_dim // 2) / (head_dim // 2))
    feeds = {"q": 2 * rng.standard_normal((T, heads * head_dim), dtype=np.float32),
             "k": 2 * rng.standard_normal((T, kv_heads * head_dim), dtype=np.float32),
             "v": rng.standard_normal((T, kv_heads * head_dim), dtype=np.float32),
             "k_pool": pools[0], "v_pool": pools[1],
             "positions": np.concatenate([np.arange(c, c + n) for c, n in SEQUENCES]),
             "block_tables": tables, "context_lens": np.array([c + n for c, n in SEQUENCES], np.int32),
             "query_start": np.cumsum([0] + [n for _, n in SEQUENCES]).astype(np.int32),
             "rope_cos": np.cos(angles).astype(np.float32), "rope_sin": np.sin(angles).astype(np.float32), **scales}
    return feeds


def _pool(feeds, name, kv_heads, head_dim):
    """A pool's values [NB * B, KVH, D] in float64 (int8 codes times their channels' scales)."""
    pool = feeds[f"{name}_pool"].reshape(-1, kv_heads, head_dim).astype(np.float64)
    if f"{name}_scale" in feeds:
        pool = pool * feeds[f"{name}_scale"].astype(np.float64).reshape(kv_heads, head_dim)
    return pool


def _bf16(x):
    """Round float32 to bfloat16 (nearest even), returned as float64."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def _reference(feeds, heads, kv_heads, head_dim, round_bf16):
    """Causal paged attention in float64 (keys gathered through the tables, RoPE on the step's q and k);
    with round_bf16 the rotated queries (scaled by scale * log2(e), as the kernel does, its softmax then
    being 2^x), keys and values are rounded to bf16 first."""
    half, group = head_dim // 2, heads // kv_heads
    cos, sin = feeds["rope_cos"].astype(np.float64), feeds["rope_sin"].astype(np.float64)

    def rope(x, pos):  # [T, n, D]
        c, s = cos[pos][:, None], sin[pos][:, None]
        return np.concatenate([x[..., :half] * c - x[..., half:] * s, x[..., half:] * c + x[..., :half] * s], -1)

    pos = feeds["positions"]
    q = rope(feeds["q"].reshape(len(pos), heads, head_dim).astype(np.float64), pos)
    k = rope(feeds["k"].reshape(len(pos), kv_heads, head_dim).astype(np.float64), pos)
    v = feeds["v"].reshape(len(pos), kv_heads, head_dim).astype(np.float64)
    out, start = np.zeros_like(q), 0
    for s, (cached, new) in enumerate(SEQUENCES):
        slots = feeds["block_tables"][s, np.arange(cached) // BLOCK] * BLOCK + np.arange(cached) % BLOCK
        keys = np.concatenate([_pool(feeds, "k", kv_heads, head_dim)[slots], k[start:start + new]])  # [L, KVH, D]
        values = np.concatenate([_pool(feeds, "v", kv_heads, head_dim)[slots], v[start:start + new]])
        queries = q[start:start + new] * (head_dim ** -0.5 * LOG2E)  # [new, H, D]: scores in log2 units
        if round_bf16:
            queries, keys, values = (_bf16(x.astype(np.float32)) for x in (queries, keys, values))
        keys, values = np.repeat(keys, group, axis=1), np.repeat(values, group, axis=1)  # [L, H, D]
        scores = np.einsum("qhd,khd->hqk", queries, keys)
        scores[:, np.arange(cached + new)[None, :] > cached + np.arange(new)[:, None]] = -np.inf  # causal
        weights = np.exp2(scores - scores.max(-1, keepdims=True))
        out[start:start + new] = np.einsum("hqk,khd->qhd", weights / weights.sum(-1, keepdims=True), values)
        start += new
    return out.reshape(len(pos), heads * head_dim)


@pytest.mark.parametrize("kernels", ["native", "emulated-amx"])
@pytest.mark.parametrize("kv_dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 2, 128), (4, 2, 16)],
                         ids=["d64-g3", "d128-g2", "d16-g2"])
def test_bf16_tiles_match_a_bf16_reference_and_float32_within_bf16_error(heads, kv_heads, head_dim, kv_dtype,
                                                                         kernels):
    feeds = _step(heads, kv_heads, head_dim, kv_dtype, seed=head_dim)
    graph = _graph(heads, kv_heads, head_dim, kv_dtype, bf16_tiles=True)
    got = ort.InferenceSession(graph, kernel_options(kernels), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    body = ort.InferenceSession(graph, kernel_options("function-body"),
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    exact = _reference(feeds, heads, kv_heads, head_dim, round_bf16=False)
    assert np.abs(body - exact).max() < 1e-4  # the reference is the op's contract
    decode = slice(-SEQUENCES[-1][1], None)  # the decoding token: float32 chunks in every case
    assert np.abs(got[decode] - exact[decode]).max() < 1e-4
    prefill = slice(0, -SEQUENCES[-1][1])
    bf16 = kernels == "emulated-amx" or fused_cpu.bf16_attention_available()  # AMX or AVX-512 BF16
    if not (bf16 and head_dim % 32 == 0):  # float32 tiles: the attribute is ignored
        assert np.abs(got - exact).max() < 1e-4
        return
    rounded = _reference(feeds, heads, kv_heads, head_dim, round_bf16=True)
    # Against the same rounding of Q, K and V only the probabilities' bf16 rounding remains (~2^-9 relative
    # per weight, averaging out over the keys); against float32 the inputs' rounding shows too.
    to_rounded, to_exact = np.abs(got[prefill] - rounded[prefill]), np.abs(got[prefill] - exact[prefill])
    assert to_rounded.max() < 8e-3 and to_rounded.mean() < 5e-4
    assert 1e-3 < to_exact.max() < 0.1, "bf16 tiles should differ from float32 by bf16's rounding, no more"
    assert to_rounded.mean() < to_exact.mean() / 4
