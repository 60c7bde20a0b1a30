// C-LoRA forgetting penalty with its gradients in one fused pass, grouped over layers.
//
// Per layer l (PyTorch layout): past P [out, in], lora_A A [r, in], lora_B B [out, r], scale s.
//   M = s * B @ A                        (never materialised: recomputed tile by tile in registers)
//   loss = sum_ij P_ij^2 * M_ij^2        (0-dim float32, summed over layers)
//   G = 2 * P^2 (.) M
//   dA = s * B^T @ G   [r, in]  float32
//   dB = s * G @ A^T   [out, r] float32
// One kernel launch covers every layer: blocks are work items (layer, 64-column strip, 128-row
// chunk) found by binary search in a device table of per-layer pointers / shapes / offsets.
// P is read exactly once; all arithmetic is fp32 (inputs may be fp32, fp16 or bf16, each tensor
// its own dtype).
//
// Block of 256 threads on a 64-column strip j0:j0+64 of a layer:
//   shared: sA [r][65]  = A[:, strip]      (loaded once, padded: conflict-free column reads)
//           sdA[r][64]  = dA partial for the strip, accumulated over the block's rows
//           sB [16][r]  = B rows of the current 16-row tile
//           sG [16][65] = G of the current tile
//   for each 16-row tile of the block's 128-row chunk:
//     thread (jj = t % 64, g = t / 64) computes M, loss and G for rows g, g+4, g+8, g+12
//     dB[i, k] += s * sum_jj G[i, jj] A[k, jj]      (fp32 atomicAdd, one per (i, k) per strip)
//     sdA[k, jj] += sum_i B[i, k] G[i, jj]           (thread owns k = g, g+4, ...)
//   dA[k, j0 + jj] += s * sdA[k, jj]                 (fp32 atomicAdd, once per block)
//   loss: block reduction, one atomicAdd per block.
#include "common.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <limits>
#include <tuple>

