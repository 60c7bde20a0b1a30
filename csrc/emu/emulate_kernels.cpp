// Runs the extension's CUDA kernels (csrc/kernels/*.cuh, unchanged source) on the CPU under the
// emulation of cuda_emu.h and checks them against float64 references computed here.
//
// Build and run (tests/test_cuda_backend.py does this):
//   c++ -std=c++20 -O1 -pthread -I<torch>/include -Icsrc csrc/emu/emulate_kernels.cpp -o emu && ./emu
// Prints one line per check and "ALL PASSED"; exit status 1 on any failure.  `--quick` runs a
// small subset (used with -fsanitize=thread: every shared-memory race the kernels could have
// between two __syncthreads is reported as a data race).
#include "cuda_emu.h"

#include "../kernels/forgetting_penalty_kernel.cuh"
#include "../kernels/lora_projection_kernels.cuh"

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

using namespace clora_fast;

namespace {

int g_failures = 0;
int g_checks = 0;

void check(const std::string& what, double err, double tol) {
  ++g_checks;
  const bool ok = err <= tol;  // false for NaN
  if (!ok) ++g_failures;
  std::printf("%s %s: rel err %.3e (tol %.1e)\n", ok ? "ok  " : "FAIL", what.c_str(), err, tol);
}

template <typename T>
const char* tname();
template <> const char* tname<float>() { return "fp32"; }
template <> const char* tname<c10::Half>() { return "fp16"; }
template <> const char* tname<c10::BFloat16>() { return "bf16"; }

template <typename T>
double tol_of();  // relative tolerance of a result rounded once to T (fp32 accumulation)
template <> double tol_of<float>() { return 2e-5; }
template <> double tol_of<c10::Half>() { return 2e-3; }
template <> double tol_of<c10::BFloat16>() { return 1e-2; }

template <typename T>
double d(T v) { return static_cast<double>(static_cast<float>(v)); }

template <typename T>
std::vector<T> randn(size_t n, std::mt19937& gen, double s = 1.0) {
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(static_cast<float>(dist(gen) * s));
  return v;
}

// max |a - b| / max(max |b|, tiny)
double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    const double e = std::fabs(a[i] - b[i]);
    num = std::isnan(e) ? INFINITY : std::max(num, e);
    den = std::max(den, std::fabs(b[i]));
  }
  return num / den;
}

template <typename T>
void test_projection(int64_t M, int64_t N, const std::vector<int64_t>& offsets, int r, std::mt19937& gen) {
  const int L = static_cast<int>(offsets.size()) - 1;
  std::vector<double> scales;
  for (int l = 0; l < L; ++l) scales.push_back(0.5 + 0.75 * l);
  const SegmentTable seg = build_segment_table(offsets, scales);
  const int64_t Lr = static_cast<int64_t>(L) * r;
  // Padded row strides, to check that every kernel honours them.
  const int64_t ldy = N + 5, ldxa = Lr + 3, ldb = r + 2, ldgy = N + 1, ldg = Lr + 1;
  std::vector<float> xa = randn<float>(static_cast<size_t>(M * ldxa), gen);
  std::vector<T> B = randn<T>(static_cast<size_t>(N * ldb), gen, 0.5);
  std::vector<T> y0 = randn<T>(static_cast<size_t>(M * ldy), gen);
  std::vector<T> gy = randn<T>(static_cast<size_t>(M * ldgy), gen);
  char name[160];
  std::snprintf(name, sizeof(name), "%s M=%lld N=%lld L=%d r=%d", tname<T>(), (long long)M, (long long)N, L, r);
  auto seg_of = [&](int64_t c) {
    int l = 0;
    while (offsets[l + 1] <= c) ++l;
    return l;
  };

  // Kernel 1: epilogue.
  {
    std::vector<T> y = y0;
    const dim3 grid(static_cast<unsigned>(ceil_div(M, EP_TM)), static_cast<unsigned>(seg.col_tiles));
    clora_emu::launch(grid, kProjThreads, 0, [&] {
      seg_lora_epilogue_kernel<T>(y.data(), ldy, xa.data(), ldxa, B.data(), ldb, seg.table.data(), L, r, M);
    });
    std::vector<double> got, ref;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < N; ++c) {
        const int l = seg_of(c);
        double acc = 0;
        for (int k = 0; k < r; ++k) acc += static_cast<double>(xa[m * ldxa + l * r + k]) * d(B[c * ldb + k]);
        ref.push_back(d(y0[m * ldy + c]) + scales[l] * acc);
        got.push_back(d(y[m * ldy + c]));
      }
    // padding columns untouched
    bool pad_ok = true;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = N; c < ldy; ++c) pad_ok &= d(y[m * ldy + c]) == d(y0[m * ldy + c]);
    check(std::string("epilogue ") + name, pad_ok ? rel_err(got, ref) : INFINITY, tol_of<T>());
  }
  // Kernel 2: g = s * gy @ B per segment.
  {
    std::vector<float> g(static_cast<size_t>(M * ldg), NAN);
    const dim3 grid(static_cast<unsigned>(ceil_div(M, G_TM)), static_cast<unsigned>(L),
                    static_cast<unsigned>(ceil_div(r, G_KC)));
    clora_emu::launch(grid, kProjThreads, 0, [&] {
      seg_lora_grad_xa_kernel<T>(g.data(), ldg, gy.data(), ldgy, B.data(), ldb, seg.table.data(), r, M);
    });
    std::vector<double> got, ref;
    for (int64_t m = 0; m < M; ++m)
      for (int l = 0; l < L; ++l)
        for (int k = 0; k < r; ++k) {
          double acc = 0;
          for (int64_t c = offsets[l]; c < offsets[l + 1]; ++c) acc += d(gy[m * ldgy + c]) * d(B[c * ldb + k]);
          ref.push_back(scales[l] * acc);
          got.push_back(g[m * ldg + l * r + k]);  // NaN if never written
        }
    check(std::string("grad_xa  ") + name, rel_err(got, ref), 2e-5);
  }
  // Kernel 3: dB = s * gy^T @ xa per segment, with the production row chunking and with 32-row chunks.
  for (int64_t rpb : {grad_B_rows_per_block(M), static_cast<int64_t>(D_TM)}) {
    std::vector<float> dB(static_cast<size_t>(N * r), 0.f);
    const dim3 grid(static_cast<unsigned>(seg.col_tiles), static_cast<unsigned>(ceil_div(M, rpb)),
                    static_cast<unsigned>(ceil_div(r, D_KC)));
    clora_emu::launch(grid, kProjThreads, 0, [&] {
      seg_lora_grad_B_kernel<T>(dB.data(), gy.data(), ldgy, xa.data(), ldxa, seg.table.data(), L, r, M, rpb);
    });
    std::vector<double> got, ref;
    for (int64_t c = 0; c < N; ++c) {
      const int l = seg_of(c);
      for (int k = 0; k < r; ++k) {
        double acc = 0;
        for (int64_t m = 0; m < M; ++m) acc += d(gy[m * ldgy + c]) * static_cast<double>(xa[m * ldxa + l * r + k]);
        ref.push_back(scales[l] * acc);
        got.push_back(dB[c * r + k]);
      }
    }
    check(std::string("grad_B   ") + name + " rows/block=" + std::to_string(rpb), rel_err(got, ref), 2e-5);
  }
}

