#include <string.h>
// fwd_attention_dual against a plain scalar loop in double: per (b, h, i), with kv head h / (H / Hkv),
//   s_j  = scale q.k_j + mask_ij (masked keys: causal j > i + S - L, or mask = -inf),  p = softmax(s)
//   o    = sum_j p_j v_j
//   o_dot = sum_j p_j (sd_j v_j + v_dot_j) - (sum_j p_j sd_j) o,   sd_j = scale (q_dot.k_j + q.k_dot_j)
// with rows whose every key is masked giving o = o_dot = 0, over shapes (query / key block edges, GQA,
// D up to 256), optional tangents, K = 0, masks with broadcast strides, causal, float32 / bfloat16 and
// thread counts; then the error codes of invalid arguments (which must write nothing).
#include "test_common.h"

namespace {

struct Case {
  const char* name;
  int64_t B, H, Hkv, L, S, D, K;
  bool qd = true, kd = true, vd = true;
  int mask = 0;  // 0 none, 1 padding (B,1,1,S) with -inf, 2 full (B,H,L,S) finite + some -inf, 3 (1,1,L,S) rows
  bool causal = false;
  int dtype = FWD_F32;
  int nt = 1;
  float scale = 0.0f;  // 0: 1/sqrt(D)
};

// A dense tensor held as float32 and bfloat16 bits; `val` is what the kernel sees for the dtype under test.
struct Tensor {
  std::vector<float> f;
  std::vector<uint16_t> b;
  std::vector<double> val;
  void init(int64_t n, ref::Rng& rng, int dtype) {
    f.resize((size_t)n);
    b.resize((size_t)n);
    val.resize((size_t)n);
    for (int64_t i = 0; i < n; ++i) {
      const float x = (float)rng.uniform(-1.5, 1.5);
      b[(size_t)i] = ref::f32_to_bf16_rne(x);
      f[(size_t)i] = dtype == FWD_BF16 ? ref::bf16_to_f32(b[(size_t)i]) : x;
      val[(size_t)i] = (double)f[(size_t)i];
    }
  }
  const void* ptr(int dtype) const { return dtype == FWD_BF16 ? (const void*)b.data() : (const void*)f.data(); }
};

struct Problem {
  Case c;
  Tensor q, k, v, qd, kd, vd;
  std::vector<float> mask;  // dense storage of the mask's own shape
  int64_t ms[4] = {0, 0, 0, 0};
  float scale = 1.0f;
};

Problem make_problem(const Case& c) {
  Problem P;
  P.c = c;
  ref::Rng rng((uint64_t)(c.B * 1000003 + c.H * 10007 + c.L * 101 + c.S * 13 + c.D + c.K * 7 + c.mask));
  const int dt = c.dtype;
  const int64_t nq = c.B * c.H * c.L * c.D, nkv = c.B * c.Hkv * c.S * c.D;
  P.q.init(nq, rng, dt);
  P.k.init(nkv, rng, dt);
  P.v.init(nkv, rng, dt);
  if (c.qd) P.qd.init(c.K * nq, rng, dt);
  if (c.kd) P.kd.init(c.K * nkv, rng, dt);
  if (c.vd) P.vd.init(c.K * nkv, rng, dt);
  P.scale = c.scale != 0.0f ? c.scale : (float)(1.0 / sqrt((double)c.D));
  if (c.mask == 1) {  // (B, 1, 1, S): batch b keeps its first S - b * S / 3 keys (at least one)
    P.mask.assign((size_t)(c.B * c.S), 0.0f);
    for (int64_t b = 0; b < c.B; ++b) {
      int64_t keep = c.S - b * (c.S / 3);
      if (keep < 1) keep = 1;
      for (int64_t j = keep; j < c.S; ++j) P.mask[(size_t)(b * c.S + j)] = -INFINITY;
    }
    P.ms[0] = c.S; P.ms[1] = 0; P.ms[2] = 0; P.ms[3] = 1;
  } else if (c.mask == 2) {  // (B, H, L, S) finite values, some -inf
    const int64_t n = c.B * c.H * c.L * c.S;
    P.mask.resize((size_t)n);
    for (int64_t i = 0; i < n; ++i) P.mask[(size_t)i] = rng.uniform(0, 1) < 0.2 ? -INFINITY : (float)rng.uniform(-2, 2);
    P.ms[0] = c.H * c.L * c.S; P.ms[1] = c.L * c.S; P.ms[2] = c.S; P.ms[3] = 1;
  } else if (c.mask == 3) {  // (1, 1, L, S) with every second query row fully masked
    P.mask.assign((size_t)(c.L * c.S), 0.0f);
    for (int64_t i = 0; i < c.L; i += 2)
      for (int64_t j = 0; j < c.S; ++j) P.mask[(size_t)(i * c.S + j)] = -INFINITY;
    P.ms[0] = 0; P.ms[1] = 0; P.ms[2] = c.S; P.ms[3] = 1;
  }
  return P;
}

// The scalar reference: o (B,H,L,D) and o_dot (K,B,H,L,D) in double.
void reference(const Problem& P, std::vector<double>& o, std::vector<double>& od) {
  const Case& c = P.c;
  const int64_t B = c.B, H = c.H, Hkv = c.Hkv, L = c.L, S = c.S, D = c.D, K = c.K, G = H / Hkv;
  const int64_t nq = B * H * L * D, nkv = B * Hkv * S * D;
  o.assign((size_t)nq, 0.0);
  od.assign((size_t)(K * nq), 0.0);
  std::vector<double> s((size_t)S), p((size_t)S), sd((size_t)S);
  std::vector<char> on((size_t)S);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / G;
      for (int64_t i = 0; i < L; ++i) {
        const double* qi = &P.q.val[(size_t)(((b * H + h) * L + i) * D)];
        double mx = -INFINITY;
        for (int64_t j = 0; j < S; ++j) {
          const double* kj = &P.k.val[(size_t)(((b * Hkv + hk) * S + j) * D)];
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += qi[d] * kj[d];
          double m = 0;
          if (c.mask) m = P.mask[(size_t)(b * P.ms[0] + h * P.ms[1] + i * P.ms[2] + j * P.ms[3])];
          on[(size_t)j] = !(c.causal && j > i + S - L) && m != -INFINITY;
          s[(size_t)j] = P.scale * dot + m;
          if (on[(size_t)j] && s[(size_t)j] > mx) mx = s[(size_t)j];
        }
        double l = 0;
        for (int64_t j = 0; j < S; ++j) {
          p[(size_t)j] = on[(size_t)j] ? exp(s[(size_t)j] - mx) : 0.0;
          l += p[(size_t)j];
        }
        if (l == 0) continue;  // every key masked: zeros
        for (int64_t j = 0; j < S; ++j) p[(size_t)j] /= l;
        double* oi = &o[(size_t)(((b * H + h) * L + i) * D)];
        for (int64_t j = 0; j < S; ++j)
          for (int64_t d = 0; d < D; ++d) oi[d] += p[(size_t)j] * P.v.val[(size_t)(((b * Hkv + hk) * S + j) * D + d)];
        for (int64_t kk = 0; kk < K; ++kk) {
          double csum = 0;
          for (int64_t j = 0; j < S; ++j) {
            const int64_t kvr = ((b * Hkv + hk) * S + j) * D;
            double t = 0;
            for (int64_t d = 0; d < D; ++d) {
              if (c.qd) t += P.qd.val[(size_t)(kk * nq + ((b * H + h) * L + i) * D + d)] * P.k.val[(size_t)(kvr + d)];
              if (c.kd) t += qi[d] * P.kd.val[(size_t)(kk * nkv + kvr + d)];
            }
            sd[(size_t)j] = P.scale * t;
            csum += p[(size_t)j] * sd[(size_t)j];
          }
          double* odi = &od[(size_t)(kk * nq + ((b * H + h) * L + i) * D)];
          for (int64_t j = 0; j < S; ++j) {
            const int64_t kvr = ((b * Hkv + hk) * S + j) * D;
            for (int64_t d = 0; d < D; ++d) {
              double t = sd[(size_t)j] * P.v.val[(size_t)(kvr + d)];
              if (c.vd) t += P.vd.val[(size_t)(kk * nkv + kvr + d)];
              odi[d] += p[(size_t)j] * t;
            }
          }
          for (int64_t d = 0; d < D; ++d) odi[d] -= csum * oi[d];
        }
      }
    }
}

