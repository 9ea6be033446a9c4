// fwd_sgemm_nt: C (M, N) = A (M, K) B (N, K)^T against a double-precision triple loop, odd shapes,
// leading dimensions larger than the rows, several thread counts; C's padding must stay untouched.
#include "test_common.h"

static void check_gemm(int64_t M, int64_t N, int64_t K, int64_t pad_a, int64_t pad_b, int64_t pad_c, int nt,
                       uint64_t seed) {
  const std::string ctx = strf("M=%lld N=%lld K=%lld pads=%lld/%lld/%lld threads=%d", (long long)M, (long long)N,
                               (long long)K, (long long)pad_a, (long long)pad_b, (long long)pad_c, nt);
  g_context = ctx.c_str();
  const int64_t lda = K + pad_a, ldb = K + pad_b, ldc = N + pad_c;
  ref::Rng rng(seed);
  std::vector<float> A((size_t)(M * lda)), B((size_t)(N * ldb));
  for (auto& v : A) v = (float)rng.uniform(-1, 1);
  for (auto& v : B) v = (float)rng.uniform(-1, 1);
  // Padding is NaN: reading past a row would poison the result.
  for (int64_t i = 0; i < M; ++i)
    for (int64_t p = K; p < lda; ++p) A[i * lda + p] = NAN;
  for (int64_t j = 0; j < N; ++j)
    for (int64_t p = K; p < ldb; ++p) B[j * ldb + p] = NAN;
  const float sentinel = -777.25f;
  std::vector<float> C((size_t)(M * ldc), sentinel);
  const fwd_status st = fwd_sgemm_nt(M, N, K, A.data(), lda, B.data(), ldb, C.data(), ldc, nt);
  CHECK(st == FWD_OK, "status %d: %s", (int)st, fwd_last_error());
  int bad = 0, badpad = 0;
  double err2 = 0, ref2 = 0;
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      double want = 0, absum = 0;
      for (int64_t p = 0; p < K; ++p) {
        want += (double)A[i * lda + p] * (double)B[j * ldb + p];
        absum += fabs((double)A[i * lda + p] * (double)B[j * ldb + p]);
      }
      const double got = C[i * ldc + j];
      err2 += (got - want) * (got - want);
      ref2 += want * want;
      // float32 accumulation: a few ulps of the sum of magnitudes per element
      CHECK_LIMITED(bad, fabs(got - want) <= 1e-6 * absum * (2.0 + sqrt((double)K)) + 1e-30,
                    "C[%lld][%lld] = %.9g, want %.9g", (long long)i, (long long)j, got, want);
    }
    for (int64_t j = N; j < ldc; ++j)
      CHECK_LIMITED(badpad, C[i * ldc + j] == sentinel, "padding C[%lld][%lld] overwritten", (long long)i,
                    (long long)j);
  }
  CHECK(sqrt(err2) <= 1e-5 * sqrt(ref2) + 1e-30, "relative Frobenius error %.3g", sqrt(err2 / fmax(ref2, 1e-300)));
  g_context = "";
}

int main() {
  struct {
    int64_t M, N, K;
  } shapes[] = {{1, 1, 1},    {7, 33, 17},  {13, 300, 5},  {100, 257, 130}, {2, 8, 3},    {1, 9, 1},
                {12, 8, 256}, {6, 16, 257}, {145, 17, 513}, {3, 1100, 20},  {300, 3, 7}};
  uint64_t seed = 1;
  for (auto& s : shapes)
    for (int nt : {1, 2}) {
      check_gemm(s.M, s.N, s.K, 0, 0, 0, nt, seed++);
      check_gemm(s.M, s.N, s.K, 3, 5, 7, nt, seed++);
    }
  check_gemm(100, 257, 130, 1, 64, 1, 0, 99);  // OpenMP default thread count
  // Exact small-integer case: the sum is exact in float, so the result must be bit-exact.
  {
    const float A[6] = {1, 2, 3, 4, 5, 6}, B[6] = {1, 0, -1, 2, 2, 2};
    float C[4] = {0, 0, 0, 0};
    CHECK(fwd_sgemm_nt(2, 2, 3, A, 3, B, 3, C, 2, 1) == FWD_OK, "%s", fwd_last_error());
    const float want[4] = {-2, 12, -2, 30};
    for (int i = 0; i < 4; ++i) CHECK(C[i] == want[i], "C[%d] = %g, want %g", i, C[i], want[i]);
  }
  return test_summary("test_sgemm");
}
