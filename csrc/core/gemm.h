// A small packed-panel GEMM engine (BLIS-style loops) that the dual kernels are built on.
//
// Why our own GEMM instead of calling a BLAS: the dual LoRA linear needs operand panels that do not
// exist in memory (perturbation slices regenerated from Philox while a panel is packed), bfloat16
// inputs widened while packing, and one pass that reads each W panel once for the primal rows and
// all K tangent streams. Packing is where all of that happens; the micro-kernel only ever sees
// float32 panels.
//
// The problem: G row groups of M rows each (group 0 = primal, group 1+k = tangent k). Output group g
// is C_g (M, N) = init_g + sum over segments s of A_{s,g} (M, kdim_s) . B_{s,g} (N, kdim_s)^T.
// A segment may skip some groups (inactive) and its B panel may depend on the group.
#pragma once
#include <stdint.h>
#include <functional>
#include <vector>

namespace fwdcore {

struct GemmSegment {
  int64_t kdim = 0;
  bool b_per_group = false;  // B panel differs between groups (perturbation slices)
  // A short segment (kdim <= 256) that follows another: for the groups active in both, it is folded
  // into the previous segment's last reduction block, so C is written once instead of re-read.
  bool fuse_with_prev = false;
  std::vector<char> active;  // per group
  // Both callbacks pack rows [i0, i0 + n) of their operand (A: rows of group g; B: output columns)
  // over the reduction range [p0, p0 + kc) into panels of P rows: element (i, p) goes to
  // dst[(i / P) * P * kc + p * P + i % P], rows past n zero-filled up to a multiple of P. The
  // pack_panel helpers below do exactly that from a strided source or a generator.
  std::function<void(int g, int64_t i0, int64_t n, int64_t p0, int64_t kc, int P, float* dst)> pack_b;
  std::function<void(int g, int64_t i0, int64_t n, int64_t p0, int64_t kc, int P, float* dst)> pack_a;
};

struct GemmOutput {
  std::vector<float*> c;           // per group: row i of group g at c[g] + i * ldc[g]
  std::vector<int64_t> ldc;
  std::vector<const float*> init;  // per group: (N) row added to every row, or nullptr (zeros)
};

static inline float to_f32(float v) { return v; }
static inline float to_f32(uint16_t bf16_bits) {
  union { uint32_t u; float f; } c;
  c.u = (uint32_t)bf16_bits << 16;
  return c.f;
}
static inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  union { uint32_t u; float f; } c;
  c.f = f;
  // branch-free (a select), so that loops storing bfloat16 vectorise
  const uint32_t rounded = (c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (c.u >> 16) | 0x40u;
  return (uint16_t)((c.u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// Rows r of a strided source (row r at src + r * ld, reduction element p at [p0 + p]).
template <typename T>
void pack_panel(const T* src, int64_t ld, int64_t n, int64_t p0, int64_t kc, int P, float* dst) {
  for (int64_t r0 = 0; r0 < n; r0 += P) {
    const int64_t rows = n - r0 < P ? n - r0 : P;
    float* d = dst + r0 * kc;
    for (int64_t i = 0; i < rows; ++i) {
      const T* s = src + (r0 + i) * ld + p0;
      for (int64_t p = 0; p < kc; ++p) d[p * P + i] = to_f32(s[p]);
    }
    for (int64_t i = rows; i < P; ++i)
      for (int64_t p = 0; p < kc; ++p) d[p * P + i] = 0.0f;
  }
}

// Same layout from a generator f(r, p) (r, p relative to the block).
template <typename F>
void pack_panel_gen(int64_t n, int64_t kc, int P, float* dst, F&& f) {
  for (int64_t r0 = 0; r0 < n; r0 += P) {
    const int64_t rows = n - r0 < P ? n - r0 : P;
    float* d = dst + r0 * kc;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t p = 0; p < kc; ++p) d[p * P + i] = f(r0 + i, p);
    for (int64_t i = rows; i < P; ++i)
      for (int64_t p = 0; p < kc; ++p) d[p * P + i] = 0.0f;
  }
}

// Same layout, each row produced whole by fill(r, row_buffer) (r relative to the block; kc values).
template <typename F>
void pack_panel_rows(int64_t n, int64_t kc, int P, float* dst, float* row_buffer, F&& fill) {
  for (int64_t r0 = 0; r0 < n; r0 += P) {
    const int64_t rows = n - r0 < P ? n - r0 : P;
    float* d = dst + r0 * kc;
    for (int64_t i = 0; i < rows; ++i) {
      fill(r0 + i, row_buffer);
      for (int64_t p = 0; p < kc; ++p) d[p * P + i] = row_buffer[p];
    }
    for (int64_t i = rows; i < P; ++i)
      for (int64_t p = 0; p < kc; ++p) d[p * P + i] = 0.0f;
  }
}

// Runs the segments in order. Every group's output is fully written (init alone where no segment is
// active for it).
void gemm_run(int G, int64_t M, int64_t N, std::vector<GemmSegment>& segs, const GemmOutput& out, int num_threads);

const char* gemm_simd_name();

}  // namespace fwdcore
