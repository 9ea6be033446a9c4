// The fused dual (forward-mode) attention on the CPU: one flash-style pass over the keys per query block.
//
// For each task (b, h, block of up to BQ = 32 query rows) the keys are visited in blocks of BKV = 64:
//   scores  s  = scale q k^T + mask                     (BQ x BKV tile, never more)
//   m' = max(m, rowmax s), alpha = e^(m - m'), p = e^(s - m')
//   l = alpha l + rowsum p,  a = alpha a + p V
// and, reusing the k / v tiles already in the workspace, for each tangent stream k:
//   sd = scale (q_dot_k k^T + q k_dot_k^T)
//   w  = p * sd,  c_k = alpha c_k + rowsum w,  b_k = alpha b_k + w V + p V_dot_k
// Finally o = a / l and o_dot_k = b_k / l - (c_k / l) o. A row whose every key is masked keeps m = -inf
// and l = 0 and gets o = o_dot = 0. Memory per thread is O((K + 1) * BQ * D + BKV * (D + BQ)),
// independent of L and S.
//
// The products are small register-blocked loops written with vector extensions, with explicit NEON
// versions on aarch64 (FWD_ATTN_NEON, also for the exp of a key block) (no GEMM engine):
// scores as one query row against the transposed key tile (8 vector accumulators over the 64 keys),
// value side as 4 query rows x 16 columns against rows of V. A task's result does not depend on the
// thread count.
#include <math.h>
#include <string.h>

#include <algorithm>
#include <new>
#include <string>
#include <vector>

#include "internal.h"

#if defined(__ARM_NEON) && defined(__aarch64__) && !defined(__AVX2__)
#define FWD_ATTN_NEON 1
#include <arm_neon.h>
#endif

namespace fwdcore {

namespace {

constexpr int64_t BQ = 32;   // query rows per task
constexpr int64_t BKV = 64;  // keys per block
constexpr int64_t CH = 16;   // column chunk of the value-side products; D is padded to a multiple in the workspace

template <typename T>
inline void load_row(const T* __restrict src, int64_t D, int64_t Dp, float* __restrict dst) {
  for (int64_t d = 0; d < D; ++d) dst[d] = to_f32(src[d]);
  for (int64_t d = D; d < Dp; ++d) dst[d] = 0.0f;
}

// dst[d * BKV + j] = src[j * D + d] for j < n; columns n .. BKV-1 zero.
template <typename T>
inline void load_transposed(const T* __restrict src, int64_t n, int64_t D, float* __restrict dst) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) dst[d * BKV + j] = to_f32(src[j * D + d]);
  if (n < BKV)
    for (int64_t d = 0; d < D; ++d)
      for (int64_t j = n; j < BKV; ++j) dst[d * BKV + j] = 0.0f;
}

