// pybind11 bindings of the clora_fast CUDA extension (module clora_fast._C).
//
// The four launchers follow the kernel launcher contract of docs/ARCHITECTURE.md; the Python
// wrappers with the contract's exact signatures live in clora_fast/_cuda.py.
#include <torch/extension.h>
#include <torch/version.h>
#include <cuda_runtime_api.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common.h"

#ifndef CLORA_FAST_BUILD_SYSTEM
#define CLORA_FAST_BUILD_SYSTEM unknown
#endif
#ifndef CLORA_FAST_ARCHS
#define CLORA_FAST_ARCHS unknown
#endif
#define CLORA_STR2(x) #x
#define CLORA_STR(x) CLORA_STR2(x)

namespace clora_fast {
std::tuple<at::Tensor, at::Tensor> segmented_lora_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const std::vector<int64_t>& seg_offsets, const std::vector<double>& scales,
    const std::optional<at::Tensor>& bias);
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
segmented_lora_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa,
                        const std::vector<int64_t>& seg_offsets, const std::vector<double>& scales,
                        bool need_dx, bool need_dA, bool need_dB);
std::tuple<at::Tensor, at::Tensor, at::Tensor> forgetting_penalty_forward(const at::Tensor& past,
                                                                         const at::Tensor& lora_A,
                                                                         const at::Tensor& lora_B, double scale);
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> grouped_forgetting_penalty_forward(
    const std::vector<at::Tensor>& pasts, const std::vector<at::Tensor>& lora_As,
    const std::vector<at::Tensor>& lora_Bs, const std::vector<double>& scales);
}  // namespace clora_fast

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "clora_fast CUDA C++ kernels (segmented LoRA projection, fused forgetting penalty)";
  m.def("segmented_lora_forward", &clora_fast::segmented_lora_forward,
        "y, xa = segmented_lora_forward(x, weight, lora_A, lora_B, seg_offsets, scales, bias=None)",
        py::arg("x"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("seg_offsets"),
        py::arg("scales"), py::arg("bias") = py::none());
  m.def("segmented_lora_backward", &clora_fast::segmented_lora_backward,
        "dx, dA, dB = segmented_lora_backward(grad_y, x, weight, lora_A, lora_B, xa, seg_offsets, scales, "
        "need_dx=True, need_dA=True, need_dB=True)  (None where not needed)",
        py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("xa"),
        py::arg("seg_offsets"), py::arg("scales"), py::arg("need_dx") = true, py::arg("need_dA") = true,
        py::arg("need_dB") = true);
  m.def("forgetting_penalty_forward", &clora_fast::forgetting_penalty_forward,
        "loss, dA, dB = forgetting_penalty_forward(past, lora_A, lora_B, scale)", py::arg("past"),
        py::arg("lora_A"), py::arg("lora_B"), py::arg("scale"));
  m.def("grouped_forgetting_penalty_forward", &clora_fast::grouped_forgetting_penalty_forward,
        "loss, dAs, dBs = grouped_forgetting_penalty_forward(pasts, lora_As, lora_Bs, scales)", py::arg("pasts"),
        py::arg("lora_As"), py::arg("lora_Bs"), py::arg("scales"));
  m.def("clear_table_cache", &clora_fast::clear_table_cache, "drop the cached device tables");
  m.def("table_cache_size", &clora_fast::table_cache_size, "number of cached device tables");
  m.def("build_info", []() {
    py::dict d;
    d["build_system"] = CLORA_STR(CLORA_FAST_BUILD_SYSTEM);
    d["cuda_archs"] = CLORA_STR(CLORA_FAST_ARCHS);
    d["cuda_runtime_version"] = CUDART_VERSION;
    d["torch_version"] = TORCH_VERSION;
    d["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
    return d;
  }, "how this extension was built");
}
