// Error handling of every C API entry point: NULL pointers, zero/negative sizes, bad dist/dtype,
// negative offsets, short leading dimensions, LoRA A without B, K = 0, ... Each must return the right
// nonzero fwd_status with a non-empty fwd_last_error() naming the problem, write nothing, and never abort.
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
    CHECK(msg_.rfind(fn, 0) == 0, "%s: message '%s' does not start with '%s'", #call, msg_.c_str(), fn);      \
    CHECK(msg_.find(keyword) != std::string::npos, "%s: message '%s' does not mention '%s'", #call,            \
          msg_.c_str(), keyword);                                                                              \
  } while (0)

#define EXPECT_OK(call)                                                                               \
  do {                                                                                                \
    const fwd_status st_ = (call);                                                                    \
    CHECK(st_ == FWD_OK, "%s returned %d; message: '%s'", #call, (int)st_, fwd_last_error());         \
  } while (0)

static void test_philox_words() {
  const char* fn = "fwd_philox_words";
  uint32_t out[8];
  for (int i = 0; i < 8; ++i) out[i] = 0xCDCDCDCDu;
  EXPECT_ERR(fwd_philox_words(1, 0, 0, out, 1), FWD_ERR_SIZE, fn, "n must be positive");
  EXPECT_ERR(fwd_philox_words(1, -3, 0, out, 1), FWD_ERR_SIZE, fn, "-3");
  EXPECT_ERR(fwd_philox_words(1, INT64_MIN, 0, out, 1), FWD_ERR_SIZE, fn, "n must be positive");
  EXPECT_ERR(fwd_philox_words(1, 2, -1, out, 1), FWD_ERR_SIZE, fn, "offset");
  EXPECT_ERR(fwd_philox_words(1, 2, INT64_MIN, out, 1), FWD_ERR_SIZE, fn, "offset");
  EXPECT_ERR(fwd_philox_words(1, 3, INT64_MAX - 1, out, 1), FWD_ERR_SIZE, fn, "counter range");
  EXPECT_ERR(fwd_philox_words(1, 2, 0, nullptr, 1), FWD_ERR_NULL, fn, "out");
  for (int i = 0; i < 8; ++i) CHECK(out[i] == 0xCDCDCDCDu, "a failing fwd_philox_words wrote its output");
  EXPECT_OK(fwd_philox_words(1, 2, 0, out, 1));
  EXPECT_OK(fwd_philox_words(1, 2, 0, out, -7));  // num_threads <= 0: the OpenMP default
}

static void test_perturb() {
  const char* fn = "fwd_perturb";
  float out[4] = {9, 9, 9, 9};
  EXPECT_ERR(fwd_perturb(1, 0, 0, FWD_DIST_NORMAL, FWD_F32, out, 1), FWD_ERR_SIZE, fn, "n must be positive");
  EXPECT_ERR(fwd_perturb(1, -1, 0, FWD_DIST_NORMAL, FWD_F32, out, 1), FWD_ERR_SIZE, fn, "n must be positive");
  EXPECT_ERR(fwd_perturb(1, 4, -5, FWD_DIST_NORMAL, FWD_F32, out, 1), FWD_ERR_SIZE, fn, "offset");
  EXPECT_ERR(fwd_perturb(1, 4, 0, FWD_DIST_NORMAL, FWD_F32, nullptr, 1), FWD_ERR_NULL, fn, "out");
  EXPECT_ERR(fwd_perturb(1, 4, 0, 2, FWD_F32, out, 1), FWD_ERR_ARG, fn, "dist");
  EXPECT_ERR(fwd_perturb(1, 4, 0, -1, FWD_F32, out, 1), FWD_ERR_ARG, fn, "dist");
  EXPECT_ERR(fwd_perturb(1, 4, 0, FWD_DIST_RADEMACHER, 2, out, 1), FWD_ERR_ARG, fn, "out_dtype");
  EXPECT_ERR(fwd_perturb(1, 4, 0, FWD_DIST_RADEMACHER, -1, out, 1), FWD_ERR_ARG, fn, "out_dtype");
  for (float v : out) CHECK(v == 9.0f, "a failing fwd_perturb wrote its output");
  EXPECT_OK(fwd_perturb(1, 4, 0, FWD_DIST_RADEMACHER, FWD_F32, out, 1));
}

static void test_derive_seed() {
  // No status to return: NULL / n <= 0 mean "no integers" and must not crash.
  CHECK(fwd_derive_seed(5, nullptr, 3) == 5, "NULL ints");
  CHECK(fwd_derive_seed(5, nullptr, -3) == 5, "negative n");
  const int64_t i[1] = {1};
  CHECK(fwd_derive_seed(5, i, 0) == 5, "n = 0");
}

static void test_sgemm() {
  const char* fn = "fwd_sgemm_nt";
  float A[12] = {0}, B[12] = {0}, C[12];
  for (float& v : C) v = 3.5f;
  EXPECT_ERR(fwd_sgemm_nt(0, 2, 2, A, 2, B, 2, C, 2, 1), FWD_ERR_SIZE, fn, "M, N, K");
  EXPECT_ERR(fwd_sgemm_nt(2, 0, 2, A, 2, B, 2, C, 2, 1), FWD_ERR_SIZE, fn, "M, N, K");
  EXPECT_ERR(fwd_sgemm_nt(2, 2, 0, A, 2, B, 2, C, 2, 1), FWD_ERR_SIZE, fn, "M, N, K");
  EXPECT_ERR(fwd_sgemm_nt(-2, 2, 2, A, 2, B, 2, C, 2, 1), FWD_ERR_SIZE, fn, "M, N, K");
  EXPECT_ERR(fwd_sgemm_nt(2, 2, -1, A, 2, B, 2, C, 2, 1), FWD_ERR_SIZE, fn, "M, N, K");
  EXPECT_ERR(fwd_sgemm_nt(2, 2, 2, nullptr, 2, B, 2, C, 2, 1), FWD_ERR_NULL, fn, "NULL");
  EXPECT_ERR(fwd_sgemm_nt(2, 2, 2, A, 2, nullptr, 2, C, 2, 1), FWD_ERR_NULL, fn, "NULL");
  EXPECT_ERR(fwd_sgemm_nt(2, 2, 2, A, 2, B, 2, nullptr, 2, 1), FWD_ERR_NULL, fn, "NULL");
  EXPECT_ERR(fwd_sgemm_nt(2, 2, 3, A, 2, B, 3, C, 2, 1), FWD_ERR_SIZE, fn, "leading dimension");  // lda < K
  EXPECT_ERR(fwd_sgemm_nt(2, 2, 3, A, 3, B, 2, C, 2, 1), FWD_ERR_SIZE, fn, "leading dimension");  // ldb < K
  EXPECT_ERR(fwd_sgemm_nt(2, 3, 2, A, 2, B, 2, C, 2, 1), FWD_ERR_SIZE, fn, "leading dimension");  // ldc < N
  EXPECT_ERR(fwd_sgemm_nt(2, 2, 2, A, -1, B, 2, C, 2, 1), FWD_ERR_SIZE, fn, "leading dimension");
  for (float v : C) CHECK(v == 3.5f, "a failing fwd_sgemm_nt wrote its output");
  EXPECT_OK(fwd_sgemm_nt(2, 2, 2, A, 2, B, 2, C, 2, 1));
}

// A valid small LoRA problem; each error case breaks one thing.
struct Lora {
  static constexpr int64_t M = 2, d_in = 3, d_out = 4, r = 2, K = 2;
  float x[M * d_in] = {}, xd[K * M * d_in] = {}, W[d_out * d_in] = {}, b[d_out] = {}, A[r * d_in] = {},
        B[d_out * r] = {};
  float Ad[K * r * d_in] = {}, Bd[K * d_out * r] = {}, bd[K * d_out] = {};
  float y[M * d_out], yd[K * M * d_out];
  int64_t seeds[K] = {1, 2};
  fwd_lora_dual_args a;
  Lora() {
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
    a.scaling = 1.0f;
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
  EXPECT_ERR(fwd_lora_linear_dual(nullptr), FWD_ERR_NULL, fn, "args");
  {
    Lora L;
    EXPECT_OK(fwd_lora_linear_dual(&L.a));  // the base case is valid
  }
  struct Bad {
    const char* what;
    void (*mutate)(Lora&);
    fwd_status want;
    const char* keyword;
  } bad[] = {
      {"M = 0", [](Lora& L) { L.a.M = 0; }, FWD_ERR_SIZE, "M, d_in, d_out"},
      {"M < 0", [](Lora& L) { L.a.M = -2; }, FWD_ERR_SIZE, "M, d_in, d_out"},
      {"d_in = 0", [](Lora& L) { L.a.d_in = 0; }, FWD_ERR_SIZE, "M, d_in, d_out"},
      {"d_out < 0", [](Lora& L) { L.a.d_out = -1; }, FWD_ERR_SIZE, "M, d_in, d_out"},
      {"K = 0", [](Lora& L) { L.a.K = 0; }, FWD_ERR_SIZE, "K"},
      {"K < 0", [](Lora& L) { L.a.K = -4; }, FWD_ERR_SIZE, "K"},
      {"in_dtype", [](Lora& L) { L.a.in_dtype = 2; }, FWD_ERR_ARG, "in_dtype"},
      {"in_dtype < 0", [](Lora& L) { L.a.in_dtype = -1; }, FWD_ERR_ARG, "in_dtype"},
      {"out_dtype", [](Lora& L) { L.a.out_dtype = 7; }, FWD_ERR_ARG, "out_dtype"},
      {"dist", [](Lora& L) { L.a.dist = 2; }, FWD_ERR_ARG, "dist"},
      {"dist < 0", [](Lora& L) { L.a.dist = -1; }, FWD_ERR_ARG, "dist"},
      {"x NULL", [](Lora& L) { L.a.x = nullptr; }, FWD_ERR_NULL, "x"},
      {"W NULL", [](Lora& L) { L.a.W = nullptr; }, FWD_ERR_NULL, "W"},
      {"y NULL", [](Lora& L) { L.a.y = nullptr; }, FWD_ERR_NULL, "y"},
      {"y_dot NULL", [](Lora& L) { L.a.y_dot = nullptr; }, FWD_ERR_NULL, "y_dot"},
      {"ldx < d_in", [](Lora& L) { L.a.ldx = 2; }, FWD_ERR_SIZE, "leading dimension"},
      {"ldw < d_in", [](Lora& L) { L.a.ldw = 2; }, FWD_ERR_SIZE, "leading dimension"},
      {"ldy < d_out", [](Lora& L) { L.a.ldy = 3; }, FWD_ERR_SIZE, "leading dimension"},
      {"ldy_dot < d_out", [](Lora& L) { L.a.ldy_dot = 0; }, FWD_ERR_SIZE, "leading dimension"},
      {"ldx_dot < d_in", [](Lora& L) { L.a.ldx_dot = 1; }, FWD_ERR_SIZE, "ldx_dot"},
      {"A without B", [](Lora& L) { L.a.B = nullptr; }, FWD_ERR_NULL, "lora_A and lora_B"},
      {"B without A", [](Lora& L) { L.a.A = nullptr; }, FWD_ERR_NULL, "lora_A and lora_B"},
      {"r = 0", [](Lora& L) { L.a.r = 0; }, FWD_ERR_SIZE, "rank"},
      {"r < 0", [](Lora& L) { L.a.r = -1; }, FWD_ERR_SIZE, "rank"},
      {"lda < d_in", [](Lora& L) { L.a.lda = 2; }, FWD_ERR_SIZE, "lda"},
      {"ldb < r", [](Lora& L) { L.a.ldb = 1; }, FWD_ERR_SIZE, "ldb"},
      {"offset_A < 0", [](Lora& L) { L.a.offset_A = -1; }, FWD_ERR_SIZE, "offset_A"},
      {"offset_B < 0", [](Lora& L) { L.a.offset_B = -8; }, FWD_ERR_SIZE, "offset_B"},
      {"offset_A slice past 2^63", [](Lora& L) { L.a.offset_A = INT64_MAX - 3; }, FWD_ERR_SIZE, "counter range"},
      {"offset_bias slice past 2^63", [](Lora& L) { L.a.offset_bias = INT64_MAX - 1; }, FWD_ERR_SIZE,
       "counter range"},
      {"bias tangent without bias",
       [](Lora& L) {
         L.a.bias = nullptr;
         L.a.offset_bias = 0;
       },
       FWD_ERR_ARG, "bias is NULL"},
      {"A_dot without LoRA",
       [](Lora& L) {
         L.a.A = L.a.B = nullptr;
         L.a.A_dot = L.Ad;
       },
       FWD_ERR_ARG, "A_dot"},
      {"B_dot without LoRA",
       [](Lora& L) {
         L.a.A = L.a.B = nullptr;
         L.a.B_dot = L.Bd;
       },
       FWD_ERR_ARG, "B_dot"},
      {"seeds NULL (LoRA slices generated)", [](Lora& L) { L.a.seeds = nullptr; }, FWD_ERR_NULL, "seeds"},
      {"seeds NULL (only B generated)",
       [](Lora& L) {
         L.a.seeds = nullptr;
         L.a.A_dot = L.Ad;
         L.a.bias_dot = L.bd;
       },
       FWD_ERR_NULL, "seeds"},
      {"seeds NULL (bias tangent generated)",
       [](Lora& L) {
         L.a.seeds = nullptr;
         L.a.A_dot = L.Ad;
         L.a.B_dot = L.Bd;
       },
       FWD_ERR_NULL, "seeds"},
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
  } good[] = {
      {"no LoRA: r, lda, ldb, offsets ignored",
       [](Lora& L) {
         L.a.A = L.a.B = nullptr;
         L.a.r = -5;
         L.a.lda = L.a.ldb = 0;
         L.a.offset_A = L.a.offset_B = -1;
       }},
      {"explicit tangents: offsets may be negative, seeds NULL",
       [](Lora& L) {
         L.a.A_dot = L.Ad;
         L.a.B_dot = L.Bd;
         L.a.bias_dot = L.bd;
         L.a.offset_A = L.a.offset_B = L.a.offset_bias = -1;
         L.a.seeds = nullptr;
       }},
      {"frozen bias, explicit LoRA tangents, seeds NULL",
       [](Lora& L) {
         L.a.A_dot = L.Ad;
         L.a.B_dot = L.Bd;
         L.a.offset_bias = -1;
         L.a.seeds = nullptr;
       }},
      {"no x_dot: ldx_dot ignored",
       [](Lora& L) {
         L.a.x_dot = nullptr;
         L.a.ldx_dot = -3;
       }},
      {"no bias", [](Lora& L) {
         L.a.bias = nullptr;
         L.a.offset_bias = -1;
         L.a.bias_dot = nullptr;
       }},
      {"normal dist, bf16 out", [](Lora& L) {
         L.a.dist = FWD_DIST_NORMAL;
         L.a.out_dtype = FWD_BF16;
       }},
  };
  for (const Good& g : good) {
    Lora L;
    g.mutate(L);
    g_context = g.what;
    EXPECT_OK(fwd_lora_linear_dual(&L.a));
    g_context = "";
  }
}

// fwd_last_error is per thread: another thread's failure does not replace this thread's message.
static void test_thread_local_error() {
  uint32_t out[4];
  CHECK(fwd_philox_words(0, 0, 0, out, 1) == FWD_ERR_SIZE, "setup");
  const std::string mine = fwd_last_error();
  std::string theirs;
  std::thread t([&] {
    float f[1];
    fwd_perturb(0, 1, 0, 9, FWD_F32, f, 1);
    theirs = fwd_last_error();
  });
  t.join();
  CHECK(theirs.find("fwd_perturb") != std::string::npos, "the other thread's message: '%s'", theirs.c_str());
  CHECK(mine == fwd_last_error(), "this thread's message changed to '%s'", fwd_last_error());
}

int main() {
  CHECK(fwd_last_error() != nullptr, "fwd_last_error() is NULL before any error");
  test_philox_words();
  test_perturb();
  test_derive_seed();
  test_sgemm();
  test_lora();
  test_thread_local_error();
  return test_summary("test_errors");
}
