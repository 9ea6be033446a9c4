// Internal (C++) interface of the core, shared by the C API and the tests.
#pragma once
#include <stdint.h>
#include <functional>
#include <stdexcept>
#include <string>

#include "fwdcore.h"
#include "gemm.h"
#include "philox.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fwdcore {

// An argument error carrying its fwd_status; caught at the C API boundary.
struct ArgError : std::runtime_error {
  fwd_status code;
  ArgError(fwd_status c, const std::string& m) : std::runtime_error(m), code(c) {}
};

// The C API boundary (api.cpp): runs f, turning ArgError / bad_alloc / anything else into a status and
// the thread's fwd_last_error() message prefixed with fn. Every FWD_API entry point goes through it.
fwd_status guarded_call(const char* fn, const std::function<void()>& f);
void set_last_error(const std::string& msg);

static inline void store_f32(float* p, float v) { *p = v; }
static inline void store_f32(uint16_t* p, float v) { *p = f32_to_bf16(v); }

static inline int resolve_threads(int nt) {
#ifdef _OPENMP
  return nt > 0 ? nt : omp_get_max_threads();
#else
  (void)nt;
  return 1;
#endif
}

// Perturbation values for counters c0 .. c0+n-1 (8 lanes at a time where SIMD allows).
void perturb_fill(uint64_t seed, uint64_t c0, int64_t n, int dist, float* out);

void philox_words(uint64_t seed, int64_t n, int64_t offset, uint32_t* out, int nt);
void perturb(uint64_t seed, int64_t n, int64_t offset, int dist, int out_dtype, void* out, int nt);
void perturb_combine(const uint64_t* seeds, const float* coefs, int64_t n_seeds, int64_t n, int64_t offset,
                     int dist, float* out, int nt);
void lora_linear_dual(const fwd_lora_dual_args& a);
void attention_dual(const fwd_attention_dual_args& a);  // validates (throws ArgError), then runs
// The argument checks of fwd_lora_linear_dual / fwd_attention_dual (throw ArgError naming the argument);
// the CUDA entry points run them too, then their device-side checks.
void validate_lora_dual(const fwd_lora_dual_args& a);
void validate_attention_dual(const fwd_attention_dual_args& a);
void sgemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
              int64_t ldc, int nt);

}  // namespace fwdcore