struct Buf {
  std::vector<float> f32;
  std::vector<c10::Half> f16;
  std::vector<c10::BFloat16> bf16;
  int64_t code = kCodeF32;
  const void* ptr() const {
    return code == kCodeF32 ? static_cast<const void*>(f32.data())
                            : code == kCodeF16 ? static_cast<const void*>(f16.data()) : static_cast<const void*>(bf16.data());
  }
  double at(int64_t i) const { return code == kCodeF32 ? f32[i] : code == kCodeF16 ? d(f16[i]) : d(bf16[i]); }
};

Buf make_buf(int64_t code, size_t n, std::mt19937& gen, double s) {
  Buf b;
  b.code = code;
  if (code == kCodeF32) b.f32 = randn<float>(n, gen, s);
  else if (code == kCodeF16) b.f16 = randn<c10::Half>(n, gen, s);
  else b.bf16 = randn<c10::BFloat16>(n, gen, s);
  return b;
}

struct LayerSpec {
  int64_t out, in, r, pad_past;
  int64_t code_p, code_a, code_b;
  double scale;
};

void test_penalty(const std::vector<LayerSpec>& specs, std::mt19937& gen, const std::string& label) {
  std::vector<Buf> P, A, B;
  std::vector<PenaltyLayer> layers;
  for (const auto& s : specs) {
    const int64_t ldp = s.in + s.pad_past;
    P.push_back(make_buf(s.code_p, static_cast<size_t>(s.out * ldp), gen, 1.0));
    A.push_back(make_buf(s.code_a, static_cast<size_t>(s.r * s.in), gen, 0.3));
    B.push_back(make_buf(s.code_b, static_cast<size_t>(s.out * s.r), gen, 0.3));
  }
  for (size_t l = 0; l < specs.size(); ++l) {
    const auto& s = specs[l];
    layers.push_back({P[l].ptr(), A[l].ptr(), B[l].ptr(), s.out, s.in, s.r, s.in + s.pad_past, s.in, s.r, s.code_p,
                      s.code_a, s.code_b, s.scale});
  }
  const PenaltyTable t = build_penalty_table(layers);
  std::vector<float> grads(static_cast<size_t>(t.grad_total), 0.f);
  float loss = 0.f;
  const size_t smem = static_cast<size_t>(penalty_smem_floats(t.max_r)) * sizeof(float);
  if (t.work_total > 0) {
    clora_emu::launch(dim3(static_cast<unsigned>(t.work_total)), PT_THREADS, smem, [&] {
      forgetting_penalty_kernel(t.table.data(), static_cast<int>(specs.size()), grads.data(), &loss);
    });
  }
  double loss_ref = 0;
  std::vector<double> gA, rA, gB, rB;
  for (size_t l = 0; l < specs.size(); ++l) {
    const auto& s = specs[l];
    const int64_t ldp = s.in + s.pad_past;
    std::vector<double> G(static_cast<size_t>(s.out * s.in));
    for (int64_t i = 0; i < s.out; ++i)
      for (int64_t j = 0; j < s.in; ++j) {
        double m = 0;
        for (int64_t k = 0; k < s.r; ++k) m += B[l].at(i * s.r + k) * A[l].at(k * s.in + j);
        m *= s.scale;
        const double p2 = P[l].at(i * ldp + j) * P[l].at(i * ldp + j);
        loss_ref += p2 * m * m;
        G[i * s.in + j] = 2 * p2 * m;
      }
    const int64_t offA = t.table[l * F_COUNT + F_DA_OFF], offB = t.table[l * F_COUNT + F_DB_OFF];
    for (int64_t k = 0; k < s.r; ++k)
      for (int64_t j = 0; j < s.in; ++j) {
        double acc = 0;
        for (int64_t i = 0; i < s.out; ++i) acc += B[l].at(i * s.r + k) * G[i * s.in + j];
        rA.push_back(s.scale * acc);
        gA.push_back(grads[offA + k * s.in + j]);
      }
    for (int64_t i = 0; i < s.out; ++i)
      for (int64_t k = 0; k < s.r; ++k) {
        double acc = 0;
        for (int64_t j = 0; j < s.in; ++j) acc += G[i * s.in + j] * A[l].at(k * s.in + j);
        rB.push_back(s.scale * acc);
        gB.push_back(grads[offB + i * s.r + k]);
      }
  }
  check("penalty loss " + label, std::fabs(loss - loss_ref) / std::max(std::fabs(loss_ref), 1e-30), 1e-5);
  check("penalty dA   " + label, rel_err(gA, rA), 2e-5);
  check("penalty dB   " + label, rel_err(gB, rB), 2e-5);
}

}  // namespace

