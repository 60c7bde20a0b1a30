// Segmented LoRA projection: L LoRA-augmented linear layers that share one input, computed as
// one dense GEMM (cuBLAS through ATen) plus fused custom kernels for the per-segment LoRA parts.
//
// Shapes (PyTorch layout, the launcher contract of docs/ARCHITECTURE.md):
//   x [M, K] (any strides, M may be 0), weight [N, K], lora_A [L*r, K], lora_B [N, r], bias [N];
//   seg_offsets 0 = o_0 < o_1 < ... < o_L = N, scales s_0..s_{L-1}.
//   Layer l owns output columns o_l:o_{l+1}, lora_A rows l*r:(l+1)*r, lora_B rows o_l:o_{l+1}.
//
// Forward:
//   xa = x @ lora_A^T                                   [M, L*r]  fp32 (fp32 accumulation)
//   y  = x @ weight^T + bias                            [M, N]    (cuBLAS, x.dtype)
//   y[:, o_l:o_{l+1}] += s_l * xa[:, l*r:(l+1)*r] @ lora_B[o_l:o_{l+1}]^T   (kernel 1, fp32 math)
// Backward, with gy = dL/dy [M, N]:
//   g[:, l*r:(l+1)*r] = s_l * gy[:, o_l:o_{l+1}] @ lora_B[o_l:o_{l+1}]      (kernel 2, fp32)
//   dx = gy @ weight + g @ lora_A                       [M, K]   (cuBLAS, fp32 output, one rounding)
//   dA = g^T @ x                                        [L*r, K] (cuBLAS, fp32)
//   dB[o_l:o_{l+1}] = s_l * gy[:, o_l:o_{l+1}]^T @ xa[:, l*r:(l+1)*r]      (kernel 3, fp32 atomics)
// None of the three kernels materialises B @ A; all accumulate in fp32.
#include "common.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/version.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