// e^x for x <= 0 (a score minus the running max): Cephes' expf polynomial (about 2 ulp), written
// without libm calls so that the loops over a key block vectorize. x < -87 (including -inf) gives exactly
// 0, NaN stays NaN.
inline float exp_nonpos(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float n = floorf(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  union { uint32_t u; float f; } sc;
  sc.u = (uint32_t)((int32_t)n + 127) << 23;
  const float e = y * sc.f;
  return x != x ? x : (x < -87.0f ? 0.0f : e);
}

#if defined(FWD_ATTN_NEON)
// exp_nonpos on four lanes (GCC does not vectorize the scalar one on aarch64: floorf stays scalar frintm).
inline float32x4_t exp_nonpos4(float32x4_t x) {
  const float32x4_t lim = vdupq_n_f32(-87.0f);
  const uint32x4_t low = vcltq_f32(x, lim), num = vceqq_f32(x, x);
  const float32x4_t xc = vbslq_f32(low, lim, x);
  const float32x4_t n = vrndmq_f32(vfmaq_f32(vdupq_n_f32(0.5f), xc, vdupq_n_f32(1.44269504088896341f)));
  float32x4_t r = vfmsq_f32(xc, n, vdupq_n_f32(0.693359375f));
  r = vfmaq_f32(r, n, vdupq_n_f32(2.12194440e-4f));
  float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
  p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
  p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
  p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
  p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
  const float32x4_t y = vaddq_f32(vfmaq_f32(r, vmulq_f32(p, r), r), vdupq_n_f32(1.0f));
  const int32x4_t e2 = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
  const float32x4_t e = vmulq_f32(y, vreinterpretq_f32_s32(e2));
  return vbslq_f32(num, vbslq_f32(low, vdupq_n_f32(0.0f), e), x);
}
// s[j] = exp_nonpos(s[j] - mu), j < BKV.
inline void exp_block(float* __restrict s, float mu) {
  const float32x4_t m = vdupq_n_f32(mu);
  for (int64_t j = 0; j < BKV; j += 4) vst1q_f32(s + j, exp_nonpos4(vsubq_f32(vld1q_f32(s + j), m)));
}
#else
// s[j] = exp_nonpos(s[j] - mu), j < BKV.
inline void exp_block(float* __restrict s, float mu) {
  for (int64_t j = 0; j < BKV; ++j) s[j] = exp_nonpos(s[j] - mu);
}
#endif

// Reductions over a key block with 8 independent partial results (vectorizable without -ffast-math).
inline float block_max(const float* __restrict s) {
  float part[8];
  for (int c = 0; c < 8; ++c) part[c] = s[c];
  for (int64_t j = 8; j < BKV; j += 8)
    for (int c = 0; c < 8; ++c) part[c] = part[c] > s[j + c] ? part[c] : s[j + c];
  float m = part[0];
  for (int c = 1; c < 8; ++c) m = m > part[c] ? m : part[c];
  return m;
}
inline float block_sum(const float* __restrict s) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t j = 0; j < BKV; j += 8)
    for (int c = 0; c < 8; ++c) part[c] += s[j + c];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// The micro-kernels use GCC/Clang vector extensions (as gemm.cpp does): 8-float vectors become AVX2+FMA
// with -mavx2 -mfma, NEON pairs on aarch64, scalar code elsewhere. Workspace rows are not assumed aligned.
typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));
static inline v8f ld8(const float* p) { return *(const v8f_u*)p; }
static inline void st8(float* p, v8f v) { *(v8f_u*)p = v; }
static inline v8f bcast(float x) { return (v8f){x, x, x, x, x, x, x, x}; }
constexpr int NVK = (int)(BKV / 8);  // vectors per key block
constexpr int NVC = (int)(CH / 8);   // vectors per column chunk

#if defined(FWD_ATTN_NEON)
// aarch64: explicit NEON versions of the three micro-kernels below, with the accumulators in q
// registers (GCC keeps the 32-byte vectors of the generic code partly on the stack). Same FMA sequence
// per element as the generic code under AVX2+FMA.
constexpr int NQK = (int)(BKV / 4);  // q registers per key block
constexpr int NQC = (int)(CH / 4);   // q registers per column chunk

inline void row_dot(const float* __restrict x, const float* __restrict bT, int64_t D, float* __restrict out) {
  float32x4_t acc[NQK];
#pragma GCC unroll 16
  for (int v = 0; v < NQK; ++v) acc[v] = vdupq_n_f32(0.0f);
  for (int64_t d = 0; d < D; ++d) {
    const float xs = x[d];
    const float* __restrict b = bT + d * BKV;
#pragma GCC unroll 16
    for (int v = 0; v < NQK; ++v) acc[v] = vfmaq_n_f32(acc[v], vld1q_f32(b + 4 * v), xs);
  }
#pragma GCC unroll 16
  for (int v = 0; v < NQK; ++v) vst1q_f32(out + 4 * v, acc[v]);
}

