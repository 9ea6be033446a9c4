// Counter-based Philox4x32-10, bit-compatible with Triton's tl.randint / tl.randn.
//
// Element i of the perturbation defined by seed s, starting at global offset o, uses
//   key     = (k0, k1) = (low 32 bits of s, high 32 bits of s)
//   counter = (c0, c1, c2, c3) = (low 32 of (o + i), high 32 of (o + i), 0, 0)
// and ten Philox rounds, the key bumped by the Weyl constants after each round. This is exactly what
// `tl.randint4x(seed, offsets)` computes for int64 offsets, so a Triton kernel, this C++ code (x86 or
// ARM) and the vectorised torch reference regenerate the same 32-bit words on any machine.
//
// Torch-free and header-only so that every kernel (CPU, CUDA host code) can inline it.
#pragma once
#include <stdint.h>
#include <math.h>

#if defined(__CUDACC__)
#define FWD_HD __host__ __device__ __forceinline__
#else
#define FWD_HD static inline
#endif

namespace fwdcore {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;

struct Words4 {
  uint32_t w[4];
};

FWD_HD Words4 philox4x32_10(uint64_t seed, uint64_t counter) {
  uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#if defined(__CUDA_ARCH__)  // nvcc's device pass; its host pass knows neither pragma
#pragma unroll
#elif defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#pragma GCC unroll 10
#endif
  for (int r = 0; r < 10; ++r) {
    const uint64_t pa = (uint64_t)kPhiloxRoundA * c0;  // umulhi / mul of round A with old c0
    const uint64_t pb = (uint64_t)kPhiloxRoundB * c2;  // ... and of round B with old c2
    const uint32_t n0 = (uint32_t)(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = (uint32_t)(pa >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)pb;
    c3 = (uint32_t)pa;
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  Words4 out;
  out.w[0] = c0; out.w[1] = c1; out.w[2] = c2; out.w[3] = c3;
  return out;
}

// First word only (tl.randint). The compiler drops the dead half of the last round.
FWD_HD uint32_t philox_word0(uint64_t seed, uint64_t counter) {
  return philox4x32_10(seed, counter).w[0];
}

// Rademacher value from the top bit of the first word: bit 31 clear -> +1, set -> -1.
FWD_HD float rademacher_from_word(uint32_t w) { return (w >> 31) ? -1.0f : 1.0f; }

// tl.rand's uint -> [0, 1) float: reinterpret as int32, fold negatives with ~x, scale in float32.
FWD_HD float uniform_from_word(uint32_t w) {
  int32_t x = (int32_t)w;
  if (x < 0) x = ~x;
  return (float)x * 4.6566127342e-10f;
}

// tl.randn: Box-Muller on the first two words, first output (the cosine branch), in float32.
FWD_HD float normal_from_words(uint32_t w0, uint32_t w1) {
  float u1 = uniform_from_word(w0);
  const float u2 = uniform_from_word(w1);
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  const float th = 6.283185307179586f * u2;
  const float r = sqrtf(-2.0f * logf(u1));
  return r * cosf(th);
}

enum Dist : int { kRademacher = 0, kNormal = 1 };

FWD_HD float perturb_value(uint64_t seed, uint64_t index, int dist) {
  const Words4 w = philox4x32_10(seed, index);
  return dist == kNormal ? normal_from_words(w.w[0], w.w[1]) : rademacher_from_word(w.w[0]);
}

// splitmix64 finaliser: the mixing step of derive_seed.
FWD_HD uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// derive_seed(base, i1, ..., in) = fold of splitmix64: s <- splitmix64(s ^ splitmix64(i_j)).
// Each integer is mixed before it is combined so that (t, c, j) and (t, j, c) give unrelated seeds.
FWD_HD uint64_t derive_seed_step(uint64_t s, uint64_t i) { return splitmix64(s ^ splitmix64(i)); }

}  // namespace fwdcore
