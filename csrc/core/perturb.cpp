// Seeded perturbations and Philox words over a range of global offsets.
#include "internal.h"

#if defined(__AVX2__)
#include <immintrin.h>
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define FWD_PHILOX_NEON 1
#include <arm_neon.h>
#endif

namespace fwdcore {

namespace {
// Eight Philox4x32-10 streams side by side with GCC/Clang vector extensions (AVX2 on x86; explicit
// NEON intrinsics on aarch64, below). Only the first two words are kept: rademacher needs word 0,
// normal words 0 and 1.
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

#if defined(FWD_PHILOX_NEON)
// aarch64: two 4-lane NEON halves. The 32x32 -> 64 products are umull / umull2 and the high and low
// halves are de-interleaved with uzp2 / uzp1; GCC lowers the generic 64-bit vector code above to far
// more instructions (and keeps the 32-byte vectors partly on the stack).
static inline void mulhilo4(uint32x4_t a, uint32x4_t b, uint32x4_t& hi, uint32x4_t& lo) {
  const uint32x4_t p0 = vreinterpretq_u32_u64(vmull_u32(vget_low_u32(a), vget_low_u32(b)));
  const uint32x4_t p1 = vreinterpretq_u32_u64(vmull_high_u32(a, b));
  lo = vuzp1q_u32(p0, p1);
  hi = vuzp2q_u32(p0, p1);
}

static inline void philox8(uint64_t seed, uint64_t c, v8u& w0, v8u& w1) {
  uint32x4_t c0[2], c1[2], c2[2], c3[2];
  for (int h = 0; h < 2; ++h) {
    uint32_t lo[4], hi[4];
    for (int l = 0; l < 4; ++l) {
      lo[l] = (uint32_t)(c + 4 * h + l);
      hi[l] = (uint32_t)((c + 4 * h + l) >> 32);
    }
    c0[h] = vld1q_u32(lo);
    c1[h] = vld1q_u32(hi);
    c2[h] = c3[h] = vdupq_n_u32(0);
  }
  const uint32x4_t ra = vdupq_n_u32(kPhiloxRoundA), rb = vdupq_n_u32(kPhiloxRoundB);
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const uint32x4_t vk0 = vdupq_n_u32(k0), vk1 = vdupq_n_u32(k1);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      uint32x4_t hb, lb, ha, la;
      mulhilo4(c2[h], rb, hb, lb);
      mulhilo4(c0[h], ra, ha, la);
      const uint32x4_t n0 = veorq_u32(veorq_u32(hb, c1[h]), vk0), n2 = veorq_u32(veorq_u32(ha, c3[h]), vk1);
      c1[h] = lb;
      c3[h] = la;
      c0[h] = n0;
      c2[h] = n2;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  uint32_t o0[8], o1[8];
  vst1q_u32(o0, c0[0]);
  vst1q_u32(o0 + 4, c0[1]);
  vst1q_u32(o1, c1[0]);
  vst1q_u32(o1 + 4, c1[1]);
  __builtin_memcpy(&w0, o0, sizeof w0);
  __builtin_memcpy(&w1, o1, sizeof w1);
}
#else
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
#endif
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
