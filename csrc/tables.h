// Kernel tile sizes and the layouts of the int64 device tables the kernels read, with the
// host-side builders.  Plain C++ (no ATen): shared by the extension and the CPU emulation test.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace clora_fast {

// Runtime dtype codes (kernels that accept one dtype per tensor: the penalty).
enum DTypeCode : int64_t { kCodeF32 = 0, kCodeF16 = 1, kCodeBF16 = 2 };

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t double_bits(double v) {
  int64_t bits;
  static_assert(sizeof(bits) == sizeof(v), "double must be 64-bit");
  std::memcpy(&bits, &v, sizeof(v));
  return bits;
}

// ---------------------------------------------------------------------------------------------
// Segmented projection.
// ---------------------------------------------------------------------------------------------
constexpr int kProjThreads = 256;
constexpr int EP_TM = 32, EP_TN = 64, EP_KC = 32;  // kernel 1 (epilogue): rows, columns, rank chunk
constexpr int G_TM = 32, G_TN = 64, G_KC = 16;     // kernel 2 (g = s * gy @ B): rows, columns, ranks
constexpr int D_TM = 32, D_TN = 64, D_KC = 16;     // kernel 3 (dB): row step, columns, ranks
static_assert(EP_TN == D_TN, "kernels 1 and 3 share the column-tile table");

// Segment table: kSegStride int64 per segment l: o_l, o_{l+1}, its first column tile (tiles of
// EP_TN columns, numbered over all segments; a tile never straddles two segments), scale (bits
// of a double).
constexpr int kSegStride = 4;
enum SegField : int { S_BEGIN = 0, S_END = 1, S_TILE = 2, S_SCALE = 3 };

struct SegmentTable {
  int L = 0;
  int64_t col_tiles = 0;
  std::vector<int64_t> table;
};

// offsets: L+1 strictly increasing ints from 0; scales: L values (validated by the caller).
inline SegmentTable build_segment_table(const std::vector<int64_t>& offsets, const std::vector<double>& scales) {
  SegmentTable s;
  s.L = static_cast<int>(offsets.size()) - 1;
  s.table.reserve(static_cast<size_t>(s.L) * kSegStride);
  for (int l = 0; l < s.L; ++l) {
    s.table.push_back(offsets[l]);
    s.table.push_back(offsets[l + 1]);
    s.table.push_back(s.col_tiles);
    s.table.push_back(double_bits(scales[l]));
    s.col_tiles += ceil_div(offsets[l + 1] - offsets[l], EP_TN);
  }
  return s;
}

// Rows per block of kernel 3: at least 256, and few enough chunks that gridDim.y <= 65535.
inline int64_t grad_B_rows_per_block(int64_t M) {
  if (M <= 0) return D_TM;
  const int64_t chunks = ceil_div(M, 256) < 65535 ? ceil_div(M, 256) : 65535;
  return ceil_div(ceil_div(M, chunks), D_TM) * D_TM;
}

// ---------------------------------------------------------------------------------------------
// Forgetting penalty.
// ---------------------------------------------------------------------------------------------
constexpr int PT_THREADS = 256;
constexpr int PT_TJ = 64;     // columns per strip
constexpr int PT_TI = 16;     // rows per tile
constexpr int PT_ROWS = 128;  // rows per block (8 tiles)

// Per-layer table entry: F_COUNT int64.
enum PenField : int {
  F_PAST = 0, F_A, F_B,        // data pointers
  F_DA_OFF, F_DB_OFF,          // offsets (elements) of dA [r, in] / dB [out, r] in the flat fp32 gradient buffer
  F_OUT, F_IN, F_R,            // shapes
  F_LDP, F_LDA, F_LDB,         // row strides (elements)
  F_DTYPES,                    // dtype codes: past | A << 8 | B << 16
  F_SCALE,                     // scale (double bits)
  F_WORK_START,                // first work item (block) of this layer
  F_STRIPS,                    // number of PT_TJ-column strips
  F_PAD,
  F_COUNT
};
static_assert(F_COUNT == 16, "penalty table entry must be 16 int64");

// Floats of dynamic shared memory for rank r: sA [r][TJ+1], sdA [r][TJ], sB [TI][r], sG [TI][TJ+1].
inline int64_t penalty_smem_floats(int64_t r) {
  return r * (PT_TJ + 1) + r * PT_TJ + PT_TI * r + PT_TI * (PT_TJ + 1);
}

struct PenaltyLayer {
  const void* past;
  const void* A;
  const void* B;
  int64_t out, in, r;
  int64_t ld_past, ld_A, ld_B;
  int64_t code_past, code_A, code_B;
  double scale;
};

struct PenaltyTable {
  std::vector<int64_t> table;
  int64_t grad_total = 0;  // floats in the flat gradient buffer (all dA then dB, layer by layer)
  int64_t work_total = 0;  // blocks of the launch
  int64_t max_r = 0;       // largest rank among layers with work (sizes shared memory)
};

// A layer owns ceil(in / PT_TJ) * ceil(out / PT_ROWS) blocks (none when r, out or in is 0).
inline PenaltyTable build_penalty_table(const std::vector<PenaltyLayer>& layers) {
  PenaltyTable t;
  t.table.reserve(layers.size() * F_COUNT);
  for (const PenaltyLayer& la : layers) {
    const int64_t strips = ceil_div(la.in, PT_TJ);
    const int64_t work = la.r > 0 ? strips * ceil_div(la.out, PT_ROWS) : 0;
    t.table.push_back(static_cast<int64_t>(reinterpret_cast<intptr_t>(la.past)));
    t.table.push_back(static_cast<int64_t>(reinterpret_cast<intptr_t>(la.A)));
    t.table.push_back(static_cast<int64_t>(reinterpret_cast<intptr_t>(la.B)));
    t.table.push_back(t.grad_total);
    t.table.push_back(t.grad_total + la.r * la.in);
    t.table.push_back(la.out);
    t.table.push_back(la.in);
    t.table.push_back(la.r);
    t.table.push_back(la.ld_past);
    t.table.push_back(la.ld_A);
    t.table.push_back(la.ld_B);
    t.table.push_back(la.code_past | (la.code_A << 8) | (la.code_B << 16));
    t.table.push_back(double_bits(la.scale));
    t.table.push_back(t.work_total);
    t.table.push_back(strips);
    t.table.push_back(0);
    t.grad_total += la.r * la.in + la.out * la.r;
    t.work_total += work;
    if (work > 0 && la.r > t.max_r) t.max_r = la.r;
  }
  return t;
}

}  // namespace clora_fast
