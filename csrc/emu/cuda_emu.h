// A small CPU emulation of the CUDA execution model, enough to run the kernels of csrc/kernels/
// unchanged on a machine without a GPU (tests/test_cuda_backend.py builds and runs
// csrc/emu/emulate_kernels.cpp with the host C++ compiler).
//
// Blocks run one after another; the threads of a block run as real OS threads, so
// __syncthreads() is a barrier, __shared__ arrays are function-static (one block at a time uses
// them), warp shuffles exchange through a per-block buffer between per-warp barriers, and
// atomicAdd is std::atomic_ref<float>::fetch_add.  Include this before any kernel header.
#pragma once

// c10 headers first: the macros below must not leak into them.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static
#define CLORA_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::clora_emu::dynamic_smem())

namespace clora_emu {

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct BlockState {
  std::unique_ptr<std::barrier<>> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<float> shfl;  // one slot per thread
  std::vector<float> smem;  // dynamic shared memory
};

inline thread_local dim3 tl_threadIdx, tl_blockIdx, tl_blockDim, tl_gridDim;
inline thread_local BlockState* tl_block = nullptr;

inline float* dynamic_smem() { return tl_block->smem.data(); }

inline void syncthreads() { tl_block->block_barrier->arrive_and_wait(); }

// All 32 lanes of the calling warp must call it (as with a full mask on a GPU).
inline float shfl_down(float v, unsigned off) {
  const unsigned tid = tl_threadIdx.x, lane = tid & 31u, warp = tid >> 5;
  auto& bar = *tl_block->warp_barriers[warp];
  tl_block->shfl[tid] = v;
  bar.arrive_and_wait();
  const float r = lane + off < 32u ? tl_block->shfl[tid + off] : v;
  bar.arrive_and_wait();
  return r;
}

// Runs body() as every thread of every block of `grid` (threads = blockDim.x, 1-D blocks).
inline void launch(dim3 grid, unsigned threads, size_t smem_bytes, const std::function<void()>& body) {
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        BlockState st;
        st.block_barrier = std::make_unique<std::barrier<>>(static_cast<std::ptrdiff_t>(threads));
        for (unsigned w = 0; w < (threads + 31) / 32; ++w)
          st.warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        st.shfl.assign(threads, 0.f);
        // Garbage-fill dynamic shared memory, as a GPU would not zero it.
        st.smem.assign(smem_bytes / sizeof(float) + 1, 12345.678f);
        std::vector<std::thread> ts;
        ts.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          ts.emplace_back([&, t] {
            tl_threadIdx = dim3(t, 0, 0);
            tl_blockIdx = dim3(bx, by, bz);
            tl_blockDim = dim3(threads, 1, 1);
            tl_gridDim = grid;
            tl_block = &st;
            body();
          });
        }
        for (auto& th : ts) th.join();
      }
}

}  // namespace clora_emu

using clora_emu::dim3;
#define threadIdx (::clora_emu::tl_threadIdx)
#define blockIdx (::clora_emu::tl_blockIdx)
#define blockDim (::clora_emu::tl_blockDim)
#define gridDim (::clora_emu::tl_gridDim)

inline void __syncthreads() { clora_emu::syncthreads(); }
inline float __shfl_down_sync(unsigned /*mask*/, float v, unsigned off) { return clora_emu::shfl_down(v, off); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double __longlong_as_double(long long v) {
  double d;
  std::memcpy(&d, &v, sizeof(d));
  return d;
}
