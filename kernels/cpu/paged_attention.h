// llmc's fused paged attention for one layer of one engine step (CPU, fp32).
//
// The same contract as the `llmc.PagedAttention` ONNX function (compiler/onnx_paged_attention.py):
// RoPE on the step's queries and keys, attention of each query over its sequence's cached keys
// (read in place from the token-major pool through the block table) and the step's own keys up to
// itself, grouped-query heads. No padding, no mask, no copy of the cached keys.
#pragma once

#include <cstdint>

namespace llmc {

struct PagedAttentionArgs {
  // Step projections, before RoPE.
  const float* q;  // [T, H*D]
  const float* k;  // [T, KVH*D]
  const float* v;  // [T, KVH*D]
  // The layer's pools, token-major: float, or IEEE half (uint16_t) with half_pools.
  const void* k_pool;  // [NB, B, KVH, D]
  const void* v_pool;  // [NB, B, KVH, D]
  bool half_pools;
  // The step plan (compiler/onnx_paged_attention.py: build_plan).
  const int64_t* query_index;      // [S, Qmax] token of each padded query row
  const int64_t* query_positions;  // [S, Qmax] its position; row 0 = the sequence's cached length
  const int32_t* cached_tables;    // [S, Mc] blocks holding each sequence's cached tokens
  const int64_t* token_index;      // [T, 2] (sequence, row) of each token
  const float* rope_cos;           // [P, D/2]
  const float* rope_sin;           // [P, D/2]
  int64_t T, S, Qmax, Mc, NB, B, P;
  int64_t H, KVH, D;
  float scale;
  // Outputs.
  float* out;        // [T, H*D]
  float* k_rotated;  // [T, KVH*D]
  // Scratch (sized by the caller: see num_chunks).
  float* q_rotated;  // [T, H*D]
  float* partials;   // [T, chunks, H, D + 2]: each chunk's unnormalized output, its score maximum and sum
};

// Each token's keys (its cached tokens, then the step's rows up to itself) are split into chunks of
// kChunk keys, the work items; a decode step's single token then still spreads over threads.
constexpr int64_t kChunk = 64;

// Chunks per token (the longest token's; shorter ones leave their last chunks empty).
int64_t num_chunks(const PagedAttentionArgs& a);

// Checks indices against the shapes; returns nullptr or a message naming what is out of range.
const char* validate(const PagedAttentionArgs& a);

// RoPE of every token's queries and keys (into q_rotated and k_rotated).
void rotate_all(const PagedAttentionArgs& a);

// Work item `item` in [0, T * num_chunks): token item / chunks, its keys in chunk item % chunks, all heads
// (after rotate_all), into partials.
void attend_chunk(const PagedAttentionArgs& a, int64_t item);

// Combines each token's chunk partials into out (softmax over all its keys).
void merge_chunks(const PagedAttentionArgs& a);

}  // namespace llmc
