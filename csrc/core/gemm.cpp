// Packed GEMM engine: loops jc (NC output columns) -> segment -> pc (KC reduction) -> pack B ->
// parallel over row blocks (MC rows of one group) -> pack A -> NR x MR micro-tiles.
//
// The micro-kernel keeps an MR x NR tile of C in registers and streams an MR-interleaved A panel and
// an NR-interleaved B panel. It is written with GCC/Clang vector extensions, so the same source is
// AVX2+FMA on x86 (-mavx2 -mfma) and plain scalar code elsewhere; aarch64 gets an explicit NEON
// micro-kernel (FWD_GEMM_NEON: fmla by element, the whole tile in registers).
#include "gemm.h"

#include <stdlib.h>
#include <string.h>
#include <algorithm>
#include <new>
#include <stdexcept>
#include <utility>

#if defined(__ARM_NEON) && defined(__aarch64__) && !defined(__AVX2__)
#define FWD_GEMM_NEON 1
#include <arm_neon.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fwdcore {

typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));  // unaligned access

const char* gemm_simd_name() {
#if defined(__AVX512F__)
  return "avx512f";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2+fma";
#elif defined(__ARM_NEON) || defined(__ARM_NEON__)
  return "neon";
#else
  return "generic";
#endif
}

static inline v8f ld8(const float* p) { return *(const v8f*)p; }
static inline v8f ld8u(const float* p) { return *(const v8f_u*)p; }
static inline void st8u(float* p, v8f v) { *(v8f_u*)p = v; }
static inline v8f bcast(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

#if defined(FWD_GEMM_NEON)
// aarch64: GCC splits the 32-byte vectors of the generic kernel into NEON pairs but keeps the
// accumulators on the stack (a load and a store around every fmla). This one holds the MR x NR tile in
// MR * NR / 4 q registers (24 for 6 x 16 and 12 x 8), loads a row of A as ceil(MR / 4) q registers and
// multiplies by lane (fmla vd.4s, vn.4s, vm.s[l]). Same FMA sequence per element as AVX2+FMA.

// First A row of q register j; the last register is moved back so that it ends at row MR - 1 (no
// load past the panel): MR = 6 loads rows 0-3 and 2-5.
template <int MR>
constexpr int a_base(int j) { return 4 * j + 4 <= MR ? 4 * j : MR - 4; }

template <int I, int MR, int NV>
static inline void fma_row(float32x4_t (&acc)[NV], const float32x4_t (&bv)[NV], const float32x4_t* av) {
  constexpr int J = I / 4, LANE = I - a_base<MR>(I / 4);
  static_assert(LANE >= 0 && LANE < 4, "A lane");
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) acc[v] = vfmaq_laneq_f32(acc[v], bv[v], av[J], LANE);
}

template <int MR, int NV, int... I>
static inline void fma_rows(float32x4_t (&acc)[MR][NV], const float32x4_t (&bv)[NV], const float32x4_t* av,
                            std::integer_sequence<int, I...>) {
  (fma_row<I, MR, NV>(acc[I], bv, av), ...);
}

