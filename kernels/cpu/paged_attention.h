// llmc's fused paged attention for one layer of one engine step (CPU, fp32).
//
// The same contract as the `llmc.PagedAttention` ONNX function (compiler/onnx_paged_attention.py):
// RoPE on the step's queries and keys, attention of each query over its sequence's cached keys
// (read in place from the token-major pool through the block table) and the step's own keys up to
// itself, grouped-query heads. No padding, no mask, no copy of the cached keys.
#pragma once

#include <cstdint>
#include <vector>

#include "aligned_vector.h"

namespace llmc {

struct PagedAttentionArgs {
  // Step projections, before RoPE.
  const float* q;  // [T, H*D]
  const float* k;  // [T, KVH*D]
  const float* v;  // [T, KVH*D]
  // The layer's pools, token-major: float, IEEE half (uint16_t) with half_pools, or int8 codes with
  // int8_pools: value = code * scale of its channel (k_scale, v_scale [KVH*D], static, from the build's
  // calibration). The step's own k and v stay float.
  const void* k_pool;  // [NB, B, KVH, D]
  const void* v_pool;  // [NB, B, KVH, D]
  bool half_pools;
  bool int8_pools = false;
  const float* k_scale = nullptr;  // [KVH*D] with int8_pools
  const float* v_scale = nullptr;  // [KVH*D] with int8_pools
  // The attention plan (compiler/onnx_paged_attention.py: build_plan).
  const int64_t* query_index;      // [S, Qmax] token of each padded query row
  const int64_t* query_positions;  // [S, Qmax] its position; row 0 = the sequence's cached length
  const int32_t* cached_tables;    // [S, Mc] blocks holding each sequence's cached tokens
  const int64_t* token_index;      // [T, 2] (sequence, row) of each token
  const float* rope_cos;           // [P, D/2]
  const float* rope_sin;           // [P, D/2]
  int64_t T, S, Qmax, Mc, NB, B, P;
  int64_t H, KVH, D;
  float scale;
  bool bf16_tiles = false;  // prefill tiles in bf16 (paged_attention_amx.cc) where the CPU has AMX or AVX-512 BF16
  // Outputs.
  float* out;        // [T, H*D]
  float* k_rotated;  // [T, KVH*D]
  float* q_rotated;  // [T, H*D] scratch
  float* q_scaled = nullptr;  // [T, H*D] scratch with int8_pools: q_rotated times its KV head's k_scale
};

// f<float>, f<uint16_t> or f<int8_t> by the pools' element type.
template <typename Fn>
inline auto by_pool_type(const PagedAttentionArgs& a, Fn fn) {
  if (a.int8_pools) return fn(int8_t{});
  return a.half_pools ? fn(uint16_t{}) : fn(float{});
}

// Keys are read kChunk at a time. A sequence with fewer than kTile rows in the step (decodes, verify
// steps) is attended token by token, each token's keys split into chunks that are separate work
// items (so a decode step's single token still spreads over threads), merged afterwards as in
// flash-decoding. Longer runs of rows (prefill) go kTile rows at a time (paged_attention_tiles.cc).
constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kChunk = 64;
constexpr int64_t kTile = 16;

// A sequence's keys and values in bf16 for the AMX tiles, padded with zeros to whole chunks.
struct Bf16Keys {
  int64_t padded = 0;         // Lp: the sequence's keys (cached and in the step), rounded up to kAmxKeys
  AlignedVector<uint16_t> k;    // [KVH, Lp, D]
  AlignedVector<uint16_t> v_t;  // [KVH, D, Lp]: transposed
};
constexpr int64_t kAmxKeys = 64;  // keys per chunk of an AMX tile

struct WorkSplit {
  int64_t chunks = 0;                   // key chunks per chunked token
  std::vector<int64_t> chunked_tokens;  // tokens attended chunk by chunk
  std::vector<int64_t> tiles;           // (sequence, first row, rows) per tile
  std::vector<float> partials;          // [chunked tokens, chunks, H, D + 2]: unnormalized output, max, sum
  std::vector<int64_t> step_rows;       // [S]: each sequence's rows in the step
  // tiles run in bf16 (a.bf16_tiles, D a multiple of 32): on AMX, or where it has none on AVX-512 BF16
  // (bf16_vectors)
  bool bf16_tiles = false;
  bool bf16_vectors = false;
  std::vector<int64_t> packed_sequences;  // with bf16_tiles: the sequences that have tiles
  std::vector<Bf16Keys> bf16_keys;        // with bf16_tiles: [S], filled for packed_sequences by pack_keys
  int64_t num_items() const { return int64_t(chunked_tokens.size()) * chunks + int64_t(tiles.size()) / 3; }
};

WorkSplit split_work(const PagedAttentionArgs& a);

// Checks indices against the shapes; returns nullptr or a message naming what is out of range.
const char* validate(const PagedAttentionArgs& a);

// RoPE of every token's queries and keys (into q_rotated and k_rotated; with int8 pools q_scaled too).
void rotate_all(const PagedAttentionArgs& a);

// Work item `item` in [0, split.num_items()) (after rotate_all): a chunk of a chunked token's keys into
// its partial, or a tile into out.
void run_item(const PagedAttentionArgs& a, WorkSplit& split, int64_t item);

// Combines each chunked token's partials into out (softmax over all its keys).
void merge_chunks(const PagedAttentionArgs& a, const WorkSplit& split);

// With split.bf16_tiles: sequence packed_sequences[i]'s keys and values into split.bf16_keys (after rotate_all,
// before the tiles run).
void pack_keys(const PagedAttentionArgs& a, WorkSplit& split, int64_t i);

// Rows [r0, r0 + rows) of sequence s in bf16, on AMX tiles or AVX-512 BF16 (from split.bf16_keys).
void attend_tile_bf16(const PagedAttentionArgs& a, const WorkSplit& split, int64_t s, int64_t r0, int64_t rows);

// Rows [r0, r0 + rows) of sequence s (rows <= kTile), all their keys, into out.
void attend_tile(const PagedAttentionArgs& a, int64_t s, int64_t r0, int64_t rows);

}  // namespace llmc
