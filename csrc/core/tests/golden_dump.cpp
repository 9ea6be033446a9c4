// Cross-architecture golden check of the fwdcore C API.
//
//   golden_dump dump FILE            run every entry point on fixed small odd shapes, write FILE
//   golden_dump compare REF TEST     compare two dumps (e.g. x86 REF, aarch64 TEST); exit 1 on a mismatch
//
// A dump is text: a header line per quantity "@ name kind count tol" followed by its values in hex, 8 a
// line. Kinds: u32 and u64 (compared bit for bit), f32 and bf16 (IEEE bits; tol 0: bit for bit, else
// max_i |test_i - ref_i| <= tol * max_i |ref_i|, non-finite values must match). The tolerance is the
// dumper's, read from REF. Inputs are generated from integers (exact in float32 / bfloat16), so both
// machines feed every kernel identical bits.
//
// Adding an entry point: write one `static void dump_xxx(Dump& d)` that calls it and records its
// outputs with d.u32 / d.u64 / d.f32 / d.bf16, and add it to kEntries. Only fwdcore.h is used.
#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <map>
#include <string>
#include <vector>

#include "fwdcore.h"

namespace {

// Tolerances (relative to the largest |reference| value of the quantity).
constexpr double kTolF32 = 1e-5;   // float32 results: summation order / FMA / libm differences
constexpr double kTolBf16 = 1e-2;  // bfloat16 results: one bf16 ulp is 2^-8 of the value

struct Dump {
  FILE* f;
  std::string prefix;  // entry name, prepended to every quantity

