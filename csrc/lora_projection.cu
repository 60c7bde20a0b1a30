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
// None of the three kernels materialises B @ A; all accumulate in fp32.  Kernels and tilings:
// kernels/lora_projection_kernels.cuh; segment table layout: tables.h.
#include "common.h"
#include "kernels/lora_projection_kernels.cuh"

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

// Validates seg_offsets / scales and builds the segment table (csrc/tables.h).
SegmentTable make_segments(const std::vector<int64_t>& offsets, const std::vector<double>& scales, int64_t N) {
  TORCH_CHECK(offsets.size() >= 2, "clora_fast._C: seg_offsets needs at least 2 entries (0 and N), got ",
              offsets.size());
  TORCH_CHECK(scales.size() == offsets.size() - 1, "clora_fast._C: scales has ", scales.size(),
              " entries but seg_offsets defines ", offsets.size() - 1, " segments");
  TORCH_CHECK(offsets.front() == 0, "clora_fast._C: seg_offsets must start at 0, got ", offsets);
  TORCH_CHECK(offsets.back() == N, "clora_fast._C: seg_offsets must end at N = weight.shape[0] = ", N,
              ", got ", offsets);
  for (size_t l = 0; l + 1 < offsets.size(); ++l) {
    TORCH_CHECK(offsets[l] < offsets[l + 1], "clora_fast._C: seg_offsets must be strictly increasing, got ",
                offsets);
    TORCH_CHECK(std::isfinite(scales[l]), "clora_fast._C: scales[", l, "] is not finite: ", scales[l]);
  }
  return build_segment_table(offsets, scales);
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
  SegmentTable seg;
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
  SegmentTable seg = make_segments(seg_offsets, scales, N);
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
      seg_lora_epilogue_kernel<scalar_t><<<grid, kProjThreads, 0, stream>>>(
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
        seg_lora_grad_xa_kernel<scalar_t><<<grid, kProjThreads, 0, stream>>>(
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
      const int64_t rows_per_block = grad_B_rows_per_block(a.M);
      const int64_t chunks = ceil_div(a.M, rows_per_block);
      check_grid(chunks, 65535, "row chunks");
      check_grid(a.seg.col_tiles, std::numeric_limits<int>::max(), "column tiles");
      check_grid(ceil_div(a.r, D_KC), 65535, "rank chunks");
      const dim3 grid(static_cast<unsigned>(a.seg.col_tiles), static_cast<unsigned>(chunks),
                      static_cast<unsigned>(ceil_div(a.r, D_KC)));
      const at::Tensor xac = rows_contiguous(xa);
      CLORA_DISPATCH_KERNEL_TYPES(x.scalar_type(), "seg_lora_grad_B", [&] {
        seg_lora_grad_B_kernel<scalar_t><<<grid, kProjThreads, 0, stream>>>(
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