inline void row_dot2(const float* __restrict x, const float* __restrict bT, const float* __restrict y,
                     const float* __restrict cT, int64_t D, float* __restrict out) {
  float32x4_t acc[NQK];
#pragma GCC unroll 16
  for (int v = 0; v < NQK; ++v) acc[v] = vdupq_n_f32(0.0f);
  for (int64_t d = 0; d < D; ++d) {
    const float xs = x[d], ys = y[d];
    const float* __restrict b = bT + d * BKV;
    const float* __restrict c = cT + d * BKV;
#pragma GCC unroll 16
    for (int v = 0; v < NQK; ++v) {
      acc[v] = vfmaq_n_f32(acc[v], vld1q_f32(b + 4 * v), xs);
      acc[v] = vfmaq_n_f32(acc[v], vld1q_f32(c + 4 * v), ys);
    }
  }
#pragma GCC unroll 16
  for (int v = 0; v < NQK; ++v) vst1q_f32(out + 4 * v, acc[v]);
}

template <int R, bool TWO>
inline void rows_axpy_t(const float* __restrict alpha, const float* __restrict W, const float* __restrict V,
                        const float* __restrict P, const float* __restrict U, int64_t n, int64_t Dp,
                        float* __restrict out) {
  for (int64_t c0 = 0; c0 < Dp; c0 += CH) {
    float32x4_t acc[R][NQC];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NQC; ++v) acc[r][v] = vmulq_n_f32(vld1q_f32(out + r * Dp + c0 + 4 * v), alpha[r]);
    for (int64_t j = 0; j < n; ++j) {
      float32x4_t vr[NQC];
#pragma GCC unroll 4
      for (int v = 0; v < NQC; ++v) vr[v] = vld1q_f32(V + j * Dp + c0 + 4 * v);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const float wr = W[r * BKV + j];
#pragma GCC unroll 4
        for (int v = 0; v < NQC; ++v) acc[r][v] = vfmaq_n_f32(acc[r][v], vr[v], wr);
      }
      if (TWO) {
#pragma GCC unroll 4
        for (int v = 0; v < NQC; ++v) vr[v] = vld1q_f32(U + j * Dp + c0 + 4 * v);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const float pr = P[r * BKV + j];
#pragma GCC unroll 4
          for (int v = 0; v < NQC; ++v) acc[r][v] = vfmaq_n_f32(acc[r][v], vr[v], pr);
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NQC; ++v) vst1q_f32(out + r * Dp + c0 + 4 * v, acc[r][v]);
  }
}
#else
// out[j] = sum_d x[d] bT[d * BKV + j], j < BKV: one query row against the transposed key tile.
inline void row_dot(const float* __restrict x, const float* __restrict bT, int64_t D, float* __restrict out) {
  v8f acc[NVK];
#pragma GCC unroll 8
  for (int v = 0; v < NVK; ++v) acc[v] = bcast(0.0f);
  for (int64_t d = 0; d < D; ++d) {
    const v8f xv = bcast(x[d]);
    const float* __restrict b = bT + d * BKV;
#pragma GCC unroll 8
    for (int v = 0; v < NVK; ++v) acc[v] += xv * ld8(b + 8 * v);
  }
#pragma GCC unroll 8
  for (int v = 0; v < NVK; ++v) st8(out + 8 * v, acc[v]);
}

