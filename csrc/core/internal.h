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

// Argument checks shared by every entry point (CPU and CUDA): each throws ArgError with a message naming
// the argument and its value (the C API's contract, tests/test_errors.cpp).
inline void need(bool ok, fwd_status code, const std::string& msg) {
  if (!ok) throw ArgError(code, msg);
}
inline std::string num(int64_t v) { return std::to_string((long long)v); }
inline void need_positive(int64_t v, const char* name) {
  need(v > 0, FWD_ERR_SIZE, std::string(name) + " must be positive, got " + num(v));
}
inline void need_nonnegative(int64_t v, const char* name) {
  need(v >= 0, FWD_ERR_SIZE, std::string(name) + " must be non-negative, got " + num(v));
}
inline void need_ptr(const void* p, const char* name) {
  need(p != nullptr, FWD_ERR_NULL, std::string(name) + " is NULL");
}
// A leading dimension must hold a whole row.
inline void need_ld(int64_t ld, const char* ld_name, int64_t row, const char* row_name) {
  need(ld >= row, FWD_ERR_SIZE,
       std::string(ld_name) + " (" + num(ld) + ") is smaller than its row length " + row_name + " (" + num(row) + ")");
}
inline void need_dist(int dist) {
  need(dist == FWD_DIST_RADEMACHER || dist == FWD_DIST_NORMAL, FWD_ERR_ARG,
       "dist must be FWD_DIST_RADEMACHER (0) or FWD_DIST_NORMAL (1), got " + num(dist));
}
inline void need_dtype(int dtype, const char* name) {
  need(dtype == FWD_F32 || dtype == FWD_BF16, FWD_ERR_ARG,
       std::string(name) + " must be FWD_F32 (0) or FWD_BF16 (1), got " + num(dtype));
}
inline bool mul_ok(int64_t x, int64_t y) { return x == 0 || y <= INT64_MAX / x; }  // x, y >= 0
// rows rows of `len` elements `ld` apart (all positive): the last element's index must fit in int64.
inline void need_extent(int64_t rows, int64_t ld, int64_t len, const char* name) {
  need(mul_ok(rows - 1, ld) && (rows - 1) * ld <= INT64_MAX - len, FWD_ERR_SIZE,
       std::string(name) + ": " + num(rows) + " rows of leading dimension " + num(ld) + " overflow int64");
}
inline void need_product(int64_t x, int64_t y, const char* what) {
  need(mul_ok(x, y), FWD_ERR_SIZE, std::string(what) + " = " + num(x) + " * " + num(y) + " overflows int64");
}
// Counters are offset + index as int64: the slice [offset, offset + n) must stay below 2^63.
inline void need_range(int64_t offset, int64_t n, const char* what) {
  need(n <= INT64_MAX - offset, FWD_ERR_SIZE,
       std::string(what) + ": offset " + num(offset) + " + " + num(n) + " elements exceeds the int64 counter range");
}

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
void validate_perturb(int64_t n, int64_t offset, int dist, int out_dtype, const void* out);
void validate_perturb_combine(const uint64_t* seeds, const float* coefs, int64_t n_seeds, int64_t n, int64_t offset,
                              int dist, const float* out);
void validate_attention_dual(const fwd_attention_dual_args& a);
void sgemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
              int64_t ldc, int nt);

}  // namespace fwdcore
