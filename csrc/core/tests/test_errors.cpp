// Error handling of every C API entry point: NULL pointers, zero/negative sizes, short leading
// dimensions, negative offsets and strides, index ranges that overflow int64, unsupported dist/dtype,
// inconsistent combinations (LoRA A without B, a tangent with K = 0, seeds missing where a slice must be
// generated, H not a multiple of Hkv, ...), non-finite scale/scaling. Each case must return the specific
// nonzero fwd_status with a fwd_last_error() that starts with the function's name and names the
// offending argument (and its value where it has one), write nothing, and never abort; valid corner
// cases around them must succeed. fwd_last_error() is thread-local.
#include <atomic>
#include <thread>

#include "test_common.h"

// Expect status `want` and a message that starts with the function's name and contains `keyword`.
#define EXPECT_ERR(call, want, fn, keyword)                                                                    \
  do {                                                                                                         \
    const fwd_status st_ = (call);                                                                             \
    CHECK(st_ == (want), "%s returned %d, want %d (%s); message: '%s'", #call, (int)st_, (int)(want), #want, \
          fwd_last_error());                                                                                   \
    CHECK(nonempty_error(), "%s: empty fwd_last_error()", #call);                                              \
    const std::string msg_ = fwd_last_error() ? fwd_last_error() : "";                                         \
    CHECK(msg_.rfind(std::string(fn) + ": ", 0) == 0, "%s: message '%s' does not start with '%s: '", #call,   \
          msg_.c_str(), fn);                                                                                   \
    CHECK(msg_.find(keyword) != std::string::npos, "%s: message '%s' does not mention '%s'", #call,            \
          msg_.c_str(), keyword);                                                                              \
  } while (0)

#define EXPECT_OK(call)                                                                               \
  do {                                                                                                \
    const fwd_status st_ = (call);                                                                    \
    CHECK(st_ == FWD_OK, "%s returned %d; message: '%s'", #call, (int)st_, fwd_last_error());         \
  } while (0)

static const int64_t BIG = (int64_t)1 << 62;

static void test_philox_words() {
  const char* fn = "fwd_philox_words";
  uint32_t out[8];
  for (int i = 0; i < 8; ++i) out[i] = 0xCDCDCDCDu;
  EXPECT_ERR(fwd_philox_words(1, 0, 0, out, 1), FWD_ERR_SIZE, fn, "n must be positive, got 0");
  EXPECT_ERR(fwd_philox_words(1, -3, 0, out, 1), FWD_ERR_SIZE, fn, "n must be positive, got -3");
  EXPECT_ERR(fwd_philox_words(1, INT64_MIN, 0, out, 1), FWD_ERR_SIZE, fn, "n must be positive");
  EXPECT_ERR(fwd_philox_words(1, 2, -1, out, 1), FWD_ERR_SIZE, fn, "offset must be non-negative, got -1");
  EXPECT_ERR(fwd_philox_words(1, 2, INT64_MIN, out, 1), FWD_ERR_SIZE, fn, "offset must be non-negative");
  EXPECT_ERR(fwd_philox_words(1, 3, INT64_MAX - 1, out, 1), FWD_ERR_SIZE, fn, "offset + n");
  EXPECT_ERR(fwd_philox_words(1, 3, INT64_MAX - 1, out, 1), FWD_ERR_SIZE, fn, "counter range");
  EXPECT_ERR(fwd_philox_words(1, INT64_MAX / 2, 0, out, 1), FWD_ERR_SIZE, fn, "n * 4");  // (n, 4) output
  EXPECT_ERR(fwd_philox_words(1, 2, 0, nullptr, 1), FWD_ERR_NULL, fn, "out is NULL");
  for (int i = 0; i < 8; ++i) CHECK(out[i] == 0xCDCDCDCDu, "a failing fwd_philox_words wrote its output");
  EXPECT_OK(fwd_philox_words(1, 2, 0, out, 1));
  EXPECT_OK(fwd_philox_words(1, 2, 0, out, -7));  // num_threads <= 0: the OpenMP default
  EXPECT_OK(fwd_philox_words(1, 1, INT64_MAX - 1, out, 1));  // the last counter below 2^63
}

static void test_perturb() {
  const char* fn = "fwd_perturb";
  float out[4] = {9, 9, 9, 9};
  EXPECT_ERR(fwd_perturb(1, 0, 0, FWD_DIST_NORMAL, FWD_F32, out, 1), FWD_ERR_SIZE, fn, "n must be positive, got 0");
  EXPECT_ERR(fwd_perturb(1, -1, 0, FWD_DIST_NORMAL, FWD_F32, out, 1), FWD_ERR_SIZE, fn, "n must be positive, got -1");
  EXPECT_ERR(fwd_perturb(1, 4, -5, FWD_DIST_NORMAL, FWD_F32, out, 1), FWD_ERR_SIZE, fn,
             "offset must be non-negative, got -5");
  EXPECT_ERR(fwd_perturb(1, 4, INT64_MAX - 2, FWD_DIST_NORMAL, FWD_F32, out, 1), FWD_ERR_SIZE, fn, "offset + n");
  EXPECT_ERR(fwd_perturb(1, 4, 0, FWD_DIST_NORMAL, FWD_F32, nullptr, 1), FWD_ERR_NULL, fn, "out is NULL");
  EXPECT_ERR(fwd_perturb(1, 4, 0, 2, FWD_F32, out, 1), FWD_ERR_ARG, fn, "dist must be");
  EXPECT_ERR(fwd_perturb(1, 4, 0, 2, FWD_F32, out, 1), FWD_ERR_ARG, fn, "got 2");
  EXPECT_ERR(fwd_perturb(1, 4, 0, -1, FWD_F32, out, 1), FWD_ERR_ARG, fn, "dist must be");
  EXPECT_ERR(fwd_perturb(1, 4, 0, FWD_DIST_RADEMACHER, 2, out, 1), FWD_ERR_ARG, fn, "out_dtype must be");
  EXPECT_ERR(fwd_perturb(1, 4, 0, FWD_DIST_RADEMACHER, -1, out, 1), FWD_ERR_ARG, fn, "got -1");
  for (float v : out) CHECK(v == 9.0f, "a failing fwd_perturb wrote its output");
  EXPECT_OK(fwd_perturb(1, 4, 0, FWD_DIST_RADEMACHER, FWD_F32, out, 1));
}

static void test_perturb_combine() {
  const char* fn = "fwd_perturb_combine";
  const uint64_t seeds[2] = {11, 12};
  const float coefs[2] = {0.5f, -2.0f};
  float out[5];
  for (float& v : out) v = 4.25f;
  EXPECT_ERR(fwd_perturb_combine(seeds, coefs, 2, 0, 0, 0, out, 1), FWD_ERR_SIZE, fn, "n must be positive, got 0");
  EXPECT_ERR(fwd_perturb_combine(seeds, coefs, 2, -5, 0, 0, out, 1), FWD_ERR_SIZE, fn, "n must be positive, got -5");
  EXPECT_ERR(fwd_perturb_combine(seeds, coefs, 0, 5, 0, 0, out, 1), FWD_ERR_SIZE, fn, "n_seeds must be positive, got 0");
  EXPECT_ERR(fwd_perturb_combine(seeds, coefs, -1, 5, 0, 0, out, 1), FWD_ERR_SIZE, fn, "n_seeds must be positive, got -1");
  EXPECT_ERR(fwd_perturb_combine(seeds, coefs, 2, 5, -2, 0, out, 1), FWD_ERR_SIZE, fn,
             "offset must be non-negative, got -2");
  EXPECT_ERR(fwd_perturb_combine(seeds, coefs, 2, 5, INT64_MAX - 3, 0, out, 1), FWD_ERR_SIZE, fn, "offset + n");
  EXPECT_ERR(fwd_perturb_combine(nullptr, coefs, 2, 5, 0, 0, out, 1), FWD_ERR_NULL, fn, "seeds is NULL");
  EXPECT_ERR(fwd_perturb_combine(seeds, nullptr, 2, 5, 0, 0, out, 1), FWD_ERR_NULL, fn, "coefs is NULL");
  EXPECT_ERR(fwd_perturb_combine(seeds, coefs, 2, 5, 0, 0, nullptr, 1), FWD_ERR_NULL, fn, "out is NULL");
  EXPECT_ERR(fwd_perturb_combine(seeds, coefs, 2, 5, 0, 3, out, 1), FWD_ERR_ARG, fn, "dist must be");
  EXPECT_ERR(fwd_perturb_combine(seeds, coefs, 2, 5, 0, -2, out, 1), FWD_ERR_ARG, fn, "got -2");
  for (float v : out) CHECK(v == 4.25f, "a failing fwd_perturb_combine wrote its output");
  // The valid call accumulates: out += 0.5 v_11 - 2 v_12.
  EXPECT_OK(fwd_perturb_combine(seeds, coefs, 2, 5, 7, FWD_DIST_RADEMACHER, out, 1));
  float v0[5], v1[5];
  EXPECT_OK(fwd_perturb(11, 5, 7, FWD_DIST_RADEMACHER, FWD_F32, v0, 1));
  EXPECT_OK(fwd_perturb(12, 5, 7, FWD_DIST_RADEMACHER, FWD_F32, v1, 1));
  for (int i = 0; i < 5; ++i)
    CHECK(fabsf(out[i] - (4.25f + 0.5f * v0[i] - 2.0f * v1[i])) < 1e-6f, "combine[%d] = %g", i, out[i]);
}

static void test_derive_seed() {
  // No status to return: NULL / n <= 0 mean "no integers" (documented) and must not crash.
  CHECK(fwd_derive_seed(5, nullptr, 3) == 5, "NULL ints");
  CHECK(fwd_derive_seed(5, nullptr, -3) == 5, "negative n");
  const int64_t i[1] = {1};
  CHECK(fwd_derive_seed(5, i, 0) == 5, "n = 0");
  CHECK(fwd_derive_seed(5, i, -1) == 5, "n < 0");
  CHECK(fwd_derive_seed(5, i, 1) == ref::derive_seed(5, {1}), "one integer");
}

static void test_sgemm() {
  const char* fn = "fwd_sgemm_nt";
  float A[12] = {0}, B[12] = {0}, C[12];
  for (float& v : C) v = 3.5f;
  EXPECT_ERR(fwd_sgemm_nt(0, 2, 2, A, 2, B, 2, C, 2, 1), FWD_ERR_SIZE, fn, "M must be positive, got 0");
  EXPECT_ERR(fwd_sgemm_nt(2, 0, 2, A, 2, B, 2, C, 2, 1), FWD_ERR_SIZE, fn, "N must be positive, got 0");
  EXPECT_ERR(fwd_sgemm_nt(2, 2, 0, A, 2, B, 2, C, 2, 1), FWD_ERR_SIZE, fn, "K must be positive, got 0");
  EXPECT_ERR(fwd_sgemm_nt(-2, 2, 2, A, 2, B, 2, C, 2, 1), FWD_ERR_SIZE, fn, "M must be positive, got -2");
  EXPECT_ERR(fwd_sgemm_nt(2, 2, -1, A, 2, B, 2, C, 2, 1), FWD_ERR_SIZE, fn, "K must be positive, got -1");
  EXPECT_ERR(fwd_sgemm_nt(2, 2, 2, nullptr, 2, B, 2, C, 2, 1), FWD_ERR_NULL, fn, "A is NULL");
  EXPECT_ERR(fwd_sgemm_nt(2, 2, 2, A, 2, nullptr, 2, C, 2, 1), FWD_ERR_NULL, fn, "B is NULL");
  EXPECT_ERR(fwd_sgemm_nt(2, 2, 2, A, 2, B, 2, nullptr, 2, 1), FWD_ERR_NULL, fn, "C is NULL");
  EXPECT_ERR(fwd_sgemm_nt(2, 2, 3, A, 2, B, 3, C, 2, 1), FWD_ERR_SIZE, fn, "lda (2)");  // lda < K
  EXPECT_ERR(fwd_sgemm_nt(2, 2, 3, A, 3, B, 2, C, 2, 1), FWD_ERR_SIZE, fn, "ldb (2)");  // ldb < K
  EXPECT_ERR(fwd_sgemm_nt(2, 3, 2, A, 2, B, 2, C, 2, 1), FWD_ERR_SIZE, fn, "ldc (2)");  // ldc < N
  EXPECT_ERR(fwd_sgemm_nt(2, 2, 2, A, -1, B, 2, C, 2, 1), FWD_ERR_SIZE, fn, "lda (-1)");
  EXPECT_ERR(fwd_sgemm_nt(BIG, 2, 2, A, 2, B, 2, C, 2, 1), FWD_ERR_SIZE, fn, "A: ");         // M * lda
  EXPECT_ERR(fwd_sgemm_nt(2, 2, 2, A, 2, B, INT64_MAX - 1, C, 2, 1), FWD_ERR_SIZE, fn, "B: ");  // N * ldb
  EXPECT_ERR(fwd_sgemm_nt(2, 2, 2, A, 2, B, 2, C, INT64_MAX - 1, 1), FWD_ERR_SIZE, fn, "C: ");  // M * ldc
  EXPECT_ERR(fwd_sgemm_nt(2, 2, 2, A, 2, B, 2, C, INT64_MAX - 1, 1), FWD_ERR_SIZE, fn, "overflow int64");
  for (float v : C) CHECK(v == 3.5f, "a failing fwd_sgemm_nt wrote its output");
  EXPECT_OK(fwd_sgemm_nt(2, 2, 2, A, 2, B, 2, C, 2, 1));
  EXPECT_OK(fwd_sgemm_nt(1, 2, 2, A, INT64_MAX, B, 2, C, 2, 1));  // one row: any leading dimension
}

// A valid small LoRA problem; each error case breaks one thing.
struct Lora {
  static constexpr int64_t M = 2, d_in = 3, d_out = 4, r = 2, K = 2;
  float x[M * d_in], xd[K * M * d_in], W[d_out * d_in], b[d_out], A[r * d_in], B[d_out * r];
  float Ad[K * r * d_in] = {}, Bd[K * d_out * r] = {}, bd[K * d_out] = {};
  float y[M * d_out], yd[K * M * d_out];
  int64_t seeds[K] = {1, 2};
  fwd_lora_dual_args a;
  Lora() {
    ref::Rng rng(3);
    for (float& v : x) v = (float)rng.uniform(-1, 1);
    for (float& v : xd) v = (float)rng.uniform(-1, 1);
    for (float& v : W) v = (float)rng.uniform(-1, 1);
    for (float& v : b) v = (float)rng.uniform(-1, 1);
    for (float& v : A) v = (float)rng.uniform(-1, 1);
    for (float& v : B) v = (float)rng.uniform(-1, 1);
    for (float& v : y) v = 5.5f;
    for (float& v : yd) v = 5.5f;
    memset(&a, 0, sizeof a);
    a.M = M;
    a.d_in = d_in;
    a.d_out = d_out;
    a.r = r;
    a.K = K;
    a.in_dtype = FWD_F32;
    a.out_dtype = FWD_F32;
    a.x = x;
    a.ldx = d_in;
    a.x_dot = xd;
    a.ldx_dot = d_in;
    a.W = W;
    a.ldw = d_in;
    a.bias = b;
    a.A = A;
    a.lda = d_in;
    a.B = B;
    a.ldb = r;
    a.scaling = 1.5f;
    a.seeds = seeds;
    a.offset_A = 0;
    a.offset_B = 100;
    a.offset_bias = 200;
    a.dist = FWD_DIST_RADEMACHER;
    a.y = y;
    a.ldy = d_out;
    a.y_dot = yd;
    a.ldy_dot = d_out;
    a.num_threads = 1;
  }
  bool untouched() const {
    for (float v : y)
      if (v != 5.5f) return false;
    for (float v : yd)
      if (v != 5.5f) return false;
    return true;
  }
};

static void test_lora() {
  const char* fn = "fwd_lora_linear_dual";
  EXPECT_ERR(fwd_lora_linear_dual(nullptr), FWD_ERR_NULL, fn, "args is NULL");
  float y_ref[Lora::M * Lora::d_out];
  {
    Lora L;
    EXPECT_OK(fwd_lora_linear_dual(&L.a));  // the base case is valid
    memcpy(y_ref, L.y, sizeof y_ref);
  }
  struct Bad {
    const char* what;
    void (*mutate)(Lora&);
    fwd_status want;
    const char* keyword;
  } bad[] = {
      {"M = 0", [](Lora& L) { L.a.M = 0; }, FWD_ERR_SIZE, "M must be positive, got 0"},
      {"M < 0", [](Lora& L) { L.a.M = -2; }, FWD_ERR_SIZE, "M must be positive, got -2"},
      {"d_in = 0", [](Lora& L) { L.a.d_in = 0; }, FWD_ERR_SIZE, "d_in must be positive, got 0"},
      {"d_out < 0", [](Lora& L) { L.a.d_out = -1; }, FWD_ERR_SIZE, "d_out must be positive, got -1"},
      {"K < 0", [](Lora& L) { L.a.K = -4; }, FWD_ERR_SIZE, "K (the number of tangents) must be non-negative, got -4"},
      {"K huge", [](Lora& L) { L.a.K = (int64_t)1 << 40; }, FWD_ERR_SIZE, "K is too large"},
      {"in_dtype", [](Lora& L) { L.a.in_dtype = 2; }, FWD_ERR_ARG, "in_dtype must be FWD_F32 (0) or FWD_BF16 (1), got 2"},
      {"in_dtype < 0", [](Lora& L) { L.a.in_dtype = -1; }, FWD_ERR_ARG, "in_dtype must be FWD_F32 (0) or FWD_BF16 (1), got -1"},
      {"out_dtype", [](Lora& L) { L.a.out_dtype = 7; }, FWD_ERR_ARG, "out_dtype must be FWD_F32 (0) or FWD_BF16 (1), got 7"},
      {"dist", [](Lora& L) { L.a.dist = 2; }, FWD_ERR_ARG, "dist must be FWD_DIST_RADEMACHER (0) or FWD_DIST_NORMAL (1), got 2"},
      {"dist < 0", [](Lora& L) { L.a.dist = -1; }, FWD_ERR_ARG, "got -1"},
      {"x NULL", [](Lora& L) { L.a.x = nullptr; }, FWD_ERR_NULL, "x is NULL"},
      {"W NULL", [](Lora& L) { L.a.W = nullptr; }, FWD_ERR_NULL, "W is NULL"},
      {"y NULL with K = 0", [](Lora& L) { L.a.y = nullptr; L.a.K = 0; }, FWD_ERR_NULL, "y is NULL"},
      {"y_dot NULL", [](Lora& L) { L.a.y_dot = nullptr; }, FWD_ERR_NULL, "y_dot is NULL"},
      {"ldx < d_in", [](Lora& L) { L.a.ldx = 2; }, FWD_ERR_SIZE, "ldx (2) is smaller than its row length d_in (3)"},
      {"ldx < 0", [](Lora& L) { L.a.ldx = -3; }, FWD_ERR_SIZE, "ldx (-3)"},
      {"ldw < d_in", [](Lora& L) { L.a.ldw = 2; }, FWD_ERR_SIZE, "ldw (2)"},
      {"ldy < d_out", [](Lora& L) { L.a.ldy = 3; }, FWD_ERR_SIZE, "ldy (3) is smaller than its row length d_out (4)"},
      {"ldy_dot < d_out", [](Lora& L) { L.a.ldy_dot = 0; }, FWD_ERR_SIZE, "ldy_dot (0)"},
      {"ldx_dot < d_in", [](Lora& L) { L.a.ldx_dot = 1; }, FWD_ERR_SIZE, "ldx_dot (1)"},
      {"A without B", [](Lora& L) { L.a.B = nullptr; }, FWD_ERR_NULL, "A without B (B is NULL)"},
      {"B without A", [](Lora& L) { L.a.A = nullptr; }, FWD_ERR_NULL, "B without A (A is NULL)"},
      {"r = 0", [](Lora& L) { L.a.r = 0; }, FWD_ERR_SIZE, "rank r must be positive, got 0"},
      {"r < 0", [](Lora& L) { L.a.r = -1; }, FWD_ERR_SIZE, "rank r must be positive, got -1"},
      {"lda < d_in", [](Lora& L) { L.a.lda = 2; }, FWD_ERR_SIZE, "lda (2) is smaller than its row length d_in (3)"},
      {"ldb < r", [](Lora& L) { L.a.ldb = 1; }, FWD_ERR_SIZE, "ldb (1) is smaller than its row length r (2)"},
      {"scaling NaN", [](Lora& L) { L.a.scaling = NAN; }, FWD_ERR_ARG, "scaling must be finite, got"},
      {"scaling inf", [](Lora& L) { L.a.scaling = -INFINITY; }, FWD_ERR_ARG, "scaling must be finite, got -inf"},
      {"offset_A < 0", [](Lora& L) { L.a.offset_A = -1; }, FWD_ERR_SIZE, "offset_A must be non-negative, got -1"},
      {"offset_B < 0", [](Lora& L) { L.a.offset_B = -8; }, FWD_ERR_SIZE, "offset_B must be non-negative, got -8"},
      {"offset_A slice past 2^63", [](Lora& L) { L.a.offset_A = INT64_MAX - 3; }, FWD_ERR_SIZE,
       "offset_A + r * d_in"},
      {"offset_B slice past 2^63", [](Lora& L) { L.a.offset_B = INT64_MAX - 7; }, FWD_ERR_SIZE,
       "offset_B + d_out * r"},
      {"offset_bias slice past 2^63", [](Lora& L) { L.a.offset_bias = INT64_MAX - 1; }, FWD_ERR_SIZE,
       "offset_bias + d_out"},
      {"bias trainable without bias",
       [](Lora& L) {
         L.a.bias = nullptr;
         L.a.offset_bias = 0;
       },
       FWD_ERR_ARG, "offset_bias (0) >= 0 makes the bias trainable but bias is NULL"},
      {"bias_dot without bias",
       [](Lora& L) {
         L.a.bias = nullptr;
         L.a.offset_bias = -1;
         L.a.bias_dot = L.bd;
       },
       FWD_ERR_ARG, "bias_dot was given but bias is NULL"},
      {"A_dot without LoRA",
       [](Lora& L) {
         L.a.A = L.a.B = nullptr;
         L.a.A_dot = L.Ad;
       },
       FWD_ERR_ARG, "A_dot was given without lora_A/lora_B"},
      {"B_dot without LoRA",
       [](Lora& L) {
         L.a.A = L.a.B = nullptr;
         L.a.B_dot = L.Bd;
       },
       FWD_ERR_ARG, "B_dot was given without lora_A/lora_B"},
      {"seeds NULL (LoRA slices generated)", [](Lora& L) { L.a.seeds = nullptr; }, FWD_ERR_NULL,
       "seeds is NULL but a perturbation slice must be generated (lora_A"},
      {"seeds NULL (only B generated)",
       [](Lora& L) {
         L.a.seeds = nullptr;
         L.a.A_dot = L.Ad;
         L.a.bias_dot = L.bd;
       },
       FWD_ERR_NULL, "seeds is NULL but a perturbation slice must be generated (lora_B"},
      {"seeds NULL (bias tangent generated)",
       [](Lora& L) {
         L.a.seeds = nullptr;
         L.a.A_dot = L.Ad;
         L.a.B_dot = L.Bd;
       },
       FWD_ERR_NULL, "seeds is NULL but a perturbation slice must be generated (bias"},
      {"seeds NULL (no LoRA, bias tangent generated)",
       [](Lora& L) {
         L.a.seeds = nullptr;
         L.a.A = L.a.B = nullptr;
       },
       FWD_ERR_NULL, "seeds is NULL"},
      {"K = 0 with x_dot", [](Lora& L) { L.a.K = 0; }, FWD_ERR_ARG, "x_dot was given but K = 0"},
      {"K = 0 with A_dot",
       [](Lora& L) {
         L.a.K = 0;
         L.a.x_dot = nullptr;
         L.a.A_dot = L.Ad;
       },
       FWD_ERR_ARG, "A_dot was given but K = 0"},
      {"K = 0 with B_dot",
       [](Lora& L) {
         L.a.K = 0;
         L.a.x_dot = nullptr;
         L.a.B_dot = L.Bd;
       },
       FWD_ERR_ARG, "B_dot was given but K = 0"},
      {"K = 0 with bias_dot",
       [](Lora& L) {
         L.a.K = 0;
         L.a.x_dot = nullptr;
         L.a.bias_dot = L.bd;
       },
       FWD_ERR_ARG, "bias_dot was given but K = 0"},
      // Sizes whose element indices overflow int64 (nothing is read or allocated before the check).
      {"x extent", [](Lora& L) { L.a.M = BIG; }, FWD_ERR_SIZE, "x: 4611686018427387904 rows of leading dimension 3"},
      {"x ld extent", [](Lora& L) { L.a.ldx = INT64_MAX - 1; }, FWD_ERR_SIZE, "x: 2 rows"},
      {"W extent", [](Lora& L) { L.a.ldw = INT64_MAX / 2; }, FWD_ERR_SIZE, "W: 4 rows"},
      {"y extent", [](Lora& L) { L.a.ldy = INT64_MAX - 1; }, FWD_ERR_SIZE, "y: 2 rows"},
      {"y_dot extent", [](Lora& L) { L.a.ldy_dot = INT64_MAX / 2; }, FWD_ERR_SIZE, "y_dot: 4 rows"},
      {"x_dot extent", [](Lora& L) { L.a.ldx_dot = INT64_MAX / 2; }, FWD_ERR_SIZE, "x_dot: 4 rows"},
      {"lora_A extent", [](Lora& L) { L.a.lda = INT64_MAX - 1; }, FWD_ERR_SIZE, "lora_A: 2 rows"},
      {"lora_B extent", [](Lora& L) { L.a.ldb = INT64_MAX / 2; }, FWD_ERR_SIZE, "lora_B: 4 rows"},
      {"(K + 1) * M", [](Lora& L) {
         L.a.K = ((int64_t)1 << 30) - 1;
         L.a.M = (int64_t)1 << 40;
         L.a.ldx = 1;
         L.a.d_in = 1;
         L.a.lda = L.a.ldx_dot = 1;
       },
       FWD_ERR_SIZE, "(K + 1) * M"},
      {"r * d_in", [](Lora& L) {
         L.a.r = BIG;
         L.a.ldb = BIG;
       },
       FWD_ERR_SIZE, "r * d_in"},
  };
  for (const Bad& b : bad) {
    Lora L;
    b.mutate(L);
    g_context = b.what;
    EXPECT_ERR(fwd_lora_linear_dual(&L.a), b.want, fn, b.keyword);
    CHECK(L.untouched(), "a failing call wrote y / y_dot");
    g_context = "";
  }

  // Valid variants around the error cases: none of these may fail.
  struct Good {
    const char* what;
    void (*mutate)(Lora&);
    bool same_y;  // y must equal the base case's
  } good[] = {
      {"no LoRA: r, lda, ldb, offsets, scaling ignored",
       [](Lora& L) {
         L.a.A = L.a.B = nullptr;
         L.a.r = -5;
         L.a.lda = L.a.ldb = 0;
         L.a.offset_A = L.a.offset_B = -1;
         L.a.scaling = NAN;
       },
       false},
      {"explicit tangents: offsets may be negative, seeds NULL",
       [](Lora& L) {
         L.a.A_dot = L.Ad;
         L.a.B_dot = L.Bd;
         L.a.bias_dot = L.bd;
         L.a.offset_A = L.a.offset_B = L.a.offset_bias = -1;
         L.a.seeds = nullptr;
       },
       true},
      {"frozen bias, explicit LoRA tangents, seeds NULL",
       [](Lora& L) {
         L.a.A_dot = L.Ad;
         L.a.B_dot = L.Bd;
         L.a.offset_bias = -1;
         L.a.seeds = nullptr;
       },
       true},
      {"no x_dot: ldx_dot ignored",
       [](Lora& L) {
         L.a.x_dot = nullptr;
         L.a.ldx_dot = -3;
       },
       true},
      {"no bias", [](Lora& L) {
         L.a.bias = nullptr;
         L.a.offset_bias = -1;
         L.a.bias_dot = nullptr;
       },
       false},
      {"normal dist, bf16 out", [](Lora& L) {
         L.a.dist = FWD_DIST_NORMAL;
         L.a.out_dtype = FWD_BF16;
       },
       false},
      {"K = 0: the primal only; y_dot, ldy_dot, seeds and offsets ignored",
       [](Lora& L) {
         L.a.K = 0;
         L.a.x_dot = nullptr;
         L.a.y_dot = nullptr;
         L.a.ldy_dot = -1;
         L.a.seeds = nullptr;
         L.a.offset_A = L.a.offset_B = -7;
       },
       true},
      {"K = 0 with a trainable bias offset",
       [](Lora& L) {
         L.a.K = 0;
         L.a.x_dot = nullptr;
         L.a.y_dot = nullptr;
       },
       true},
      {"num_threads = 0 and negative", [](Lora& L) { L.a.num_threads = -3; }, true},
  };
  for (const Good& g : good) {
    Lora L;
    g.mutate(L);
    g_context = g.what;
    EXPECT_OK(fwd_lora_linear_dual(&L.a));
    if (g.same_y)
      for (int i = 0; i < Lora::M * Lora::d_out; ++i)
        CHECK(fabsf(L.y[i] - y_ref[i]) <= 1e-5f * (1.0f + fabsf(y_ref[i])), "y[%d] = %g, base case %g", i, L.y[i],
              y_ref[i]);
    if (L.a.K == 0)
      for (float v : L.yd) CHECK(v == 5.5f, "K = 0 wrote y_dot");
    g_context = "";
  }

#if !defined(__SANITIZE_ADDRESS__)
  // Out of memory is a status too (under ASan a failed operator new reports and exits instead). Sizes
  // whose indices fit in int64 but whose scratch (M x (1 + K) r floats, 2^59.6 bytes) exceeds any address
  // space (57-bit at most): the kernel allocates it before reading x.
  {
    Lora L;
    L.a.M = (int64_t)1 << 55;
    L.a.x_dot = nullptr;
    g_context = "out of memory";
    EXPECT_ERR(fwd_lora_linear_dual(&L.a), FWD_ERR_ALLOC, fn, "out of memory");
    g_context = "";
  }
#endif
}

// A valid small attention problem (with a mask and all three tangents); each error case breaks one thing.
struct Attn {
  static constexpr int64_t B = 1, H = 2, Hkv = 1, L = 3, S = 4, D = 4, K = 2;
  static constexpr int64_t nq = B * H * L * D, nkv = B * Hkv * S * D;
  float q[nq] = {}, k[nkv] = {}, v[nkv] = {}, qd[K * nq] = {}, kd[K * nkv] = {}, vd[K * nkv] = {};
  float mask[L * S] = {};
  float o[nq], od[K * nq];
  fwd_attention_dual_args a;
  Attn() {
    for (float& x : o) x = 6.5f;
    for (float& x : od) x = 6.5f;
    memset(&a, 0, sizeof a);
    a.B = B;
    a.H = H;
    a.Hkv = Hkv;
    a.L = L;
    a.S = S;
    a.D = D;
    a.K = K;
    a.dtype = FWD_F32;
    a.q = q;
    a.k = k;
    a.v = v;
    a.q_dot = qd;
    a.k_dot = kd;
    a.v_dot = vd;
    a.mask = mask;
    a.mask_stride[0] = 0;
    a.mask_stride[1] = 0;
    a.mask_stride[2] = S;
    a.mask_stride[3] = 1;
    a.causal = 1;
    a.scale = 0.5f;
    a.o = o;
    a.o_dot = od;
    a.num_threads = 1;
  }
  bool untouched() const {
    for (float x : o)
      if (x != 6.5f) return false;
    for (float x : od)
      if (x != 6.5f) return false;
    return true;
  }
};

static void test_attention() {
  const char* fn = "fwd_attention_dual";
  EXPECT_ERR(fwd_attention_dual(nullptr), FWD_ERR_NULL, fn, "args is NULL");
  {
    Attn T;
    EXPECT_OK(fwd_attention_dual(&T.a));
  }
  struct Bad {
    const char* what;
    void (*mutate)(Attn&);
    fwd_status want;
    const char* keyword;
  } bad[] = {
      {"B = 0", [](Attn& T) { T.a.B = 0; }, FWD_ERR_SIZE, "B must be positive, got 0"},
      {"H < 0", [](Attn& T) { T.a.H = -4; }, FWD_ERR_SIZE, "H must be positive, got -4"},
      {"Hkv = 0", [](Attn& T) { T.a.Hkv = 0; }, FWD_ERR_SIZE, "Hkv must be positive, got 0"},
      {"L = 0", [](Attn& T) { T.a.L = 0; }, FWD_ERR_SIZE, "L must be positive, got 0"},
      {"S < 0", [](Attn& T) { T.a.S = -1; }, FWD_ERR_SIZE, "S must be positive, got -1"},
      {"D = 0", [](Attn& T) { T.a.D = 0; }, FWD_ERR_SIZE, "D must be positive, got 0"},
      {"K < 0", [](Attn& T) { T.a.K = -1; }, FWD_ERR_SIZE, "K (number of tangents) must be non-negative, got -1"},
      {"K huge", [](Attn& T) { T.a.K = (int64_t)1 << 40; }, FWD_ERR_SIZE, "K is too large: 1099511627776"},
      {"H % Hkv", [](Attn& T) { T.a.Hkv = 3; }, FWD_ERR_SIZE, "H (2) must be a multiple of Hkv (3)"},
      {"sizes overflow", [](Attn& T) { T.a.L = (int64_t)1 << 60; }, FWD_ERR_SIZE, "the tensor sizes overflow int64"},
      {"dtype", [](Attn& T) { T.a.dtype = 2; }, FWD_ERR_ARG, "dtype must be FWD_F32 (0) or FWD_BF16 (1), got 2"},
      {"dtype < 0", [](Attn& T) { T.a.dtype = -1; }, FWD_ERR_ARG, "got -1"},
      {"q NULL", [](Attn& T) { T.a.q = nullptr; }, FWD_ERR_NULL, "q is NULL"},
      {"k NULL", [](Attn& T) { T.a.k = nullptr; }, FWD_ERR_NULL, "k is NULL"},
      {"v NULL", [](Attn& T) { T.a.v = nullptr; }, FWD_ERR_NULL, "v is NULL"},
      {"o NULL", [](Attn& T) { T.a.o = nullptr; }, FWD_ERR_NULL, ": o is NULL"},
      {"o_dot NULL with K > 0", [](Attn& T) { T.a.o_dot = nullptr; }, FWD_ERR_NULL, "o_dot is NULL but K = 2"},
      {"q_dot with K = 0",
       [](Attn& T) {
         T.a.K = 0;
         T.a.k_dot = T.a.v_dot = nullptr;
       },
       FWD_ERR_ARG, "q_dot was given but K = 0"},
      {"k_dot with K = 0",
       [](Attn& T) {
         T.a.K = 0;
         T.a.q_dot = T.a.v_dot = nullptr;
       },
       FWD_ERR_ARG, "k_dot was given but K = 0"},
      {"v_dot with K = 0",
       [](Attn& T) {
         T.a.K = 0;
         T.a.q_dot = T.a.k_dot = nullptr;
       },
       FWD_ERR_ARG, "v_dot was given but K = 0"},
      {"negative mask stride", [](Attn& T) { T.a.mask_stride[2] = -1; }, FWD_ERR_SIZE,
       "mask_stride[2] must be non-negative, got -1"},
      {"negative mask stride (b)", [](Attn& T) { T.a.mask_stride[0] = INT64_MIN; }, FWD_ERR_SIZE, "mask_stride[0]"},
      {"mask index overflow", [](Attn& T) { T.a.mask_stride[3] = INT64_MAX / 2; }, FWD_ERR_SIZE,
       "mask_stride: the largest mask index overflows int64"},
      {"scale NaN", [](Attn& T) { T.a.scale = NAN; }, FWD_ERR_ARG, "scale must be finite, got"},
      {"scale inf", [](Attn& T) { T.a.scale = INFINITY; }, FWD_ERR_ARG, "scale must be finite, got inf"},
  };
  for (const Bad& b : bad) {
    Attn T;
    b.mutate(T);
    g_context = b.what;
    EXPECT_ERR(fwd_attention_dual(&T.a), b.want, fn, b.keyword);
    CHECK(T.untouched(), "a failing call wrote o / o_dot");
    g_context = "";
  }
  struct Good {
    const char* what;
    void (*mutate)(Attn&);
  } good[] = {
      {"K = 0, o_dot NULL",
       [](Attn& T) {
         T.a.K = 0;
         T.a.q_dot = T.a.k_dot = T.a.v_dot = nullptr;
         T.a.o_dot = nullptr;
       }},
      {"no mask: strides ignored",
       [](Attn& T) {
         T.a.mask = nullptr;
         T.a.mask_stride[2] = -1;
         T.a.mask_stride[3] = INT64_MAX;
       }},
      {"no tangents with K > 0", [](Attn& T) { T.a.q_dot = T.a.k_dot = T.a.v_dot = nullptr; }},
      {"any nonzero causal, num_threads <= 0",
       [](Attn& T) {
         T.a.causal = -9;
         T.a.num_threads = 0;
       }},
      {"scale 0", [](Attn& T) { T.a.scale = 0.0f; }},
  };
  for (const Good& g : good) {
    Attn T;
    g.mutate(T);
    g_context = g.what;
    EXPECT_OK(fwd_attention_dual(&T.a));
    g_context = "";
  }
}

// fwd_last_error is per thread: another thread's failure does not replace this thread's message, a new
// thread starts with "", and concurrent failures each see their own message.
static void test_thread_local_error() {
  uint32_t out[4];
  CHECK(fwd_philox_words(0, 0, 0, out, 1) == FWD_ERR_SIZE, "setup");
  const std::string mine = fwd_last_error();
  std::string theirs, fresh;
  std::thread t([&] {
    fresh = fwd_last_error();
    float f[1];
    fwd_perturb(0, 1, 0, 9, FWD_F32, f, 1);
    theirs = fwd_last_error();
  });
  t.join();
  CHECK(fresh.empty(), "a new thread's fwd_last_error() is '%s', not empty", fresh.c_str());
  CHECK(theirs.find("fwd_perturb") != std::string::npos, "the other thread's message: '%s'", theirs.c_str());
  CHECK(mine == fwd_last_error(), "this thread's message changed to '%s'", fwd_last_error());

  // Four threads failing at once with different values, many times: each must read its own message.
  constexpr int NT = 4, ITERS = 500;
  std::atomic<int> wrong{0};
  std::vector<std::thread> ts;
  for (int i = 0; i < NT; ++i)
    ts.emplace_back([i, &wrong] {
      const std::string want = "fwd_perturb: n must be positive, got " + std::to_string(-(i + 1));
      float f[1];
      for (int it = 0; it < ITERS; ++it) {
        if (fwd_perturb(0, -(i + 1), 0, 0, FWD_F32, f, 1) != FWD_ERR_SIZE || want != fwd_last_error()) ++wrong;
        if (fwd_perturb(0, 1, 0, 0, FWD_F32, f, 1) != FWD_OK || want != fwd_last_error()) ++wrong;  // kept on success
      }
    });
  for (auto& th : ts) th.join();
  CHECK(wrong.load() == 0, "%d concurrent calls saw another thread's message or status", wrong.load());
}

int main() {
  CHECK(fwd_last_error() != nullptr && fwd_last_error()[0] == '\0', "fwd_last_error() is not \"\" before any error");
  test_philox_words();
  test_perturb();
  test_perturb_combine();
  test_derive_seed();
  test_sgemm();
  test_lora();
  test_attention();
  test_thread_local_error();
  return test_summary("test_errors");
}
