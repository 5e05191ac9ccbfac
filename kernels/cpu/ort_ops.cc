// onnxruntime custom-op library: registers llmc.PagedAttention (paged_attention.h) for the CPU
// execution provider. onnxruntime then runs this kernel for the step graph's attention nodes instead
// of inlining the op's ONNX function body. Loaded by llmc.kernels.fused_cpu / runtime/engine_ort.py.
#include <algorithm>
#include <string>
#include <vector>

#include "int4_linear.h"
#include "int8_linear.h"
#include "ort_abi.h"
#include "ort_ops.h"
#include "paged_attention.h"

namespace {

const char* kDomain = "llmc";
const char* kOpName = "PagedAttention";

// Inputs, in the order of the op's contract (compiler/onnx_paged_attention.py: INPUTS).
enum Input : size_t {
  kQ, kK, kV, kKeyPool, kValuePool, kQueryIndex, kQueryPositions, kCachedTables, kCachedShape, kLengths,
  kTokenIndex, kRopeCos, kRopeSin, kKeyScale, kValueScale, kNumInputs
};
// k_scale and v_scale (int8 pools only) are optional: float pools' graphs end at rope_sin.
constexpr size_t kRequiredInputs = kKeyScale;
// The pools' type is checked at run time (float, float16 or int8): UNDEFINED lets onnxruntime pass any.
const ONNXTensorElementDataType kInputTypes[kNumInputs] = {
    ELEMENT_FLOAT, ELEMENT_FLOAT, ELEMENT_FLOAT, ELEMENT_UNDEFINED, ELEMENT_UNDEFINED, ELEMENT_INT64,
    ELEMENT_INT64, ELEMENT_INT32, ELEMENT_INT64, ELEMENT_INT64, ELEMENT_INT64, ELEMENT_FLOAT, ELEMENT_FLOAT,
    ELEMENT_FLOAT, ELEMENT_FLOAT};
const size_t kInputRanks[kNumInputs] = {2, 2, 2, 4, 4, 2, 2, 2, 1, 2, 2, 2, 2, 1, 1};

// Work below this many multiply-adds (per Q.K or P.V) stays on the calling thread.
constexpr int64_t kParallelWork = int64_t(1) << 16;

struct Kernel {
  ortabi::Api api;
  float scale;
  int64_t num_heads, kv_num_heads;
  bool bf16_tiles;
};

OrtStatus* error(const ortabi::Api& api, const std::string& message) {
  return api.CreateStatus(ORT_INVALID_ARGUMENT, ("llmc.PagedAttention: " + message).c_str());
}

using llmc_ops::Tensor;

OrtStatus* read_checked_input(const ortabi::Api& api, OrtKernelContext* context, size_t index, Tensor* out) {
  RETURN_IF_ERROR(llmc_ops::read_input(api, context, index, out));
  if (out->dims.size() != kInputRanks[index]) {
    return error(api, "input " + std::to_string(index) + " has rank " + std::to_string(out->dims.size()) +
                          ", expected " + std::to_string(kInputRanks[index]));
  }
  return nullptr;
}

using llmc_ops::make_output;

struct Work {
  const llmc::PagedAttentionArgs* args;
  llmc::WorkSplit* split;
};

void run_item(void* data, size_t item) {
  const Work& work = *static_cast<Work*>(data);
  llmc::run_item(*work.args, *work.split, static_cast<int64_t>(item));
}

void pack_keys(void* data, size_t item) {
  const Work& work = *static_cast<Work*>(data);
  llmc::pack_keys(*work.args, *work.split, static_cast<int64_t>(item));
}

OrtStatus* compute(void* kernel_ptr, OrtKernelContext* context) {
  const Kernel& kernel = *static_cast<Kernel*>(kernel_ptr);
  const ortabi::Api& api = kernel.api;
  size_t count = 0;
  RETURN_IF_ERROR(api.KernelContextGetInputCount(context, &count));
  const bool scaled = count > kKeyScale;
  Tensor in[kNumInputs];
  for (size_t i = 0; i < (scaled ? kNumInputs : kRequiredInputs); ++i) {
    RETURN_IF_ERROR(read_checked_input(api, context, i, &in[i]));
  }

  llmc::PagedAttentionArgs a{};
  a.T = in[kQ].dims[0];
  a.H = kernel.num_heads;
  a.KVH = kernel.kv_num_heads;
  a.D = a.H > 0 ? in[kQ].dims[1] / a.H : 0;
  a.NB = in[kKeyPool].dims[0];
  a.B = in[kKeyPool].dims[1];
  a.S = in[kQueryIndex].dims[0];
  a.Qmax = in[kQueryIndex].dims[1];
  a.Mc = in[kCachedTables].dims[1];
  a.P = in[kRopeCos].dims[0];
  a.scale = kernel.scale;
  a.bf16_tiles = kernel.bf16_tiles;
  const bool shapes_agree =
      a.H > 0 && a.KVH > 0 && a.D > 0 && in[kQ].dims[1] == a.H * a.D &&
      in[kK].dims == std::vector<int64_t>{a.T, a.KVH * a.D} && in[kV].dims == in[kK].dims && in[kKeyPool].dims == std::vector<int64_t>{a.NB, a.B, a.KVH, a.D} &&
      in[kValuePool].dims == in[kKeyPool].dims && in[kQueryPositions].dims == in[kQueryIndex].dims &&
      in[kCachedTables].dims[0] == a.S && in[kTokenIndex].dims == std::vector<int64_t>{a.T, 2} &&
      in[kRopeCos].dims[1] == a.D / 2 && in[kRopeSin].dims == in[kRopeCos].dims && a.B > 0;
  if (!shapes_agree) return error(api, "input shapes disagree with each other or with num_heads/kv_num_heads");
  const ONNXTensorElementDataType pool_type = in[kKeyPool].type;
  if (in[kValuePool].type != pool_type ||
      (pool_type != ELEMENT_FLOAT && pool_type != ELEMENT_FLOAT16 && pool_type != ELEMENT_INT8)) {
    return error(api, "the K and V pools must both be float32, both float16 or both int8");
  }
  a.half_pools = pool_type == ELEMENT_FLOAT16;
  a.int8_pools = pool_type == ELEMENT_INT8;
  if (a.int8_pools != scaled) return error(api, "k_scale and v_scale come with int8 pools, and only with them");
  if (scaled) {
    const std::vector<int64_t> channels{a.KVH * a.D};
    if (in[kKeyScale].dims != channels || in[kValueScale].dims != channels) {
      return error(api, "k_scale and v_scale must have kv_num_heads * head_dim values");
    }
    a.k_scale = static_cast<const float*>(in[kKeyScale].data);
    a.v_scale = static_cast<const float*>(in[kValueScale].data);
  }

  a.q = static_cast<const float*>(in[kQ].data);
  a.k = static_cast<const float*>(in[kK].data);
  a.v = static_cast<const float*>(in[kV].data);
  a.k_pool = in[kKeyPool].data;
  a.v_pool = in[kValuePool].data;
  a.query_index = static_cast<const int64_t*>(in[kQueryIndex].data);
  a.query_positions = static_cast<const int64_t*>(in[kQueryPositions].data);
  a.cached_tables = static_cast<const int32_t*>(in[kCachedTables].data);
  a.token_index = static_cast<const int64_t*>(in[kTokenIndex].data);
  a.rope_cos = static_cast<const float*>(in[kRopeCos].data);
  a.rope_sin = static_cast<const float*>(in[kRopeSin].data);
  if (const char* problem = llmc::validate(a)) return error(api, problem);

  RETURN_IF_ERROR(make_output(api, context, 0, a.T, a.H * a.D, &a.out));
  RETURN_IF_ERROR(make_output(api, context, 1, a.T, a.KVH * a.D, &a.k_rotated));
  thread_local std::vector<float> q_rotated;  // scratch reused across calls (see int8_linear_op.cc)
  q_rotated.resize(a.T * a.H * a.D);
  a.q_rotated = q_rotated.data();
  thread_local std::vector<float> q_scaled;
  if (a.int8_pools) {
    q_scaled.resize(a.T * a.H * a.D);
    a.q_scaled = q_scaled.data();
  }
  llmc::rotate_all(a);
  llmc::WorkSplit split = llmc::split_work(a);
  Work work{&a, &split};
  const size_t packed = split.packed_sequences.size();
  if (packed > 1) {
    RETURN_IF_ERROR(api.KernelContextParallelFor(context, pack_keys, packed, packed, &work));
  } else if (packed == 1) {
    llmc::pack_keys(a, split, 0);
  }
  const int64_t items = split.num_items();
  if (items > 1 && (!split.tiles.empty() || items * llmc::kChunk * a.H * a.D >= kParallelWork)) {
    // Tiles differ in cost (causal): one task each, taken by whichever thread is free.
    const size_t batches = static_cast<size_t>(split.tiles.empty() ? std::min<int64_t>(items, 64) : items);
    RETURN_IF_ERROR(api.KernelContextParallelFor(context, run_item, items, batches, &work));
  } else {
    for (int64_t item = 0; item < items; ++item) llmc::run_item(a, split, item);
  }
  llmc::merge_chunks(a, split);
  return nullptr;
}

OrtStatus* create_kernel(const OrtCustomOp*, const OrtApi* table, const OrtKernelInfo* info, void** out) {
  ortabi::Api api(table);
  Kernel kernel{api, 0.0f, 0, 0, false};
  RETURN_IF_ERROR(api.KernelInfoGetAttributeFloat(info, "scale", &kernel.scale));
  RETURN_IF_ERROR(api.KernelInfoGetAttributeInt64(info, "num_heads", &kernel.num_heads));
  RETURN_IF_ERROR(api.KernelInfoGetAttributeInt64(info, "kv_num_heads", &kernel.kv_num_heads));
  int64_t bf16_tiles = 0;  // optional (graphs built before it have none): prefill tiles in float32
  if (OrtStatus* missing = api.KernelInfoGetAttributeInt64(info, "bf16_tiles", &bf16_tiles)) api.ReleaseStatus(missing);
  kernel.bf16_tiles = bf16_tiles != 0;
  *out = new Kernel(kernel);
  return nullptr;
}

OrtCustomOp make_op() {
  OrtCustomOp op = llmc_ops::base_op();
  op.GetName = [](const OrtCustomOp*) { return kOpName; };
  op.GetInputType = [](const OrtCustomOp*, size_t i) { return i < kNumInputs ? kInputTypes[i] : ELEMENT_UNDEFINED; };
  op.GetInputTypeCount = [](const OrtCustomOp*) { return size_t(kNumInputs); };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
    return i < kRequiredInputs ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  };
  op.GetOutputTypeCount = [](const OrtCustomOp*) { return size_t(2); };
  op.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  return op;
}

