// Shared helpers of the clora_fast CUDA extension (clora_fast._C).
//
// Included by the .cu translation units (nvcc) and by bindings.cpp / table_cache.cpp
// (host compiler).  Only light ATen/c10 headers: no cuBLAS/cuSPARSE headers are needed,
// so the extension builds against a bare CUDA toolkit (nvcc + cudart).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "tables.h"

namespace clora_fast {

// "shape [5, 33], dtype Float, device cuda:0, strides [33, 1]" -- for error messages.
inline std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "an undefined tensor";
  std::ostringstream os;
  os << "shape " << t.sizes() << ", dtype " << t.scalar_type() << ", device " << t.device()
     << ", strides " << t.strides();
  return os.str();
}

// AT_DISPATCH over exactly the kernel dtypes (float32, float16, bfloat16): like
// AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16, ...) without the float64 instantiation.
#define CLORA_DISPATCH_KERNEL_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                     \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

inline bool is_kernel_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

inline int64_t dtype_code(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return kCodeF32;
    case at::kHalf: return kCodeF16;
    case at::kBFloat16: return kCodeBF16;
    default: TORCH_CHECK(false, "clora_fast._C: unsupported dtype ", s);
  }
  return -1;
}

// Checks that `t` is a 2-D CUDA tensor of a kernel dtype; `name` names the argument.
inline void check_cuda_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "clora_fast._C: ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), "clora_fast._C: ", name, " must be a CUDA tensor, got ", describe(t));
  TORCH_CHECK(t.dim() == 2, "clora_fast._C: ", name, " must be 2-D, got ", describe(t));
  TORCH_CHECK(is_kernel_dtype(t.scalar_type()), "clora_fast._C: ", name,
              " must be float32, float16 or bfloat16, got ", describe(t));
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "clora_fast._C: ", name, " is on ", t.device(),
              " but ", ref_name, " is on ", ref.device());
}

// A 2-D tensor whose rows are contiguous (unit inner stride); copies only when needed.
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  if (t.size(1) <= 1 || t.stride(1) == 1) {
    if (t.size(0) <= 1 || t.stride(0) >= t.size(1)) return t;
  }
  return t.contiguous();
}

// Row stride (in elements) of a tensor returned by rows_contiguous.
inline int64_t row_stride(const at::Tensor& t) {
  return t.size(0) <= 1 ? std::max<int64_t>(t.size(1), 1) : t.stride(0);
}

// A read-only int64 table on `device`, valid on the current CUDA stream.  Tables are cached by
// content (plus device and stream), so a training loop that calls an op with the same segments /
// the same parameter tensors every step uploads its table once; a miss stages through pinned
// memory and copies asynchronously (no host synchronisation).  Defined in table_cache.cpp.
at::Tensor device_table(const std::vector<int64_t>& host, const at::Device& device);
void clear_table_cache();
int64_t table_cache_size();

}  // namespace clora_fast

