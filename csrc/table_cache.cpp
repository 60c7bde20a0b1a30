// Device-side lookup tables (segment tables, per-layer pointer tables) cached by content.
//
// A table is a small int64 array that a kernel reads (segments of the segmented projection,
// pointers/shapes of the grouped penalty).  In a training loop the same table is needed every
// step, so it is uploaded once and kept: the key is the table's bytes plus the device and the
// current stream, so a hit always returns identical contents.  A miss stages the table in pinned
// host memory and copies it with cudaMemcpyAsync on the current stream (no host sync; the
// caching host allocator keeps the pinned block alive until the copy has run).
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

// Tables uploaded while the stream is being captured into a CUDA graph: the graph's copy node reads the
// pinned staging buffer at every replay, so staging and device copies are kept for the process (one pair
// per distinct table per capture: a few hundred bytes each) and never enter the eager cache (an eager hit
// before the first replay would read a table that was never copied).
std::unordered_map<std::string, std::pair<at::Tensor, at::Tensor>>& captured() {
  static auto* c = new std::unordered_map<std::string, std::pair<at::Tensor, at::Tensor>>();
  return *c;
}

}  // namespace

at::Tensor device_table(const std::vector<int64_t>& host, const at::Device& device) {
  TORCH_CHECK(device.is_cuda(), "clora_fast._C: device_table needs a CUDA device, got ", device);
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  std::string key(reinterpret_cast<const char*>(host.data()), host.size() * sizeof(int64_t));
  const int64_t tag[2] = {static_cast<int64_t>(device.index()), static_cast<int64_t>(stream.id())};
  key.append(reinterpret_cast<const char*>(tag), sizeof(tag));

  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long capture_id = 0;
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream.stream(), &status, &capture_id));
  const bool capturing = status != cudaStreamCaptureStatusNone;
  if (capturing) {   // per capture: one upload per distinct table within a graph, a fresh one for every graph
    key.append(reinterpret_cast<const char*>(&capture_id), sizeof(capture_id));
  }

  std::lock_guard<std::mutex> lock(cache_mutex());
  auto& c = cache();
  if (capturing) {
    auto it = captured().find(key);
    if (it != captured().end()) return it->second.second;
  } else {
    auto it = c.find(key);
    if (it != c.end()) return it->second;
  }

  const int64_t n = static_cast<int64_t>(host.size());
  at::Tensor staged = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  if (n > 0) std::memcpy(staged.data_ptr<int64_t>(), host.data(), n * sizeof(int64_t));
  at::Tensor on_device = at::empty({n}, at::TensorOptions().dtype(at::kLong).device(device));
  on_device.copy_(staged, /*non_blocking=*/true);
  if (capturing) {
    captured().emplace(std::move(key), std::make_pair(staged, on_device));
    return on_device;
  }
  if (c.size() >= kMaxEntries) c.clear();
  c.emplace(std::move(key), on_device);
  return on_device;
}

void clear_table_cache() {
  std::lock_guard<std::mutex> lock(cache_mutex());
  cache().clear();
}

int64_t table_cache_size() {
  std::lock_guard<std::mutex> lock(cache_mutex());
  return static_cast<int64_t>(cache().size());
}

}  // namespace clora_fast