const OrtCustomOp kPagedAttention = make_op();
const OrtCustomOp kInt8Linear = llmc_ops::make_int8_linear_op("Int8Linear");
const OrtCustomOp kInt8LinearSwiGLU = llmc_ops::make_int8_linear_op("Int8LinearSwiGLU");
const OrtCustomOp kInt8LinearSplit3 = llmc_ops::make_int8_linear_op("Int8LinearSplit3");
const OrtCustomOp kInt8LinearGLU = llmc_ops::make_int8_linear_op("Int8LinearGLU");
const OrtCustomOp kInt4Linear = llmc_ops::make_int4_linear_op(false);
const OrtCustomOp kInt4LinearGLU = llmc_ops::make_int4_linear_op(true);

}  // namespace

namespace llmc_ops {

OrtStatus* read_input(const ortabi::Api& api, OrtKernelContext* context, size_t index, Tensor* out) {
  const OrtValue* value = nullptr;
  RETURN_IF_ERROR(api.KernelContextGetInput(context, index, &value));
  OrtTensorTypeAndShapeInfo* info = nullptr;
  RETURN_IF_ERROR(api.GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* status = api.GetDimensionsCount(info, &rank);
  if (status == nullptr) {
    out->dims.resize(rank);
    status = api.GetDimensions(info, out->dims.data(), rank);
  }
  if (status == nullptr) status = api.GetTensorElementType(info, &out->type);
  api.ReleaseTensorTypeAndShapeInfo(info);
  RETURN_IF_ERROR(status);
  // Inputs are read only; onnxruntime's C API hands out their buffers through the mutable getter.
  return api.GetTensorMutableData(const_cast<OrtValue*>(value), &out->data);
}

OrtStatus* make_output(const ortabi::Api& api, OrtKernelContext* context, size_t index, int64_t rows, int64_t cols,
                       float** data) {
  const int64_t dims[2] = {rows, cols};
  OrtValue* value = nullptr;
  RETURN_IF_ERROR(api.KernelContextGetOutput(context, index, dims, 2, &value));
  return api.GetTensorMutableData(value, reinterpret_cast<void**>(data));
}

OrtCustomOp base_op() {
  OrtCustomOp op{};
  op.version = 16;
  op.GetExecutionProviderType = [](const OrtCustomOp*) { return "CPUExecutionProvider"; };
  op.GetOutputType = [](const OrtCustomOp*, size_t) { return ELEMENT_FLOAT; };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  return op;
}

}  // namespace llmc_ops

// What llmc.Int8Linear runs on here (llmc::Int8Backend: 0 none, and then it is not registered; 1 AMX; 2
// AVX-512 VNNI): for the runtime's choice of graph and its reports.
extern "C" __attribute__((visibility("default"))) int llmc_int8_backend() {
  return static_cast<int>(llmc::int8_backend());
}
// Whether LLMC_INT8_BACKEND=avx512-vnni would run here (AMX CPUs have VNNI too), and whether the AMX
// kernels run: for the tests.
extern "C" __attribute__((visibility("default"))) int llmc_avx512_vnni_usable() { return llmc::avx512_vnni_usable(); }
// Whether llmc.Int4Linear runs here (and is registered): the engine's choice of its int4 decode graph.
extern "C" __attribute__((visibility("default"))) int llmc_int4_usable() { return llmc::int4_usable(); }
extern "C" __attribute__((visibility("default"))) int llmc_amx_usable() { return llmc::amx_usable(); }
// Whether attention's bf16 tiles run here (on AMX, or on AVX-512 BF16 without it): for the tests.
extern "C" __attribute__((visibility("default"))) int llmc_bf16_attention_usable() {
  return llmc::amx_usable() || llmc::avx512_bf16_usable();
}

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                                 const OrtApiBase* base) {
  const OrtApi* table = base->GetApi(ortabi::kApiVersion);
  if (table == nullptr) {  // an onnxruntime older than 1.17: refuse, so that the caller falls back and says so
    return ortabi::Api(base->GetApi(1)).CreateStatus(ORT_FAIL, "llmc's fused CPU kernels need onnxruntime >= 1.17");
  }
  ortabi::Api api(table);
  OrtCustomOpDomain* domain = nullptr;  // kept for the life of the process, as onnxruntime requires
  RETURN_IF_ERROR(api.CreateCustomOpDomain(kDomain, &domain));
  RETURN_IF_ERROR(api.CustomOpDomainAdd(domain, &kPagedAttention));
  if (llmc::int8_backend() != llmc::Int8Backend::kNone) {
    RETURN_IF_ERROR(api.CustomOpDomainAdd(domain, &kInt8Linear));
    RETURN_IF_ERROR(api.CustomOpDomainAdd(domain, &kInt8LinearSwiGLU));
    RETURN_IF_ERROR(api.CustomOpDomainAdd(domain, &kInt8LinearSplit3));
    RETURN_IF_ERROR(api.CustomOpDomainAdd(domain, &kInt8LinearGLU));
  }
  if (llmc::int4_usable()) {
    RETURN_IF_ERROR(api.CustomOpDomainAdd(domain, &kInt4Linear));
    RETURN_IF_ERROR(api.CustomOpDomainAdd(domain, &kInt4LinearGLU));
  }
  return api.AddCustomOpDomain(options, domain);
}
