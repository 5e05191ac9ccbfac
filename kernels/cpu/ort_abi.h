// The part of onnxruntime's C ABI that llmc's custom-op library uses, declared by llmc because the
// onnxruntime wheels ship no headers. The ABI is stable across releases: `OrtApi` is a table of
// function pointers that only grows at its end, so a function's position in it never changes, and
// `OrtCustomOp` is read up to the fields its `version` says it has. Positions and layouts follow
// onnxruntime's documented C API (onnxruntime_c_api.h); tests/kernels/test_fused_cpu.py holds the
// library's results to the op's ONNX function body and to torch.
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {

struct OrtApi;
struct OrtStatus;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtCustomOpDomain;
struct OrtSessionOptions;
struct OrtShapeInferContext;

enum OrtErrorCode { ORT_OK = 0, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
enum ONNXTensorElementDataType {
  ELEMENT_UNDEFINED = 0, ELEMENT_FLOAT = 1, ELEMENT_UINT8 = 2, ELEMENT_INT8 = 3, ELEMENT_INT32 = 6, ELEMENT_INT64 = 7, ELEMENT_FLOAT16 = 10
};
enum OrtCustomOpInputOutputCharacteristic { INPUT_OUTPUT_REQUIRED = 0, INPUT_OUTPUT_OPTIONAL = 1 };
enum OrtMemType { OrtMemTypeDefault = 0 };

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

// A custom op's callbacks (version 16: CreateKernelV2 / KernelComputeV2, which return a status).
struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*);
  const char* (*GetName)(const OrtCustomOp*);
  const char* (*GetExecutionProviderType)(const OrtCustomOp*);
  ONNXTensorElementDataType (*GetInputType)(const OrtCustomOp*, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp*);
  ONNXTensorElementDataType (*GetOutputType)(const OrtCustomOp*, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp*);
  void (*KernelCompute)(void* kernel, OrtKernelContext*);
  void (*KernelDestroy)(void* kernel);
  OrtCustomOpInputOutputCharacteristic (*GetInputCharacteristic)(const OrtCustomOp*, size_t index);
  OrtCustomOpInputOutputCharacteristic (*GetOutputCharacteristic)(const OrtCustomOp*, size_t index);
  OrtMemType (*GetInputMemoryType)(const OrtCustomOp*, size_t index);
  int (*GetVariadicInputMinArity)(const OrtCustomOp*);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp*);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp*);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp*);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void** kernel);
  OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext*);
  // Read only by versions above 16; left null.
  OrtStatus* (*InferOutputShapeFn)(const OrtCustomOp*, OrtShapeInferContext*);
  int (*GetStartVersion)(const OrtCustomOp*);
  int (*GetEndVersion)(const OrtCustomOp*);
  size_t (*GetMayInplace)(int** input_index, int** output_index);
  void (*ReleaseMayInplace)(int* input_index, int* output_index);
  size_t (*GetAliasMap)(int** input_index, int** output_index);
  void (*ReleaseAliasMap)(int* input_index, int* output_index);
};

}  // extern "C"

namespace ortabi {

constexpr uint32_t kApiVersion = 17;  // the oldest API with every function below (onnxruntime 1.17)

// Positions in the OrtApi table.
enum Slot : size_t {
  kCreateStatus = 0,
  kCreateCustomOpDomain = 26,
  kCustomOpDomainAdd = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kGetTensorElementType = 60,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetTensorTypeAndShape = 65,
  kKernelInfoGetAttributeFloat = 85,
  kKernelInfoGetAttributeInt64 = 86,
  kKernelContextGetInputCount = 88,
  kKernelContextGetInput = 90,
  kKernelContextGetOutput = 91,
  kReleaseStatus = 93,
  kReleaseTensorTypeAndShapeInfo = 99,
  kKernelContextParallelFor = 274,
};

// Typed calls into the table.
class Api {
 public:
  explicit Api(const OrtApi* table) : table_(reinterpret_cast<void* const*>(table)) {}