// C tile (mr x nr valid of MR x NR) = (first ? init : C) + A_panel . B_panel.
template <int MR, int NR>
static inline void ukernel(int64_t kc, const float* __restrict a, const float* __restrict b, int64_t kc2,
                           const float* __restrict a2, const float* __restrict b2, float* __restrict c,
                           int64_t ldc, const float* init, bool first, int mr, int nr) {
  static_assert(MR >= 4 && NR % 4 == 0, "NEON micro-tile");
  constexpr int NV = NR / 4, NA = (MR + 3) / 4;
  float32x4_t acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = vdupq_n_f32(0.0f);
  for (int part = 0; part < 2; ++part) {
    const int64_t n = part ? kc2 : kc;
    const float* __restrict pa = part ? a2 : a;
    const float* __restrict pb = part ? b2 : b;
    for (int64_t p = 0; p < n; ++p) {
      float32x4_t bv[NV], av[NA];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = vld1q_f32(pb + p * NR + 4 * v);
#pragma GCC unroll 4
      for (int j = 0; j < NA; ++j) av[j] = vld1q_f32(pa + p * MR + a_base<MR>(j));
      fma_rows<MR, NV>(acc, bv, av, std::make_integer_sequence<int, MR>{});
    }
  }
  if (mr == MR && nr == NR) {
    if (first) {
      float32x4_t iv[NV];
      for (int v = 0; v < NV; ++v) iv[v] = init ? vld1q_f32(init + 4 * v) : vdupq_n_f32(0.0f);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) vst1q_f32(c + i * ldc + 4 * v, vaddq_f32(acc[i][v], iv[v]));
    } else {
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v)
          vst1q_f32(c + i * ldc + 4 * v, vaddq_f32(vld1q_f32(c + i * ldc + 4 * v), acc[i][v]));
    }
    return;
  }
  alignas(64) float tmp[MR * NR];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) vst1q_f32(tmp + i * NR + 4 * v, acc[i][v]);
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) {
      const float base = first ? (init ? init[j] : 0.0f) : c[i * ldc + j];
      c[i * ldc + j] = base + tmp[i * NR + j];
    }
}
#else
// C tile (mr x nr valid of MR x NR) = (first ? init : C) + A_panel . B_panel.
template <int MR, int NR>
static inline void ukernel(int64_t kc, const float* __restrict a, const float* __restrict b, int64_t kc2,
                           const float* __restrict a2, const float* __restrict b2, float* __restrict c,
                           int64_t ldc, const float* init, bool first, int mr, int nr) {
  constexpr int NV = NR / 8;
  v8f acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = bcast(0.0f);
  // Two (A, B) panel pairs: the main reduction block and an optional fused tail (kc2 may be 0).
  for (int part = 0; part < 2; ++part) {
    const int64_t n = part ? kc2 : kc;
    const float* __restrict pa = part ? a2 : a;
    const float* __restrict pb = part ? b2 : b;
    for (int64_t p = 0; p < n; ++p) {
      v8f bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = ld8(pb + p * NR + 8 * v);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const v8f av = bcast(pa[p * MR + i]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] += av * bv[v];
      }
    }
  }
  if (mr == MR && nr == NR) {
    if (first) {
      v8f iv[NV];
      for (int v = 0; v < NV; ++v) iv[v] = init ? ld8u(init + 8 * v) : bcast(0.0f);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) st8u(c + i * ldc + 8 * v, acc[i][v] + iv[v]);
    } else {
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) st8u(c + i * ldc + 8 * v, ld8u(c + i * ldc + 8 * v) + acc[i][v]);
    }
    return;
  }
  alignas(64) float tmp[MR * NR];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) *(v8f*)(tmp + i * NR + 8 * v) = acc[i][v];
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) {
      const float base = first ? (init ? init[j] : 0.0f) : c[i * ldc + j];
      c[i * ldc + j] = base + tmp[i * NR + j];
    }
}
#endif

static float* alloc_floats(size_t n) {
  size_t bytes = ((n * sizeof(float)) + 63) / 64 * 64;
  if (bytes == 0) bytes = 64;
  void* p = aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  return (float*)p;
}

struct FreeGuard {
  float* p;
  ~FreeGuard() { free(p); }
};

