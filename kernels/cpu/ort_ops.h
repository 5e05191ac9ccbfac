// What llmc's custom ops share: reading inputs, making outputs, the common OrtCustomOp fields.
#pragma once

#include <cstdint>
#include <vector>

#include "ort_abi.h"

#define RETURN_IF_ERROR(expr)                        \
  do {                                               \
    if (OrtStatus* status_ = (expr)) return status_; \
  } while (0)

namespace llmc_ops {

struct Tensor {
  void* data = nullptr;
  std::vector<int64_t> dims;
  ONNXTensorElementDataType type = ELEMENT_UNDEFINED;
};

// Input `index`: its buffer, shape and element type.
OrtStatus* read_input(const ortabi::Api& api, OrtKernelContext* context, size_t index, Tensor* out);
// Output `index` as a float matrix [rows, cols].
OrtStatus* make_output(const ortabi::Api& api, OrtKernelContext* context, size_t index, int64_t rows, int64_t cols,
                       float** data);
// An op for the CPU provider with required inputs and float outputs; the caller sets name, types and callbacks.
OrtCustomOp base_op();

// llmc.Int8Linear, llmc.Int8LinearSwiGLU (x = silu(gate) * up of an input [M, 2K]) or
// llmc.Int8LinearSplit3 (y as 3 outputs side by side), by name.
OrtCustomOp make_int8_linear_op(const char* name);

// llmc.Int4Linear, or llmc.Int4LinearGLU (silu(gate) * up of the linear's output gate | up).
OrtCustomOp make_int4_linear_op(bool glu);

}  // namespace llmc_ops