  void ReleaseStatus(OrtStatus* status) const { call<void (*)(OrtStatus*)>(kReleaseStatus)(status); }
  OrtStatus* CreateStatus(OrtErrorCode code, const char* msg) const {
    return call<OrtStatus* (*)(OrtErrorCode, const char*)>(kCreateStatus)(code, msg);
  }
  OrtStatus* CreateCustomOpDomain(const char* domain, OrtCustomOpDomain** out) const {
    return call<OrtStatus* (*)(const char*, OrtCustomOpDomain**)>(kCreateCustomOpDomain)(domain, out);
  }
  OrtStatus* CustomOpDomainAdd(OrtCustomOpDomain* domain, const OrtCustomOp* op) const {
    return call<OrtStatus* (*)(OrtCustomOpDomain*, const OrtCustomOp*)>(kCustomOpDomainAdd)(domain, op);
  }
  OrtStatus* AddCustomOpDomain(OrtSessionOptions* options, OrtCustomOpDomain* domain) const {
    return call<OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(kAddCustomOpDomain)(options, domain);
  }
  OrtStatus* GetTensorMutableData(OrtValue* value, void** out) const {
    return call<OrtStatus* (*)(OrtValue*, void**)>(kGetTensorMutableData)(value, out);
  }
  OrtStatus* GetTensorTypeAndShape(const OrtValue* value, OrtTensorTypeAndShapeInfo** out) const {
    return call<OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**)>(kGetTensorTypeAndShape)(value, out);
  }
  OrtStatus* GetTensorElementType(const OrtTensorTypeAndShapeInfo* info, ONNXTensorElementDataType* out) const {
    using Fn = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, ONNXTensorElementDataType*);
    return call<Fn>(kGetTensorElementType)(info, out);
  }
  OrtStatus* GetDimensionsCount(const OrtTensorTypeAndShapeInfo* info, size_t* out) const {
    return call<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*)>(kGetDimensionsCount)(info, out);
  }
  OrtStatus* GetDimensions(const OrtTensorTypeAndShapeInfo* info, int64_t* dims, size_t count) const {
    return call<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)>(kGetDimensions)(info, dims, count);
  }
  void ReleaseTensorTypeAndShapeInfo(OrtTensorTypeAndShapeInfo* info) const {
    call<void (*)(OrtTensorTypeAndShapeInfo*)>(kReleaseTensorTypeAndShapeInfo)(info);
  }
  OrtStatus* KernelInfoGetAttributeFloat(const OrtKernelInfo* info, const char* name, float* out) const {
    return call<OrtStatus* (*)(const OrtKernelInfo*, const char*, float*)>(kKernelInfoGetAttributeFloat)(info, name, out);
  }
  OrtStatus* KernelInfoGetAttributeInt64(const OrtKernelInfo* info, const char* name, int64_t* out) const {
    using Fn = OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*);
    return call<Fn>(kKernelInfoGetAttributeInt64)(info, name, out);
  }
  OrtStatus* KernelContextGetInputCount(const OrtKernelContext* context, size_t* out) const {
    return call<OrtStatus* (*)(const OrtKernelContext*, size_t*)>(kKernelContextGetInputCount)(context, out);
  }
  OrtStatus* KernelContextGetInput(const OrtKernelContext* context, size_t index, const OrtValue** out) const {
    using Fn = OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**);
    return call<Fn>(kKernelContextGetInput)(context, index, out);
  }
  OrtStatus* KernelContextGetOutput(OrtKernelContext* context, size_t index, const int64_t* dims, size_t count,
                                    OrtValue** out) const {
    using Fn = OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
    return call<Fn>(kKernelContextGetOutput)(context, index, dims, count, out);
  }
  // Runs fn(data, i) for i in [0, total) on the session's intra-op threads, in num_batches batches.
  OrtStatus* KernelContextParallelFor(const OrtKernelContext* context, void (*fn)(void*, size_t), size_t total,
                                      size_t num_batches, void* data) const {
    using Fn = OrtStatus* (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*);
    return call<Fn>(kKernelContextParallelFor)(context, fn, total, num_batches, data);
  }

 private:
  template <typename Fn>
  Fn call(Slot slot) const { return reinterpret_cast<Fn>(table_[slot]); }

  void* const* table_;
};

}  // namespace ortabi
