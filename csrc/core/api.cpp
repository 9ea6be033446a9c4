// The C API: validation, error codes and messages; no exception crosses it.
//
// Every failing call returns a specific fwd_status and sets the thread's fwd_last_error() to
// "<function>: <argument> ... got <value>", naming the first offending argument (see test_errors.cpp).
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <new>
#include <string>

#include "internal.h"

#define FWD_STR2(x) #x
#define FWD_STR(x) FWD_STR2(x)
#ifndef FWDCORE_VERSION
#define FWDCORE_VERSION 0.1.0
#endif

using namespace fwdcore;  // the need_* checks (internal.h)

namespace {
thread_local std::string g_last_error;

fwd_status fail(fwd_status code, const std::string& msg) {
  g_last_error = msg;
  return code;
}

template <typename F>
fwd_status guarded(const char* fn, F&& f) {
  try {
    f();
    return FWD_OK;
  } catch (const fwdcore::ArgError& e) {
    return fail(e.code, std::string(fn) + ": " + e.what());
  } catch (const std::bad_alloc&) {
    return fail(FWD_ERR_ALLOC, std::string(fn) + ": out of memory");
  } catch (const std::exception& e) {
    return fail(FWD_ERR_INTERNAL, std::string(fn) + ": internal error: " + e.what());
  } catch (...) {
    return fail(FWD_ERR_INTERNAL, std::string(fn) + ": internal error");
  }
}

std::string fnum(float v) {
  char buf[32];
  snprintf(buf, sizeof buf, "%g", (double)v);
  return buf;
}

}  // namespace

namespace fwdcore {
// For entry points defined in other files (internal.h).
fwd_status guarded_call(const char* fn, const std::function<void()>& f) { return guarded(fn, f); }
void set_last_error(const std::string& msg) { g_last_error = msg; }
}  // namespace fwdcore

