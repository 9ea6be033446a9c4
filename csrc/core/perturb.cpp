// Seeded perturbations and Philox words over a range of global offsets.
#include "internal.h"

namespace fwdcore {

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
#pragma omp parallel for schedule(static) num_threads(nt) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) store_f32(out + i, perturb_value(seed, (uint64_t)(offset + i), dist));
}

void perturb(uint64_t seed, int64_t n, int64_t offset, int dist, int out_dtype, void* out, int nt) {
  if (out_dtype == FWD_BF16)
    perturb_impl(seed, n, offset, dist, (uint16_t*)out, nt);
  else
    perturb_impl(seed, n, offset, dist, (float*)out, nt);
}

}  // namespace fwdcore