namespace clora_fast {
namespace {

constexpr int kThreads = 256;

// Segment table: 4 int64 per segment: o_l, o_{l+1}, first column tile (over all segments), scale
// (double bits).  Column tiles never straddle two segments.
constexpr int kSegStride = 4;

// ---------------------------------------------------------------------------------------------
// Kernel 1: LoRA epilogue.  y[m, c] += s_l * sum_k xa[m, l*r + k] * B[c, k]   for c in segment l.
// Block: 32 rows x 64 columns of one segment; k in chunks of 32 staged in shared memory.
// Thread t owns column t % 64 and rows (t / 64) + 4q, q = 0..7.
// grid = (ceil(M / 32), total column tiles).
// ---------------------------------------------------------------------------------------------
constexpr int EP_TM = 32, EP_TN = 64, EP_KC = 32;

template <typename T>
__global__ void __launch_bounds__(kThreads)
seg_lora_epilogue_kernel(T* __restrict__ y, int64_t ldy, const float* __restrict__ xa, int64_t ldxa,
                         const T* __restrict__ B, int64_t ldb, const int64_t* __restrict__ seg,
                         int L, int r, int64_t M) {
  __shared__ float sX[EP_TM][EP_KC];
  __shared__ float sB[EP_TN][EP_KC + 1];
  const int tid = threadIdx.x;
  const int64_t tile = blockIdx.y;
  const int l = find_segment(seg, L, kSegStride, 2, tile);
  const int64_t n1 = seg[l * kSegStride + 1];
  const int64_t c0 = seg[l * kSegStride] + (tile - seg[l * kSegStride + 2]) * EP_TN;
  const float scale = static_cast<float>(__longlong_as_double(seg[l * kSegStride + 3]));
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * EP_TM;
  const int64_t a0 = static_cast<int64_t>(l) * r;
  const int n = tid % EP_TN, mg = tid / EP_TN;

  float acc[EP_TM / 4];
#pragma unroll
  for (int q = 0; q < EP_TM / 4; ++q) acc[q] = 0.f;

  for (int kc = 0; kc < r; kc += EP_KC) {
    const int kw = min(EP_KC, r - kc);
    for (int idx = tid; idx < EP_TM * EP_KC; idx += kThreads) {
      const int mm = idx / EP_KC, kk = idx % EP_KC;
      const int64_t m = m0 + mm;
      sX[mm][kk] = (m < M && kk < kw) ? xa[m * ldxa + a0 + kc + kk] : 0.f;
    }
    for (int idx = tid; idx < EP_TN * EP_KC; idx += kThreads) {
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

// ---------------------------------------------------------------------------------------------
// Kernel 2: g[m, l*r + k] = s_l * sum_{c in segment l} gy[m, c] * B[c, k]     (g fp32 [M, L*r])
// Block: 32 rows x 16 ranks of one segment, reducing over the segment in 64-column chunks.
// Thread t owns rank k0 + t % 16 and rows t / 16 and t / 16 + 16.
// grid = (ceil(M / 32), L, ceil(r / 16)).  Deterministic (no atomics).
// ---------------------------------------------------------------------------------------------
constexpr int G_TM = 32, G_TN = 64, G_KC = 16;

template <typename T>
__global__ void __launch_bounds__(kThreads)
seg_lora_grad_xa_kernel(float* __restrict__ g, int64_t ldg, const T* __restrict__ gy, int64_t ldgy,
                        const T* __restrict__ B, int64_t ldb, const int64_t* __restrict__ seg,
                        int r, int64_t M) {
  __shared__ float sGy[G_TM][G_TN + 1];
  __shared__ float sB[G_TN][G_KC];
  const int tid = threadIdx.x;
  const int l = blockIdx.y;
  const int64_t n0 = seg[l * kSegStride], n1 = seg[l * kSegStride + 1];
  const float scale = static_cast<float>(__longlong_as_double(seg[l * kSegStride + 3]));
  const int k0 = blockIdx.z * G_KC;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * G_TM;
  const int kk = tid % G_KC, mm = tid / G_KC;  // mm in 0..15

  float acc0 = 0.f, acc1 = 0.f;
  for (int64_t c0 = n0; c0 < n1; c0 += G_TN) {
    for (int idx = tid; idx < G_TM * G_TN; idx += kThreads) {
      const int mr = idx / G_TN, cc = idx % G_TN;
      const int64_t m = m0 + mr, c = c0 + cc;
      sGy[mr][cc] = (m < M && c < n1) ? static_cast<float>(gy[m * ldgy + c]) : 0.f;
    }
    for (int idx = tid; idx < G_TN * G_KC; idx += kThreads) {
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

// ---------------------------------------------------------------------------------------------
// Kernel 3: dB[c, k] += s_l * sum_m gy[m, c] * xa[m, l*r + k]     (dB fp32 [N, r], zeroed)
// Block: 64 columns of one segment x 16 ranks, over a chunk of `rows_per_block` rows in 32-row
// steps; chunks are combined with fp32 atomicAdd.  Thread t owns column t % 64 and ranks
// 4 * (t / 64) + q, q = 0..3.   grid = (total column tiles, row chunks, ceil(r / 16)).
// ---------------------------------------------------------------------------------------------
constexpr int D_TM = 32, D_TN = 64, D_KC = 16;

template <typename T>
__global__ void __launch_bounds__(kThreads)
seg_lora_grad_B_kernel(float* __restrict__ dB, const T* __restrict__ gy, int64_t ldgy,
                       const float* __restrict__ xa, int64_t ldxa, const int64_t* __restrict__ seg,
                       int L, int r, int64_t M, int64_t rows_per_block) {
  __shared__ float sGy[D_TM][D_TN];
  __shared__ float sX[D_TM][D_KC];
  const int tid = threadIdx.x;
  const int64_t tile = blockIdx.x;
  const int l = find_segment(seg, L, kSegStride, 2, tile);
  const int64_t n1 = seg[l * kSegStride + 1];
  const int64_t c0 = seg[l * kSegStride] + (tile - seg[l * kSegStride + 2]) * D_TN;
  const float scale = static_cast<float>(__longlong_as_double(seg[l * kSegStride + 3]));
  const int64_t mbeg = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t mend = min(M, mbeg + rows_per_block);
  const int k0 = blockIdx.z * D_KC;
  const int64_t a0 = static_cast<int64_t>(l) * r;
  const int cl = tid % D_TN, kg = tid / D_TN;  // kg in 0..3

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t m0 = mbeg; m0 < mend; m0 += D_TM) {
    for (int idx = tid; idx < D_TM * D_TN; idx += kThreads) {
      const int mr = idx / D_TN, cc = idx % D_TN;
      const int64_t m = m0 + mr, c = c0 + cc;
      sGy[mr][cc] = (m < mend && c < n1) ? static_cast<float>(gy[m * ldgy + c]) : 0.f;
    }
    for (int idx = tid; idx < D_TM * D_KC; idx += kThreads) {
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

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

struct Segments {
  int L = 0;
  int64_t N = 0;
  int64_t col_tiles = 0;  // sum over segments of ceil(width / 64)
  std::vector<int64_t> table;
};

Segments make_segments(const std::vector<int64_t>& offsets, const std::vector<double>& scales,
                       int64_t N) {
  TORCH_CHECK(offsets.size() >= 2, "clora_fast._C: seg_offsets needs at least 2 entries (0 and N), got ",
              offsets.size());
  Segments s;
  s.L = static_cast<int>(offsets.size() - 1);
  s.N = N;
  TORCH_CHECK(scales.size() == offsets.size() - 1, "clora_fast._C: scales has ", scales.size(),
              " entries but seg_offsets defines ", offsets.size() - 1, " segments");
  TORCH_CHECK(offsets.front() == 0, "clora_fast._C: seg_offsets must start at 0, got ", offsets);
  TORCH_CHECK(offsets.back() == N, "clora_fast._C: seg_offsets must end at N = weight.shape[0] = ", N,
              ", got ", offsets);
  static_assert(EP_TN == D_TN, "column tiles of kernels 1 and 3 must agree");
  s.table.reserve(offsets.size() * kSegStride);
  for (int l = 0; l < s.L; ++l) {
    TORCH_CHECK(offsets[l] < offsets[l + 1], "clora_fast._C: seg_offsets must be strictly increasing, got ",
                offsets);
    TORCH_CHECK(std::isfinite(scales[l]), "clora_fast._C: scales[", l, "] is not finite: ", scales[l]);
    s.table.push_back(offsets[l]);
    s.table.push_back(offsets[l + 1]);
    s.table.push_back(s.col_tiles);
    s.table.push_back(double_bits(scales[l]));
    s.col_tiles += ceil_div(offsets[l + 1] - offsets[l], EP_TN);
  }
  return s;
}

// a @ b with float32 output and fp32 accumulation; a, b of one dtype (fp32/fp16/bf16).
at::Tensor mm_f32(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) return at::mm(a, b);
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  return at::mm(a, b, at::kFloat);  // cuBLAS with fp16/bf16 inputs and an fp32 output
#else
  return at::mm(a.to(at::kFloat), b.to(at::kFloat));
#endif
}

void check_grid(int64_t v, int64_t limit, const char* what) {
  TORCH_CHECK(v <= limit, "clora_fast._C: problem too large for one launch: ", what, " = ", v,
              " exceeds the CUDA grid limit ", limit);
}

struct Checked {
  int64_t M, K, N, r;
  Segments seg;
};

Checked check_projection_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                              const at::Tensor& lora_B, const std::vector<int64_t>& seg_offsets,
                              const std::vector<double>& scales) {
  check_cuda_2d(x, "x");
  check_cuda_2d(weight, "weight");
  check_cuda_2d(lora_A, "lora_A");
  check_cuda_2d(lora_B, "lora_B");
  check_same_device(weight, x, "weight", "x");
  check_same_device(lora_A, x, "lora_A", "x");
  check_same_device(lora_B, x, "lora_B", "x");
  const auto dt = x.scalar_type();
  TORCH_CHECK(weight.scalar_type() == dt && lora_A.scalar_type() == dt && lora_B.scalar_type() == dt,
              "clora_fast._C: x, weight, lora_A, lora_B must share one dtype, got x ", describe(x),
              "; weight ", describe(weight), "; lora_A ", describe(lora_A), "; lora_B ", describe(lora_B));
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "clora_fast._C: weight must be [N, K] with K = x.shape[1] = ", K,
              ", got weight ", describe(weight));
  Segments seg = make_segments(seg_offsets, scales, N);
  TORCH_CHECK(lora_A.size(1) == K && lora_A.size(0) % seg.L == 0,
              "clora_fast._C: lora_A must be [L*r, K] with L = ", seg.L, " segments and K = ", K,
              ", got lora_A ", describe(lora_A));
  const int64_t r = lora_A.size(0) / seg.L;
  TORCH_CHECK(lora_B.size(0) == N && lora_B.size(1) == r, "clora_fast._C: lora_B must be [N, r] = [", N,
              ", ", r, "], got lora_B ", describe(lora_B));
  TORCH_CHECK(r <= std::numeric_limits<int>::max() / 2, "clora_fast._C: rank too large: ", r);
  return {M, K, N, r, std::move(seg)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> segmented_lora_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const std::vector<int64_t>& seg_offsets, const std::vector<double>& scales,
    const std::optional<at::Tensor>& bias) {
  Checked a = check_projection_args(x, weight, lora_A, lora_B, seg_offsets, scales);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.is_cuda() && b.dim() == 1 && b.size(0) == a.N && b.scalar_type() == x.scalar_type(),
                "clora_fast._C: bias must be a 1-D CUDA tensor [N] = [", a.N, "] of x's dtype ",
                x.scalar_type(), ", got bias ", describe(b));
    check_same_device(b, x, "bias", "x");
  }
  const c10::cuda::CUDAGuard guard(x.device());

  at::Tensor y = has_bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  y = y.contiguous();
  at::Tensor xa = mm_f32(x, lora_A.t()).contiguous();  // [M, L*r] fp32

  if (a.M > 0 && a.r > 0) {
    const at::Tensor Bc = rows_contiguous(lora_B);
    const at::Tensor seg = device_table(a.seg.table, x.device());
    check_grid(a.seg.col_tiles, 65535, "column tiles (sum of ceil(segment width / 64))");
    check_grid(ceil_div(a.M, EP_TM), std::numeric_limits<int>::max(), "row tiles");
    const dim3 grid(static_cast<unsigned>(ceil_div(a.M, EP_TM)), static_cast<unsigned>(a.seg.col_tiles));
    const auto stream = c10::cuda::getCurrentCUDAStream();
    CLORA_DISPATCH_KERNEL_TYPES(x.scalar_type(), "seg_lora_epilogue", [&] {
      seg_lora_epilogue_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          y.data_ptr<scalar_t>(), y.stride(0), xa.data_ptr<float>(), xa.stride(0),
          Bc.data_ptr<scalar_t>(), row_stride(Bc), seg.data_ptr<int64_t>(), a.seg.L,
          static_cast<int>(a.r), a.M);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {y, xa};
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
segmented_lora_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa,
                        const std::vector<int64_t>& seg_offsets, const std::vector<double>& scales,
                        bool need_dx, bool need_dA, bool need_dB) {
  Checked a = check_projection_args(x, weight, lora_A, lora_B, seg_offsets, scales);
  check_cuda_2d(grad_y, "grad_y");
  check_same_device(grad_y, x, "grad_y", "x");
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && grad_y.size(0) == a.M && grad_y.size(1) == a.N,
              "clora_fast._C: grad_y must be [M, N] = [", a.M, ", ", a.N, "] of x's dtype ", x.scalar_type(),
              ", got grad_y ", describe(grad_y));
  check_cuda_2d(xa, "xa");
  check_same_device(xa, x, "xa", "x");
  TORCH_CHECK(xa.scalar_type() == at::kFloat && xa.size(0) == a.M && xa.size(1) == a.seg.L * a.r,
              "clora_fast._C: xa must be float32 [M, L*r] = [", a.M, ", ", a.seg.L * a.r, "], got xa ",
              describe(xa));
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor gy = rows_contiguous(grad_y);
  const at::Tensor Bc = rows_contiguous(lora_B);
  const bool lora = a.M > 0 && a.r > 0;
  const at::Tensor seg = lora ? device_table(a.seg.table, x.device()) : at::Tensor();

  std::optional<at::Tensor> dx, dA, dB;
  at::Tensor g;
  if (need_dx || need_dA) {
    g = at::empty({a.M, a.seg.L * a.r}, x.options().dtype(at::kFloat));
    if (lora) {
      check_grid(ceil_div(a.M, G_TM), std::numeric_limits<int>::max(), "row tiles");
      check_grid(a.seg.L, 65535, "segments");
      check_grid(ceil_div(a.r, G_KC), 65535, "rank chunks");
      const dim3 grid(static_cast<unsigned>(ceil_div(a.M, G_TM)), static_cast<unsigned>(a.seg.L),
                      static_cast<unsigned>(ceil_div(a.r, G_KC)));
      CLORA_DISPATCH_KERNEL_TYPES(x.scalar_type(), "seg_lora_grad_xa", [&] {
        seg_lora_grad_xa_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
            g.data_ptr<float>(), g.stride(0), gy.data_ptr<scalar_t>(), row_stride(gy),
            Bc.data_ptr<scalar_t>(), row_stride(Bc), seg.data_ptr<int64_t>(), static_cast<int>(a.r), a.M);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  if (need_dx) {
    at::Tensor dxf = mm_f32(gy, weight);  // [M, K] fp32
    if (a.r > 0 && a.M > 0) {
      dxf.addmm_(g, lora_A.scalar_type() == at::kFloat ? lora_A : lora_A.to(at::kFloat));
    }
    dx = dxf.to(x.scalar_type());
  }
  if (need_dA) {
    const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
    dA = at::mm(g.t(), xf).to(lora_A.scalar_type());  // [L*r, K]; zeros when M == 0
  }
  if (need_dB) {
    at::Tensor dBf = at::zeros({a.N, a.r}, x.options().dtype(at::kFloat));
    if (lora) {
      // Rows per block: at least 256, and few enough chunks for gridDim.y <= 65535.
      int64_t chunks = std::min<int64_t>(ceil_div(a.M, 256), 65535);
      int64_t rows_per_block = ceil_div(ceil_div(a.M, chunks), D_TM) * D_TM;
      chunks = ceil_div(a.M, rows_per_block);
      check_grid(a.seg.col_tiles, std::numeric_limits<int>::max(), "column tiles");
      check_grid(ceil_div(a.r, D_KC), 65535, "rank chunks");
      const dim3 grid(static_cast<unsigned>(a.seg.col_tiles), static_cast<unsigned>(chunks),
                      static_cast<unsigned>(ceil_div(a.r, D_KC)));
      const at::Tensor xac = rows_contiguous(xa);
      CLORA_DISPATCH_KERNEL_TYPES(x.scalar_type(), "seg_lora_grad_B", [&] {
        seg_lora_grad_B_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
            dBf.data_ptr<float>(), gy.data_ptr<scalar_t>(), row_stride(gy), xac.data_ptr<float>(),
            row_stride(xac), seg.data_ptr<int64_t>(), a.seg.L, static_cast<int>(a.r), a.M, rows_per_block);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    dB = dBf.to(lora_B.scalar_type());
  }
  return {dx, dA, dB};
}

}  // namespace clora_fast