template <int MR, int NR>
static void run_impl(int G, int64_t M, int64_t N, std::vector<GemmSegment>& segs, const GemmOutput& out,
                     int num_threads) {
// Reduction block. Measured on Zen 4 (1 MiB L2), 9216 x 384 x 1536: KC 256 -> 94 GFLOP/s, 512..2048
// -> 106; 2304 x 4096 x 4096: 256 -> 90, 1024 -> 103. A short reduction is one block, so C is
// written once instead of re-read per block.
#ifndef FWD_KC
#define FWD_KC 1024
#endif
  int64_t KC = FWD_KC;
  {
    int64_t kmax = 0;
    for (auto& sg : segs) kmax = std::max(kmax, sg.kdim);
    KC = std::max<int64_t>(1, std::min(KC, kmax));
  }
  const int64_t MC = 144;  // a multiple of 6 and 12
  const int64_t NC = 1024; // a multiple of 8 and 16
  const int64_t nc_max = std::min<int64_t>(NC, (N + NR - 1) / NR * NR);
  size_t bsize = 0;
  for (auto& s : segs) {
    const size_t k = (size_t)std::min<int64_t>(s.kdim, KC);
    bsize = std::max(bsize, (s.b_per_group ? (size_t)G : 1) * k * (size_t)nc_max);
  }
  float* bbuf = alloc_floats(bsize);
  FreeGuard bguard{bbuf};
  // Fused tails: which groups each segment runs alone (eff) and which ride on the previous one.
  const size_t S = segs.size();
  std::vector<std::vector<char>> eff(S), fused(S);
  size_t tsize = 0;
  int64_t kt_max = 0;
  for (size_t si = 0; si < S; ++si) {
    eff[si] = segs[si].active;
    fused[si].assign(G, 0);
    if (si > 0 && segs[si].fuse_with_prev && segs[si].kdim <= KC && segs[si].kdim > 0 && segs[si - 1].kdim > 0) {
      for (int g = 0; g < G; ++g)
        if (segs[si].active[g] && segs[si - 1].active[g]) {
          fused[si][g] = 1;
          eff[si][g] = 0;
        }
      tsize = std::max(tsize, (segs[si].b_per_group ? (size_t)G : 1) * (size_t)segs[si].kdim * (size_t)nc_max);
      kt_max = std::max(kt_max, segs[si].kdim);
    }
  }
  float* tbuf = alloc_floats(tsize);
  FreeGuard tguard{tbuf};
  std::vector<char> written((size_t)G, 0);
  const int64_t n_mblocks = (M + MC - 1) / MC;
  int nt = num_threads;
#ifdef _OPENMP
  if (nt <= 0) nt = omp_get_max_threads();
  // Small problems run on one thread: waking a team costs more than it saves, and far more when the
  // other cores are busy (OpenMP's spin-then-sleep barriers).
  double work = 0.0;
  for (auto& sg : segs) work += (double)G * (double)M * (double)N * (double)sg.kdim;
  if (work < 2.0e6) nt = 1;
#else
  nt = 1;
#endif
  // Every loop below runs identically on every thread; work is shared through `omp for` only.
  bool failed = false;
#pragma omp parallel num_threads(nt)
  {
    float* abuf = nullptr;
    abuf = (float*)aligned_alloc(64, (size_t)MC * (KC + kt_max) * sizeof(float));
    if (!abuf) {
#pragma omp atomic write
      failed = true;
    }
#pragma omp barrier
    if (!failed) {
      for (int64_t jc = 0; jc < N; jc += NC) {
        const int64_t nc = std::min(NC, N - jc);
        const int64_t n_npanels = (nc + NR - 1) / NR;
#pragma omp single
        std::fill(written.begin(), written.end(), 0);
        for (size_t si = 0; si < S; ++si) {
          GemmSegment& s = segs[si];
          const std::vector<char>& act = eff[si];
          GemmSegment* tail = (si + 1 < S && kt_max > 0 && std::find(fused[si + 1].begin(), fused[si + 1].end(), 1) !=
                                                                 fused[si + 1].end())
                                  ? &segs[si + 1]
                                  : nullptr;
          for (int64_t pc = 0; pc < s.kdim; pc += KC) {
            const int64_t kc = std::min(KC, s.kdim - pc);
            const bool last_block = pc + kc >= s.kdim;
            const int64_t kt = (tail && last_block) ? tail->kdim : 0;
            const int64_t tstride = n_npanels * NR * kt;
            const int64_t bstride = n_npanels * NR * kc;  // one group's packed B block
            // Pack B: one NR-column panel per iteration (per active group if B depends on it).
            const int64_t nbg = s.b_per_group ? G : 1;
#pragma omp for schedule(static) collapse(2)
            for (int64_t g = 0; g < nbg; ++g)
              for (int64_t jp = 0; jp < n_npanels; ++jp) {
                if (s.b_per_group && !act[g]) continue;
                const int64_t j0 = jp * NR;
                s.pack_b((int)g, jc + j0, std::min<int64_t>(NR, nc - j0), pc, kc, NR, bbuf + g * bstride + j0 * kc);
              }
            if (kt > 0) {  // the fused tail's B panels, per group when they differ
              const int64_t ntg = tail->b_per_group ? G : 1;
#pragma omp for schedule(static) collapse(2)
              for (int64_t g = 0; g < ntg; ++g)
                for (int64_t jp = 0; jp < n_npanels; ++jp) {
                  if (tail->b_per_group && !fused[si + 1][g]) continue;
                  const int64_t j0 = jp * NR;
                  tail->pack_b((int)g, jc + j0, std::min<int64_t>(NR, nc - j0), 0, kt, NR,
                               tbuf + g * tstride + j0 * kt);
                }
            }
            // Multiply: tasks are (group, row block).
#pragma omp for schedule(dynamic, 1) collapse(2)
            for (int64_t g = 0; g < G; ++g)
              for (int64_t ib = 0; ib < n_mblocks; ++ib) {
                if (!act[g]) continue;
                const int64_t i0 = ib * MC, mc = std::min(MC, M - i0);
                s.pack_a((int)g, i0, mc, pc, kc, MR, abuf);
                const float* bp = bbuf + (s.b_per_group ? g * bstride : 0);
                const int64_t ktg = (kt > 0 && fused[si + 1][g]) ? kt : 0;
                float* abuf2 = abuf + MC * KC;
                const float* tp = tbuf + ((ktg > 0 && tail->b_per_group) ? g * tstride : 0);
                if (ktg > 0) tail->pack_a((int)g, i0, mc, 0, ktg, MR, abuf2);
                const bool first = pc == 0 && !written[g];
                const float* init = out.init.empty() ? nullptr : out.init[g];
                const int64_t ldc = out.ldc[g];
                float* cg = out.c[g] + i0 * ldc + jc;
                for (int64_t j0 = 0; j0 < nc; j0 += NR) {
                  const int nr = (int)std::min<int64_t>(NR, nc - j0);
                  for (int64_t r0 = 0; r0 < mc; r0 += MR) {
                    const int mr = (int)std::min<int64_t>(MR, mc - r0);
                    ukernel<MR, NR>(kc, abuf + r0 * kc, bp + j0 * kc, ktg, abuf2 + r0 * ktg, tp + j0 * ktg,
                                    cg + r0 * ldc + j0, ldc,
                                    init ? init + jc + j0 : nullptr, first, mr, nr);
                  }
                }
              }
          }
#pragma omp single
          for (int g = 0; g < G; ++g)
            if (act[g] && s.kdim > 0) written[g] = 1;
        }
        // Groups no segment touched get their init row (or zeros).
#pragma omp for schedule(static) collapse(2)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t i = 0; i < M; ++i) {
            if (written[g] || !out.c[g]) continue;  // a null output: the caller skips that group
            float* row = out.c[g] + i * out.ldc[g] + jc;
            const float* init = out.init.empty() ? nullptr : out.init[g];
            if (init)
              memcpy(row, init + jc, (size_t)nc * sizeof(float));
            else
              memset(row, 0, (size_t)nc * sizeof(float));
          }
      }
    }
    free(abuf);
  }
  if (failed) throw std::bad_alloc();
}

void gemm_run(int G, int64_t M, int64_t N, std::vector<GemmSegment>& segs, const GemmOutput& out, int num_threads) {
  if (G <= 0 || M <= 0 || N <= 0) return;
  for (auto& s : segs)
    if ((int)s.active.size() != G) throw std::logic_error("gemm_run: segment activity list has the wrong size");
  if ((int)out.c.size() != G || (int)out.ldc.size() != G || (!out.init.empty() && (int)out.init.size() != G))
    throw std::logic_error("gemm_run: output lists have the wrong size");
  if (N <= 8)
    run_impl<12, 8>(G, M, N, segs, out, num_threads);
  else
    run_impl<6, 16>(G, M, N, segs, out, num_threads);
}

}  // namespace fwdcore
