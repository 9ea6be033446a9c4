// Seeded perturbations and Philox words over a range of global offsets.
#include "internal.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fwdcore {

namespace {
// Eight Philox4x32-10 streams side by side with GCC/Clang vector extensions (AVX2 on x86, NEON on
// ARM). Only the first two words are kept: rademacher needs word 0, normal words 0 and 1.
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint64_t v4q __attribute__((vector_size(32)));

#if defined(__AVX2__)
// 32x32 -> 64 products of the even and the odd lanes (vpmuludq), interleaved back: GCC's generic
// 64-bit vector multiply has no AVX2 instruction and is emulated ~4x slower.
static inline void mulhilo8(v8u a, uint32_t b, v8u& hi, v8u& lo) {
  const __m256i va = (__m256i)a, vb = _mm256_set1_epi32((int)b);
  const __m256i pe = _mm256_mul_epu32(va, vb);
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(va, 32), vb);
  lo = (v8u)_mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
  hi = (v8u)_mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}
#else
static inline void mulhilo8(v8u a, uint32_t b, v8u& hi, v8u& lo) {
  lo = a * b;
  const v4q even = (v4q)a & 0xffffffffull, odd = (v4q)a >> 32;
  const v4q pe = even * (uint64_t)b, po = odd * (uint64_t)b;
  hi = (v8u)((pe >> 32) | (po & 0xffffffff00000000ull));
}
#endif

static inline void philox8(uint64_t seed, uint64_t c, v8u& w0, v8u& w1) {
  v8u c0, c1, c2 = {}, c3 = {};
  for (int l = 0; l < 8; ++l) {
    c0[l] = (uint32_t)(c + l);
    c1[l] = (uint32_t)((c + l) >> 32);
  }
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    v8u hb, lb, ha, la;
    mulhilo8(c2, kPhiloxRoundB, hb, lb);
    mulhilo8(c0, kPhiloxRoundA, ha, la);
    const v8u n0 = hb ^ c1 ^ k0, n2 = ha ^ c3 ^ k1;
    c1 = lb;
    c3 = la;
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  w0 = c0;
  w1 = c1;
}
}  // namespace

void perturb_fill(uint64_t seed, uint64_t c0, int64_t n, int dist, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8u w0, w1;
    philox8(seed, c0 + (uint64_t)i, w0, w1);
    if (dist == kNormal) {
      for (int l = 0; l < 8; ++l) out[i + l] = normal_from_words(w0[l], w1[l]);
    } else {
      for (int l = 0; l < 8; ++l) out[i + l] = rademacher_from_word(w0[l]);
    }
  }
  for (; i < n; ++i) out[i] = perturb_value(seed, c0 + (uint64_t)i, dist);
}

void philox_words(uint64_t seed, int64_t n, int64_t offset, uint32_t* out, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const Words4 w = philox4x32_10(seed, (uint64_t)(offset + i));
    out[4 * i + 0] = w.w[0];
    out[4 * i + 1] = w.w[1];
    out[4 * i + 2] = w.w[2];
    out[4 * i + 3] = w.w[3];
  }
}

template <typename T>
static void perturb_impl(uint64_t seed, int64_t n, int64_t offset, int dist, T* out, int nt) {
  const int64_t CH = 4096;
  const int64_t nch = (n + CH - 1) / CH;
#pragma omp parallel for schedule(static) num_threads(nt) if (n > 65536)
  for (int64_t ch = 0; ch < nch; ++ch) {
    float buf[CH];
    const int64_t i0 = ch * CH, m = n - i0 < CH ? n - i0 : CH;
    perturb_fill(seed, (uint64_t)(offset + i0), m, dist, buf);
    for (int64_t i = 0; i < m; ++i) store_f32(out + i0 + i, buf[i]);
  }
}

void perturb(uint64_t seed, int64_t n, int64_t offset, int dist, int out_dtype, void* out, int nt) {
  if (out_dtype == FWD_BF16)
    perturb_impl(seed, n, offset, dist, (uint16_t*)out, nt);
  else
    perturb_impl(seed, n, offset, dist, (float*)out, nt);
}

void perturb_combine(const uint64_t* seeds, const float* coefs, int64_t n_seeds, int64_t n, int64_t offset,
                     int dist, float* out, int nt) {
  // Chunked so that the accumulator chunk and one generated chunk stay in L1 while every seed
  // passes over it: out[i] += sum_j coefs[j] v_j(offset + i), no (n_seeds, n) buffer.
  const int64_t CH = 2048;
  const int64_t nch = (n + CH - 1) / CH;
#pragma omp parallel for schedule(static) num_threads(nt) if (n * n_seeds > (1 << 22))
  for (int64_t ch = 0; ch < nch; ++ch) {
    float buf[CH];
    const int64_t i0 = ch * CH, m = n - i0 < CH ? n - i0 : CH;
    float* o = out + i0;
    for (int64_t j = 0; j < n_seeds; ++j) {
      const float c = coefs[j];
      if (c == 0.0f) continue;
      perturb_fill(seeds[j], (uint64_t)(offset + i0), m, dist, buf);
      for (int64_t i = 0; i < m; ++i) o[i] += c * buf[i];
    }
  }
}

}  // namespace fwdcore
