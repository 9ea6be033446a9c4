// The small dual ops of a transformer block on the CPU: LayerNorm / RMSNorm, elementwise activations, the
// gated (SwiGLU) activation, rotary embedding and the softmax cross-entropy, each computing the primal and
// its K tangent streams in one call (formulas in fwdcore.h).
//
// Shape of the work: every op is memory-bound on its (K, rows, d) tangent. The primal-sized derivative
// coefficients (f'(x), the normalised row x̂, softmax rows) are computed once per block of the primal and
// applied to all K streams while the block is hot in cache, so each tangent element is read once (twice
// for the norms: the row statistics mean(x_dot), mean(x̂ x_dot) need a pass before the update) and
// written once, instead of the several passes and temporaries a composite of framework ops makes.
#include <math.h>
#include <string.h>

#include <string>
#include <vector>

#include "internal.h"

// Build note: the core is compiled with -fno-trapping-math (CMakeLists.txt and setup.py add it). Without
// it GCC turns `v = v < lo ? lo : v; w = v * c` into a branch (it will not speculate a float multiply that
// might raise an exception), and none of the elementwise loops below vectorise (~20x slower here). The
// core never reads the floating-point exception flags, and the option changes no result. (A
// `#pragma GCC optimize("no-trapping-math")` in this file is no substitute: measured ~20x slower, it
// resets more of the command line's code generation than the one option.)

namespace fwdcore {

namespace {

// n * K must be addressable; every size positive (K >= 0).
void need_sizes(int64_t n, int64_t K, const char* n_name) {
  need(n > 0, FWD_ERR_SIZE, std::string(n_name) + " must be positive, got " + num(n));
  need(K >= 0, FWD_ERR_SIZE, "K (number of tangents) must be non-negative, got " + num(K));
  need(K < (int64_t)1 << 30, FWD_ERR_SIZE, "K is too large: " + num(K));
  need(K == 0 || n <= INT64_MAX / 4 / K, FWD_ERR_SIZE,
       "K * " + std::string(n_name) + " = " + num(K) + " * " + num(n) + " overflows");
}
// K = 0: no tangent may be given. K > 0: y_dot is required.
void need_tangents(int64_t K, std::initializer_list<std::pair<const char*, const void*>> tangents, const void* y_dot) {
  if (K == 0) {
    for (auto& t : tangents)
      need(t.second == nullptr, FWD_ERR_ARG, std::string(t.first) + " was given but K = 0 (primal only)");
  } else {
    need(y_dot != nullptr, FWD_ERR_NULL, "y_dot is NULL but K = " + num(K));
  }
}

template <typename T>
inline float ld(const T* p, int64_t i) { return to_f32(p[i]); }
template <typename T>
inline float round_to(float v) { return v; }
template <>
inline float round_to<uint16_t>(float v) { return to_f32(f32_to_bf16(v)); }

#ifdef _OPENMP
#define FWD_PRAGMA(x) _Pragma(#x)
#define FWD_OMP_FOR(nt, cond) FWD_PRAGMA(omp parallel for schedule(static) num_threads(nt) if (cond))
#else
#define FWD_OMP_FOR(nt, cond)
#endif

// Work per tangent element is small: run serially below ~64k elements (thread start-up costs more).
constexpr int64_t kParallelMin = 1 << 16;

template <typename T>
inline void load_block(const T* src, int64_t len, float* dst) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) dst[i] = ld(src, i);
}
template <typename T>
inline void store_block(const float* src, int64_t len, T* dst) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) store_f32(dst + i, src[i]);
}

// ---------------------------------------------------------------------------------------------------
// norms

