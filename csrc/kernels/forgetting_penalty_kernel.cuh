// The fused, grouped forgetting-penalty kernel (see csrc/forgetting_penalty.cu for the whole op).
//
// Per layer (PyTorch layout): past P [out, in], A [r, in], B [out, r], scale s; M = s * B @ A.
//   loss += sum_ij P_ij^2 M_ij^2,  G = 2 P^2 (.) M,  dA += s * B^T @ G [r, in],  dB += s * G @ A^T [out, r]
// Blocks are work items (layer, PT_TJ-column strip, PT_ROWS-row chunk) found by binary search in the
// per-layer table (layout: csrc/tables.h).  P is read once; M is recomputed tile by tile from
// shared-memory copies of A and B (r is small) and never written out.  fp32 throughout; dA, dB
// and loss are fp32 buffers, zero-initialised, combined across blocks with atomicAdd.
//
// Block of 256 threads on the strip j0:j0+64 of one layer:
//   shared  sA [r][65]  = A[:, strip]    (loaded once; padded rows: conflict-free column reads)
//           sdA[r][64]  = the strip's dA partial, accumulated over the block's rows
//           sB [16][r]  = B rows of the current 16-row tile
//           sG [16][65] = G of the current tile
//   per 16-row tile: thread (jj = t % 64, grp = t / 64) computes M, the loss and G of rows
//   grp + 4q (q = 0..3) of column jj; then dB[i, k] += s * sum_jj G[i, jj] A[k, jj] (one atomicAdd
//   per (i, k)); then sdA[k, jj] += sum_i B[i, k] G[i, jj] (thread owns ranks k = grp, grp + 4, ...).
//   End: dA[k, j0 + jj] += s * sdA[k, jj] (atomicAdd), loss block-reduced, one atomicAdd.
#pragma once

#include "device_utils.cuh"

namespace clora_fast {

__global__ void __launch_bounds__(PT_THREADS)
forgetting_penalty_kernel(const int64_t* __restrict__ table, int L, float* __restrict__ grads,
                          float* __restrict__ loss_out) {
  CLORA_DYNAMIC_SMEM(float, smem);
  __shared__ float warp_loss[PT_THREADS / 32];
  const int tid = threadIdx.x;
  const int64_t w = blockIdx.x;
  const int l = find_entry(table, L, F_COUNT, F_WORK_START, w);
  const int64_t* e = table + static_cast<int64_t>(l) * F_COUNT;

  const void* past = reinterpret_cast<const void*>(static_cast<intptr_t>(e[F_PAST]));
  const void* A = reinterpret_cast<const void*>(static_cast<intptr_t>(e[F_A]));
  const void* B = reinterpret_cast<const void*>(static_cast<intptr_t>(e[F_B]));
  float* dA = grads + e[F_DA_OFF];
  float* dB = grads + e[F_DB_OFF];
  const int64_t out = e[F_OUT], in = e[F_IN];
  const int r = static_cast<int>(e[F_R]);
  const int64_t ldp = e[F_LDP], lda = e[F_LDA], ldb = e[F_LDB];
  const int64_t code_p = e[F_DTYPES] & 0xff, code_a = (e[F_DTYPES] >> 8) & 0xff, code_b = (e[F_DTYPES] >> 16) & 0xff;
  const float scale = static_cast<float>(__longlong_as_double(e[F_SCALE]));
  const int64_t local = w - e[F_WORK_START];
  const int64_t strips = e[F_STRIPS];
  const int64_t j0 = (local % strips) * PT_TJ;
  const int64_t row_begin = (local / strips) * PT_ROWS;
  const int64_t row_end = out < row_begin + PT_ROWS ? out : row_begin + PT_ROWS;

  float* sA = smem;                   // [r][PT_TJ + 1]
  float* sdA = sA + r * (PT_TJ + 1);  // [r][PT_TJ]
  float* sB = sdA + r * PT_TJ;        // [PT_TI][r]
  float* sG = sB + PT_TI * r;         // [PT_TI][PT_TJ + 1]

  for (int idx = tid; idx < r * PT_TJ; idx += PT_THREADS) {
    const int k = idx / PT_TJ, c = idx % PT_TJ;
    const int64_t j = j0 + c;
    sA[k * (PT_TJ + 1) + c] = j < in ? load_as_float(A, k * lda + j, code_a) : 0.f;
    sdA[idx] = 0.f;
  }
  __syncthreads();

  const int jj = tid % PT_TJ, grp = tid / PT_TJ;  // grp in 0..3
  const int64_t j = j0 + jj;
  float loss = 0.f;
  for (int64_t i0 = row_begin; i0 < row_end; i0 += PT_TI) {
    for (int idx = tid; idx < PT_TI * r; idx += PT_THREADS) {
      const int ii = idx / r, k = idx % r;
      const int64_t i = i0 + ii;
      sB[idx] = i < row_end ? load_as_float(B, i * ldb + k, code_b) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < PT_TI / 4; ++q) {
      const int ii = grp + 4 * q;
      const int64_t i = i0 + ii;
      float m = 0.f;
      for (int k = 0; k < r; ++k) m += sB[ii * r + k] * sA[k * (PT_TJ + 1) + jj];
      m *= scale;
      float gval = 0.f;
      if (i < row_end && j < in) {
        const float p = load_as_float(past, i * ldp + j, code_p);
        const float p2 = p * p;
        loss += p2 * m * m;
        gval = 2.f * p2 * m;
      }
      sG[ii * (PT_TJ + 1) + jj] = gval;
    }
    __syncthreads();
    // dB rows of this tile: one (ii, k) pair per thread and loop step.
    for (int idx = tid; idx < PT_TI * r; idx += PT_THREADS) {
      const int ii = idx / r, k = idx % r;
      const int64_t i = i0 + ii;
      if (i < row_end) {
        float acc = 0.f;
        const float* gr = sG + ii * (PT_TJ + 1);
        const float* ar = sA + k * (PT_TJ + 1);
#pragma unroll 8
        for (int c = 0; c < PT_TJ; ++c) acc += gr[c] * ar[c];
        atomicAdd(dB + i * r + k, scale * acc);
      }
    }
    // The strip's dA partial: thread owns column jj and ranks grp, grp + 4, ...
    for (int k = grp; k < r; k += 4) {
      float acc = 0.f;
#pragma unroll
      for (int ii = 0; ii < PT_TI; ++ii) acc += sB[ii * r + k] * sG[ii * (PT_TJ + 1) + jj];
      sdA[k * PT_TJ + jj] += acc;
    }
    __syncthreads();
  }

  for (int idx = tid; idx < r * PT_TJ; idx += PT_THREADS) {
    const int k = idx / PT_TJ, c = idx % PT_TJ;
    const int64_t jc = j0 + c;
    if (jc < in) atomicAdd(dA + k * in + jc, scale * sdA[idx]);
  }

  // Block reduction of the loss: warp shuffles, then warp 0 over the per-warp partials.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) loss += __shfl_down_sync(0xffffffffu, loss, off);
  if ((tid & 31) == 0) warp_loss[tid >> 5] = loss;
  __syncthreads();
  if (tid < 32) {
    float v = tid < PT_THREADS / 32 ? warp_loss[tid] : 0.f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (tid == 0) atomicAdd(loss_out, v);
  }
}

}  // namespace clora_fast