fwd_attention_dual_args make_args(const Problem& P) {
  const Case& c = P.c;
  fwd_attention_dual_args a;
  memset(&a, 0, sizeof a);
  a.B = c.B; a.H = c.H; a.Hkv = c.Hkv; a.L = c.L; a.S = c.S; a.D = c.D; a.K = c.K;
  a.dtype = c.dtype;
  a.q = P.q.ptr(c.dtype); a.k = P.k.ptr(c.dtype); a.v = P.v.ptr(c.dtype);
  a.q_dot = c.qd && c.K ? P.qd.ptr(c.dtype) : nullptr;
  a.k_dot = c.kd && c.K ? P.kd.ptr(c.dtype) : nullptr;
  a.v_dot = c.vd && c.K ? P.vd.ptr(c.dtype) : nullptr;
  if (c.mask) {
    a.mask = P.mask.data();
    for (int d = 0; d < 4; ++d) a.mask_stride[d] = P.ms[d];
  }
  a.causal = c.causal;
  a.scale = P.scale;
  a.num_threads = c.nt;
  return a;
}

// Runs the kernel; outputs converted to double. Returns the status.
fwd_status run(const Problem& P, std::vector<double>& o, std::vector<double>& od, int nt = -100) {
  const Case& c = P.c;
  fwd_attention_dual_args a = make_args(P);
  if (nt != -100) a.num_threads = nt;
  const int64_t nq = c.B * c.H * c.L * c.D;
  std::vector<float> of((size_t)nq, NAN), odf((size_t)(c.K * nq), NAN);
  std::vector<uint16_t> ob((size_t)nq, 0x7fc0), odb((size_t)(c.K * nq), 0x7fc0);
  const bool bf = c.dtype == FWD_BF16;
  a.o = bf ? (void*)ob.data() : (void*)of.data();
  a.o_dot = c.K ? (bf ? (void*)odb.data() : (void*)odf.data()) : nullptr;
  const fwd_status st = fwd_attention_dual(&a);
  o.resize((size_t)nq);
  od.resize((size_t)(c.K * nq));
  for (int64_t i = 0; i < nq; ++i) o[(size_t)i] = bf ? ref::bf16_to_f32(ob[(size_t)i]) : of[(size_t)i];
  for (int64_t i = 0; i < c.K * nq; ++i) od[(size_t)i] = bf ? ref::bf16_to_f32(odb[(size_t)i]) : odf[(size_t)i];
  return st;
}

