// fwd_perturb: Rademacher and normal values, float32 and bfloat16 output, against the test's own Philox
// and Triton's rand/randn mapping recomputed in double.
#include "test_common.h"

// Normal values: |got - want| <= 1e-5 * max(1, |want|).
static bool close_normal(double got, double want) { return fabs(got - want) <= 1e-5 * fmax(1.0, fabs(want)); }

struct NormalStats {
  int64_t n = 0, n_far_from_double_uniform = 0;
  double max_dev_double_uniform = 0;
  double max_u1_of_far = 0, min_u1_of_far = 2;  // the double u1 of those beyond 1e-5
};
static NormalStats g_stats;

static void check_range(uint64_t seed, int64_t n, int64_t offset, int dist, int nt) {
  const std::string ctx = strf("seed=%016llx n=%lld offset=%lld dist=%d threads=%d", (unsigned long long)seed,
                               (long long)n, (long long)offset, dist, nt);
  g_context = ctx.c_str();

  std::vector<float> f(n + 4, 12345.0f);
  fwd_status st = fwd_perturb(seed, n, offset, dist, FWD_F32, f.data(), nt);
  CHECK(st == FWD_OK, "f32 status %d: %s", (int)st, fwd_last_error());
  std::vector<uint16_t> b(n + 4, 0x7777);
  st = fwd_perturb(seed, n, offset, dist, FWD_BF16, b.data(), nt);
  CHECK(st == FWD_OK, "bf16 status %d: %s", (int)st, fwd_last_error());
  for (int j = 0; j < 4; ++j) {
    CHECK(f[n + j] == 12345.0f, "f32 output written past n");
    CHECK(b[n + j] == 0x7777, "bf16 output written past n");
  }

  int bad_val = 0, bad_bf16 = 0;
  double sum = 0, sum2 = 0;
  for (int64_t i = 0; i < n; ++i) {
    const ref::W4 w = ref::philox(seed, (uint64_t)(offset + i));
    const double got = f[i];
    sum += got;
    sum2 += got * got;
    if (dist == FWD_DIST_RADEMACHER) {
      const double want = (w.v[0] >> 31) == 0 ? 1.0 : -1.0;  // +1 iff bit 31 of word 0 is clear
      CHECK_LIMITED(bad_val, got == want, "element %lld: got %g, want %g (word0 %08x)", (long long)i, got, want, w.v[0]);
    } else {
      const double want = ref::normal(w.v[0], w.v[1], /*fp32_uniform=*/true);
      CHECK_LIMITED(bad_val, close_normal(got, want), "element %lld: got %.9g, want %.9g (words %08x %08x)",
                    (long long)i, got, want, w.v[0], w.v[1]);
      // The same formula with the uniforms in double too differs only where sqrt(-2 ln u1) is
      // ill-conditioned (u1 -> 1): recorded, not checked.
      const double dd = fabs(got - ref::normal(w.v[0], w.v[1], /*fp32_uniform=*/false));
      g_stats.n++;
      if (dd > 1e-5 * fmax(1.0, fabs(want))) {
        g_stats.n_far_from_double_uniform++;
        const double u1 = ref::uniform(w.v[0], false);
        g_stats.min_u1_of_far = fmin(g_stats.min_u1_of_far, u1);
        g_stats.max_u1_of_far = fmax(g_stats.max_u1_of_far, u1);
      }
      g_stats.max_dev_double_uniform = fmax(g_stats.max_dev_double_uniform, dd);
    }
    const uint16_t want_b = ref::f32_to_bf16_rne(f[i]);
    CHECK_LIMITED(bad_bf16, b[i] == want_b, "element %lld: bf16 %04x, want %04x (f32 %.9g)", (long long)i, b[i], want_b,
                  got);
  }
  if (n >= 10000) {  // the distribution: mean 0, variance 1
    const double mean = sum / n, var = sum2 / n - mean * mean;
    CHECK(fabs(mean) < 6.0 / sqrt((double)n), "mean %g", mean);
    CHECK(fabs(var - 1.0) < (dist == FWD_DIST_NORMAL ? 12.0 / sqrt((double)n) : 1e-12 + 36.0 / n), "variance %g", var);
  }
  g_context = "";
}

