// Kernels of the segmented LoRA projection (see csrc/lora_projection.cu for the whole op).
//
// Segments: layer l owns output columns o_l:o_{l+1}, rank slice l*r:(l+1)*r of xa / g, rows
// o_l:o_{l+1} of B [N, r]; the segment table layout is in csrc/tables.h.  All math is fp32.
//   kernel 1  y[m, c]          += s_l * sum_k xa[m, l*r + k] * B[c, k]          (c in segment l)
//   kernel 2  g[m, l*r + k]     = s_l * sum_{c in seg l} gy[m, c] * B[c, k]
//   kernel 3  dB[c, k]         += s_l * sum_m gy[m, c] * xa[m, l*r + k]         (fp32 atomics)
// None of them materialises B @ A.
#pragma once

#include "device_utils.cuh"

namespace clora_fast {

// Kernel 1: LoRA epilogue on y [M, N] (T, row stride ldy), xa [M, L*r] fp32, B [N, r] (T).
// Block: EP_TM (32) rows x EP_TN (64) columns of one segment; rank in chunks of EP_KC (32) staged
// in shared memory.  Thread t owns column t % 64 and rows t / 64 + 4q, q = 0..7.
// grid = (ceil(M / 32), total column tiles), 256 threads.
template <typename T>
__global__ void __launch_bounds__(kProjThreads)
seg_lora_epilogue_kernel(T* __restrict__ y, int64_t ldy, const float* __restrict__ xa, int64_t ldxa,
                         const T* __restrict__ B, int64_t ldb, const int64_t* __restrict__ seg, int L, int r,
                         int64_t M) {
  __shared__ float sX[EP_TM][EP_KC];
  __shared__ float sB[EP_TN][EP_KC + 1];
  const int tid = threadIdx.x;
  const int64_t tile = blockIdx.y;
  const int l = find_entry(seg, L, kSegStride, S_TILE, tile);
  const int64_t* e = seg + static_cast<int64_t>(l) * kSegStride;
  const int64_t n1 = e[S_END];
  const int64_t c0 = e[S_BEGIN] + (tile - e[S_TILE]) * EP_TN;
  const float scale = static_cast<float>(__longlong_as_double(e[S_SCALE]));
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * EP_TM;
  const int64_t a0 = static_cast<int64_t>(l) * r;
  const int n = tid % EP_TN, mg = tid / EP_TN;  // mg in 0..3

  float acc[EP_TM / 4];
#pragma unroll
  for (int q = 0; q < EP_TM / 4; ++q) acc[q] = 0.f;

  for (int kc = 0; kc < r; kc += EP_KC) {
    const int kw = r - kc < EP_KC ? r - kc : EP_KC;
    for (int idx = tid; idx < EP_TM * EP_KC; idx += kProjThreads) {
      const int mm = idx / EP_KC, kk = idx % EP_KC;
      const int64_t m = m0 + mm;
      sX[mm][kk] = (m < M && kk < kw) ? xa[m * ldxa + a0 + kc + kk] : 0.f;
    }
    for (int idx = tid; idx < EP_TN * EP_KC; idx += kProjThreads) {
      const int nn = idx / EP_KC, kk = idx % EP_KC;
      const int64_t c = c0 + nn;
      sB[nn][kk] = (c < n1 && kk < kw) ? static_cast<float>(B[c * ldb + kc + kk]) : 0.f;
    }
    __syncthreads();
    for (int kk = 0; kk < kw; ++kk) {
      const float b = sB[n][kk];
#pragma unroll
      for (int q = 0; q < EP_TM / 4; ++q) acc[q] += sX[mg + 4 * q][kk] * b;
    }
    __syncthreads();
  }
  const int64_t c = c0 + n;
  if (c < n1) {
#pragma unroll
    for (int q = 0; q < EP_TM / 4; ++q) {
      const int64_t m = m0 + mg + 4 * q;
      if (m < M) {
        T* p = y + m * ldy + c;
        *p = static_cast<T>(static_cast<float>(*p) + scale * acc[q]);
      }
    }
  }
}

// Kernel 2: g [M, L*r] fp32 (row stride ldg) from gy [M, N] (T) and B [N, r] (T).
// Block: G_TM (32) rows x G_KC (16) ranks of one segment, reducing over the segment in G_TN (64)
// column chunks.  Thread t owns rank k0 + t % 16 and rows t / 16 and t / 16 + 16.
// grid = (ceil(M / 32), L, ceil(r / 16)), 256 threads.  Deterministic (no atomics).
template <typename T>
__global__ void __launch_bounds__(kProjThreads)
seg_lora_grad_xa_kernel(float* __restrict__ g, int64_t ldg, const T* __restrict__ gy, int64_t ldgy,
                        const T* __restrict__ B, int64_t ldb, const int64_t* __restrict__ seg, int r, int64_t M) {
  __shared__ float sGy[G_TM][G_TN + 1];
  __shared__ float sB[G_TN][G_KC];
  const int tid = threadIdx.x;
  const int l = blockIdx.y;
  const int64_t* e = seg + static_cast<int64_t>(l) * kSegStride;
  const int64_t n0 = e[S_BEGIN], n1 = e[S_END];
  const float scale = static_cast<float>(__longlong_as_double(e[S_SCALE]));
  const int k0 = blockIdx.z * G_KC;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * G_TM;
  const int kk = tid % G_KC, mm = tid / G_KC;  // mm in 0..15

  float acc0 = 0.f, acc1 = 0.f;
  for (int64_t c0 = n0; c0 < n1; c0 += G_TN) {
    for (int idx = tid; idx < G_TM * G_TN; idx += kProjThreads) {
      const int mr = idx / G_TN, cc = idx % G_TN;
      const int64_t m = m0 + mr, c = c0 + cc;
      sGy[mr][cc] = (m < M && c < n1) ? static_cast<float>(gy[m * ldgy + c]) : 0.f;
    }
    for (int idx = tid; idx < G_TN * G_KC; idx += kProjThreads) {
      const int cc = idx / G_KC, kq = idx % G_KC;
      const int64_t c = c0 + cc;
      const int k = k0 + kq;
      sB[cc][kq] = (c < n1 && k < r) ? static_cast<float>(B[c * ldb + k]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int cc = 0; cc < G_TN; ++cc) {
      const float b = sB[cc][kk];
      acc0 += sGy[mm][cc] * b;
      acc1 += sGy[mm + 16][cc] * b;
    }
    __syncthreads();
  }
  const int k = k0 + kk;
  if (k < r) {
    const int64_t col = static_cast<int64_t>(l) * r + k;
    const int64_t m = m0 + mm;
    if (m < M) g[m * ldg + col] = scale * acc0;
    if (m + 16 < M) g[(m + 16) * ldg + col] = scale * acc1;
  }
}

// Kernel 3: dB [N, r] fp32 (contiguous, zero-initialised) += from gy [M, N] (T) and xa [M, L*r] fp32.
// Block: D_TN (64) columns of one segment x D_KC (16) ranks, over a chunk of `rows_per_block` rows
// in D_TM (32)-row steps; chunks are combined with fp32 atomicAdd.  Thread t owns column t % 64 and
// ranks 4 * (t / 64) + q, q = 0..3.  grid = (total column tiles, row chunks, ceil(r / 16)).
template <typename T>
__global__ void __launch_bounds__(kProjThreads)
seg_lora_grad_B_kernel(float* __restrict__ dB, const T* __restrict__ gy, int64_t ldgy, const float* __restrict__ xa,
                       int64_t ldxa, const int64_t* __restrict__ seg, int L, int r, int64_t M,
                       int64_t rows_per_block) {
  __shared__ float sGy[D_TM][D_TN];
  __shared__ float sX[D_TM][D_KC];
  const int tid = threadIdx.x;
  const int64_t tile = blockIdx.x;
  const int l = find_entry(seg, L, kSegStride, S_TILE, tile);
  const int64_t* e = seg + static_cast<int64_t>(l) * kSegStride;
  const int64_t n1 = e[S_END];
  const int64_t c0 = e[S_BEGIN] + (tile - e[S_TILE]) * D_TN;
  const float scale = static_cast<float>(__longlong_as_double(e[S_SCALE]));
  const int64_t mbeg = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t mend = M < mbeg + rows_per_block ? M : mbeg + rows_per_block;
  const int k0 = blockIdx.z * D_KC;
  const int64_t a0 = static_cast<int64_t>(l) * r;
  const int cl = tid % D_TN, kg = tid / D_TN;  // kg in 0..3

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t m0 = mbeg; m0 < mend; m0 += D_TM) {
    for (int idx = tid; idx < D_TM * D_TN; idx += kProjThreads) {
      const int mr = idx / D_TN, cc = idx % D_TN;
      const int64_t m = m0 + mr, c = c0 + cc;
      sGy[mr][cc] = (m < mend && c < n1) ? static_cast<float>(gy[m * ldgy + c]) : 0.f;
    }
    for (int idx = tid; idx < D_TM * D_KC; idx += kProjThreads) {
      const int mr = idx / D_KC, kq = idx % D_KC;
      const int64_t m = m0 + mr;
      const int k = k0 + kq;
      sX[mr][kq] = (m < mend && k < r) ? xa[m * ldxa + a0 + k] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int mr = 0; mr < D_TM; ++mr) {
      const float gv = sGy[mr][cl];
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[q] += gv * sX[mr][kg * 4 + q];
    }
    __syncthreads();
  }
  const int64_t c = c0 + cl;
  if (c < n1) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int k = k0 + kg * 4 + q;
      if (k < r) atomicAdd(dB + c * r + k, scale * acc[q]);
    }
  }
}

}  // namespace clora_fast
