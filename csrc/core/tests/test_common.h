// Shared helpers of the fwdcore C API tests: a tiny assertion macro and *independent* scalar reference
// implementations (Philox4x32-10, Triton's uniform/normal mapping, splitmix64, bfloat16 rounding)
// written from their specifications, deliberately not reusing anything from the core's headers except
// the C API in fwdcore.h.
#pragma once
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <string>
#include <vector>

#include "fwdcore.h"

// ---------------------------------------------------------------------------------------------------
// Assertions: CHECK records a failure (with file:line and a printf-style message) and goes on, so one
// run reports every problem; the test's main returns test_summary(), nonzero when anything failed.

inline int g_failures = 0;
inline int g_checks = 0;
inline const char* g_context = "";  // printed with each failure (e.g. the case being tested)

__attribute__((format(printf, 4, 5))) static inline void test_fail(const char* file, int line, const char* expr,
                                                                   const char* fmt, ...) {
  ++g_failures;
  fprintf(stderr, "FAILED %s:%d: %s", file, line, expr);
  if (g_context && *g_context) fprintf(stderr, " [%s]", g_context);
  if (fmt && *fmt) {
    fprintf(stderr, ": ");
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
  }
  fprintf(stderr, "\n");
}

#define CHECK(cond, ...)                                                        \
  do {                                                                          \
    ++g_checks;                                                                 \
    if (!(cond)) test_fail(__FILE__, __LINE__, #cond, "" __VA_ARGS__);         \
  } while (0)

// Stop printing the same failing check more than a few times inside a loop.
#define CHECK_LIMITED(counter, cond, ...)                                       \
  do {                                                                          \
    ++g_checks;                                                                 \
    if (!(cond)) {                                                              \
      if ((counter)++ < 5) test_fail(__FILE__, __LINE__, #cond, "" __VA_ARGS__); \
      else ++g_failures;                                                        \
    }                                                                           \
  } while (0)

static inline int test_summary(const char* name) {
  if (g_failures)
    fprintf(stderr, "%s: %d of %d checks FAILED\n", name, g_failures, g_checks);
  else
    printf("%s: all %d checks passed\n", name, g_checks);
  return g_failures ? 1 : 0;
}

__attribute__((format(printf, 1, 2))) static inline std::string strf(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

// ---------------------------------------------------------------------------------------------------
// Reference Philox4x32-10 (Salmon et al., SC'11; Random123's philox4x32_R), the full 4-word counter.

namespace ref {

struct W4 {
  uint32_t v[4];
};

static inline void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = (uint64_t)a * (uint64_t)b;
  *hi = (uint32_t)(p >> 32);
  *lo = (uint32_t)p;
}

// Random123: round(ctr, key) = { hi1 ^ ctr1 ^ key0, lo1, hi0 ^ ctr3 ^ key1, lo0 } with
// (hi0, lo0) = M0 * ctr0, (hi1, lo1) = M1 * ctr2; the key is bumped by the Weyl constants between rounds.
static inline W4 philox4x32_10_full(const uint32_t ctr_in[4], const uint32_t key_in[2]) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  uint32_t ctr[4] = {ctr_in[0], ctr_in[1], ctr_in[2], ctr_in[3]};
  uint32_t key[2] = {key_in[0], key_in[1]};
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key[0] += W0;
      key[1] += W1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(M0, ctr[0], &hi0, &lo0);
    mulhilo32(M1, ctr[2], &hi1, &lo1);
    const uint32_t out[4] = {hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0};
    memcpy(ctr, out, sizeof ctr);
  }
  W4 r;
  memcpy(r.v, ctr, sizeof ctr);
  return r;
}

// fwdcore's/Triton's use: key = (lo, hi) of seed, counter = (lo, hi) of the 64-bit index, c2 = c3 = 0.
static inline W4 philox(uint64_t seed, uint64_t index) {
  const uint32_t ctr[4] = {(uint32_t)index, (uint32_t)(index >> 32), 0u, 0u};
  const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
  return philox4x32_10_full(ctr, key);
}

// Triton's uint_to_uniform_float for 32-bit words: int32 view, negatives folded with ~x (= -x - 1),
// times 4.6566127342e-10. `fp32` = exactly as Triton evaluates it (an int32 tensor times a Python float
// is a float32 multiply); otherwise the same formula in double.
static inline double uniform(uint32_t w, bool fp32) {
  int32_t x;
  memcpy(&x, &w, sizeof x);
  if (x < 0) x = ~x;
  if (fp32) return (double)((float)x * 4.6566127342e-10f);
  return (double)x * 4.6566127342e-10;
}

// Triton's randn (the cosine branch of Box-Muller), transcendental part in double.
static inline double normal(uint32_t w0, uint32_t w1, bool fp32_uniform = true) {
  double u1 = uniform(w0, fp32_uniform);
  const double u2 = uniform(w1, fp32_uniform);
  if (u1 < 1.0e-7) u1 = 1.0e-7;
  const double r = sqrt(-2.0 * log(u1));
  return r * cos(6.283185307179586 * u2);
}

static inline double rademacher(uint32_t w0) { return (w0 & 0x80000000u) ? -1.0 : 1.0; }

// Perturbation value of element `index` of perturbation `seed`.
static inline double value(uint64_t seed, uint64_t index, int dist) {
  const W4 w = philox(seed, index);
  return dist == FWD_DIST_NORMAL ? normal(w.v[0], w.v[1]) : rademacher(w.v[0]);
}

// splitmix64 as specified in the brief / Vigna's splitmix64.c with state z (one step).
static inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static inline uint64_t derive_seed(uint64_t base, const std::vector<int64_t>& ints) {
  uint64_t s = base;
  for (int64_t i : ints) s = splitmix64(s ^ splitmix64((uint64_t)i));
  return s;
}

// ---------------------------------------------------------------------------------------------------
// bfloat16, by value: the two bf16 neighbours of x (truncation and one ulp up in magnitude) and
// whichever is nearer in exact (double) arithmetic, ties to the even mantissa. NaN -> a quiet NaN.

static inline float bf16_to_f32(uint16_t b) {
  const uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint16_t f32_to_bf16_rne(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  if (isnan(x)) return (uint16_t)((u >> 16) | 0x40);
  const uint16_t lo = (uint16_t)(u >> 16);  // toward zero
  if ((u & 0xffffu) == 0) return lo;
  const uint16_t hi = (uint16_t)(lo + 1);  // away from zero (may become inf: correct overflow)
  const double dx = fabs((double)x);
  const double dlo = dx - fabs((double)bf16_to_f32(lo));
  double dhi;
  if (((hi >> 7) & 0xff) == 0xff)  // rounding up overflows to inf: the "next value" is 2^128
    dhi = ldexp(1.0, 128) - dx;
  else
    dhi = fabs((double)bf16_to_f32(hi)) - dx;
  if (dlo < dhi) return lo;
  if (dhi < dlo) return hi;
  return (lo & 1) ? hi : lo;
}

// ---------------------------------------------------------------------------------------------------
// Deterministic test data (xorshift64*; no dependence on <random>'s implementation).

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545F4914F6CDD1Dull;
  }
  double uniform(double a, double b) { return a + (b - a) * ((next() >> 11) * (1.0 / 9007199254740992.0)); }
};

}  // namespace ref

static inline bool nonempty_error() {
  const char* e = fwd_last_error();
  return e != nullptr && e[0] != '\0';
}