namespace fwdcore {
// The checks of fwd_perturb / fwd_perturb_combine (also run by their CUDA entry points).
void validate_perturb(int64_t n, int64_t offset, int dist, int out_dtype, const void* out) {
  need_positive(n, "n");
  need_nonnegative(offset, "offset");
  need_ptr(out, "out");
  need_dist(dist);
  need_dtype(out_dtype, "out_dtype");
  need_range(offset, n, "offset + n");
}
void validate_perturb_combine(const uint64_t* seeds, const float* coefs, int64_t n_seeds, int64_t n, int64_t offset,
                              int dist, const float* out) {
  need_positive(n, "n");
  need_positive(n_seeds, "n_seeds");
  need_nonnegative(offset, "offset");
  need_ptr(seeds, "seeds");
  need_ptr(coefs, "coefs");
  need_ptr(out, "out");
  need_dist(dist);
  need_range(offset, n, "offset + n");
}

// The checks of fwd_lora_linear_dual (also run by the CUDA entry point before its device-side ones).
void validate_lora_dual(const fwd_lora_dual_args& a) {
  need_positive(a.M, "M");
  need_positive(a.d_in, "d_in");
  need_positive(a.d_out, "d_out");
  need_nonnegative(a.K, "K (the number of tangents)");
  need(a.K < (int64_t)1 << 30, FWD_ERR_SIZE, "K is too large: " + num(a.K));
  need_dtype(a.in_dtype, "in_dtype");
  need_dtype(a.out_dtype, "out_dtype");
  need_dist(a.dist);
  const bool tangents = a.K > 0;  // K = 0: the primal only
  need_ptr(a.x, "x");
  need_ptr(a.W, "W");
  if (!tangents) need_ptr(a.y, "y");  // y may be NULL with tangents: tangents only
  if (tangents) {
    need_ptr(a.y_dot, "y_dot");
  } else {
    need(!a.x_dot, FWD_ERR_ARG, "x_dot was given but K = 0");
    need(!a.A_dot, FWD_ERR_ARG, "A_dot was given but K = 0");
    need(!a.B_dot, FWD_ERR_ARG, "B_dot was given but K = 0");
    need(!a.bias_dot, FWD_ERR_ARG, "bias_dot was given but K = 0");
  }
  need_ld(a.ldx, "ldx", a.d_in, "d_in");
  need_ld(a.ldw, "ldw", a.d_in, "d_in");
  if (a.y) need_ld(a.ldy, "ldy", a.d_out, "d_out");
  if (tangents) need_ld(a.ldy_dot, "ldy_dot", a.d_out, "d_out");
  if (a.x_dot) need_ld(a.ldx_dot, "ldx_dot", a.d_in, "d_in");
  need((a.A == nullptr) == (a.B == nullptr), FWD_ERR_NULL,
       std::string("lora_A and lora_B must be given together, got ") + (a.A ? "A without B (B is NULL)" : "B without A (A is NULL)"));
  const bool lora = a.A != nullptr;
  if (lora) {
    need(a.r > 0, FWD_ERR_SIZE, "LoRA rank r must be positive, got " + num(a.r));
    need_ld(a.lda, "lda", a.d_in, "d_in");
    need_ld(a.ldb, "ldb", a.r, "r");
    need(isfinite(a.scaling), FWD_ERR_ARG, "scaling must be finite, got " + fnum(a.scaling));
    need_product(a.r, a.d_in, "r * d_in");
    need_product(a.d_out, a.r, "d_out * r");
  } else {
    need(!a.A_dot, FWD_ERR_ARG, "A_dot was given without lora_A/lora_B");
    need(!a.B_dot, FWD_ERR_ARG, "B_dot was given without lora_A/lora_B");
  }
  need(!(a.bias == nullptr && a.bias_dot != nullptr), FWD_ERR_ARG, "bias_dot was given but bias is NULL");
  need(!(a.bias == nullptr && a.offset_bias >= 0), FWD_ERR_ARG,
       "offset_bias (" + num(a.offset_bias) + ") >= 0 makes the bias trainable but bias is NULL");
  // Every index the kernel forms must fit in int64.
  need_extent(a.M, a.ldx, a.d_in, "x");
  need_extent(a.d_out, a.ldw, a.d_in, "W");
  if (a.y) need_extent(a.M, a.ldy, a.d_out, "y");
  const int64_t kk = tangents ? a.K : 1;
  need_product(kk + 1, a.M, "(K + 1) * M");
  need_product((kk + 1) * a.M, a.d_out, "(K + 1) * M * d_out");
  if (tangents) need_extent(a.K * a.M, a.ldy_dot, a.d_out, "y_dot");
  if (a.x_dot) need_extent(a.K * a.M, a.ldx_dot, a.d_in, "x_dot");
  need_product(kk, a.d_out, "K * d_out");
  if (lora) {
    need_extent(a.r, a.lda, a.d_in, "lora_A");
    need_extent(a.d_out, a.ldb, a.r, "lora_B");
    need_product((kk + 1) * a.M, 2 * a.r, "(K + 1) * M * 2r");
    need_product(kk, a.r * a.d_in, "K * r * d_in");
    need_product(kk, a.d_out * a.r, "K * d_out * r");
  }
  if (tangents) {
    // Perturbation slices generated from the seeds (those without an explicit tangent).
    const bool gen_A = lora && !a.A_dot, gen_B = lora && !a.B_dot, gen_b = !a.bias_dot && a.offset_bias >= 0;
    if (gen_A) {
      need(a.offset_A >= 0, FWD_ERR_SIZE, "offset_A must be non-negative, got " + num(a.offset_A));
      need_range(a.offset_A, a.r * a.d_in, "offset_A + r * d_in (lora_A's perturbation slice)");
    }
    if (gen_B) {
      need(a.offset_B >= 0, FWD_ERR_SIZE, "offset_B must be non-negative, got " + num(a.offset_B));
      need_range(a.offset_B, a.d_out * a.r, "offset_B + d_out * r (lora_B's perturbation slice)");
    }
    if (gen_b) need_range(a.offset_bias, a.d_out, "offset_bias + d_out (the bias's perturbation slice)");
    need(!(gen_A || gen_B || gen_b) || a.seeds != nullptr, FWD_ERR_NULL,
         std::string("seeds is NULL but a perturbation slice must be generated (") +
             (gen_A ? "lora_A" : gen_B ? "lora_B" : "bias") + " has no explicit tangent)");
  }
}
}  // namespace fwdcore

