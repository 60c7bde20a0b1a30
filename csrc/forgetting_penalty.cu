// C-LoRA forgetting penalty with its gradients in one fused pass, grouped over layers.
//
// Per layer l (PyTorch layout): past P [out, in], lora_A A [r, in], lora_B B [out, r], scale s.
//   M = s * B @ A                        (never materialised: recomputed tile by tile in registers)
//   loss = sum_ij P_ij^2 * M_ij^2        (0-dim float32, summed over layers)
//   G = 2 * P^2 (.) M
//   dA = s * B^T @ G   [r, in]  float32
//   dB = s * G @ A^T   [out, r] float32
// One kernel launch covers every layer, reading each past exactly once, fp32 accumulation (inputs
// fp32 / fp16 / bf16, each tensor its own dtype).  The kernel and its tiling are in
// kernels/forgetting_penalty_kernel.cuh, the per-layer table layout in tables.h.
#include "common.h"
#include "kernels/forgetting_penalty_kernel.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>
#include <unordered_map>
#include <cuda_runtime_api.h>

#include <cmath>
#include <limits>
#include <tuple>

namespace clora_fast {
namespace {

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
  std::vector<LayerArgs> keep(L);  // keeps row-contiguous copies (if any) alive until the launch
  std::vector<PenaltyLayer> layers;
  layers.reserve(L);
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
    // row slice such as timm's qkv K/V rows) is used in place, without a copy.
    LayerArgs& la = keep[l];
    la.past = rows_contiguous(pasts[l]);
    la.A = rows_contiguous(lora_As[l]);
    la.B = rows_contiguous(lora_Bs[l]);
    layers.push_back({la.past.data_ptr(), la.A.data_ptr(), la.B.data_ptr(), out, in, r, row_stride(la.past),
                      row_stride(la.A), row_stride(la.B), dtype_code(la.past.scalar_type()),
                      dtype_code(la.A.scalar_type()), dtype_code(la.B.scalar_type()), scales[l]});
  }
  const PenaltyTable pt = build_penalty_table(layers);
  const std::vector<int64_t>& table = pt.table;
  const int64_t grad_total = pt.grad_total, work_total = pt.work_total, max_r = pt.max_r;

  const c10::cuda::CUDAGuard guard(device);
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor loss = at::zeros({}, f32);
  at::Tensor grads = at::zeros({grad_total}, f32);

  if (work_total > 0) {
    TORCH_CHECK(work_total <= std::numeric_limits<int>::max(),
                "clora_fast._C: problem too large for one launch: ", work_total, " blocks");
    const size_t smem = static_cast<size_t>(penalty_smem_floats(max_r)) * sizeof(float);
    int dev_max = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&dev_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index()));
    // + 64 bytes: the kernel's static shared memory (per-warp loss partials).
    TORCH_CHECK(smem + 64 <= static_cast<size_t>(dev_max), "clora_fast._C: lora rank r = ", max_r,
                " is too large for the CUDA penalty kernel: it needs ", smem, " bytes of shared memory, the "
                "device allows ", dev_max, " (use backend='triton' or 'reference')");
    if (smem > 48 * 1024) {
      // The limit is one setting per function and device: only ever raised, under a lock, so that a
      // thread launching with a smaller rank can never lower it between another thread's set and launch.
      static std::mutex mu;
      static std::unordered_map<int, size_t> raised_to;
      std::lock_guard<std::mutex> lock(mu);
      size_t& cur = raised_to[device.index()];
      if (smem > cur) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(forgetting_penalty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
        cur = smem;
      }
    }
    // Layers without work (r == 0, or empty) keep their table entry; a block never maps to them
    // because their work range is empty and binary search returns the last layer starting <= w.
    const at::Tensor dtable = device_table(table, device);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    forgetting_penalty_kernel<<<static_cast<unsigned>(work_total), PT_THREADS, smem, stream>>>(
        dtable.data_ptr<int64_t>(), static_cast<int>(L), grads.data_ptr<float>(), loss.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Each gradient is returned as a tensor with its own storage over its (disjoint) range of the
  // flat buffer, which stays alive as long as any of them does.  Plain views of `grads` would share
  // one storage, and torch.library custom ops (clora_fast.ops) reject outputs that alias each other.
  auto piece = [&](int64_t off, int64_t rows, int64_t cols) -> at::Tensor {
    if (rows * cols == 0) return at::zeros({rows, cols}, f32);
    at::Tensor keep = grads;
    return at::from_blob(grads.data_ptr<float>() + off, {rows, cols}, [keep](void*) {}, f32);
  };
  std::vector<at::Tensor> dAs, dBs;
  dAs.reserve(L);
  dBs.reserve(L);
  for (size_t l = 0; l < L; ++l) {
    const int64_t* e = table.data() + l * F_COUNT;
    dAs.push_back(piece(e[F_DA_OFF], e[F_R], e[F_IN]));
    dBs.push_back(piece(e[F_DB_OFF], e[F_OUT], e[F_R]));
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
