// The onnxruntime custom op llmc.Int8Linear (inputs x float [M, K], w int8 [N, Ki], w_scale float [N],
// w_outlier float [N, Ko], channels int64 [K = Ki + Ko]; output y float [M, N]) over the AMX kernel of
// int8_linear.h. Registered only where AMX or AVX-512 VNNI runs; elsewhere onnxruntime runs the op's ONNX
// function body.
#include <algorithm>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "int8_linear.h"
#include "ort_abi.h"
#include "ort_ops.h"

namespace {

enum class Variant { kPlain, kSwiGLU, kSplit3, kGLU };

struct Kernel {
  ortabi::Api api;
  // kSwiGLU: x is [M, 2K], gate | up; kSplit3: y as 3 outputs (input 5: their widths); kGLU: y [M, N / 2] =
  // silu(gate) * up of the linear's output gate | up
  Variant variant;
  llmc::Int8Backend backend;  // chosen when the session creates the kernel
  std::mutex mutex;
  const int8_t* packed_from = nullptr;  // the weight buffer the packed copy was made from
  llmc::PackedWeight packed;
};

OrtStatus* error(const ortabi::Api& api, const std::string& message) {
  return api.CreateStatus(ORT_INVALID_ARGUMENT, ("llmc.Int8Linear: " + message).c_str());
}

struct Work {
  const llmc::Int8LinearArgs* args;
  std::vector<llmc::GemmItem> items;
};

void quantize_item(void* data, size_t item) {
  const Work& work = *static_cast<Work*>(data);
  const int64_t begin = static_cast<int64_t>(item) * llmc::kRowBlock;
  llmc::quantize_rows(*work.args, begin, begin + llmc::kRowBlock);
}

void gemm_item(void* data, size_t item) {
  const Work& work = *static_cast<Work*>(data);
  llmc::run_item(*work.args, work.items[item]);
}

OrtStatus* compute(void* kernel_ptr, OrtKernelContext* context) {
  Kernel& kernel = *static_cast<Kernel*>(kernel_ptr);
  const ortabi::Api& api = kernel.api;
  llmc_ops::Tensor x, w, scale, outlier, channels;
  RETURN_IF_ERROR(llmc_ops::read_input(api, context, 0, &x));
  RETURN_IF_ERROR(llmc_ops::read_input(api, context, 1, &w));
  RETURN_IF_ERROR(llmc_ops::read_input(api, context, 2, &scale));
  RETURN_IF_ERROR(llmc_ops::read_input(api, context, 3, &outlier));
  RETURN_IF_ERROR(llmc_ops::read_input(api, context, 4, &channels));
  if (x.dims.size() != 2 || w.dims.size() != 2 || outlier.dims.size() != 2 || scale.dims.size() != 1 ||
      channels.dims.size() != 1 || outlier.dims[0] != w.dims[0] || scale.dims[0] != w.dims[0] ||
      channels.dims[0] * (kernel.variant == Variant::kSwiGLU ? 2 : 1) != x.dims[1] || w.dims[1] + outlier.dims[1] != channels.dims[0] ||
      w.dims[1] % llmc::kInlierAlign != 0 || outlier.dims[1] % llmc::kOutlierAlign != 0) {
    return error(api, "expected x [M, K] ([M, 2K] for Int8LinearSwiGLU), w [N, Ki], w_scale [N], w_outlier [N, Ko] "
                      "and channels [K = Ki + Ko], Ki a multiple of 64 and Ko of 32");
  }
  const int64_t M = x.dims[0], N = w.dims[0], Ki = w.dims[1], Ko = outlier.dims[1];
  const bool glu = kernel.variant == Variant::kGLU;
  if (glu && N % 32 != 0) return error(api, "Int8LinearGLU: w's rows (gate | up) must be a multiple of 32");
  const int64_t* order = static_cast<const int64_t*>(channels.data);
  const int8_t* weight = static_cast<const int8_t*>(w.data);
  {
    std::lock_guard<std::mutex> lock(kernel.mutex);  // pack once: onnxruntime passes the same initializers
    if (kernel.packed_from != weight || kernel.packed.N != N || kernel.packed.Ki != Ki || kernel.packed.Ko != Ko) {
      for (int64_t k = 0; k < Ki + Ko; ++k) {  // checked with the weights they come with, once
        if (order[k] < 0 || order[k] >= Ki + Ko) return error(api, "a channel index is out of range");
      }
      const std::vector<int64_t> columns = glu ? llmc::glu_column_order(N) : std::vector<int64_t>();
      kernel.packed = llmc::pack_weight(weight, static_cast<const float*>(scale.data),
                                        static_cast<const float*>(outlier.data), order, N, Ki, Ko,
                                        glu ? columns.data() : nullptr,
                                        kernel.backend == llmc::Int8Backend::kAvx512Vnni);
      kernel.packed_from = weight;
    }
  }
  llmc::Int8LinearArgs args{static_cast<const float*>(x.data), &kernel.packed, {}, {0, N, N, N}, M};
  if (kernel.variant == Variant::kSplit3) {
    llmc_ops::Tensor splits;
    RETURN_IF_ERROR(llmc_ops::read_input(api, context, 5, &splits));
    const int64_t* widths = static_cast<const int64_t*>(splits.data);
    if (splits.dims != std::vector<int64_t>{3} || widths[0] + widths[1] + widths[2] != N) {
      return error(api, "Int8LinearSplit3: splits must be 3 widths adding up to N");
    }
    for (int o = 0; o < 3; ++o) {
      if (widths[o] <= 0 || widths[o] % llmc::kOutputAlign != 0) {
        return error(api, "Int8LinearSplit3: each split must be a positive multiple of 16 columns");
      }
      args.y_begin[o + 1] = args.y_begin[o] + widths[o];
    }
  }
  for (int o = 0; o < (kernel.variant == Variant::kSplit3 ? 3 : 1); ++o) {
    const int64_t width = args.y_begin[o + 1] - args.y_begin[o];
    RETURN_IF_ERROR(llmc_ops::make_output(api, context, o, M, glu ? width / 2 : width, &args.y[o]));
  }
  if (M == 0) return nullptr;
  const int64_t Mp = llmc::padded_rows(M);
  // Scratch reused across calls on this thread: fresh buffers of a few MB were fresh pages each call
  // (malloc maps them), zeroed by the kernel: ~7% of a prefill step.
  thread_local llmc::AlignedVector<int8_t> xq;  // whole tile rows on cache lines
  thread_local llmc::AlignedVector<uint16_t> xo;
  thread_local std::vector<float> x_scale;
  thread_local std::vector<int32_t> x_sum;
  xq.resize(Mp * Ki);
  xo.resize(Mp * Ko);
  x_scale.resize(Mp);
  x_sum.resize(Mp);
  args.xq = xq.data();
  args.xo = xo.data();
  args.x_scale = x_scale.data();
  args.x_sum = x_sum.data();
  args.swiglu = kernel.variant == Variant::kSwiGLU;
  args.glu = glu;
  args.stream = M * N * static_cast<int64_t>(sizeof(float)) / (glu ? 2 : 1) >= llmc::kStreamBytes;
  Work work{&args, llmc::plan_items(kernel.packed, M)};
  const size_t row_blocks = static_cast<size_t>(Mp / llmc::kRowBlock), items = work.items.size();
  RETURN_IF_ERROR(api.KernelContextParallelFor(context, quantize_item, row_blocks, row_blocks, &work));
  return api.KernelContextParallelFor(context, gemm_item, items, items, &work);
}

template <Variant kVariant>
OrtStatus* create_kernel(const OrtCustomOp*, const OrtApi* table, const OrtKernelInfo*, void** out) {
  *out = new Kernel{ortabi::Api(table), kVariant, llmc::int8_backend()};
  return nullptr;
}

const ONNXTensorElementDataType kInputTypes[6] = {ELEMENT_FLOAT, ELEMENT_INT8, ELEMENT_FLOAT, ELEMENT_FLOAT,
                                                  ELEMENT_INT64, ELEMENT_INT64};

}  // namespace