template <typename T>
void norm_run(const fwd_norm_dual_args& a, bool rms) {
  const int64_t R = a.rows, d = a.d, K = a.K, n = R * d;
  const int nt = resolve_threads(a.num_threads);
  const T* x = (const T*)a.x;
  const T* xd = (const T*)a.x_dot;
  const T* wd = (const T*)a.weight_dot;
  const T* bd = (const T*)a.bias_dot;
  T* y = (T*)a.y;
  T* yd = (T*)a.y_dot;
  // float copies of the affine parameters, and per thread one row of x̂ (h) and of w / sigma: computed
  // once per row, then applied to the row's K tangent streams. Allocated here: nothing may throw inside
  // the parallel region.
  std::vector<float> w(d, 1.0f), b(d, 0.0f), buf((size_t)nt * 2 * d);
  if (a.weight) load_block((const T*)a.weight, d, w.data());
  if (a.bias) load_block((const T*)a.bias, d, b.data());
  const bool d1 = rms && d == 1;
  FWD_OMP_FOR(nt, (K + 1) * n > kParallelMin)
  for (int64_t r = 0; r < R; ++r) {
#ifdef _OPENMP
    float* h = buf.data() + (size_t)omp_get_thread_num() * 2 * d;
#else
    float* h = buf.data();
#endif
    float* ws = h + d;
    load_block(x + r * d, d, h);
    // Two-pass statistics in double: robust to rows with a large common offset, where E[x^2] - E[x]^2
    // would cancel.
    double m = 0.0;
    if (!rms) {
      for (int64_t i = 0; i < d; ++i) m += h[i];
      m /= (double)d;
    }
    double v = 0.0;
    for (int64_t i = 0; i < d; ++i) v += ((double)h[i] - m) * ((double)h[i] - m);
    const float rstd = (float)(1.0 / sqrt(v / (double)d + (double)a.eps)), m0 = (float)m;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      h[i] = (h[i] - m0) * rstd;
      // LlamaRMSNorm: h cast to the input dtype, then times the weight (rounded again)
      store_f32(y + r * d + i, rms ? w[i] * round_to<T>(h[i]) : h[i] * w[i] + b[i]);
    }
    // d = 1 RMSNorm: x_dot - h mean(h x_dot) = x_dot eps / (x^2 + eps) exactly; the general form cancels.
    const float c1 = d1 ? a.eps * rstd * rstd * rstd : rstd;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) ws[i] = w[i] * c1;
    for (int64_t k = 0; k < K; ++k) {
      const T* xdr = xd ? xd + (k * R + r) * d : nullptr;
      const T* wdk = wd ? wd + k * d : nullptr;
      const T* bdk = bd ? bd + k * d : nullptr;
      T* ydr = yd + (k * R + r) * d;
      float m1 = 0.0f, m2 = 0.0f;
      if (xdr && !d1) {
        float s1 = 0.0f, s2 = 0.0f;
#pragma omp simd reduction(+ : s1, s2)
        for (int64_t i = 0; i < d; ++i) {
          const float t = ld(xdr, i);
          s1 += t;
          s2 += h[i] * t;
        }
        m1 = rms ? 0.0f : s1 / (float)d;
        m2 = s2 / (float)d;
      }
      // y_dot = (x_dot - m1 - h m2) w / sigma + w_dot h + b_dot; branches hoisted out of the loops
      if (xdr) {
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) {
          float o = (ld(xdr, i) - m1 - h[i] * m2) * ws[i];
          if (wdk) o += ld(wdk, i) * h[i];
          if (bdk) o += ld(bdk, i);
          store_f32(ydr + i, o);
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) {
          float o = 0.0f;
          if (wdk) o += ld(wdk, i) * h[i];
          if (bdk) o += ld(bdk, i);
          store_f32(ydr + i, o);
        }
      }
    }
  }
}

