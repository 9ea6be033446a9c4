// C++ consumer of the installed static fwdcore: the header-only generator agrees with the library.
#include <cstdio>

#include "fwdcore.h"
#include "philox.h"

int main() {
  uint32_t w[4 * 5];
  if (fwd_philox_words(0xfeedfacecafebeefull, 5, 4294967294ll, w, 2) != FWD_OK) return 1;
  for (int i = 0; i < 5; ++i) {
    const fwdcore::Words4 r = fwdcore::philox4x32_10(0xfeedfacecafebeefull, 4294967294ull + i);
    for (int j = 0; j < 4; ++j)
      if (r.w[j] != w[4 * i + j]) return 2;
  }
  std::printf("consumer_static: fwdcore %s ok\n", fwd_version());
  return 0;
}