extern "C" {

const char* fwd_last_error(void) { return g_last_error.c_str(); }
const char* fwd_version(void) { return FWD_STR(FWDCORE_VERSION); }
const char* fwd_simd(void) { return fwdcore::gemm_simd_name(); }

fwd_status fwd_philox_words(uint64_t seed, int64_t n, int64_t offset, uint32_t* out, int num_threads) {
  return guarded("fwd_philox_words", [&] {
    need_positive(n, "n");
    need_nonnegative(offset, "offset");
    need_ptr(out, "out");
    need_product(n, 4, "the output's element count n * 4");
    need_range(offset, n, "offset + n");
    fwdcore::philox_words(seed, n, offset, out, fwdcore::resolve_threads(num_threads));
  });
}

fwd_status fwd_perturb(uint64_t seed, int64_t n, int64_t offset, int dist, int out_dtype, void* out,
                       int num_threads) {
  return guarded("fwd_perturb", [&] {
    fwdcore::validate_perturb(n, offset, dist, out_dtype, out);
    fwdcore::perturb(seed, n, offset, dist, out_dtype, out, fwdcore::resolve_threads(num_threads));
  });
}

fwd_status fwd_perturb_combine(const uint64_t* seeds, const float* coefs, int64_t n_seeds, int64_t n,
                               int64_t offset, int dist, float* out, int num_threads) {
  return guarded("fwd_perturb_combine", [&] {
    fwdcore::validate_perturb_combine(seeds, coefs, n_seeds, n, offset, dist, out);
    fwdcore::perturb_combine(seeds, coefs, n_seeds, n, offset, dist, out, fwdcore::resolve_threads(num_threads));
  });
}

uint64_t fwd_derive_seed(uint64_t base, const int64_t* ints, int n) {
  uint64_t s = base;
  for (int i = 0; ints != nullptr && i < n; ++i) s = fwdcore::derive_seed_step(s, (uint64_t)ints[i]);
  return s;
}

fwd_status fwd_lora_linear_dual(const fwd_lora_dual_args* args) {
  return guarded("fwd_lora_linear_dual", [&] {
    need_ptr(args, "args");
    fwdcore::validate_lora_dual(*args);
    fwdcore::lora_linear_dual(*args);
  });
}

fwd_status fwd_attention_dual(const fwd_attention_dual_args* args) {
  return guarded("fwd_attention_dual", [&] {
    need_ptr(args, "args");
    fwdcore::attention_dual(*args);  // validates (throws ArgError naming the problem), then runs
  });
}

fwd_status fwd_sgemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                        float* C, int64_t ldc, int num_threads) {
  return guarded("fwd_sgemm_nt", [&] {
    need_positive(M, "M");
    need_positive(N, "N");
    need_positive(K, "K");
    need_ptr(A, "A");
    need_ptr(B, "B");
    need_ptr(C, "C");
    need_ld(lda, "lda", K, "K");
    need_ld(ldb, "ldb", K, "K");
    need_ld(ldc, "ldc", N, "N");
    need_extent(M, lda, K, "A");
    need_extent(N, ldb, K, "B");
    need_extent(M, ldc, N, "C");
    fwdcore::sgemm_nt(M, N, K, A, lda, B, ldb, C, ldc, num_threads);
  });
}

}  // extern "C"