// out[j] = sum_d x[d] bT[d * BKV + j] + y[d] cT[d * BKV + j], j < BKV.
inline void row_dot2(const float* __restrict x, const float* __restrict bT, const float* __restrict y,
                     const float* __restrict cT, int64_t D, float* __restrict out) {
  v8f acc[NVK];
#pragma GCC unroll 8
  for (int v = 0; v < NVK; ++v) acc[v] = bcast(0.0f);
  for (int64_t d = 0; d < D; ++d) {
    const v8f xv = bcast(x[d]), yv = bcast(y[d]);
    const float* __restrict b = bT + d * BKV;
    const float* __restrict c = cT + d * BKV;
#pragma GCC unroll 8
    for (int v = 0; v < NVK; ++v) {
      acc[v] += xv * ld8(b + 8 * v);
      acc[v] += yv * ld8(c + 8 * v);
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < NVK; ++v) st8(out + 8 * v, acc[v]);
}

// Value side, R (<= 4) query rows at a time so that each loaded row of V serves R rows and the R x 2
// vector accumulators are independent (one row alone would be bound by the FMA latency chain):
//   out[r, 0:Dp] = alpha[r] out[r, :] + sum_{j<n} W[r, j] V[j, :]                     (TWO = false)
//   out[r, 0:Dp] = alpha[r] out[r, :] + sum_{j<n} (W[r, j] V[j, :] + P[r, j] U[j, :])  (TWO = true)
// W and P rows are BKV apart, out rows Dp apart, V and U rows Dp floats.
template <int R, bool TWO>
inline void rows_axpy_t(const float* __restrict alpha, const float* __restrict W, const float* __restrict V,
                        const float* __restrict P, const float* __restrict U, int64_t n, int64_t Dp,
                        float* __restrict out) {
  for (int64_t c0 = 0; c0 < Dp; c0 += CH) {
    v8f acc[R][NVC];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const v8f av = bcast(alpha[r]);
#pragma GCC unroll 2
      for (int v = 0; v < NVC; ++v) acc[r][v] = av * ld8(out + r * Dp + c0 + 8 * v);
    }
    for (int64_t j = 0; j < n; ++j) {
      v8f vr[NVC];
#pragma GCC unroll 2
      for (int v = 0; v < NVC; ++v) vr[v] = ld8(V + j * Dp + c0 + 8 * v);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const v8f wr = bcast(W[r * BKV + j]);
#pragma GCC unroll 2
        for (int v = 0; v < NVC; ++v) acc[r][v] += wr * vr[v];
      }
      if (TWO) {
#pragma GCC unroll 2
        for (int v = 0; v < NVC; ++v) vr[v] = ld8(U + j * Dp + c0 + 8 * v);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const v8f pr = bcast(P[r * BKV + j]);
#pragma GCC unroll 2
          for (int v = 0; v < NVC; ++v) acc[r][v] += pr * vr[v];
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int v = 0; v < NVC; ++v) st8(out + r * Dp + c0 + 8 * v, acc[r][v]);
  }
}
#endif

// rows_axpy_t over nr rows (any count), 4 at a time.
template <bool TWO>
inline void rows_axpy(int64_t nr, const float* alpha, const float* W, const float* V, const float* P, const float* U,
                      int64_t n, int64_t Dp, float* out) {
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4)
    rows_axpy_t<4, TWO>(alpha + r, W + r * BKV, V, P + r * BKV, U, n, Dp, out + r * Dp);
  const float* Pr = P + r * BKV;
  switch (nr - r) {
    case 3: rows_axpy_t<3, TWO>(alpha + r, W + r * BKV, V, Pr, U, n, Dp, out + r * Dp); break;
    case 2: rows_axpy_t<2, TWO>(alpha + r, W + r * BKV, V, Pr, U, n, Dp, out + r * Dp); break;
    case 1: rows_axpy_t<1, TWO>(alpha + r, W + r * BKV, V, Pr, U, n, Dp, out + r * Dp); break;
    default: break;
  }
}