double rel_err(const std::vector<double>& got, const std::vector<double>& want, bool* finite) {
  double e = 0, n = 0;
  *finite = true;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!isfinite(got[i])) *finite = false;
    e += (got[i] - want[i]) * (got[i] - want[i]);
    n += want[i] * want[i];
  }
  return n == 0 ? sqrt(e) : sqrt(e / n);
}

void check_case(const Case& c) {
  g_context = c.name;
  const Problem P = make_problem(c);
  std::vector<double> o_ref, od_ref, o, od;
  reference(P, o_ref, od_ref);
  const fwd_status st = run(P, o, od);
  CHECK(st == FWD_OK, "status %d", (int)st);
  const double tol = c.dtype == FWD_BF16 ? 2e-2 : 1e-5;
  bool fin = true;
  const double eo = rel_err(o, o_ref, &fin);
  CHECK(fin, "o has non-finite values");
  CHECK(eo < tol, "o relative error %.3e", eo);
  if (c.K) {
    const double ed = rel_err(od, od_ref, &fin);
    CHECK(fin, "o_dot has non-finite values");
    CHECK(ed < tol, "o_dot relative error %.3e", ed);
  }
  // fully masked rows must be exact zeros
  if (c.mask == 3)
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t i = 0; i < c.L; i += 2)
          for (int64_t d = 0; d < c.D; ++d) {
            const size_t ix = (size_t)(((b * c.H + h) * c.L + i) * c.D + d);
            CHECK(o[ix] == 0.0, "fully masked row: o = %g", o[ix]);
            for (int64_t kk = 0; kk < c.K; ++kk)
              CHECK(od[(size_t)(kk * c.B * c.H * c.L * c.D) + ix] == 0.0, "fully masked row: o_dot != 0");
          }
  // the result does not depend on the thread count
  std::vector<double> o3, od3;
  CHECK(run(P, o3, od3, 3) == FWD_OK, "status with 3 threads");
  CHECK(o3 == o && od3 == od, "results differ between %d and 3 threads", c.nt);
  g_context = "";
}