namespace clora_fast {
namespace {

constexpr int PT_THREADS = 256;
constexpr int PT_TJ = 64;     // columns per strip
constexpr int PT_TI = 16;     // rows per tile
constexpr int PT_ROWS = 128;  // rows per block (8 tiles)

// Per-layer table entry, 16 int64.
enum Field : int {
  F_PAST = 0, F_A, F_B,        // data pointers
  F_DA_OFF, F_DB_OFF,          // offsets (elements) of dA / dB in the flat fp32 gradient buffer
  F_OUT, F_IN, F_R,            // shapes
  F_LDP, F_LDA, F_LDB,         // row strides (elements)
  F_DTYPES,                    // dtype codes: past | A << 8 | B << 16
  F_SCALE,                     // scale (double bits)
  F_WORK_START,                // first work item (block) of this layer
  F_STRIPS,                    // number of 64-column strips
  F_PAD,
  F_COUNT
};
static_assert(F_COUNT == 16, "table entry must be 16 int64");

__host__ __device__ inline int64_t smem_floats(int64_t r) {
  return r * (PT_TJ + 1) + r * PT_TJ + PT_TI * r + PT_TI * (PT_TJ + 1);
}

__global__ void __launch_bounds__(PT_THREADS)
forgetting_penalty_kernel(const int64_t* __restrict__ table, int L, float* __restrict__ grads,
                          float* __restrict__ loss_out) {
  extern __shared__ float smem[];
  __shared__ float warp_loss[PT_THREADS / 32];
  const int tid = threadIdx.x;
  const int64_t w = blockIdx.x;
  const int l = find_segment(table, L, F_COUNT, F_WORK_START, w);
  const int64_t* e = table + static_cast<int64_t>(l) * F_COUNT;

  const void* past = reinterpret_cast<const void*>(e[F_PAST]);
  const void* A = reinterpret_cast<const void*>(e[F_A]);
  const void* B = reinterpret_cast<const void*>(e[F_B]);
  float* dA = grads + e[F_DA_OFF];
  float* dB = grads + e[F_DB_OFF];
  const int64_t out = e[F_OUT], in = e[F_IN];
  const int r = static_cast<int>(e[F_R]);
  const int64_t ldp = e[F_LDP], lda = e[F_LDA], ldb = e[F_LDB];
  const int64_t code_p = e[F_DTYPES] & 0xff, code_a = (e[F_DTYPES] >> 8) & 0xff,
                code_b = (e[F_DTYPES] >> 16) & 0xff;
  const float scale = static_cast<float>(__longlong_as_double(e[F_SCALE]));
  const int64_t local = w - e[F_WORK_START];
  const int64_t strips = e[F_STRIPS];
  const int64_t j0 = (local % strips) * PT_TJ;
  const int64_t row_begin = (local / strips) * PT_ROWS;
  const int64_t row_end = min(out, row_begin + PT_ROWS);

  float* sA = smem;                          // [r][PT_TJ + 1]
  float* sdA = sA + r * (PT_TJ + 1);         // [r][PT_TJ]
  float* sB = sdA + r * PT_TJ;               // [PT_TI][r]
  float* sG = sB + PT_TI * r;                // [PT_TI][PT_TJ + 1]

  for (int idx = tid; idx < r * PT_TJ; idx += PT_THREADS) {
    const int k = idx / PT_TJ, jj = idx % PT_TJ;
    const int64_t j = j0 + jj;
    sA[k * (PT_TJ + 1) + jj] = j < in ? load_as_float(A, k * lda + j, code_a) : 0.f;
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
    // dA partial of the strip: thread owns column jj and ranks grp, grp + 4, ...
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

  // Block reduction of the loss.
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

struct LayerArgs {
  at::Tensor past, A, B;
};

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> grouped_forgetting_penalty_forward(
    const std::vector<at::Tensor>& pasts, const std::vector<at::Tensor>& lora_As,
    const std::vector<at::Tensor>& lora_Bs, const std::vector<double>& scales) {
  const size_t L = pasts.size();
  TORCH_CHECK(L > 0, "clora_fast._C: pasts is empty (need at least one layer)");
  TORCH_CHECK(lora_As.size() == L && lora_Bs.size() == L && scales.size() == L,
              "clora_fast._C: pasts, lora_As, lora_Bs, scales must have the same length, got ", L, ", ",
              lora_As.size(), ", ", lora_Bs.size(), ", ", scales.size());
  const at::Device device = pasts[0].device();
  std::vector<LayerArgs> layers(L);
  std::vector<int64_t> table;
  table.reserve(L * F_COUNT);
  int64_t grad_total = 0, work_total = 0, max_r = 0;
  for (size_t l = 0; l < L; ++l) {
    const std::string pn = "pasts[" + std::to_string(l) + "]";
    const std::string an = "lora_As[" + std::to_string(l) + "]";
    const std::string bn = "lora_Bs[" + std::to_string(l) + "]";
    check_cuda_2d(pasts[l], pn.c_str());
    check_cuda_2d(lora_As[l], an.c_str());
    check_cuda_2d(lora_Bs[l], bn.c_str());
    check_same_device(pasts[l], pasts[0], pn.c_str(), "pasts[0]");
    check_same_device(lora_As[l], pasts[0], an.c_str(), "pasts[0]");
    check_same_device(lora_Bs[l], pasts[0], bn.c_str(), "pasts[0]");
    const int64_t out = pasts[l].size(0), in = pasts[l].size(1), r = lora_As[l].size(0);
    TORCH_CHECK(lora_As[l].size(1) == in, "clora_fast._C: ", an, " must be [r, in] with in = ", pn,
                ".shape[1] = ", in, ", got ", an, " ", describe(lora_As[l]), "; ", pn, " ", describe(pasts[l]));
    TORCH_CHECK(lora_Bs[l].size(0) == out && lora_Bs[l].size(1) == r, "clora_fast._C: ", bn,
                " must be [out, r] = [", out, ", ", r, "], got ", describe(lora_Bs[l]));
    TORCH_CHECK(std::isfinite(scales[l]), "clora_fast._C: scales[", l, "] is not finite: ", scales[l]);
    // Rows must be contiguous for the kernel; a past with unit inner stride (the usual case, also a
    // row slice such as timm's qkv K/V rows) is used in place without a copy.
    LayerArgs& la = layers[l];
    la.past = rows_contiguous(pasts[l]);
    la.A = rows_contiguous(lora_As[l]);
    la.B = rows_contiguous(lora_Bs[l]);
    const int64_t strips = ceil_div(in, PT_TJ);
    const int64_t work = (r > 0) ? strips * ceil_div(out, PT_ROWS) : 0;
    table.push_back(reinterpret_cast<int64_t>(la.past.data_ptr()));
    table.push_back(reinterpret_cast<int64_t>(la.A.data_ptr()));
    table.push_back(reinterpret_cast<int64_t>(la.B.data_ptr()));
    table.push_back(grad_total);
    table.push_back(grad_total + r * in);
    table.push_back(out);
    table.push_back(in);
    table.push_back(r);
    table.push_back(row_stride(la.past));
    table.push_back(row_stride(la.A));
    table.push_back(row_stride(la.B));
    table.push_back(dtype_code(la.past.scalar_type()) | (dtype_code(la.A.scalar_type()) << 8) |
                    (dtype_code(la.B.scalar_type()) << 16));
    table.push_back(double_bits(scales[l]));
    table.push_back(work_total);
    table.push_back(strips);
    table.push_back(0);
    grad_total += r * in + out * r;
    work_total += work;
    if (work > 0) max_r = std::max(max_r, r);
  }

  const c10::cuda::CUDAGuard guard(device);
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor loss = at::zeros({}, f32);
  at::Tensor grads = at::zeros({grad_total}, f32);

  if (work_total > 0) {
    TORCH_CHECK(work_total <= std::numeric_limits<int>::max(),
                "clora_fast._C: problem too large for one launch: ", work_total, " blocks");
    const size_t smem = static_cast<size_t>(smem_floats(max_r)) * sizeof(float);
    int dev_max = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&dev_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index()));
    // + 64 bytes: the kernel's static shared memory (per-warp loss partials).
    TORCH_CHECK(smem + 64 <= static_cast<size_t>(dev_max), "clora_fast._C: lora rank r = ", max_r,
                " is too large for the CUDA penalty kernel: it needs ", smem, " bytes of shared memory, the "
                "device allows ", dev_max, " (use backend='triton' or 'reference')");
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(forgetting_penalty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    // Layers without work (r == 0, or empty) keep their table entry; a block never maps to them
    // because their work range is empty and binary search returns the last layer starting <= w.
    const at::Tensor dtable = device_table(table, device);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    forgetting_penalty_kernel<<<static_cast<unsigned>(work_total), PT_THREADS, smem, stream>>>(
        dtable.data_ptr<int64_t>(), static_cast<int>(L), grads.data_ptr<float>(), loss.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  std::vector<at::Tensor> dAs, dBs;
  dAs.reserve(L);
  dBs.reserve(L);
  for (size_t l = 0; l < L; ++l) {
    const int64_t off = table[l * F_COUNT + F_DA_OFF];
    const int64_t out = table[l * F_COUNT + F_OUT], in = table[l * F_COUNT + F_IN], r = table[l * F_COUNT + F_R];
    dAs.push_back(grads.narrow(0, off, r * in).view({r, in}));
    dBs.push_back(grads.narrow(0, off + r * in, out * r).view({out, r}));
  }
  return {loss, dAs, dBs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forgetting_penalty_forward(const at::Tensor& past,
                                                                         const at::Tensor& lora_A,
                                                                         const at::Tensor& lora_B, double scale) {
  auto res = grouped_forgetting_penalty_forward({past}, {lora_A}, {lora_B}, {scale});
  return {std::get<0>(res), std::get<1>(res)[0], std::get<2>(res)[0]};
}

}  // namespace clora_fast