int main(int argc, char** argv) {
  std::mt19937 gen(1234);
  // --quick: a small subset (every kernel, every dtype, several blocks) for slow runs such as
  // ThreadSanitizer builds, which check that shared memory is only shared across __syncthreads.
  if (argc > 1 && std::string(argv[1]) == "--quick") {
    test_projection<float>(40, 150, {0, 64, 65, 150}, 16, gen);
    test_projection<c10::Half>(5, 77, {0, 40, 77}, 65, gen);
    test_projection<c10::BFloat16>(5, 77, {0, 77}, 3, gen);
    test_penalty({{150, 70, 16, 0, kCodeF32, kCodeF32, kCodeF32, 0.5},
                  {4, 4, 0, 0, kCodeF32, kCodeF32, kCodeF32, 1.0},
                  {20, 33, 65, 3, kCodeBF16, kCodeF16, kCodeF32, 2.0}},
                 gen, "quick grouped");
    std::printf("%d checks, %d failures\n", g_checks, g_failures);
    if (g_failures == 0) std::printf("ALL PASSED\n");
    return g_failures == 0 ? 0 : 1;
  }
  for (int r : {1, 16, 65}) {
    for (const auto& offs : {std::vector<int64_t>{0, 77}, std::vector<int64_t>{0, 40, 77}}) {
      test_projection<float>(5, 77, offs, r, gen);
      test_projection<c10::Half>(5, 77, offs, r, gen);
      test_projection<c10::BFloat16>(5, 77, offs, r, gen);
    }
  }
  // Several row tiles / chunks, a one-column segment, a segment wider than one tile.
  test_projection<float>(70, 200, {0, 1, 130, 200}, 16, gen);
  test_projection<c10::BFloat16>(33, 150, {0, 64, 65, 150}, 3, gen);

  test_penalty({{77, 33, 16, 0, kCodeF32, kCodeF32, kCodeF32, 0.5}}, gen, "single fp32 77x33 r=16");
  test_penalty({{5, 33, 1, 0, kCodeF16, kCodeF16, kCodeF16, 1.0}}, gen, "single fp16 5x33 r=1");
  test_penalty({{77, 33, 65, 0, kCodeBF16, kCodeBF16, kCodeBF16, 1.0}}, gen, "single bf16 77x33 r=65");
  test_penalty({{300, 200, 16, 0, kCodeF32, kCodeF32, kCodeF32, 0.25},
                {10, 10, 0, 0, kCodeF32, kCodeF32, kCodeF32, 1.0},      // r = 0: no work
                {129, 64, 3, 7, kCodeBF16, kCodeF16, kCodeF32, 2.0},   // padded past rows, mixed dtypes
                {0, 20, 4, 0, kCodeF32, kCodeF32, kCodeF32, 1.0},      // out = 0: no work
                {5, 130, 65, 0, kCodeF16, kCodeF16, kCodeF16, 1.5},
                {20, 20, 2, 0, kCodeF32, kCodeF32, kCodeF32, 1.0},
                {3, 3, 0, 0, kCodeF32, kCodeF32, kCodeF32, 1.0}},      // trailing layer without work
               gen, "grouped 7 layers");

  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  if (g_failures == 0) std::printf("ALL PASSED\n");
  return g_failures == 0 ? 0 : 1;
}
