// fwd_derive_seed against the test's own splitmix64 fold: s = base; s = splitmix64(s ^ splitmix64(i)).
#include "test_common.h"

static void check(uint64_t base, const std::vector<int64_t>& ints) {
  const uint64_t got = fwd_derive_seed(base, ints.empty() ? nullptr : ints.data(), (int)ints.size());
  const uint64_t want = ref::derive_seed(base, ints);
  std::string list;
  for (int64_t i : ints) list += strf("%s%lld", list.empty() ? "" : ", ", (long long)i);
  CHECK(got == want, "derive_seed(%016llx; %s) = %016llx, want %016llx", (unsigned long long)base, list.c_str(),
        (unsigned long long)got, (unsigned long long)want);
}

int main() {
  // The test's splitmix64 is Vigna's splitmix64.c: from state 0 its outputs are these (state += golden
  // gamma before each mix, which is what splitmix64(z) does with z = the previous state).
  const uint64_t vigna[4] = {0xE220A8397B1DCDAFull, 0x6E789E6AA1B965F4ull, 0x06C45D188009454Full,
                             0xF88BB8A8724C81ECull};
  for (int k = 0; k < 4; ++k)
    CHECK(ref::splitmix64((uint64_t)k * 0x9E3779B97F4A7C15ull) == vigna[k], "reference splitmix64 output %d", k);

  // No integers: the base itself.
  for (uint64_t base : {0ull, 1ull, 0xffffffffffffffffull})
    CHECK(fwd_derive_seed(base, nullptr, 0) == base, "derive_seed(base) != base");
  const int64_t one[1] = {5};
  CHECK(fwd_derive_seed(77, one, 0) == 77, "n = 0 must ignore ints");
  CHECK(fwd_derive_seed(77, one, -3) == 77, "negative n must act as 0");
  CHECK(fwd_derive_seed(77, nullptr, 4) == 77, "NULL ints must act as no integers");

  const uint64_t bases[] = {0ull, 1ull, 1234ull, 0x8000000000000000ull, 0xffffffffffffffffull,
                            (uint64_t)(int64_t)-42};
  const std::vector<std::vector<int64_t>> lists = {
      {0}, {1}, {-1}, {INT64_MAX}, {INT64_MIN}, {0, 0}, {1, 2}, {2, 1}, {0, 3, 7}, {3, 0, 7}, {3, 7, 0},
      {123456789, -987654321, 4294967296ll, 4294967295ll}, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}};
  for (uint64_t b : bases)
    for (const auto& l : lists) check(b, l);
  for (int t = 0; t < 50; ++t)
    for (int c = 0; c < 4; ++c) check(0xC0FFEE, {t, c, 3});

  // Order matters and nearby inputs give unrelated seeds: all these (t, c, j) must be distinct.
  std::vector<uint64_t> seen;
  for (int64_t t = 0; t < 8; ++t)
    for (int64_t c = 0; c < 8; ++c)
      for (int64_t j = 0; j < 8; ++j) {
        const int64_t v[3] = {t, c, j};
        seen.push_back(fwd_derive_seed(2024, v, 3));
      }
  int dup = 0;
  for (size_t i = 0; i < seen.size(); ++i)
    for (size_t k = i + 1; k < seen.size(); ++k) dup += seen[i] == seen[k];
  CHECK(dup == 0, "%d colliding seeds among 512 (t, c, j)", dup);
  const int64_t a[3] = {1, 2, 3}, b[3] = {1, 3, 2};
  CHECK(fwd_derive_seed(9, a, 3) != fwd_derive_seed(9, b, 3), "(t, c, j) and (t, j, c) must differ");
  return test_summary("test_derive_seed");
}