void norm_validate(const fwd_norm_dual_args& a, bool rms) {
  need(a.rows > 0 && a.d > 0, FWD_ERR_SIZE, "rows and d must be positive, got " + num(a.rows) + ", " + num(a.d));
  need(a.rows <= INT64_MAX / a.d, FWD_ERR_SIZE, "rows * d overflows");
  need_sizes(a.rows * a.d, a.K, "rows * d");
  need_dtype(a.dtype, "dtype");
  need(a.x != nullptr && a.y != nullptr, FWD_ERR_NULL, "x and y must not be NULL");
  need(a.eps >= 0.0f, FWD_ERR_ARG, "eps must be non-negative (and not NaN), got " + std::to_string(a.eps));
  if (rms) need(a.bias == nullptr && a.bias_dot == nullptr, FWD_ERR_ARG, "RMSNorm has no bias: bias and bias_dot must be NULL");
  need(!(a.weight_dot && !a.weight), FWD_ERR_ARG, "weight_dot was given but weight is NULL");
  need(!(a.bias_dot && !a.bias), FWD_ERR_ARG, "bias_dot was given but bias is NULL");
  need_tangents(a.K, {{"x_dot", a.x_dot}, {"weight_dot", a.weight_dot}, {"bias_dot", a.bias_dot}}, a.y_dot);
  need(a.y != a.x, FWD_ERR_ARG, "y must not alias x");
}

template <typename F>
void by_dtype(int dtype, F&& f) {
  if (dtype == FWD_F32)
    f(float());
  else
    f(uint16_t());
}

// ---------------------------------------------------------------------------------------------------
// elementwise

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kGeluC = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

// ---- vectorisable float math. libm's expf / erfcf are scalar calls (~20 ns each here): they would cost
// more than streaming the K tangents. These are branch-free (selects only), so the block loops below
// compile to SIMD on AVX2 and NEON, and do not depend on the platform's libm: the x86 and aarch64 builds
// agree to the last bit on the activations and the loss, and within an ulp or two where vector width
// (reduction order) or FMA contraction differ (make test-arm's golden comparison).

// exp(x), relative error ~2 ulp; x clamped to [-87.3, 88.4] (2^-126 .. 2^127.5: results stay finite, normal).
inline float vexp(float x) {
  x = x < -87.33654f ? -87.33654f : x;
  x = x > 88.37626f ? 88.37626f : x;
  const float n = (float)(int)(x * 1.44269504f + (x >= 0.0f ? 0.5f : -0.5f));  // round(x / ln 2)
  float r = x - n * 0.693359375f;  // Cody-Waite: ln 2 = 0.693359375 - 2.12194440e-4 (first part exact)
  r = r + n * 2.12194440e-4f;
  // Cephes expf polynomial on |r| <= ln2 / 2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  union { uint32_t u; float f; } sc;
  sc.u = (uint32_t)((int)n + 127) << 23;
  return p * sc.f;
}

// σ(x) and 1 - σ(x), both without cancellation or overflow for any x.
inline void sigmoid2(float x, float& s, float& oms) {
  const float e = vexp(-fabsf(x));
  const float q = 1.0f / (1.0f + e);
  s = x >= 0.0f ? q : e * q;
  oms = x >= 0.0f ? e * q : q;
}

// erfc(z) with relative error < 1.2e-7 for all z in exact arithmetic (Numerical Recipes' erfcc, a
// Chebyshev fit of erfc(z) exp(z^2)); evaluated in float: a few ulp, growing like z^2 eps in the far tail.
inline float verfc(float z) {
  const float a = fabsf(z);
  const float t = 1.0f / (1.0f + 0.5f * a);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const float ans = t * vexp(p - a * a);
  return z >= 0.0f ? ans : 2.0f - ans;
}

// tanh(x) and 1 - tanh(x)^2 = 4 e / (1 + e)^2 with e = exp(-2|x|) (no cancellation); a Taylor series
// below |x| = 0.25, where (1 - e) / (1 + e) loses bits.
inline void vtanh2(float x, float& th, float& sech2) {
  const float a = fabsf(x);
  const float e = vexp(-2.0f * a);
  const float q = 1.0f / (1.0f + e);
  const float big = (1.0f - e) * q;
  const float x2 = a * a;
  const float small = a * (1.0f + x2 * (-0.333333333f + x2 * (0.133333333f + x2 * (-0.053968254f + x2 * 0.021869488f))));
  const float m = a < 0.25f ? small : big;
  th = x >= 0.0f ? m : -m;
  sech2 = 4.0f * e * q * q;
}

