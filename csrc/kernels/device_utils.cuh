// Device helpers shared by the kernels.  Compiled by nvcc for the extension, and by a host C++
// compiler under csrc/emu/cuda_emu.h for the CPU emulation test (tests/test_cuda_backend.py), so
// the exact kernel source is exercised on machines without a GPU.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../tables.h"

// Dynamic shared memory: `extern __shared__` in CUDA, a per-block buffer under emulation.
#ifndef CLORA_DYNAMIC_SMEM
#define CLORA_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#endif

namespace clora_fast {

// Loads element `i` of a float32 / float16 / bfloat16 buffer as float (dtype chosen at run time;
// the branch is uniform across a warp).
__device__ __forceinline__ float load_as_float(const void* __restrict__ base, int64_t i, int64_t code) {
  if (code == kCodeF32) return static_cast<const float*>(base)[i];
  if (code == kCodeF16) return static_cast<float>(static_cast<const c10::Half*>(base)[i]);
  return static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]);
}

// Index of the last of the n table entries (`stride` int64 each) whose field `col` is <= v; the
// field must be non-decreasing over the entries (first tile / first block of each entry).  Ties go
// to the last entry, so entries owning no tiles/blocks are never chosen for a v they do not own.
__device__ __forceinline__ int find_entry(const int64_t* __restrict__ table, int n, int stride, int col,
                                          int64_t v) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table[static_cast<int64_t>(mid) * stride + col] <= v) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace clora_fast
