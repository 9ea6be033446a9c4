// The small dual ops of the C API (fwd_layer_norm_dual, fwd_rms_norm_dual, fwd_activation_dual,
// fwd_gated_act_dual, fwd_rotary_dual, fwd_cross_entropy_dual) against plain scalar loops in double,
// written here from the formulas (derivatives by hand, not shared with the core), on odd shapes, float32
// and bfloat16, with and without each tangent, in place, and across thread counts (bit-identical).
#include <math.h>

#include <functional>

#include "test_common.h"

using ref::bf16_to_f32;
using ref::f32_to_bf16_rne;

namespace {

// A tensor stored in dtype with its exact (double) values: the reference sees what the kernel sees.
struct Buf {
  int dtype;
  std::vector<float> f;
  std::vector<uint16_t> h;
  Buf(int dt, size_t n) : dtype(dt) {
    if (dt == FWD_F32) f.assign(n, 0.0f); else h.assign(n, 0);
  }
  size_t size() const { return dtype == FWD_F32 ? f.size() : h.size(); }
  void* ptr() { return dtype == FWD_F32 ? (void*)f.data() : (void*)h.data(); }
  double at(size_t i) const { return dtype == FWD_F32 ? (double)f[i] : (double)bf16_to_f32(h[i]); }
  void set(size_t i, double v) {
    if (dtype == FWD_F32) f[i] = (float)v; else h[i] = f32_to_bf16_rne((float)v);
  }
  bool same_bits(const Buf& o) const { return f == o.f && h == o.h; }
};

Buf randbuf(int dt, size_t n, ref::Rng& g, double lo = -2.0, double hi = 2.0) {
  Buf b(dt, n);
  for (size_t i = 0; i < n; ++i) b.set(i, g.uniform(lo, hi));
  return b;
}

// relative error ||got - want|| / ||want|| (absolute when want is 0)
double relerr(const Buf& got, const std::vector<double>& want) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (got.at(i) - want[i]) * (got.at(i) - want[i]);
    den += want[i] * want[i];
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

double tol(int dt) { return dt == FWD_F32 ? 2e-6 : 8e-3; }
const char* dtname(int dt) { return dt == FWD_F32 ? "f32" : "bf16"; }
const int kDtypes[] = {FWD_F32, FWD_BF16};

// ---------------------------------------------------------------------------------------------------
// norms

struct NormCase {
  int64_t rows, d, K;
  bool rms, w, b, xdot, wdot, bdot, inplace;
};

void run_norm(const NormCase& c, int dt, ref::Rng& g) {
  g_context = "";
  std::string ctx = strf("%s rows=%lld d=%lld K=%lld w=%d b=%d xdot=%d wdot=%d bdot=%d inplace=%d %s",
                         c.rms ? "rms" : "layer", (long long)c.rows, (long long)c.d, (long long)c.K, c.w, c.b, c.xdot,
                         c.wdot, c.bdot, c.inplace, dtname(dt));
  g_context = ctx.c_str();
  const int64_t R = c.rows, d = c.d, K = c.K, n = R * d;
  const double eps = c.rms ? 1e-6 : 1e-5;
  Buf x = randbuf(dt, n, g, -1.5, 2.5);  // a common offset: the mean matters
  Buf xd = randbuf(dt, K * n, g), w = randbuf(dt, d, g, 0.5, 1.5), b = randbuf(dt, d, g);
  Buf wd = randbuf(dt, K * d, g), bd = randbuf(dt, K * d, g);
  Buf y(dt, n), yd(dt, K * n);
  fwd_norm_dual_args a;
  memset(&a, 0, sizeof a);
  a.rows = R; a.d = d; a.K = K; a.dtype = dt; a.eps = (float)eps;
  a.x = x.ptr();
  a.x_dot = c.xdot ? xd.ptr() : nullptr;
  a.weight = c.w ? w.ptr() : nullptr;
  a.bias = c.b ? b.ptr() : nullptr;
  a.weight_dot = c.wdot ? wd.ptr() : nullptr;
  a.bias_dot = c.bdot ? bd.ptr() : nullptr;
  a.y = y.ptr();
  a.y_dot = K ? (c.inplace ? xd.ptr() : yd.ptr()) : nullptr;
  a.num_threads = 2;
  Buf xd_in = xd;
  fwd_status st = c.rms ? fwd_rms_norm_dual(&a) : fwd_layer_norm_dual(&a);
  CHECK(st == FWD_OK, "%s", fwd_last_error());
  // reference in double
  std::vector<double> ry(n), ryd(K * n);
  for (int64_t r = 0; r < R; ++r) {
    double mu = 0, var = 0;
    if (!c.rms) {
      for (int64_t i = 0; i < d; ++i) mu += x.at(r * d + i);
      mu /= d;
    }
    for (int64_t i = 0; i < d; ++i) var += (x.at(r * d + i) - mu) * (x.at(r * d + i) - mu);
    var /= d;
    const double rstd = 1.0 / sqrt(var + eps);
    std::vector<double> h(d);
    for (int64_t i = 0; i < d; ++i) {
      h[i] = (x.at(r * d + i) - mu) * rstd;
      const double wi = c.w ? w.at(i) : 1.0;
      ry[r * d + i] = h[i] * wi + (c.b ? b.at(i) : 0.0);
    }
    for (int64_t k = 0; k < K; ++k) {
      // the jvp of the row map by its definition: d/dt f(x + t x_dot, w + t w_dot, b + t b_dot) at t=0
      double m1 = 0, m2 = 0;
      for (int64_t i = 0; i < d; ++i) {
        const double v = c.xdot ? xd_in.at((k * R + r) * d + i) : 0.0;
        m1 += v;
        m2 += h[i] * v;
      }
      m1 = c.rms ? 0.0 : m1 / d;
      m2 /= d;
      for (int64_t i = 0; i < d; ++i) {
        const double v = c.xdot ? xd_in.at((k * R + r) * d + i) : 0.0;
        double hd;
        if (c.rms) {
          // h = x / sqrt(mean(x^2) + eps): dh = v / s - x (mean(x v)) / s^3, s = sqrt(mean(x^2) + eps)
          double mxv = 0;
          for (int64_t j = 0; j < d; ++j) mxv += x.at(r * d + j) * (c.xdot ? xd_in.at((k * R + r) * d + j) : 0.0);
          mxv /= d;
          hd = v * rstd - x.at(r * d + i) * mxv * rstd * rstd * rstd;
        } else {
          hd = (v - m1 - h[i] * m2) * rstd;
        }
        const double wi = c.w ? w.at(i) : 1.0;
        ryd[(k * R + r) * d + i] = hd * wi + (c.wdot ? wd.at(k * d + i) * h[i] : 0.0) + (c.bdot ? bd.at(k * d + i) : 0.0);
      }
    }
  }
  double e = relerr(y, ry);
  // RMSNorm rounds h to dtype before the weight (HF semantics): one extra rounding in bf16
  CHECK(e <= tol(dt) * (c.rms && dt == FWD_BF16 ? 2 : 1), "primal relerr %.3g", e);
  if (K) {
    const Buf& out = c.inplace ? xd : yd;
    e = relerr(out, ryd);
    CHECK(e <= tol(dt) * (dt == FWD_F32 && d > 1 ? 10 : 1), "tangent relerr %.3g", e);
    // thread count does not change a bit
    Buf y1(dt, n), yd1(dt, K * n);
    a.x_dot = c.xdot ? xd_in.ptr() : nullptr;
    a.y = y1.ptr();
    a.y_dot = yd1.ptr();
    a.num_threads = 1;
    st = c.rms ? fwd_rms_norm_dual(&a) : fwd_layer_norm_dual(&a);
    CHECK(st == FWD_OK && y1.same_bits(y) && yd1.same_bits(out), "1 thread differs from 2");
  }
  g_context = "";
}

void test_norms() {
  ref::Rng g(11);
  const int64_t shapes[][2] = {{1, 1}, {3, 7}, {5, 33}, {2, 384}, {40, 65}};
  for (int dt : kDtypes)
    for (auto& s : shapes)
      for (int64_t K : {0, 1, 3})
        for (int rms = 0; rms < 2; ++rms)
          for (int mask = 0; mask < 32; ++mask) {
            NormCase c{s[0], s[1], K, (bool)rms, (bool)(mask & 1), (bool)(mask & 2), (bool)(mask & 4),
                       (bool)(mask & 8), (bool)(mask & 16), false};
            if (rms && (c.b)) continue;                      // RMSNorm has no bias
            if ((c.wdot && !c.w) || (c.bdot && !c.b)) continue;
            if (K == 0 && (c.xdot || c.wdot || c.bdot)) continue;
            run_norm(c, dt, g);
            if (K && c.xdot && mask % 3 == 0) {
              c.inplace = true;
              run_norm(c, dt, g);
            }
          }
}

// ---------------------------------------------------------------------------------------------------
// activations

double act_ref(int act, double x, double* dy) {
  switch (act) {
    case FWD_ACT_GELU: {
      const double cdf = 0.5 * erfc(-x / sqrt(2.0)), pdf = exp(-0.5 * x * x) / sqrt(2 * M_PI);
      *dy = cdf + x * pdf;
      return x * cdf;
    }
    case FWD_ACT_GELU_TANH: {
      // ½(1 + tanh u) = 1 / (1 + e^(-2u)) and 1 - tanh² u = 1 / cosh² u: no cancellation in the tails
      const double c = sqrt(2 / M_PI), u = c * (x + 0.044715 * x * x * x), h = 1 / (1 + exp(-2 * u));
      *dy = h + 0.5 * x / (cosh(u) * cosh(u)) * c * (1 + 3 * 0.044715 * x * x);
      return x * h;
    }
    case FWD_ACT_SILU: {
      const double s = 1 / (1 + exp(-x));
      *dy = s + x * s * (1 - s);
      return x * s;
    }
    default: {
      *dy = 1 / (cosh(x) * cosh(x));
      return tanh(x);
    }
  }
}

void test_activations() {
  ref::Rng g(12);
  for (int dt : kDtypes)
    for (int act = 0; act < 4; ++act)
      for (int64_t n : {1, 7, 513, 2000})
        for (int64_t K : {0, 1, 3})
          for (int variant = 0; variant < 3; ++variant) {  // 0: x_dot, 1: in place, 2: no x_dot
            if (K == 0 && variant) continue;
            std::string ctx = strf("act=%d n=%lld K=%lld variant=%d %s", act, (long long)n, (long long)K, variant, dtname(dt));
            g_context = ctx.c_str();
            Buf x = randbuf(dt, n, g, -5, 5), xd = randbuf(dt, K * n, g), y(dt, n), yd(dt, K * n);
            Buf xd_in = xd;
            void* out = variant == 1 ? xd.ptr() : yd.ptr();
            fwd_status st = fwd_activation_dual(act, n, K, dt, x.ptr(), variant == 2 || K == 0 ? nullptr : xd.ptr(), y.ptr(),
                                                K ? out : nullptr, 3);
            CHECK(st == FWD_OK, "%s", fwd_last_error());
            std::vector<double> ry(n), ryd(K * n);
            for (int64_t i = 0; i < n; ++i) {
              double dy;
              ry[i] = act_ref(act, x.at(i), &dy);
              for (int64_t k = 0; k < K; ++k) ryd[k * n + i] = variant == 2 ? 0.0 : dy * xd_in.at(k * n + i);
            }
            double e = relerr(y, ry);
            CHECK(e <= tol(dt), "primal relerr %.3g", e);
            if (K) {
              e = relerr(variant == 1 ? xd : yd, ryd);
              CHECK(e <= tol(dt), "tangent relerr %.3g", e);
            }
          }
  g_context = "";
}

// Element by element over a dense sweep of [-12, 12] in float32: the primal within 1e-5 relative (tails
// included: erfc / exp / tanh must not cancel; values below 1e-30 may be flushed to ~1e-37 by the exp
// clamp), the derivative (bounded, O(1)) within 1e-6 absolute.
void test_activation_sweep() {
  const int64_t n = 48001;
  std::vector<float> x(n), y(n), g(n);
  for (int64_t i = 0; i < n; ++i) x[i] = -12.0f + 24.0f * (float)i / (float)(n - 1);
  for (int act = 0; act < 4; ++act) {
    std::vector<float> ones(n, 1.0f);
    CHECK(fwd_activation_dual(act, n, 1, FWD_F32, x.data(), ones.data(), y.data(), g.data(), 1) == FWD_OK, "%s",
          fwd_last_error());
    int bad_y = 0, bad_g = 0;
    for (int64_t i = 0; i < n; ++i) {
      double dy;
      const double ry = act_ref(act, x[i], &dy);
      CHECK_LIMITED(bad_y, fabs(y[i] - ry) <= 1e-5 * fabs(ry) + 1e-30, "act %d x=%.7g y=%.9g want %.9g", act, x[i], y[i], ry);
      CHECK_LIMITED(bad_g, fabs(g[i] - dy) <= 1e-6, "act %d x=%.7g dy=%.9g want %.9g", act, x[i], g[i], dy);
    }
  }
}

void test_gated() {
  ref::Rng g(13);
  for (int dt : kDtypes)
    for (int64_t n : {1, 9, 1100})
      for (int64_t K : {0, 2})
        for (int mask = 0; mask < 4; ++mask)
          for (int place = 0; place < 3; ++place) {  // output: 0 separate, 1 into gate_dot, 2 into up_dot
            const bool hg = mask & 1, hu = mask & 2;
            if (K == 0 && (hg || hu || place)) continue;
            if ((place == 1 && !hg) || (place == 2 && !hu)) continue;
            std::string ctx = strf("gated n=%lld K=%lld gd=%d ud=%d place=%d %s", (long long)n, (long long)K, hg, hu, place,
                                   dtname(dt));
            g_context = ctx.c_str();
            Buf ga = randbuf(dt, n, g, -4, 4), up = randbuf(dt, n, g), gd = randbuf(dt, K * n, g), ud = randbuf(dt, K * n, g);
            Buf y(dt, n), yd(dt, K * n), gd0 = gd, ud0 = ud;
            void* out = place == 1 ? gd.ptr() : place == 2 ? ud.ptr() : yd.ptr();
            fwd_status st = fwd_gated_act_dual(n, K, dt, ga.ptr(), hg ? gd.ptr() : nullptr, up.ptr(), hu ? ud.ptr() : nullptr,
                                               y.ptr(), K ? out : nullptr, 2);
            CHECK(st == FWD_OK, "%s", fwd_last_error());
            std::vector<double> ry(n), ryd(K * n), scale(K * n);
            for (int64_t i = 0; i < n; ++i) {
              double ds;
              const double s = act_ref(FWD_ACT_SILU, ga.at(i), &ds);
              ry[i] = s * up.at(i);
              // silu'(g) = s (1 + g (1 - s)) has a root near g = -1.28 where its two terms cancel in any
              // finite precision: errors are measured against the size of the terms, not of the sum.
              const double sig = 1 / (1 + exp(-ga.at(i)));
              const double terms = sig + fabs(ga.at(i)) * sig * (1 - sig);
              for (int64_t k = 0; k < K; ++k) {
                ryd[k * n + i] = (hg ? ds * up.at(i) * gd0.at(k * n + i) : 0.0) + (hu ? s * ud0.at(k * n + i) : 0.0);
                scale[k * n + i] = (hg ? terms * fabs(up.at(i) * gd0.at(k * n + i)) : 0.0) + (hu ? fabs(s * ud0.at(k * n + i)) : 0.0);
              }
            }
            double e = relerr(y, ry);
            CHECK(e <= tol(dt), "primal relerr %.3g", e);
            if (K) {
              const Buf& out = place == 1 ? gd : place == 2 ? ud : yd;
              double num = 0, den = 0;
              for (int64_t i = 0; i < K * n; ++i) {
                num += (out.at(i) - ryd[i]) * (out.at(i) - ryd[i]);
                den += scale[i] * scale[i];
              }
              e = den > 0 ? sqrt(num / den) : sqrt(num);
              CHECK(e <= tol(dt), "tangent error / term size %.3g", e);
            }
          }
  g_context = "";
}

// ---------------------------------------------------------------------------------------------------
// rotary: x stored (B, L, H, D) and read as (B, H, L, D) through strides; cos/sin (B, L, D) broadcast
// over heads (stride 0); x_dot stored (K, B, L, H, D) likewise.

void test_rotary() {
  ref::Rng g(14);
  for (int dt : kDtypes)
    for (int64_t K : {0, 1, 3})
      for (int bcast_b = 0; bcast_b < 2; ++bcast_b)
        for (int has_xd = 0; has_xd < 2; ++has_xd) {
          if (K == 0 && has_xd) continue;
          const int64_t B = 2, H = 3, L = 5, D = 10, n = B * H * L * D;
          std::string ctx = strf("rotary K=%lld bcast_b=%d xdot=%d %s", (long long)K, bcast_b, has_xd, dtname(dt));
          g_context = ctx.c_str();
          Buf x = randbuf(dt, n, g), xd = randbuf(dt, K * n, g);
          const int64_t Bc = bcast_b ? 1 : B;
          Buf cs(dt, Bc * L * D), sn(dt, Bc * L * D);
          for (int64_t i = 0; i < Bc * L * D; ++i) {
            const double ang = g.uniform(-3, 3);
            cs.set(i, cos(ang));
            sn.set(i, sin(ang));
          }
          Buf y(dt, n), yd(dt, K * n);
          fwd_rotary_dual_args a;
          memset(&a, 0, sizeof a);
          a.B = B; a.H = H; a.L = L; a.D = D; a.K = K; a.dtype = dt;
          a.x = x.ptr();
          a.x_stride[0] = L * H * D; a.x_stride[1] = D; a.x_stride[2] = H * D;
          a.x_dot = has_xd ? xd.ptr() : nullptr;
          a.x_dot_stride[0] = n; a.x_dot_stride[1] = L * H * D; a.x_dot_stride[2] = D; a.x_dot_stride[3] = H * D;
          a.cos = cs.ptr(); a.sin = sn.ptr();
          a.cs_stride[0] = bcast_b ? 0 : L * D; a.cs_stride[1] = 0; a.cs_stride[2] = D;
          a.y = y.ptr(); a.y_dot = K ? yd.ptr() : nullptr;
          a.num_threads = 2;
          fwd_status st = fwd_rotary_dual(&a);
          CHECK(st == FWD_OK, "%s", fwd_last_error());
          std::vector<double> ry(n), ryd(K * n);
          const int64_t h2 = D / 2;
          for (int64_t b = 0; b < B; ++b)
            for (int64_t h = 0; h < H; ++h)
              for (int64_t l = 0; l < L; ++l)
                for (int64_t i = 0; i < D; ++i) {
                  const int64_t cidx = (bcast_b ? 0 : b) * L * D + l * D + i;
                  auto src = [&](const Buf& t, int64_t k, int64_t j) { return t.at(k * n + ((b * L + l) * H + h) * D + j); };
                  // rotate_half(x)[i] = -x[i + D/2] for i < D/2, x[i - D/2] otherwise
                  auto f = [&](const Buf& t, int64_t k) {
                    const double rh = i < h2 ? -src(t, k, i + h2) : src(t, k, i - h2);
                    return src(t, k, i) * cs.at(cidx) + rh * sn.at(cidx);
                  };
                  const int64_t o = ((b * H + h) * L + l) * D + i;
                  ry[o] = f(x, 0);
                  for (int64_t k = 0; k < K; ++k) ryd[k * n + o] = has_xd ? f(xd, k) : 0.0;
                }
          double e = relerr(y, ry);
          CHECK(e <= tol(dt), "primal relerr %.3g", e);
          if (K) {
            e = relerr(yd, ryd);
            CHECK(e <= tol(dt), "tangent relerr %.3g", e);
          }
        }
  g_context = "";
}

// ---------------------------------------------------------------------------------------------------
// cross-entropy

// aarch64 GCC 12 crashes (an internal compiler error in vect_transform_reduction) vectorising this
// function's double reductions; it is test code, scalar is fine.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-vectorize")))
#endif
void test_cross_entropy() {
  ref::Rng g(15);
  const int64_t shapes[][2] = {{1, 1}, {7, 11}, {33, 5}, {20, 1000}};
  for (int dt : kDtypes)
    for (auto& s : shapes)
      for (int64_t K : {0, 1, 4})
        for (int ign = 0; ign < 3; ++ign) {  // 0: none ignored, 1: some, 2: all
          const int64_t N = s[0], C = s[1];
          std::string ctx = strf("ce N=%lld C=%lld K=%lld ign=%d %s", (long long)N, (long long)C, (long long)K, ign, dtname(dt));
          g_context = ctx.c_str();
          Buf lg = randbuf(dt, N * C, g, -6, 6), lgd = randbuf(dt, K * N * C, g);
          std::vector<int64_t> lab(N);
          for (int64_t r = 0; r < N; ++r) {
            lab[r] = (int64_t)(g.next() % (uint64_t)C);
            if (ign == 2 || (ign == 1 && r % 3 == 1)) lab[r] = -100;
          }
          float loss = -1, loss1 = -1;
          std::vector<float> ldot(K + 1, -1.0f), ldot1(K + 1, -1.0f);
          fwd_status st = fwd_cross_entropy_dual(N, C, K, dt, lg.ptr(), K ? lgd.ptr() : nullptr, lab.data(), -100, &loss,
                                                 ldot.data(), 2);
          CHECK(st == FWD_OK, "%s", fwd_last_error());
          double rl = 0;
          std::vector<double> rd(K, 0.0);
          int64_t nv = 0;
          for (int64_t r = 0; r < N; ++r) {
            if (lab[r] == -100) continue;
            ++nv;
            double m = -INFINITY, se = 0;
            for (int64_t c = 0; c < C; ++c) m = fmax(m, lg.at(r * C + c));
            for (int64_t c = 0; c < C; ++c) se += exp(lg.at(r * C + c) - m);
            rl += m + log(se) - lg.at(r * C + lab[r]);
            for (int64_t k = 0; k < K; ++k)
              for (int64_t c = 0; c < C; ++c)
                rd[k] += (exp(lg.at(r * C + c) - m) / se - (c == lab[r])) * lgd.at((k * N + r) * C + c);
          }
          if (nv) {
            rl /= nv;
            for (auto& v : rd) v /= nv;
          }
          CHECK(fabs(loss - rl) <= 1e-5 * (1 + fabs(rl)), "loss %.9g vs %.9g", loss, rl);
          double num = 0, den = 0;
          for (int64_t k = 0; k < K; ++k) {
            num += (ldot[k] - rd[k]) * (ldot[k] - rd[k]);
            den += rd[k] * rd[k];
          }
          CHECK(sqrt(num) <= 1e-5 * (1 + sqrt(den)), "loss_dot err %.3g (norm %.3g)", sqrt(num), sqrt(den));
          CHECK(ldot[K] == -1.0f, "wrote past loss_dot[K-1]");
          st = fwd_cross_entropy_dual(N, C, K, dt, lg.ptr(), K ? lgd.ptr() : nullptr, lab.data(), -100, &loss1, ldot1.data(), 1);
          CHECK(st == FWD_OK && loss1 == loss && memcmp(ldot.data(), ldot1.data(), K * sizeof(float)) == 0,
                "1 thread differs from 2");
        }
  g_context = "";
}

// ---------------------------------------------------------------------------------------------------
// errors: a status, a message naming the argument, nothing written, nothing aborted

void expect_err(fwd_status st, fwd_status want, const char* needle, const char* what) {
  CHECK(st == want, "%s: status %d, want %d (%s)", what, (int)st, (int)want, fwd_last_error());
  CHECK(strstr(fwd_last_error(), needle) != nullptr, "%s: message '%s' lacks '%s'", what, fwd_last_error(), needle);
}

void test_errors() {
  float x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, xd[16] = {0}, y[8], yd[16], w[4] = {1, 1, 1, 1};
  fwd_norm_dual_args a;
  memset(&a, 0, sizeof a);
  a.rows = 2; a.d = 4; a.K = 2; a.dtype = FWD_F32; a.eps = 1e-5f;
  a.x = x; a.x_dot = xd; a.y = y; a.y_dot = yd;
  CHECK(fwd_layer_norm_dual(&a) == FWD_OK, "%s", fwd_last_error());
  expect_err(fwd_layer_norm_dual(nullptr), FWD_ERR_NULL, "args", "null args");
  fwd_norm_dual_args b = a; b.x = nullptr;
  expect_err(fwd_layer_norm_dual(&b), FWD_ERR_NULL, "x", "null x");
  b = a; b.d = 0;
  expect_err(fwd_layer_norm_dual(&b), FWD_ERR_SIZE, "d must be positive", "d = 0");
  b = a; b.rows = -3;
  expect_err(fwd_rms_norm_dual(&b), FWD_ERR_SIZE, "rows", "rows < 0");
  b = a; b.K = -1;
  expect_err(fwd_layer_norm_dual(&b), FWD_ERR_SIZE, "K", "K < 0");
  b = a; b.dtype = 7;
  expect_err(fwd_layer_norm_dual(&b), FWD_ERR_ARG, "dtype", "dtype 7");
  b = a; b.eps = -1.0f;
  expect_err(fwd_layer_norm_dual(&b), FWD_ERR_ARG, "eps", "eps < 0");
  b = a; b.eps = NAN;
  expect_err(fwd_layer_norm_dual(&b), FWD_ERR_ARG, "eps", "eps NaN");
  b = a; b.bias = w;
  expect_err(fwd_rms_norm_dual(&b), FWD_ERR_ARG, "bias", "rms bias");
  b = a; b.weight_dot = w;
  expect_err(fwd_layer_norm_dual(&b), FWD_ERR_ARG, "weight_dot", "weight_dot without weight");
  b = a; b.K = 0;
  expect_err(fwd_layer_norm_dual(&b), FWD_ERR_ARG, "x_dot", "K = 0 with x_dot");
  b = a; b.y_dot = nullptr;
  expect_err(fwd_layer_norm_dual(&b), FWD_ERR_NULL, "y_dot", "null y_dot");
  b = a; b.rows = (int64_t)1 << 40; b.d = (int64_t)1 << 40;
  expect_err(fwd_layer_norm_dual(&b), FWD_ERR_SIZE, "overflows", "rows * d overflow");

  expect_err(fwd_activation_dual(9, 8, 2, FWD_F32, x, xd, y, yd, 1), FWD_ERR_ARG, "act", "act 9");
  expect_err(fwd_activation_dual(FWD_ACT_SILU, 0, 2, FWD_F32, x, xd, y, yd, 1), FWD_ERR_SIZE, "n must be positive", "n = 0");
  expect_err(fwd_activation_dual(FWD_ACT_SILU, 8, 2, FWD_BF16 + 5, x, xd, y, yd, 1), FWD_ERR_ARG, "dtype", "dtype");
  expect_err(fwd_activation_dual(FWD_ACT_SILU, 8, 2, FWD_F32, nullptr, xd, y, yd, 1), FWD_ERR_NULL, "x", "null x");
  expect_err(fwd_activation_dual(FWD_ACT_SILU, 8, 0, FWD_F32, x, xd, y, nullptr, 1), FWD_ERR_ARG, "x_dot", "K=0 x_dot");
  expect_err(fwd_gated_act_dual(8, 2, FWD_F32, x, xd, nullptr, nullptr, y, yd, 1), FWD_ERR_NULL, "up", "null up");
  expect_err(fwd_gated_act_dual(8, 1, FWD_F32, x, xd, x, nullptr, y, nullptr, 1), FWD_ERR_NULL, "y_dot", "null y_dot");

  fwd_rotary_dual_args r;
  memset(&r, 0, sizeof r);
  r.B = 1; r.H = 1; r.L = 2; r.D = 4; r.K = 0; r.dtype = FWD_F32;
  r.x = x; r.x_stride[0] = 8; r.x_stride[1] = 8; r.x_stride[2] = 4;
  r.cos = w; r.sin = w; r.y = y;
  CHECK(fwd_rotary_dual(&r) == FWD_OK, "%s", fwd_last_error());
  fwd_rotary_dual_args r2 = r; r2.D = 3;
  expect_err(fwd_rotary_dual(&r2), FWD_ERR_SIZE, "D must be even", "odd D");
  r2 = r; r2.x_stride[2] = -4;
  expect_err(fwd_rotary_dual(&r2), FWD_ERR_SIZE, "x_stride[2]", "negative stride");
  r2 = r; r2.cos = nullptr;
  expect_err(fwd_rotary_dual(&r2), FWD_ERR_NULL, "cos", "null cos");
  r2 = r; r2.H = 0;
  expect_err(fwd_rotary_dual(&r2), FWD_ERR_SIZE, "must be positive", "H = 0");

  int64_t lab[2] = {1, 5};
  float loss, ldot[2];
  expect_err(fwd_cross_entropy_dual(2, 4, 2, FWD_F32, x, xd, lab, -100, &loss, ldot, 1), FWD_ERR_ARG, "labels[1] = 5",
             "label out of range");
  lab[1] = -7;
  expect_err(fwd_cross_entropy_dual(2, 4, 2, FWD_F32, x, xd, lab, -100, &loss, ldot, 1), FWD_ERR_ARG, "labels[1] = -7",
             "negative label");
  lab[1] = 0;
  expect_err(fwd_cross_entropy_dual(2, 0, 2, FWD_F32, x, xd, lab, -100, &loss, ldot, 1), FWD_ERR_SIZE, "C", "C = 0");
  expect_err(fwd_cross_entropy_dual(2, 4, 2, FWD_F32, x, xd, nullptr, -100, &loss, ldot, 1), FWD_ERR_NULL, "labels", "null labels");
  expect_err(fwd_cross_entropy_dual(2, 4, 2, FWD_F32, x, xd, lab, -100, &loss, nullptr, 1), FWD_ERR_NULL, "loss_dot", "null loss_dot");
  CHECK(fwd_cross_entropy_dual(2, 4, 2, FWD_F32, x, xd, lab, -100, &loss, ldot, 1) == FWD_OK, "%s", fwd_last_error());
}

}  // namespace

int main() {
  test_norms();
  test_activations();
  test_activation_sweep();
  test_gated();
  test_rotary();
  test_cross_entropy();
  test_errors();
  return test_summary("test_dual_ops");
}