// y = f(x) and f'(x) over a block (loops with one activation each, so they vectorise).
void act_block(int act, int64_t len, const float* x, float* y, float* g) {
  switch (act) {
    case FWD_ACT_GELU:
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const float cdf = 0.5f * verfc(-x[i] * kSqrtHalf);
        y[i] = x[i] * cdf;
        g[i] = cdf + x[i] * vexp(-0.5f * x[i] * x[i]) * kInvSqrt2Pi;
      }
      break;
    case FWD_ACT_GELU_TANH:
      // ½(1 + tanh u) = σ(2u),  1 - tanh² u = 4 σ(2u)(1 - σ(2u))
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const float x2 = x[i] * x[i];
        float s, oms;
        sigmoid2(2.0f * kGeluC * x[i] * (1.0f + kGeluA * x2), s, oms);
        y[i] = x[i] * s;
        g[i] = s + 2.0f * x[i] * s * oms * kGeluC * (1.0f + 3.0f * kGeluA * x2);
      }
      break;
    case FWD_ACT_SILU:
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        float s, oms;
        sigmoid2(x[i], s, oms);
        y[i] = x[i] * s;
        g[i] = s * (1.0f + x[i] * oms);
      }
      break;
    default:  // FWD_ACT_TANH
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) vtanh2(x[i], y[i], g[i]);
  }
}

constexpr int64_t kBlock = 512;  // primal elements per block: coefficients stay in L1 across the K streams

template <typename T>
void activation_run(int act, int64_t n, int64_t K, const T* x, const T* xd, T* y, T* yd, int nt) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  FWD_OMP_FOR(nt, (K + 1) * n > kParallelMin)
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t i0 = blk * kBlock, len = n - i0 < kBlock ? n - i0 : kBlock;
    float xb[kBlock], yb[kBlock], g[kBlock];
    load_block(x + i0, len, xb);
    act_block(act, len, xb, yb, g);
    store_block(yb, len, y + i0);
    for (int64_t k = 0; k < K; ++k) {
      T* o = yd + k * n + i0;
      if (!xd) {
        memset(o, 0, sizeof(T) * len);
        continue;
      }
      const T* s = xd + k * n + i0;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) store_f32(o + i, ld(s, i) * g[i]);
    }
  }
}

