// The onnxruntime custom ops llmc.Int4Linear and llmc.Int4LinearGLU (inputs x float [M, K], w uint8 [N, K / 2],
// scale float16 [N, ceil(K / G)], zero uint8 [N, ceil(K / G)]; attribute group_size G; output y float [M, N],
// or silu(gate) * up [M, N / 2] for the GLU form) over the kernel of int4_linear.h. Registered only where it
// runs (AVX-512 VNNI); elsewhere the engine runs the bundle's MatMulNBits graph.
#include <algorithm>
#include <mutex>
#include <string>
#include <vector>

#include "aligned_vector.h"
#include "int4_linear.h"
#include "ort_abi.h"
#include "ort_ops.h"

namespace {

struct Kernel {
  ortabi::Api api;
  bool glu;
  int64_t group;
  std::mutex mutex;
  const uint8_t* packed_from = nullptr;  // the weight buffer the packed copy was made from
  llmc::PackedInt4 packed;
};

OrtStatus* error(const ortabi::Api& api, const std::string& message) {
  return api.CreateStatus(ORT_INVALID_ARGUMENT, ("llmc.Int4Linear: " + message).c_str());
}

struct Work {
  const float* x;
  const llmc::PackedInt4* w;
  llmc::Int4Activations act;
  int64_t M;
  float* y;
};

constexpr size_t kTilesPerItem = 4;  // 64 columns: a work item streams ~18 KB of codes at K = 576

void quantize_item(void* data, size_t row) {
  const Work& work = *static_cast<Work*>(data);
  llmc::quantize_int4_rows(work.x, static_cast<int64_t>(row), static_cast<int64_t>(row) + 1, *work.w, work.act);
}

void tiles_item(void* data, size_t item) {
  const Work& work = *static_cast<Work*>(data);
  const int64_t begin = static_cast<int64_t>(item * kTilesPerItem);
  const int64_t end = std::min<int64_t>(work.w->num_tiles, begin + kTilesPerItem);
  llmc::int4_tiles(*work.w, work.act, work.M, begin, end, work.y);
}

OrtStatus* compute(void* kernel_ptr, OrtKernelContext* context) {
  Kernel& kernel = *static_cast<Kernel*>(kernel_ptr);
  const ortabi::Api& api = kernel.api;
  llmc_ops::Tensor x, w, scale, zero;
  RETURN_IF_ERROR(llmc_ops::read_input(api, context, 0, &x));
  RETURN_IF_ERROR(llmc_ops::read_input(api, context, 1, &w));
  RETURN_IF_ERROR(llmc_ops::read_input(api, context, 2, &scale));
  RETURN_IF_ERROR(llmc_ops::read_input(api, context, 3, &zero));
  if (x.dims.size() != 2 || w.dims.size() != 2 || scale.dims.size() != 2 || zero.dims != scale.dims ||
      w.dims[1] * 2 != x.dims[1] || scale.dims[0] != w.dims[0]) {
    return error(api, "expected x [M, K], w [N, K / 2], scale and zero [N, ceil(K / group_size)]");
  }
  const int64_t M = x.dims[0], N = w.dims[0], K = x.dims[1];
  if (K % llmc::kInt4Block != 0 || kernel.group % llmc::kInt4Block != 0 ||
      scale.dims[1] != (K + kernel.group - 1) / kernel.group) {
    return error(api, "K and group_size must be multiples of 32, and scale [N, ceil(K / group_size)]");
  }
  if (kernel.glu && N % (2 * llmc::kInt4Tile) != 0) return error(api, "Int4LinearGLU: N must be a multiple of 32");
  const uint8_t* weight = static_cast<const uint8_t*>(w.data);
  {
    std::lock_guard<std::mutex> lock(kernel.mutex);  // pack once: onnxruntime passes the same initializers
    if (kernel.packed_from != weight || kernel.packed.N != N || kernel.packed.K != K) {
      kernel.packed = llmc::pack_int4(weight, static_cast<const uint16_t*>(scale.data),
                                      static_cast<const uint8_t*>(zero.data), N, K, kernel.group, kernel.glu);
      kernel.packed_from = weight;
    }
  }
  float* y = nullptr;
  RETURN_IF_ERROR(llmc_ops::make_output(api, context, 0, M, kernel.glu ? N / 2 : N, &y));
  if (M == 0) return nullptr;
  // Scratch reused across calls on this thread (the activations of one step's linears are small).
  thread_local llmc::AlignedVector<int8_t> xq;
  thread_local std::vector<float> block_scale, xsum;
  xq.resize(M * K);
  block_scale.resize(M * K / llmc::kInt4Block);
  xsum.resize(M * kernel.packed.num_groups);
  Work work{static_cast<const float*>(x.data), &kernel.packed, {xq.data(), block_scale.data(), xsum.data()}, M, y};
  if (M >= 8) {
    RETURN_IF_ERROR(api.KernelContextParallelFor(context, quantize_item, M, M, &work));
  } else {
    llmc::quantize_int4_rows(work.x, 0, M, kernel.packed, work.act);
  }
  const size_t items = (kernel.packed.num_tiles + kTilesPerItem - 1) / kTilesPerItem;
  return api.KernelContextParallelFor(context, tiles_item, items, items, &work);
}

template <bool kGlu>
OrtStatus* create_kernel(const OrtCustomOp*, const OrtApi* table, const OrtKernelInfo* info, void** out) {
  ortabi::Api api(table);
  int64_t group = 0;
  RETURN_IF_ERROR(api.KernelInfoGetAttributeInt64(info, "group_size", &group));
  *out = new Kernel{api, kGlu, group};
  return nullptr;
}

const ONNXTensorElementDataType kInputTypes[4] = {ELEMENT_FLOAT, ELEMENT_UINT8, ELEMENT_FLOAT16, ELEMENT_UINT8};

}  // namespace

namespace llmc_ops {

OrtCustomOp make_int4_linear_op(bool glu) {
  OrtCustomOp op = base_op();
  op.GetName = glu ? [](const OrtCustomOp*) { return "Int4LinearGLU"; } : [](const OrtCustomOp*) { return "Int4Linear"; };
  op.CreateKernelV2 = glu ? create_kernel<true> : create_kernel<false>;
  op.GetInputTypeCount = [](const OrtCustomOp*) { return size_t(4); };
  op.GetOutputTypeCount = [](const OrtCustomOp*) { return size_t(1); };
  op.GetInputType = [](const OrtCustomOp*, size_t i) { return i < 4 ? kInputTypes[i] : ELEMENT_UNDEFINED; };
  op.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  op.KernelComputeV2 = compute;
  return op;
}

}  // namespace llmc_ops