template <typename T>
void run(const fwd_attention_dual_args& a) {
  const int64_t B = a.B, H = a.H, Hkv = a.Hkv, L = a.L, S = a.S, D = a.D, K = a.K;
  const int64_t G = H / Hkv;
  const int64_t Dp = (D + CH - 1) / CH * CH;
  const int64_t nqb = (L + BQ - 1) / BQ;
  const int64_t ntask = B * H * nqb;
  const int64_t strideQ = B * H * L * D, strideKV = B * Hkv * S * D;
  const int64_t shift = S - L;  // causal: query i attends key j iff j <= i + shift
  const T* q = (const T*)a.q;
  const T* k = (const T*)a.k;
  const T* v = (const T*)a.v;
  const T* q_dot = (const T*)a.q_dot;
  const T* k_dot = (const T*)a.k_dot;
  const T* v_dot = (const T*)a.v_dot;
  T* o = (T*)a.o;
  T* o_dot = (T*)a.o_dot;
  const float* mask = a.mask;
  const int64_t ms0 = a.mask_stride[0], ms1 = a.mask_stride[1], ms2 = a.mask_stride[2], ms3 = a.mask_stride[3];
  const bool causal = a.causal != 0;
  const float scale = a.scale;
  const bool has_qd = K > 0 && q_dot != nullptr, has_kd = K > 0 && k_dot != nullptr;
  const bool has_vd = K > 0 && v_dot != nullptr;
  const bool has_sd = has_qd || has_kd;  // the tangent scores are not identically zero

  // Per-thread workspace, allocated up front (no allocation, hence no exception, inside the parallel region).
  const int64_t n_qf = BQ * Dp, n_qdf = has_qd ? K * BQ * Dp : 0, n_kT = D * BKV, n_vf = BKV * Dp;
  const int64_t n_kdT = has_kd ? D * BKV : 0, n_vdf = has_vd ? BKV * Dp : 0, n_p = BQ * BKV;
  const int64_t n_sd = has_sd ? BQ * BKV : 0;
  const int64_t n_acc = BQ * Dp, n_b = K * BQ * Dp, n_c = K * BQ, n_row = 3 * BQ, n_o = Dp;
  const int64_t per = n_qf + n_qdf + n_kT + n_vf + n_kdT + n_vdf + n_p + n_sd + n_acc + n_b + n_c + n_row + n_o;
  // threads: at most one per task, and at least ~2^20 multiply-adds each (small calls stay serial)
  const double work = (double)B * H * L * S * D * (double)(2 + 4 * K);
  const int64_t by_work = std::max<int64_t>(1, (int64_t)std::min(work / (double)(1 << 20), 1e9));
  const int nt = (int)std::min<int64_t>(std::min<int64_t>(resolve_threads(a.num_threads), ntask), by_work);
  std::vector<float> workspace((size_t)(per * nt));

#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    float* w0 = workspace.data() + (size_t)tid * per;
    float* qf = w0;
    float* qdf = qf + n_qf;
    float* kT = qdf + n_qdf;
    float* vf = kT + n_kT;
    float* kdT = vf + n_vf;
    float* vdf = kdT + n_kdT;
    float* P = vdf + n_vdf;
    float* SD = P + n_p;  // w = p * sd for the rows of the task
    float* acc = SD + n_sd;
    float* bacc = acc + n_acc;
    float* cacc = bacc + n_b;
    float* mrow = cacc + n_c;
    float* lrow = mrow + BQ;
    float* alph = lrow + BQ;
    float* of = alph + BQ;

#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntask; ++t) {
      const int64_t qb = t % nqb, bh = t / nqb, b = bh / H, h = bh % H, hk = h / G;
      const int64_t i0 = qb * BQ, nq = std::min(BQ, L - i0);
      const int64_t qrow0 = bh * L + i0;  // row index of query i0 in (B*H*L, D)
      for (int64_t i = 0; i < nq; ++i) load_row(q + (qrow0 + i) * D, D, Dp, qf + i * Dp);
      if (has_qd)
        for (int64_t kk = 0; kk < K; ++kk)
          for (int64_t i = 0; i < nq; ++i)
            load_row(q_dot + kk * strideQ + (qrow0 + i) * D, D, Dp, qdf + (kk * BQ + i) * Dp);
      for (int64_t i = 0; i < nq; ++i) {
        mrow[i] = -INFINITY;
        lrow[i] = 0.0f;
      }
      memset(acc, 0, sizeof(float) * (size_t)(nq * Dp));
      for (int64_t kk = 0; kk < K; ++kk) {
        memset(bacc + kk * BQ * Dp, 0, sizeof(float) * (size_t)(nq * Dp));
        memset(cacc + kk * BQ, 0, sizeof(float) * (size_t)nq);
      }
      const int64_t kv0 = (b * Hkv + hk) * S;  // row index of key 0 in (B*Hkv*S, D)
      int64_t jend = S;
      if (causal) jend = std::min(S, i0 + nq + shift);  // keys past the last row's limit are never attended
      for (int64_t j0 = 0; j0 < jend; j0 += BKV) {
        const int64_t nk = std::min(BKV, jend - j0);
        load_transposed(k + (kv0 + j0) * D, nk, D, kT);
        for (int64_t j = 0; j < nk; ++j) load_row(v + (kv0 + j0 + j) * D, D, Dp, vf + j * Dp);
        // primal: scores, running max, p, l, a
        for (int64_t i = 0; i < nq; ++i) {
          float* s = P + i * BKV;
          row_dot(qf + i * Dp, kT, D, s);
          int64_t lim = nk;  // keys j0 + j with j < lim are attended
          if (causal) lim = std::max<int64_t>(0, std::min(nk, i0 + i + shift - j0 + 1));
          if (mask) {
            const float* mr = mask + b * ms0 + h * ms1 + (i0 + i) * ms2 + j0 * ms3;
            for (int64_t j = 0; j < lim; ++j) s[j] = s[j] * scale + mr[j * ms3];
          } else {
            for (int64_t j = 0; j < lim; ++j) s[j] *= scale;
          }
          for (int64_t j = lim; j < BKV; ++j) s[j] = -INFINITY;
          const float m_old = mrow[i], m_new = std::max(m_old, block_max(s));
          const float mu = m_new == -INFINITY ? 0.0f : m_new;  // every key so far masked: p = 0, not NaN
          const float alpha = exp_nonpos(m_old - mu);
          exp_block(s, mu);
          lrow[i] = lrow[i] * alpha + block_sum(s);
          mrow[i] = m_new;
          alph[i] = alpha;
        }
        rows_axpy<false>(nq, alph, P, vf, P, nullptr, nk, Dp, acc);
        // tangent streams, reusing kT / vf
        for (int64_t kk = 0; kk < K; ++kk) {
          const int64_t kd_off = kk * strideKV + (kv0 + j0) * D;
          if (has_kd) load_transposed(k_dot + kd_off, nk, D, kdT);
          if (has_vd)
            for (int64_t j = 0; j < nk; ++j) load_row(v_dot + kd_off + j * D, D, Dp, vdf + j * Dp);
          float* bo = bacc + kk * BQ * Dp;
          if (has_sd) {
            for (int64_t i = 0; i < nq; ++i) {
              float* w = SD + i * BKV;
              if (has_qd && has_kd)
                row_dot2(qdf + (kk * BQ + i) * Dp, kT, qf + i * Dp, kdT, D, w);
              else if (has_qd)
                row_dot(qdf + (kk * BQ + i) * Dp, kT, D, w);
              else
                row_dot(qf + i * Dp, kdT, D, w);
              const float* p = P + i * BKV;
              for (int64_t j = 0; j < BKV; ++j) w[j] = p[j] * (w[j] * scale);
              cacc[kk * BQ + i] = cacc[kk * BQ + i] * alph[i] + block_sum(w);
            }
            if (has_vd)
              rows_axpy<true>(nq, alph, SD, vf, P, vdf, nk, Dp, bo);
            else
              rows_axpy<false>(nq, alph, SD, vf, P, nullptr, nk, Dp, bo);
          } else if (has_vd) {
            rows_axpy<false>(nq, alph, P, vdf, P, nullptr, nk, Dp, bo);
          }
        }
      }
      // o = a / l, o_dot = b / l - (c / l) o; fully masked rows (l == 0) give zeros
      for (int64_t i = 0; i < nq; ++i) {
        const float l = lrow[i];
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        T* orow = o + (qrow0 + i) * D;
        for (int64_t d = 0; d < D; ++d) {
          of[d] = l > 0.0f ? acc[i * Dp + d] * inv : 0.0f;
          store_f32(orow + d, of[d]);
        }
        for (int64_t kk = 0; kk < K; ++kk) {
          T* od = o_dot + kk * strideQ + (qrow0 + i) * D;
          const float* bo = bacc + (kk * BQ + i) * Dp;
          if (l > 0.0f) {
            const float cl = cacc[kk * BQ + i] * inv;
            for (int64_t d = 0; d < D; ++d) store_f32(od + d, bo[d] * inv - cl * of[d]);
          } else {
            for (int64_t d = 0; d < D; ++d) store_f32(od + d, 0.0f);
          }
        }
      }
    }
  }
}

}  // namespace