void test_values() {
  const Case cases[] = {
      {"tiny", 1, 1, 1, 1, 1, 8, 1},
      {"basic", 2, 3, 3, 5, 5, 16, 3},
      {"gqa-s>l", 2, 4, 1, 5, 9, 24, 3},
      {"gqa2-blocks", 1, 4, 2, 33, 70, 64, 8},
      {"d256", 1, 2, 1, 9, 13, 256, 2},
      {"d8-long", 2, 3, 1, 65, 130, 8, 1},
      {"primal-only", 2, 3, 1, 33, 70, 24, 0, false, false, false},
      {"q-only", 2, 4, 2, 7, 9, 16, 3, true, false, false},
      {"k-only", 2, 4, 2, 7, 9, 16, 3, false, true, false},
      {"v-only", 2, 4, 2, 7, 9, 16, 3, false, false, true},
      {"no-tangent-K2", 1, 2, 2, 7, 9, 16, 2, false, false, false},  // K > 0 with zero tangents: o_dot = 0
      {"pad", 2, 4, 2, 33, 70, 16, 3, true, true, true, 1},
      {"pad-causal", 2, 4, 2, 33, 70, 16, 3, true, true, true, 1, true},
      {"full-mask", 2, 3, 3, 6, 9, 16, 2, true, true, true, 2},
      {"rows-masked", 2, 3, 1, 9, 70, 16, 2, true, true, true, 3},
      {"causal-s=l", 2, 2, 1, 40, 40, 32, 2, true, true, true, 0, true},
      {"causal-s<l", 1, 2, 1, 40, 7, 16, 2, true, true, true, 0, true},  // first 33 rows see no key
      {"causal-s>l", 1, 2, 2, 3, 100, 16, 2, true, true, true, 0, true},
      {"bf16", 2, 4, 2, 33, 70, 24, 3, true, true, true, 1, true, FWD_BF16},
      {"bf16-full-mask", 1, 2, 1, 5, 9, 64, 2, true, true, true, 2, false, FWD_BF16},
      {"threads2", 2, 4, 1, 70, 70, 16, 2, true, true, true, 1, true, FWD_F32, 2},
      {"scale", 1, 2, 1, 9, 13, 16, 2, true, true, true, 0, false, FWD_F32, 1, 0.37f},
  };
  for (const Case& c : cases) check_case(c);
}