template <typename T>
void gated_run(int64_t n, int64_t K, const T* gate, const T* gd, const T* up, const T* ud, T* y, T* yd, int nt) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  FWD_OMP_FOR(nt, (K + 1) * n > kParallelMin)
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t i0 = blk * kBlock, len = n - i0 < kBlock ? n - i0 : kBlock;
    float cg[kBlock], cu[kBlock], ub[kBlock];  // y_dot = cg * gate_dot + cu * up_dot
    load_block(gate + i0, len, cg);
    load_block(up + i0, len, ub);
    act_block(FWD_ACT_SILU, len, cg, cu, cg);  // cu = silu(gate), cg = silu'(gate) (in place: elementwise)
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      store_f32(y + i0 + i, cu[i] * ub[i]);
      cg[i] *= ub[i];
    }
    for (int64_t k = 0; k < K; ++k) {
      T* o = yd + k * n + i0;
      const T* g = gd ? gd + k * n + i0 : nullptr;
      const T* u = ud ? ud + k * n + i0 : nullptr;
      // o may alias g or u element-wise: each element is read before it is written.
      if (g && u) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) store_f32(o + i, cg[i] * ld(g, i) + cu[i] * ld(u, i));
      } else if (g) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) store_f32(o + i, cg[i] * ld(g, i));
      } else if (u) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) store_f32(o + i, cu[i] * ld(u, i));
      } else {
        memset(o, 0, sizeof(T) * len);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// rotary

template <typename T>
void rotary_run(const fwd_rotary_dual_args& a) {
  const int64_t B = a.B, H = a.H, L = a.L, D = a.D, K = a.K, h2 = D / 2;
  const int nt = resolve_threads(a.num_threads);
  const T* x = (const T*)a.x;
  const T* xd = (const T*)a.x_dot;
  const T* cs = (const T*)a.cos;
  const T* sn = (const T*)a.sin;
  T* y = (T*)a.y;
  T* yd = (T*)a.y_dot;
  const int64_t rows = B * H * L;
  // Row t of stream k (k = -1: the primal), rotated into the dense output row.
  auto rot = [&](const T* src, const T* c, const T* s, T* dst) {
#pragma omp simd
    for (int64_t i = 0; i < h2; ++i) {
      const float x1 = ld(src, i), x2 = ld(src, h2 + i);
      store_f32(dst + i, x1 * ld(c, i) - x2 * ld(s, i));
      store_f32(dst + h2 + i, x2 * ld(c, h2 + i) + x1 * ld(s, h2 + i));
    }
  };
  FWD_OMP_FOR(nt, (K + 1) * rows * D > kParallelMin)
  for (int64_t t = 0; t < (K + 1) * rows; ++t) {
    const int64_t k = t / rows - 1, row = t % rows;
    const int64_t l = row % L, bh = row / L, h = bh % H, b = bh / H;
    const int64_t co = b * a.cs_stride[0] + h * a.cs_stride[1] + l * a.cs_stride[2];
    if (k < 0) {
      rot(x + b * a.x_stride[0] + h * a.x_stride[1] + l * a.x_stride[2], cs + co, sn + co, y + row * D);
    } else if (xd) {
      const int64_t* s = a.x_dot_stride;
      rot(xd + k * s[0] + b * s[1] + h * s[2] + l * s[3], cs + co, sn + co, yd + (k * rows + row) * D);
    } else {
      memset(yd + (k * rows + row) * D, 0, sizeof(T) * D);
    }
  }
}

void rotary_validate(const fwd_rotary_dual_args& a) {
  need(a.B > 0 && a.H > 0 && a.L > 0 && a.D > 0, FWD_ERR_SIZE,
       "B, H, L, D must be positive, got " + num(a.B) + ", " + num(a.H) + ", " + num(a.L) + ", " + num(a.D));
  need(a.D % 2 == 0, FWD_ERR_SIZE, "D must be even (rotate_half splits it in two), got " + num(a.D));
  need(a.B <= INT64_MAX / a.H && a.B * a.H <= INT64_MAX / a.L && a.B * a.H * a.L <= INT64_MAX / a.D, FWD_ERR_SIZE,
       "B * H * L * D overflows");
  need_sizes(a.B * a.H * a.L * a.D, a.K, "B * H * L * D");
  need_dtype(a.dtype, "dtype");
  need(a.x && a.cos && a.sin && a.y, FWD_ERR_NULL, "x, cos, sin and y must not be NULL");
  need_tangents(a.K, {{"x_dot", a.x_dot}}, a.y_dot);
  for (int i = 0; i < 3; ++i) {
    need(a.x_stride[i] >= 0, FWD_ERR_SIZE, "x_stride[" + num(i) + "] must be non-negative, got " + num(a.x_stride[i]));
    need(a.cs_stride[i] >= 0, FWD_ERR_SIZE, "cs_stride[" + num(i) + "] must be non-negative, got " + num(a.cs_stride[i]));
  }
  if (a.x_dot)
    for (int i = 0; i < 4; ++i)
      need(a.x_dot_stride[i] >= 0, FWD_ERR_SIZE,
           "x_dot_stride[" + num(i) + "] must be non-negative, got " + num(a.x_dot_stride[i]));
  need(a.y != a.x && (a.y_dot == nullptr || a.y_dot != a.x_dot), FWD_ERR_ARG, "rotary outputs must not alias inputs");
}

// ---------------------------------------------------------------------------------------------------
// cross-entropy

constexpr int64_t kCeRows = 8;  // rows per task; partial sums are combined in task order (deterministic)

template <typename T>
void cross_entropy_run(int64_t N, int64_t C, int64_t K, const T* lg, const T* lgd, const int64_t* labels,
                       int64_t ignore_index, float* loss, float* loss_dot, int nt) {
  int64_t n_valid = 0;
  for (int64_t r = 0; r < N; ++r) {
    const int64_t lab = labels[r];
    if (lab == ignore_index) continue;
    need(lab >= 0 && lab < C, FWD_ERR_ARG,
         "labels[" + num(r) + "] = " + num(lab) + " is outside [0, " + num(C) + ") and is not ignore_index (" +
             num(ignore_index) + ")");
    ++n_valid;
  }
  if (n_valid == 0) {
    *loss = 0.0f;
    for (int64_t k = 0; k < K; ++k) loss_dot[k] = 0.0f;
    return;
  }
  const int64_t ntask = (N + kCeRows - 1) / kCeRows;
  // part[task * (K + 1)]: the task's loss sum, then its K tangent sums (double).
  std::vector<double> part(ntask * (K + 1), 0.0);
  // One softmax row per thread, allocated here: nothing may throw inside the parallel region.
  std::vector<float> rowbuf((size_t)nt * C);
  FWD_OMP_FOR(nt, (K + 1) * N * C > kParallelMin)
  for (int64_t task = 0; task < ntask; ++task) {
#ifdef _OPENMP
    float* p = rowbuf.data() + (size_t)omp_get_thread_num() * C;
#else
    float* p = rowbuf.data();
#endif
    double* acc = part.data() + task * (K + 1);
    const int64_t r1 = (task + 1) * kCeRows < N ? (task + 1) * kCeRows : N;
    for (int64_t r = task * kCeRows; r < r1; ++r) {
      const int64_t lab = labels[r];
      if (lab == ignore_index) continue;
      const T* row = lg + r * C;
      float m = -INFINITY;
#pragma omp simd reduction(max : m)
      for (int64_t c = 0; c < C; ++c) m = m > ld(row, c) ? m : ld(row, c);
      // Sums over a vocabulary (C ~ 50k) in double: a float sum's relative error (~1e-5 there) rescales
      // every p_c but not the one-hot term, and the jvp sum_c (p_c - [c = label]) l_dot_c cancels
      // (measured: 2.5e-4 relative jvp error through SmolLM2's head with float sums, 1.6e-5 with double).
      double se = 0.0;
#pragma omp simd reduction(+ : se)
      for (int64_t c = 0; c < C; ++c) {
        p[c] = vexp(ld(row, c) - m);
        se += (double)p[c];
      }
      const double lse = (double)m + log(se);
      acc[0] += lse - (double)ld(row, lab);
      if (!lgd) continue;
      const float inv = (float)(1.0 / se);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) p[c] *= inv;
      p[lab] -= 1.0f;  // the row's gradient p - onehot
      for (int64_t k = 0; k < K; ++k) {
        const T* dr = lgd + (k * N + r) * C;
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int64_t c = 0; c < C; ++c) s += (double)(p[c] * ld(dr, c));
        acc[1 + k] += s;
      }
    }
  }
  double l = 0.0;
  std::vector<double> ldot(K, 0.0);
  for (int64_t task = 0; task < ntask; ++task) {
    l += part[task * (K + 1)];
    for (int64_t k = 0; k < K; ++k) ldot[k] += part[task * (K + 1) + 1 + k];
  }
  *loss = (float)(l / (double)n_valid);
  for (int64_t k = 0; k < K; ++k) loss_dot[k] = (float)(ldot[k] / (double)n_valid);
}

}  // namespace
}  // namespace fwdcore