  void header(const std::string& name, const char* kind, size_t n, double tol) {
    fprintf(f, "@ %s/%s %s %zu %.3g\n", prefix.c_str(), name.c_str(), kind, n, tol);
  }
  template <typename U>
  void values(const U* v, size_t n, int width) {
    for (size_t i = 0; i < n; ++i)
      fprintf(f, "%0*" PRIx64 "%c", width, (uint64_t)v[i], (i % 8 == 7 || i + 1 == n) ? '\n' : ' ');
  }
  void u32(const std::string& name, const uint32_t* v, size_t n) { header(name, "u32", n, 0), values(v, n, 8); }
  void u64(const std::string& name, const uint64_t* v, size_t n) { header(name, "u64", n, 0), values(v, n, 16); }
  void f32(const std::string& name, const float* v, size_t n, double tol = kTolF32) {
    std::vector<uint32_t> b(n);
    if (n) memcpy(b.data(), v, n * sizeof(float));
    header(name, "f32", n, tol), values(b.data(), n, 8);
  }
  void bf16(const std::string& name, const uint16_t* v, size_t n, double tol = kTolBf16) {
    header(name, "bf16", n, tol), values(v, n, 4);
  }
};

[[noreturn]] void fail_call(const char* what, fwd_status st) {
  fprintf(stderr, "golden_dump: %s failed (%d): %s\n", what, (int)st, fwd_last_error());
  exit(2);
}
#define CALL(expr)                              \
  do {                                          \
    const fwd_status st_ = (expr);              \
    if (st_ != FWD_OK) fail_call(#expr, st_);   \
  } while (0)

// Deterministic inputs: element i of stream `tag`, from splitmix64; exact in float32 (24-bit values in
// [-1, 1)) or in bfloat16 (k / 64, |k| <= 128).
uint64_t mix(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
std::vector<float> rand_f32(uint64_t tag, size_t n) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = (float)((int64_t)(mix(tag * 0x100000001ull + i) >> 40) - (1 << 23)) / (float)(1 << 23);
  return v;
}
std::vector<uint16_t> rand_bf16(uint64_t tag, size_t n) {
  std::vector<uint16_t> v(n);
  for (size_t i = 0; i < n; ++i) {
    const float x = (float)((int)(mix(tag * 0x100000001ull + i) >> 56) - 128) / 64.0f;
    uint32_t u;
    memcpy(&u, &x, 4);
    v[i] = (uint16_t)(u >> 16);  // exact: at most 8 significant bits
  }
  return v;
}

// n values of the given dtype as raw bytes (bfloat16 when bf).
std::vector<unsigned char> rand_bytes(bool bf, uint64_t tag, size_t n) {
  std::vector<unsigned char> b(n * (bf ? 2 : 4));
  if (n == 0) return b;
  if (bf) {
    const std::vector<uint16_t> v = rand_bf16(tag, n);
    memcpy(b.data(), v.data(), b.size());
  } else {
    const std::vector<float> v = rand_f32(tag, n);
    memcpy(b.data(), v.data(), b.size());
  }
  return b;
}

// ---------------------------------------------------------------------------------------------------
// Entry points

void dump_philox_words(Dump& d) {
  const struct { uint64_t seed; int64_t n, offset; const char* name; } cases[] = {
      {0, 9, 0, "zero"},
      {0x0123456789abcdefull, 37, 4294967296ll - 5, "carry"},  // counters cross 2^32
      {0xfeedfacecafebeefull, 1001, 123456789, "long"},
  };
  for (const auto& c : cases) {
    std::vector<uint32_t> w((size_t)c.n * 4);
    CALL(fwd_philox_words(c.seed, c.n, c.offset, w.data(), 1));
    d.u32(c.name, w.data(), w.size());
  }
}

void dump_perturb(Dump& d) {
  // Lengths not a multiple of 8 (the 8-lane generator and its scalar tail), offsets across 2^32.
  const struct { uint64_t seed; int64_t n, offset; const char* name; } cases[] = {
      {42, 1003, 0, "a"},
      {0x8000000000000001ull, 517, 4294967296ll - 260, "carry"},
  };
  for (const auto& c : cases)
    for (int dist : {FWD_DIST_RADEMACHER, FWD_DIST_NORMAL}) {
      const std::string nm = std::string(c.name) + (dist == FWD_DIST_NORMAL ? "_normal" : "_rademacher");
      std::vector<float> v((size_t)c.n);
      std::vector<uint16_t> h((size_t)c.n);
      CALL(fwd_perturb(c.seed, c.n, c.offset, dist, FWD_F32, v.data(), 1));
      CALL(fwd_perturb(c.seed, c.n, c.offset, dist, FWD_BF16, h.data(), 1));
      // Rademacher values are +-1 from one bit of a Philox word: exact. Normal ones go through logf/cosf.
      const bool exact = dist == FWD_DIST_RADEMACHER;
      d.f32(nm + "_f32", v.data(), v.size(), exact ? 0 : kTolF32);
      d.bf16(nm + "_bf16", h.data(), h.size(), exact ? 0 : kTolBf16);
    }
}

void dump_perturb_combine(Dump& d) {
  const uint64_t seeds[5] = {1, 0xdeadbeefull, 77, 0xffffffffffffffffull, 5};
  const float coefs[5] = {0.5f, -1.25f, 0.0f, 3.0f, -0.0625f};
  const int64_t n = 777, offset = 4294967296ll - 100;
  for (int dist : {FWD_DIST_RADEMACHER, FWD_DIST_NORMAL}) {
    std::vector<float> out = rand_f32(11, (size_t)n);
    CALL(fwd_perturb_combine(seeds, coefs, 5, n, offset, dist, out.data(), 1));
    d.f32(dist == FWD_DIST_NORMAL ? "normal" : "rademacher", out.data(), out.size());
  }
}

void dump_derive_seed(Dump& d) {
  const int64_t ints[] = {0, 3, -1, 1234567890123ll, 7};
  std::vector<uint64_t> s;
  for (int n = 0; n <= 5; ++n) s.push_back(fwd_derive_seed(0x1234, ints, n));
  s.push_back(fwd_derive_seed(0xffffffffffffffffull, ints + 1, 3));
  d.u64("folds", s.data(), s.size());
}

void dump_sgemm_nt(Dump& d) {
  // (M, N, K): N <= 8 takes the 12 x 8 micro-tile, larger N the 6 x 16 one; K = 1100 spans two reduction
  // blocks. Leading dimensions larger than the rows.
  const int64_t shapes[][3] = {{13, 7, 29}, {37, 45, 70}, {20, 19, 1100}, {1, 1, 1}};
  for (const auto& sh : shapes) {
    const int64_t M = sh[0], N = sh[1], K = sh[2], lda = K + 3, ldb = K + 1, ldc = N + 2;
    const std::vector<float> A = rand_f32(100 + M, (size_t)(M * lda)), B = rand_f32(200 + N, (size_t)(N * ldb));
    std::vector<float> C((size_t)(M * ldc), 0.0f);
    CALL(fwd_sgemm_nt(M, N, K, A.data(), lda, B.data(), ldb, C.data(), ldc, 2));
    std::vector<float> c;  // the valid part only
    for (int64_t i = 0; i < M; ++i) c.insert(c.end(), C.begin() + i * ldc, C.begin() + i * ldc + N);
    d.f32("m" + std::to_string(M) + "_n" + std::to_string(N) + "_k" + std::to_string(K), c.data(), c.size());
  }
}

void dump_lora_linear_dual(Dump& d) {
  struct Case {
    const char* name;
    int64_t M, d_in, d_out, r, K;
    int dtype;       // inputs and outputs
    bool x_dot, bias, lora, explicit_tangents;
    int64_t offset_bias;
    int dist;
  };
  const Case cases[] = {
      {"seeds_f32", 11, 19, 23, 3, 4, FWD_F32, true, true, true, false, 1000, FWD_DIST_RADEMACHER},
      {"seeds_normal_narrow", 9, 33, 5, 2, 3, FWD_F32, false, true, true, false, -1, FWD_DIST_NORMAL},
      {"explicit_bf16", 7, 17, 21, 4, 3, FWD_BF16, true, true, true, true, 0, FWD_DIST_RADEMACHER},
      {"frozen_linear", 10, 15, 18, 0, 2, FWD_F32, true, false, false, false, -1, FWD_DIST_RADEMACHER},
  };
  for (const Case& c : cases) {
    const bool bf = c.dtype == FWD_BF16;
    const size_t es = bf ? 2 : 4;
    const int64_t M = c.M, di = c.d_in, dout = c.d_out, r = c.r, K = c.K;
    uint64_t tag = 1000;
    // Each input as raw bytes of the case's dtype.
    auto input = [&](size_t n) { return rand_bytes(bf, ++tag, n); };
    const auto x = input((size_t)(M * di)), xd = input((size_t)(K * M * di)), W = input((size_t)(dout * di));
    const auto bias = input((size_t)dout), A = input((size_t)(r * di)), B = input((size_t)(dout * r));
    const auto Ad = input((size_t)(K * r * di)), Bd = input((size_t)(K * dout * r)), bd = input((size_t)(K * dout));
    const int64_t seeds[4] = {3, -7, 0x123456789ll, 99};
    std::vector<unsigned char> y((size_t)(M * dout) * es), yd((size_t)(K * M * dout) * es);
    fwd_lora_dual_args a;
    memset(&a, 0, sizeof a);
    a.M = M, a.d_in = di, a.d_out = dout, a.r = c.lora ? r : 0, a.K = K;
    a.in_dtype = a.out_dtype = c.dtype;
    a.x = x.data(), a.ldx = di;
    a.x_dot = c.x_dot ? xd.data() : nullptr, a.ldx_dot = di;
    a.W = W.data(), a.ldw = di;
    a.bias = c.bias ? bias.data() : nullptr;
    a.A = c.lora ? A.data() : nullptr, a.lda = di;
    a.B = c.lora ? B.data() : nullptr, a.ldb = r;
    a.scaling = 1.75f;
    a.seeds = seeds;
    a.offset_A = 5, a.offset_B = 5 + r * di, a.offset_bias = c.offset_bias;
    a.dist = c.dist;
    if (c.explicit_tangents) a.A_dot = Ad.data(), a.B_dot = Bd.data(), a.bias_dot = bd.data();
    a.y = y.data(), a.ldy = dout;
    a.y_dot = yd.data(), a.ldy_dot = dout;
    a.num_threads = 2;
    CALL(fwd_lora_linear_dual(&a));
    const std::string nm = c.name;
    if (bf) {
      d.bf16(nm + "_y", (const uint16_t*)y.data(), y.size() / 2);
      d.bf16(nm + "_ydot", (const uint16_t*)yd.data(), yd.size() / 2);
    } else {
      d.f32(nm + "_y", (const float*)y.data(), y.size() / 4);
      d.f32(nm + "_ydot", (const float*)yd.data(), yd.size() / 4);
    }
  }
}

void dump_attention_dual(Dump& d) {
  struct Case {
    const char* name;
    int64_t B, H, Hkv, L, S, D, K;
    int dtype;
    bool q_dot, k_dot, v_dot, mask;
    int causal;
  };
  // S = 70 spans two key blocks (64); D = 20 is padded to 32 internally; H / Hkv = 2 is grouped-query.
  const Case cases[] = {
      {"gqa_mask_f32", 2, 4, 2, 13, 70, 20, 3, FWD_F32, true, true, true, true, 0},
      {"causal_mask_f32", 1, 2, 1, 37, 41, 12, 2, FWD_F32, true, false, true, true, 1},
      {"causal_bf16", 1, 3, 3, 33, 33, 16, 2, FWD_BF16, true, true, false, false, 1},
      {"primal_only", 2, 2, 1, 5, 9, 7, 0, FWD_F32, false, false, false, false, 0},
  };
  for (const Case& c : cases) {
    const bool bf = c.dtype == FWD_BF16;
    const size_t es = bf ? 2 : 4;
    const size_t nq = (size_t)(c.B * c.H * c.L * c.D), nkv = (size_t)(c.B * c.Hkv * c.S * c.D);
    uint64_t tag = 5000;
    auto input = [&](size_t n) { return rand_bytes(bf, ++tag, n); };
    const auto q = input(nq), k = input(nkv), v = input(nkv);
    const auto qd = input((size_t)c.K * nq), kd = input((size_t)c.K * nkv), vd = input((size_t)c.K * nkv);
    // (B, 1, L, S) additive mask: small values, the last 7*b keys of batch b masked, row 3 of batch 1 fully.
    std::vector<float> mask = rand_f32(77, (size_t)(c.B * c.L * c.S));
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t i = 0; i < c.L; ++i)
        for (int64_t j = 0; j < c.S; ++j)
          if (j >= c.S - 7 * b || (b == 1 && i == 3)) mask[(size_t)((b * c.L + i) * c.S + j)] = -INFINITY;
    std::vector<unsigned char> o(nq * es), od((size_t)c.K * nq * es);
    fwd_attention_dual_args a;
    memset(&a, 0, sizeof a);
    a.B = c.B, a.H = c.H, a.Hkv = c.Hkv, a.L = c.L, a.S = c.S, a.D = c.D, a.K = c.K;
    a.dtype = c.dtype;
    a.q = q.data(), a.k = k.data(), a.v = v.data();
    a.q_dot = c.q_dot ? qd.data() : nullptr;
    a.k_dot = c.k_dot ? kd.data() : nullptr;
    a.v_dot = c.v_dot ? vd.data() : nullptr;
    if (c.mask) {
      a.mask = mask.data();
      a.mask_stride[0] = c.L * c.S, a.mask_stride[1] = 0, a.mask_stride[2] = c.S, a.mask_stride[3] = 1;
    }
    a.causal = c.causal;
    a.scale = 1.0f / sqrtf((float)c.D);
    a.o = o.data();
    a.o_dot = c.K ? od.data() : nullptr;
    a.num_threads = 2;
    CALL(fwd_attention_dual(&a));
    const std::string nm = c.name;
    if (bf) {
      d.bf16(nm + "_o", (const uint16_t*)o.data(), nq);
      d.bf16(nm + "_odot", (const uint16_t*)od.data(), (size_t)c.K * nq);
    } else {
      d.f32(nm + "_o", (const float*)o.data(), nq);
      d.f32(nm + "_odot", (const float*)od.data(), (size_t)c.K * nq);
    }
  }
}

// The small dual ops: both dtypes, odd shapes, every tangent kind; inputs scaled into the ranges the
// activations' tails and the softmax meet.
void rec(Dump& d, const std::string& name, bool bf, const std::vector<unsigned char>& b) {
  if (bf)
    d.bf16(name, (const uint16_t*)b.data(), b.size() / 2);
  else
    d.f32(name, (const float*)b.data(), b.size() / 4);
}
std::vector<unsigned char> scaled(bool bf, uint64_t tag, size_t n, float scale) {
  std::vector<unsigned char> b(n * (bf ? 2 : 4));
  const std::vector<float> v = rand_f32(tag, n);
  for (size_t i = 0; i < n; ++i) {
    const float x = v[i] * scale;
    if (bf) {
      uint32_t u;
      memcpy(&u, &x, 4);
      const uint16_t h = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
      memcpy(b.data() + 2 * i, &h, 2);
    } else {
      memcpy(b.data() + 4 * i, &x, 4);
    }
  }
  return b;
}

void dump_dual_ops(Dump& d) {
  for (int bf = 0; bf < 2; ++bf) {
    const int dt = bf ? FWD_BF16 : FWD_F32;
    const std::string sfx = bf ? "_bf16" : "_f32";
    const size_t es = bf ? 2 : 4;
    {  // norms: rows 5, d 67, K 3, every parameter tangent
      const int64_t R = 5, D = 67, K = 3;
      auto x = scaled(bf, 501, R * D, 3.0f), xd = rand_bytes(bf, 502, K * R * D), w = rand_bytes(bf, 503, D),
           b = rand_bytes(bf, 504, D), wd = rand_bytes(bf, 505, K * D), bd = rand_bytes(bf, 506, K * D);
      std::vector<unsigned char> y(R * D * es), yd(K * R * D * es);
      fwd_norm_dual_args a;
      memset(&a, 0, sizeof a);
      a.rows = R; a.d = D; a.K = K; a.dtype = dt; a.eps = 1e-5f;
      a.x = x.data(); a.x_dot = xd.data(); a.weight = w.data(); a.bias = b.data();
      a.weight_dot = wd.data(); a.bias_dot = bd.data(); a.y = y.data(); a.y_dot = yd.data(); a.num_threads = 2;
      CALL(fwd_layer_norm_dual(&a));
      rec(d, "layer_norm_y" + sfx, bf, y), rec(d, "layer_norm_ydot" + sfx, bf, yd);
      a.bias = nullptr; a.bias_dot = nullptr;
      CALL(fwd_rms_norm_dual(&a));
      rec(d, "rms_norm_y" + sfx, bf, y), rec(d, "rms_norm_ydot" + sfx, bf, yd);
    }
    {  // activations over [-12, 12) (the erfc / exp tails), n = 1031 (two blocks and a tail), K = 2
      const int64_t n = 1031, K = 2;
      auto x = scaled(bf, 511, n, 12.0f), xd = rand_bytes(bf, 512, K * n), up = rand_bytes(bf, 513, n),
           ud = rand_bytes(bf, 514, K * n);
      std::vector<unsigned char> y(n * es), yd(K * n * es);
      const char* names[] = {"gelu", "gelu_tanh", "silu", "tanh"};
      for (int act = 0; act < 4; ++act) {
        CALL(fwd_activation_dual(act, n, K, dt, x.data(), xd.data(), y.data(), yd.data(), 2));
        rec(d, std::string(names[act]) + "_y" + sfx, bf, y), rec(d, std::string(names[act]) + "_ydot" + sfx, bf, yd);
      }
      CALL(fwd_gated_act_dual(n, K, dt, x.data(), xd.data(), up.data(), ud.data(), y.data(), yd.data(), 2));
      rec(d, "gated_y" + sfx, bf, y), rec(d, "gated_ydot" + sfx, bf, yd);
    }
    {  // rotary: x stored (B, L, H, D), read as (B, H, L, D); cos / sin (B, L, D) broadcast over heads
      const int64_t B = 2, H = 3, L = 5, D = 12, K = 2, n = B * H * L * D;
      auto x = rand_bytes(bf, 521, n), xd = rand_bytes(bf, 522, K * n), c = rand_bytes(bf, 523, B * L * D),
           sn = rand_bytes(bf, 524, B * L * D);
      std::vector<unsigned char> y(n * es), yd(K * n * es);
      fwd_rotary_dual_args a;
      memset(&a, 0, sizeof a);
      a.B = B; a.H = H; a.L = L; a.D = D; a.K = K; a.dtype = dt;
      a.x = x.data(); a.x_stride[0] = L * H * D; a.x_stride[1] = D; a.x_stride[2] = H * D;
      a.x_dot = xd.data(); a.x_dot_stride[0] = n; a.x_dot_stride[1] = L * H * D; a.x_dot_stride[2] = D;
      a.x_dot_stride[3] = H * D;
      a.cos = c.data(); a.sin = sn.data(); a.cs_stride[0] = L * D; a.cs_stride[1] = 0; a.cs_stride[2] = D;
      a.y = y.data(); a.y_dot = yd.data(); a.num_threads = 2;
      CALL(fwd_rotary_dual(&a));
      rec(d, "rotary_y" + sfx, bf, y), rec(d, "rotary_ydot" + sfx, bf, yd);
    }
    {  // cross-entropy: 11 rows (one ignored) over 3001 classes, K = 4
      const int64_t N = 11, C = 3001, K = 4;
      auto lg = scaled(bf, 531, N * C, 8.0f), lgd = rand_bytes(bf, 532, K * N * C);
      std::vector<int64_t> lab(N);
      for (int64_t r = 0; r < N; ++r) lab[r] = (int64_t)(mix(533 + r) % (uint64_t)C);
      lab[3] = -100;
      float out[1 + K];
      CALL(fwd_cross_entropy_dual(N, C, K, dt, lg.data(), lgd.data(), lab.data(), -100, out, out + 1, 2));
      d.f32("cross_entropy_loss_and_dot" + sfx, out, 1 + K);
    }
  }
}

struct Entry {
  const char* name;
  void (*fn)(Dump&);
};
const Entry kEntries[] = {
    {"philox_words", dump_philox_words},
    {"perturb", dump_perturb},
    {"perturb_combine", dump_perturb_combine},
    {"derive_seed", dump_derive_seed},
    {"sgemm_nt", dump_sgemm_nt},
    {"lora_linear_dual", dump_lora_linear_dual},
    {"attention_dual", dump_attention_dual},
    {"dual_ops", dump_dual_ops},
};

// ---------------------------------------------------------------------------------------------------
// Reading and comparing

struct Quantity {
  std::string kind;
  double tol = 0;
  size_t n = 0;  // count announced by the header
  std::vector<uint64_t> v;
};

bool read_dump(const char* path, std::vector<std::string>& order, std::map<std::string, Quantity>& q) {
  FILE* f = fopen(path, "r");
  if (!f) {
    fprintf(stderr, "golden_dump: cannot open %s\n", path);
    return false;
  }
  char line[4096];
  Quantity* cur = nullptr;
  bool ok = true;
  while (ok && fgets(line, sizeof line, f)) {
    if (line[0] == '#' || line[0] == '\n') continue;
    if (line[0] == '@') {
      char name[512], kind[16];
      size_t n;
      double tol;
      if (sscanf(line, "@ %511s %15s %zu %lf", name, kind, &n, &tol) != 4 || q.count(name)) {
        fprintf(stderr, "golden_dump: %s: bad or repeated header: %s", path, line);
        ok = false;
        break;
      }
      order.push_back(name);
      cur = &q[name];
      cur->kind = kind, cur->tol = tol, cur->n = n;
      continue;
    }
    for (char* p = strtok(line, " \n"); p && cur; p = strtok(nullptr, " \n")) cur->v.push_back(strtoull(p, nullptr, 16));
    if (!cur || cur->v.size() > cur->n) {
      fprintf(stderr, "golden_dump: %s: values outside a quantity\n", path);
      ok = false;
    }
  }
  fclose(f);
  for (auto& kv : q)
    if (ok && kv.second.v.size() != kv.second.n) {
      fprintf(stderr, "golden_dump: %s: %s has %zu values, not %zu\n", path, kv.first.c_str(), kv.second.v.size(),
              kv.second.n);
      ok = false;
    }
  return ok;
}

double as_double(const std::string& kind, uint64_t bits) {
  uint32_t u = kind == "bf16" ? (uint32_t)bits << 16 : (uint32_t)bits;
  float x;
  memcpy(&x, &u, 4);
  return x;
}

int compare(const char* ref_path, const char* test_path) {
  std::vector<std::string> ro, to;
  std::map<std::string, Quantity> ref, test;
  if (!read_dump(ref_path, ro, ref) || !read_dump(test_path, to, test)) return 2;
  int bad = 0, identical = 0;
  for (const std::string& name : ro) {
    const Quantity& r = ref[name];
    auto it = test.find(name);
    if (it == test.end()) {
      fprintf(stderr, "MISSING %s (in %s only)\n", name.c_str(), ref_path);
      ++bad;
      continue;
    }
    const Quantity& t = it->second;
    if (t.kind != r.kind || t.v.size() != r.v.size()) {
      fprintf(stderr, "FAILED %s: kind/count %s/%zu vs %s/%zu\n", name.c_str(), r.kind.c_str(), r.v.size(),
              t.kind.c_str(), t.v.size());
      ++bad;
      continue;
    }
    size_t ndiff = 0, first = 0;
    for (size_t i = 0; i < r.v.size(); ++i)
      if (r.v[i] != t.v[i] && !ndiff++) first = i;
    if (ndiff == 0) {
      ++identical;
      continue;
    }
    if (r.kind == "u32" || r.kind == "u64" || r.tol == 0) {
      fprintf(stderr, "FAILED %s (%s, exact): %zu of %zu differ, first [%zu] %" PRIx64 " vs %" PRIx64 "\n",
              name.c_str(), r.kind.c_str(), ndiff, r.v.size(), first, r.v[first], t.v[first]);
      ++bad;
      continue;
    }
    double scale = 0, err = 0;
    size_t worst = 0;
    bool nonfinite = false;
    for (size_t i = 0; i < r.v.size(); ++i) {
      const double a = as_double(r.kind, r.v[i]);
      if (isfinite(a)) scale = fmax(scale, fabs(a));
    }
    for (size_t i = 0; i < r.v.size(); ++i) {
      const double a = as_double(r.kind, r.v[i]), b = as_double(t.kind, t.v[i]);
      if (!isfinite(a) || !isfinite(b)) {
        if (!(isnan(a) && isnan(b)) && a != b) nonfinite = true;
        continue;
      }
      if (fabs(a - b) > err) err = fabs(a - b), worst = i;
    }
    const double rel = scale > 0 ? err / scale : err;
    const bool ok = !nonfinite && rel <= r.tol;
    fprintf(ok ? stdout : stderr, "%s %s (%s): %zu of %zu differ, max |diff| / max |ref| = %.3g (tol %.3g)%s\n",
            ok ? "close " : "FAILED", name.c_str(), r.kind.c_str(), ndiff, r.v.size(), rel, r.tol,
            nonfinite ? ", non-finite values differ" : "");
    if (!ok) {
      fprintf(stderr, "  worst [%zu]: ref %.9g test %.9g\n", worst, as_double(r.kind, r.v[worst]),
              as_double(t.kind, t.v[worst]));
      ++bad;
    }
  }
  for (const std::string& name : to)
    if (!ref.count(name)) printf("note: %s is new in %s (not in the reference)\n", name.c_str(), test_path);
  printf("golden compare %s vs %s: %zu quantities, %d bit-identical, %zu within tolerance, %d FAILED\n", ref_path,
         test_path, ro.size(), identical, ro.size() - identical - bad, bad);
  return bad ? 1 : 0;
}

int dump(const char* path) {
  FILE* f = fopen(path, "w");
  if (!f) {
    fprintf(stderr, "golden_dump: cannot write %s\n", path);
    return 2;
  }
  fprintf(f, "# fwdcore golden dump v1: fwdcore %s, simd %s\n", fwd_version(), fwd_simd());
  Dump d{f, ""};
  for (const Entry& e : kEntries) {
    d.prefix = e.name;
    e.fn(d);
  }
  if (fclose(f) != 0) return 2;
  printf("golden_dump: wrote %s (fwdcore %s, %s)\n", path, fwd_version(), fwd_simd());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && !strcmp(argv[1], "dump")) return dump(argv[2]);
  if (argc == 4 && !strcmp(argv[1], "compare")) return compare(argv[2], argv[3]);
  fprintf(stderr, "usage: %s dump FILE | %s compare REF TEST\n", argv[0], argv[0]);
  return 2;
}