#define EXPECT_CODE(call, want)                                                                          \
  do {                                                                                                   \
    const fwd_status st_ = (call);                                                                       \
    CHECK(st_ == (want), "%s returned %d, want %d (%s)", #call, (int)st_, (int)(want), #want);          \
    if ((want) != FWD_OK)                                                                                \
      CHECK(strncmp(fwd_last_error(), "fwd_attention_dual: ", 20) == 0 && strlen(fwd_last_error()) > 22, \
            "no message naming the problem: '%s'", fwd_last_error());                                    \
  } while (0)

void test_errors() {
  g_context = "errors";
  const Case c = {"err", 2, 4, 2, 5, 9, 16, 2, true, true, true, 1};
  const Problem P = make_problem(c);
  const int64_t nq = c.B * c.H * c.L * c.D;
  std::vector<float> o((size_t)nq, 7.0f), od((size_t)(c.K * nq), 7.0f);
  auto base = [&] {
    fwd_attention_dual_args a = make_args(P);
    a.o = o.data();
    a.o_dot = od.data();
    return a;
  };
  EXPECT_CODE(fwd_attention_dual(nullptr), FWD_ERR_NULL);
  struct Bad {
    const char* what;
    void (*edit)(fwd_attention_dual_args&);
    fwd_status want;
  };
  const Bad bads[] = {
      {"B = 0", [](fwd_attention_dual_args& a) { a.B = 0; }, FWD_ERR_SIZE},
      {"H < 0", [](fwd_attention_dual_args& a) { a.H = -4; }, FWD_ERR_SIZE},
      {"Hkv = 0", [](fwd_attention_dual_args& a) { a.Hkv = 0; }, FWD_ERR_SIZE},
      {"L = 0", [](fwd_attention_dual_args& a) { a.L = 0; }, FWD_ERR_SIZE},
      {"S = 0", [](fwd_attention_dual_args& a) { a.S = 0; }, FWD_ERR_SIZE},
      {"D = 0", [](fwd_attention_dual_args& a) { a.D = 0; }, FWD_ERR_SIZE},
      {"K < 0", [](fwd_attention_dual_args& a) { a.K = -1; }, FWD_ERR_SIZE},
      {"K huge", [](fwd_attention_dual_args& a) { a.K = (int64_t)1 << 40; }, FWD_ERR_SIZE},
      {"H % Hkv", [](fwd_attention_dual_args& a) { a.Hkv = 3; }, FWD_ERR_SIZE},
      {"sizes overflow", [](fwd_attention_dual_args& a) { a.L = (int64_t)1 << 60; }, FWD_ERR_SIZE},
      {"dtype", [](fwd_attention_dual_args& a) { a.dtype = 2; }, FWD_ERR_ARG},
      {"dtype < 0", [](fwd_attention_dual_args& a) { a.dtype = -1; }, FWD_ERR_ARG},
      {"q NULL", [](fwd_attention_dual_args& a) { a.q = nullptr; }, FWD_ERR_NULL},
      {"k NULL", [](fwd_attention_dual_args& a) { a.k = nullptr; }, FWD_ERR_NULL},
      {"v NULL", [](fwd_attention_dual_args& a) { a.v = nullptr; }, FWD_ERR_NULL},
      {"o NULL", [](fwd_attention_dual_args& a) { a.o = nullptr; }, FWD_ERR_NULL},
      {"o_dot NULL with K > 0", [](fwd_attention_dual_args& a) { a.o_dot = nullptr; }, FWD_ERR_NULL},
      {"tangent with K = 0", [](fwd_attention_dual_args& a) { a.K = 0; }, FWD_ERR_ARG},
      {"negative mask stride", [](fwd_attention_dual_args& a) { a.mask_stride[2] = -1; }, FWD_ERR_SIZE},
      {"scale NaN", [](fwd_attention_dual_args& a) { a.scale = NAN; }, FWD_ERR_ARG},
      {"scale inf", [](fwd_attention_dual_args& a) { a.scale = INFINITY; }, FWD_ERR_ARG},
  };
  for (const Bad& b : bads) {
    g_context = b.what;
    fwd_attention_dual_args a = base();
    b.edit(a);
    EXPECT_CODE(fwd_attention_dual(&a), b.want);
  }
  g_context = "errors";
  bool untouched = true;
  for (float x : o) untouched = untouched && x == 7.0f;
  for (float x : od) untouched = untouched && x == 7.0f;
  CHECK(untouched, "a failing fwd_attention_dual wrote its outputs");
  // valid corner cases: K = 0 without tangents and o_dot = NULL; negative num_threads (OpenMP default)
  {
    fwd_attention_dual_args a = base();
    a.K = 0;
    a.q_dot = a.k_dot = a.v_dot = nullptr;
    a.o_dot = nullptr;
    EXPECT_CODE(fwd_attention_dual(&a), FWD_OK);
    a = base();
    a.num_threads = -3;
    EXPECT_CODE(fwd_attention_dual(&a), FWD_OK);
    a.mask = nullptr;
    a.mask_stride[0] = -5;  // ignored without a mask
    EXPECT_CODE(fwd_attention_dual(&a), FWD_OK);
  }
  g_context = "";
}

}  // namespace

int main() {
  test_values();
  test_errors();
  return test_summary("test_attention_dual");
}
