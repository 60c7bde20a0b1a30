// Device-side lookup tables (segment tables, per-layer pointer tables) cached by content.
//
// A table is a small int64 array that a kernel reads (segments of the segmented projection,
// pointers/shapes of the grouped penalty).  In a training loop the same table is needed every
// step, so it is uploaded once and kept: the key is the table's bytes plus the device and the
// current stream, so a hit always returns identical contents.  A miss stages the table in pinned
// host memory and copies it with cudaMemcpyAsync on the current stream (no host sync; the
// caching host allocator keeps the pinned block alive until the copy has run).
//
// Inside a CUDA graph capture (torch.cuda.graph, torch.compile's mode="reduce-overhead") a table is
// taken from what an eager call uploaded on any stream of the device (the warm-up call that a capture
// needs anyway; a capture runs on a side stream) and kept for the process from then on: the graph reads
// it by address at every replay, so no eviction of the eager cache may free it.  A table that no eager
// call uploaded raises a clear error: a pageable copy cannot be captured and a pinned one fails in the
// default (global) capture mode (as clora_fast.kernels.lora_projection._graph_const does for Triton).
#include "common.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace clora_fast {
namespace {

constexpr size_t kMaxEntries = 4096;

std::mutex& cache_mutex() {
  static std::mutex mu;
  return mu;
}

// Leaked on purpose: destroying CUDA tensors from a static destructor at interpreter exit can
// run after the CUDA runtime has shut down.
std::unordered_map<std::string, at::Tensor>& cache() {
  static auto* c = new std::unordered_map<std::string, at::Tensor>();
  return *c;
}

// The latest eager upload of each table per device, whatever the stream (key: bytes + device index): what a
// capture takes.
std::unordered_map<std::string, at::Tensor>& by_content() {
  static auto* c = new std::unordered_map<std::string, at::Tensor>();
  return *c;
}

// Tables a captured CUDA graph reads (by their device address), kept for the process: a few hundred bytes each.
std::unordered_map<std::string, at::Tensor>& graph_held() {
  static auto* c = new std::unordered_map<std::string, at::Tensor>();
  return *c;
}

}  // namespace

at::Tensor device_table(const std::vector<int64_t>& host, const at::Device& device) {
  TORCH_CHECK(device.is_cuda(), "clora_fast._C: device_table needs a CUDA device, got ", device);
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  std::string content(reinterpret_cast<const char*>(host.data()), host.size() * sizeof(int64_t));
  const int64_t dev_tag = static_cast<int64_t>(device.index());
  content.append(reinterpret_cast<const char*>(&dev_tag), sizeof(dev_tag));
  std::string key = content;
  const int64_t stream_tag = static_cast<int64_t>(stream.id());
  key.append(reinterpret_cast<const char*>(&stream_tag), sizeof(stream_tag));

  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &status));

  std::lock_guard<std::mutex> lock(cache_mutex());
  if (status != cudaStreamCaptureStatusNone) {
    auto it = by_content().find(content);
    TORCH_CHECK(it != by_content().end(), "clora_fast._C: a launch table (", host.size(),
                " int64 entries) for ", device, " is not uploaded yet, and a CUDA graph capture cannot copy it to "
                "the GPU: run the same call once outside the capture first (the usual warm-up; torch.compile's "
                "CUDA graphs do it)");
    graph_held().emplace(content, it->second);
    return it->second;
  }
  auto& c = cache();
  auto it = c.find(key);
  if (it != c.end()) return it->second;

  const int64_t n = static_cast<int64_t>(host.size());
  at::Tensor staged = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  if (n > 0) std::memcpy(staged.data_ptr<int64_t>(), host.data(), n * sizeof(int64_t));
  at::Tensor on_device = at::empty({n}, at::TensorOptions().dtype(at::kLong).device(device));
  on_device.copy_(staged, /*non_blocking=*/true);
  if (c.size() >= kMaxEntries) {   // (a table a graph reads stays alive in graph_held)
    c.clear();
    by_content().clear();
  }
  c.emplace(std::move(key), on_device);
  by_content()[content] = on_device;
  return on_device;
}

void clear_table_cache() {   // (the tables captured graphs read stay: graph_held)
  std::lock_guard<std::mutex> lock(cache_mutex());
  cache().clear();
  by_content().clear();
}

int64_t table_cache_size() {
  std::lock_guard<std::mutex> lock(cache_mutex());
  return static_cast<int64_t>(cache().size());
}

}  // namespace clora_fast