void validate_attention_dual(const fwd_attention_dual_args& a) {
  // Each check names the offending argument and its value (the C API's contract, test_errors.cpp).
  const struct {
    int64_t v;
    const char* name;
  } dims[] = {{a.B, "B"}, {a.H, "H"}, {a.Hkv, "Hkv"}, {a.L, "L"}, {a.S, "S"}, {a.D, "D"}};
  for (const auto& d : dims) need(d.v > 0, FWD_ERR_SIZE, std::string(d.name) + " must be positive, got " + num(d.v));
  need(a.K >= 0, FWD_ERR_SIZE, "K (number of tangents) must be non-negative, got " + num(a.K));
  need(a.K < (int64_t)1 << 30, FWD_ERR_SIZE, "K is too large: " + num(a.K));
  need(a.H % a.Hkv == 0, FWD_ERR_SIZE,
       "H (" + num(a.H) + ") must be a multiple of Hkv (" + num(a.Hkv) + ") for grouped-query attention");
  need(a.dtype == FWD_F32 || a.dtype == FWD_BF16, FWD_ERR_ARG,
       "dtype must be FWD_F32 (0) or FWD_BF16 (1), got " + num(a.dtype));
  const struct {
    const void* p;
    const char* name;
  } ptrs[] = {{a.q, "q"}, {a.k, "k"}, {a.v, "v"}, {a.o, "o"}};
  for (const auto& p : ptrs) need(p.p != nullptr, FWD_ERR_NULL, std::string(p.name) + " is NULL");
  if (a.K > 0) {
    need(a.o_dot != nullptr, FWD_ERR_NULL, "o_dot is NULL but K = " + num(a.K));
  } else {
    need(!a.q_dot, FWD_ERR_ARG, "q_dot was given but K = 0");
    need(!a.k_dot, FWD_ERR_ARG, "k_dot was given but K = 0");
    need(!a.v_dot, FWD_ERR_ARG, "v_dot was given but K = 0");
  }
  if (a.mask)
    for (int d = 0; d < 4; ++d)
      need(a.mask_stride[d] >= 0, FWD_ERR_SIZE,
           "mask_stride[" + std::to_string(d) + "] must be non-negative, got " + num(a.mask_stride[d]));
  need(isfinite(a.scale), FWD_ERR_ARG, "scale must be finite, got " + std::to_string(a.scale));
  // element counts (and the largest mask index) must fit in int64
  const int64_t kk = a.K > 0 ? a.K : 1;
  bool ok = mul_ok(a.B, a.H) && mul_ok(a.B * a.H, a.L) && mul_ok(a.B * a.H * a.L, a.D) &&
            mul_ok(a.B * a.H * a.L * a.D, kk) && mul_ok(a.B, a.Hkv) && mul_ok(a.B * a.Hkv, a.S) &&
            mul_ok(a.B * a.Hkv * a.S, a.D) && mul_ok(a.B * a.Hkv * a.S * a.D, kk);
  need(ok, FWD_ERR_SIZE,
       "the tensor sizes overflow int64: K, B, H, Hkv, L, S, D = " + num(a.K) + ", " + num(a.B) + ", " + num(a.H) +
           ", " + num(a.Hkv) + ", " + num(a.L) + ", " + num(a.S) + ", " + num(a.D));
  if (a.mask) {
    const int64_t last[4] = {a.B - 1, a.H - 1, a.L - 1, a.S - 1};
    int64_t idx = 0;
    for (int d = 0; d < 4 && ok; ++d) {
      ok = mul_ok(last[d], a.mask_stride[d]) && last[d] * a.mask_stride[d] <= INT64_MAX - idx;
      if (ok) idx += last[d] * a.mask_stride[d];
    }
    need(ok, FWD_ERR_SIZE, "mask_stride: the largest mask index overflows int64 (strides " + num(a.mask_stride[0]) +
                               ", " + num(a.mask_stride[1]) + ", " + num(a.mask_stride[2]) + ", " +
                               num(a.mask_stride[3]) + ")");
  }
}

void attention_dual(const fwd_attention_dual_args& a) {
  validate_attention_dual(a);
  if (a.dtype == FWD_F32)
    run<float>(a);
  else
    run<uint16_t>(a);
}

}  // namespace fwdcore