// The values agree with fwd_philox_words' words (the two entry points use one generator).
static void check_against_api_words(uint64_t seed, int64_t n, int64_t offset) {
  std::vector<uint32_t> w(4 * n);
  std::vector<float> r(n), g(n);
  CHECK(fwd_philox_words(seed, n, offset, w.data(), 1) == FWD_OK, "%s", fwd_last_error());
  CHECK(fwd_perturb(seed, n, offset, FWD_DIST_RADEMACHER, FWD_F32, r.data(), 1) == FWD_OK, "%s", fwd_last_error());
  CHECK(fwd_perturb(seed, n, offset, FWD_DIST_NORMAL, FWD_F32, g.data(), 1) == FWD_OK, "%s", fwd_last_error());
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    CHECK_LIMITED(bad, r[i] == ((w[4 * i] & 0x80000000u) ? -1.0f : 1.0f), "rademacher %lld vs API word", (long long)i);
    CHECK_LIMITED(bad, close_normal(g[i], ref::normal(w[4 * i], w[4 * i + 1])), "normal %lld vs API words",
                  (long long)i);
  }
}

// The bf16 rounding helper of the test itself, on hand-picked values.
static void test_bf16_reference() {
  struct {
    uint32_t f;
    uint16_t b;
  } cases[] = {
      {0x3f800000u, 0x3f80},  // 1.0
      {0xbf800000u, 0xbf80},  // -1.0
      {0x3f808000u, 0x3f80},  // 1 + 2^-8: a tie, even mantissa stays
      {0x3f818000u, 0x3f82},  // 1 + 3*2^-8: a tie, odd mantissa rounds up
      {0x3f808001u, 0x3f81},  // just above the tie
      {0x3f807fffu, 0x3f80},  // just below
      {0x7f7fffffu, 0x7f80},  // FLT_MAX rounds to +inf
      {0x00000001u, 0x0000},  // smallest denormal
      {0x80000000u, 0x8000},  // -0
      {0x7f800000u, 0x7f80},  // inf
  };
  for (auto& c : cases) {
    float x;
    memcpy(&x, &c.f, sizeof x);
    CHECK(ref::f32_to_bf16_rne(x) == c.b, "reference bf16 of %08x: %04x, want %04x", c.f, ref::f32_to_bf16_rne(x), c.b);
  }
}

int main() {
  test_bf16_reference();
  const int64_t two32 = 4294967296ll;
  const uint64_t seeds[] = {0ull, 3ull, 0xdeadbeefcafef00dull, 0x8000000000000001ull, 0xffffffffffffffffull};
  const int64_t offsets[] = {0, 17, two32 - 40, (1ll << 45) + 3};
  for (uint64_t seed : seeds)
    for (int64_t off : offsets)
      for (int dist : {FWD_DIST_RADEMACHER, FWD_DIST_NORMAL})
        for (int64_t n : {1, 5, 333}) check_range(seed, n, off, dist, 1);
  // Large ranges: the OpenMP path, 2^32 crossed in the middle, and the distribution checks.
  for (int dist : {FWD_DIST_RADEMACHER, FWD_DIST_NORMAL})
    for (int nt : {1, 2, 0}) check_range(0x0123456789abcdefull, 100003, two32 - 50000, dist, nt);
  check_range(99, 1 << 20, 0, FWD_DIST_NORMAL, 2);

  check_against_api_words(0x5eed, 1000, two32 - 500);
  check_against_api_words(0, 64, 0);

  printf("info: normal values vs an all-double reference (uniforms in double too): %lld of %lld differ by more than "
         "1e-5 (max %.3g; u1 of those in [%.9f, %.9f])\n",
         (long long)g_stats.n_far_from_double_uniform, (long long)g_stats.n, g_stats.max_dev_double_uniform,
         g_stats.n_far_from_double_uniform ? g_stats.min_u1_of_far : 0.0,
         g_stats.n_far_from_double_uniform ? g_stats.max_u1_of_far : 0.0);
  return test_summary("test_perturb");
}