using namespace fwdcore;

extern "C" {

fwd_status fwd_layer_norm_dual(const fwd_norm_dual_args* args) {
  return guarded_call("fwd_layer_norm_dual", [&] {
    need(args != nullptr, FWD_ERR_NULL, "args is NULL");
    norm_validate(*args, false);
    by_dtype(args->dtype, [&](auto t) { norm_run<decltype(t)>(*args, false); });
  });
}

fwd_status fwd_rms_norm_dual(const fwd_norm_dual_args* args) {
  return guarded_call("fwd_rms_norm_dual", [&] {
    need(args != nullptr, FWD_ERR_NULL, "args is NULL");
    norm_validate(*args, true);
    by_dtype(args->dtype, [&](auto t) { norm_run<decltype(t)>(*args, true); });
  });
}

fwd_status fwd_activation_dual(int act, int64_t n, int64_t K, int dtype, const void* x, const void* x_dot, void* y,
                               void* y_dot, int num_threads) {
  return guarded_call("fwd_activation_dual", [&] {
    need(act >= FWD_ACT_GELU && act <= FWD_ACT_TANH, FWD_ERR_ARG,
         "act must be FWD_ACT_GELU (0), FWD_ACT_GELU_TANH (1), FWD_ACT_SILU (2) or FWD_ACT_TANH (3), got " + num(act));
    need_sizes(n, K, "n");
    need_dtype(dtype, "dtype");
    need(x != nullptr && y != nullptr, FWD_ERR_NULL, "x and y must not be NULL");
    need_tangents(K, {{"x_dot", x_dot}}, y_dot);
    by_dtype(dtype, [&](auto t) {
      using T = decltype(t);
      activation_run<T>(act, n, K, (const T*)x, (const T*)x_dot, (T*)y, (T*)y_dot, resolve_threads(num_threads));
    });
  });
}

fwd_status fwd_gated_act_dual(int64_t n, int64_t K, int dtype, const void* gate, const void* gate_dot, const void* up,
                              const void* up_dot, void* y, void* y_dot, int num_threads) {
  return guarded_call("fwd_gated_act_dual", [&] {
    need_sizes(n, K, "n");
    need_dtype(dtype, "dtype");
    need(gate != nullptr && up != nullptr && y != nullptr, FWD_ERR_NULL, "gate, up and y must not be NULL");
    need_tangents(K, {{"gate_dot", gate_dot}, {"up_dot", up_dot}}, y_dot);
    by_dtype(dtype, [&](auto t) {
      using T = decltype(t);
      gated_run<T>(n, K, (const T*)gate, (const T*)gate_dot, (const T*)up, (const T*)up_dot, (T*)y, (T*)y_dot,
                   resolve_threads(num_threads));
    });
  });
}

fwd_status fwd_rotary_dual(const fwd_rotary_dual_args* args) {
  return guarded_call("fwd_rotary_dual", [&] {
    need(args != nullptr, FWD_ERR_NULL, "args is NULL");
    rotary_validate(*args);
    by_dtype(args->dtype, [&](auto t) { rotary_run<decltype(t)>(*args); });
  });
}

fwd_status fwd_cross_entropy_dual(int64_t N, int64_t C, int64_t K, int dtype, const void* logits,
                                  const void* logits_dot, const int64_t* labels, int64_t ignore_index, float* loss,
                                  float* loss_dot, int num_threads) {
  return guarded_call("fwd_cross_entropy_dual", [&] {
    need(N > 0 && C > 0, FWD_ERR_SIZE, "N and C must be positive, got " + num(N) + ", " + num(C));
    need(N <= INT64_MAX / C, FWD_ERR_SIZE, "N * C overflows");
    need_sizes(N * C, K, "N * C");
    need_dtype(dtype, "dtype");
    need(logits && labels && loss, FWD_ERR_NULL, "logits, labels and loss must not be NULL");
    if (K == 0)
      need(logits_dot == nullptr, FWD_ERR_ARG, "logits_dot was given but K = 0 (primal only)");
    else
      need(loss_dot != nullptr, FWD_ERR_NULL, "loss_dot is NULL but K = " + num(K));
    by_dtype(dtype, [&](auto t) {
      using T = decltype(t);
      cross_entropy_run<T>(N, C, K, (const T*)logits, (const T*)logits_dot, labels, ignore_index, loss, loss_dot,
                           resolve_threads(num_threads));
    });
  });
}

}  // extern "C"
