// fwd_philox_words (and fwd_version / fwd_simd): known answers and a cross-check against the test's
// own scalar Philox4x32-10 for many seeds, offsets (crossing 2^32 and beyond) and thread counts.
#include "test_common.h"

#ifndef FWDCORE_EXPECTED_VERSION
#define FWDCORE_EXPECTED_VERSION "0.1.0"
#endif

static void test_reference_kat() {
  // Random123 tests/kat_vectors, philox4x32 10: counter words 0..3, key words 0..1 -> output words 0..3.
  struct Kat {
    uint32_t ctr[4], key[2], out[4];
  } kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& k : kats) {
    const ref::W4 w = ref::philox4x32_10_full(k.ctr, k.key);
    for (int j = 0; j < 4; ++j)
      CHECK(w.v[j] == k.out[j], "reference Philox KAT (ctr0=%08x key0=%08x) word %d: got %08x, want %08x", k.ctr[0],
            k.key[0], j, w.v[j], k.out[j]);
  }
}

static void test_api_kat() {
  uint32_t out[4] = {1, 2, 3, 4};
  const fwd_status st = fwd_philox_words(0, 1, 0, out, 1);
  CHECK(st == FWD_OK, "fwd_philox_words(seed=0, n=1, offset=0) returned %d: %s", (int)st, fwd_last_error());
  const uint32_t want[4] = {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u};
  for (int j = 0; j < 4; ++j)
    CHECK(out[j] == want[j], "key 0 / counter 0 word %d: got %08x, want %08x", j, out[j], want[j]);
}

static void cross_check(uint64_t seed, int64_t n, int64_t offset, int nt) {
  const std::string ctx = strf("seed=%016llx n=%lld offset=%lld threads=%d", (unsigned long long)seed, (long long)n,
                               (long long)offset, nt);
  g_context = ctx.c_str();
  // Guard words after the end: the call must write exactly 4n words.
  std::vector<uint32_t> out((size_t)(4 * n + 8), 0xA5A5A5A5u);
  const fwd_status st = fwd_philox_words(seed, n, offset, out.data(), nt);
  CHECK(st == FWD_OK, "status %d: %s", (int)st, fwd_last_error());
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const ref::W4 w = ref::philox(seed, (uint64_t)(offset + i));
    for (int j = 0; j < 4; ++j)
      CHECK_LIMITED(bad, out[(size_t)(4 * i + j)] == w.v[j], "element %lld word %d: got %08x, want %08x", (long long)i,
                    j, out[(size_t)(4 * i + j)], w.v[j]);
  }
  for (int j = 0; j < 8; ++j) CHECK(out[(size_t)(4 * n + j)] == 0xA5A5A5A5u, "wrote past the end of out");
  g_context = "";
}

int main() {
  printf("fwdcore %s, simd %s\n", fwd_version(), fwd_simd());
  CHECK(strcmp(fwd_version(), FWDCORE_EXPECTED_VERSION) == 0, "fwd_version() = '%s', want '%s'", fwd_version(),
        FWDCORE_EXPECTED_VERSION);
  const std::string simd = fwd_simd();
  CHECK(simd == "avx2+fma" || simd == "avx512f" || simd == "neon" || simd == "generic", "fwd_simd() = '%s'",
        simd.c_str());

  test_reference_kat();
  test_api_kat();

  const uint64_t seeds[] = {0ull,
                            1ull,
                            42ull,
                            0xdeadbeefull,
                            0x100000000ull,           // key word 0 zero, word 1 one
                            0x123456789abcdef0ull,    // high bits set
                            0x8000000000000000ull,    // only the top bit
                            0xfedcba9876543210ull,
                            0xffffffffffffffffull,
                            (uint64_t)(int64_t)-12345};  // a negative int64 seed as the Python side passes it
  const int64_t two32 = 4294967296ll;
  const int64_t offsets[] = {0,         1,          1000,           two32 - 5, two32 - 1, two32,
                             two32 + 3, 3 * two32 - 2, (1ll << 40) + 7, 1ll << 62, INT64_MAX - 200};
  const int64_t ns[] = {1, 7, 100};
  for (uint64_t seed : seeds)
    for (int64_t off : offsets)
      for (int64_t n : ns) cross_check(seed, n, off, 1);

  // Large n takes the OpenMP path (n > 65536); the range crosses 2^32 in the middle.
  for (int nt : {1, 2, 0, -1}) cross_check(0x123456789abcdef0ull, 70001, two32 - 35000, nt);
  cross_check(7, 65536, 0, 2);
  cross_check(7, 65537, 0, 2);

  return test_summary("test_philox");
}