namespace llmc_ops {

OrtCustomOp make_int8_linear_op(const char* name) {
  OrtCustomOp op = base_op();
  const std::string kind = name;
  op.GetInputTypeCount = [](const OrtCustomOp*) { return size_t(5); };
  op.GetOutputTypeCount = [](const OrtCustomOp*) { return size_t(1); };
  if (kind == "Int8LinearSwiGLU") {
    op.GetName = [](const OrtCustomOp*) { return "Int8LinearSwiGLU"; };
    op.CreateKernelV2 = create_kernel<Variant::kSwiGLU>;
  } else if (kind == "Int8LinearGLU") {
    op.GetName = [](const OrtCustomOp*) { return "Int8LinearGLU"; };
    op.CreateKernelV2 = create_kernel<Variant::kGLU>;
  } else if (kind == "Int8LinearSplit3") {
    op.GetName = [](const OrtCustomOp*) { return "Int8LinearSplit3"; };
    op.CreateKernelV2 = create_kernel<Variant::kSplit3>;
    op.GetInputTypeCount = [](const OrtCustomOp*) { return size_t(6); };  // + splits
    op.GetOutputTypeCount = [](const OrtCustomOp*) { return size_t(3); };
  } else {
    op.GetName = [](const OrtCustomOp*) { return "Int8Linear"; };
    op.CreateKernelV2 = create_kernel<Variant::kPlain>;
  }
  op.GetInputType = [](const OrtCustomOp*, size_t i) { return i < 6 ? kInputTypes[i] : ELEMENT_UNDEFINED; };
  op.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  op.KernelComputeV2 = compute;
  return op;
}

}  // namespace llmc_ops
