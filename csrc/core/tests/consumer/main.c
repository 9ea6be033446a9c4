/* C consumer of the installed fwdcore: the header must be plain C. */
#include <stdio.h>
#include <string.h>

#include "fwdcore.h"

int main(void) {
  uint32_t w[4];
  float v[3];
  if (fwd_philox_words(0, 1, 0, w, 1) != FWD_OK) return 1;
  if (w[0] != 0x6627e8d5u || w[3] != 0x9b00dbd8u) return 2;
  if (fwd_perturb(1, 3, 0, FWD_DIST_RADEMACHER, FWD_F32, v, 1) != FWD_OK) return 3;
  if (fwd_perturb(1, 0, 0, FWD_DIST_RADEMACHER, FWD_F32, v, 1) != FWD_ERR_SIZE || !fwd_last_error()[0]) return 4;
  printf("consumer_c: fwdcore %s (%s) ok\n", fwd_version(), fwd_simd());
  return 0;
}
