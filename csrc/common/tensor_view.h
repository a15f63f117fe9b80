// Plain strided views of tensors owned by Python (torch-free on purpose: see DESIGN.md).
#pragma once
#include <cstdint>

namespace llmk {

// Codes shared with python/llmkernels/_cview.py; keep both in step.
enum class DType : int32_t { f32 = 0, f16 = 1, bf16 = 2, f64 = 3, boolean = 4, u8 = 5, i8 = 6, i32 = 7, i64 = 8 };

constexpr int kMaxDims = 8;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  int32_t ndim = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements

  bool defined() const { return data != nullptr || ndim > 0; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= sizes[i];
    return n;
  }
  template <class T> T* ptr() const { return static_cast<T*>(data); }
};

inline int dtype_bytes(DType t) {
  switch (t) {
    case DType::f32: case DType::i32: return 4;
    case DType::f16: case DType::bf16: return 2;
    case DType::f64: case DType::i64: return 8;
    default: return 1;
  }
}

const char* dtype_name(DType t);

}  // namespace llmk
