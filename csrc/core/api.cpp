// The C API: validation, error codes and messages; no exception crosses it.
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

void need(bool ok, fwd_status code, const std::string& msg) {
  if (!ok) throw fwdcore::ArgError(code, msg);
}
std::string num(int64_t v) { return std::to_string((long long)v); }

// Counters are offset + index as int64: the slice [offset, offset + n) must stay below 2^63.
void need_range(int64_t offset, int64_t n, const char* what) {
  need(n <= INT64_MAX - offset, FWD_ERR_SIZE,
       std::string(what) + ": offset " + num(offset) + " + " + num(n) + " elements exceeds the int64 counter range");
}
}  // namespace

extern "C" {

const char* fwd_last_error(void) { return g_last_error.c_str(); }
const char* fwd_version(void) { return FWD_STR(FWDCORE_VERSION); }
const char* fwd_simd(void) { return fwdcore::gemm_simd_name(); }

fwd_status fwd_philox_words(uint64_t seed, int64_t n, int64_t offset, uint32_t* out, int num_threads) {
  return guarded("fwd_philox_words", [&] {
    need(n > 0, FWD_ERR_SIZE, "n must be positive, got " + num(n));
    need(offset >= 0, FWD_ERR_SIZE, "offset must be non-negative, got " + num(offset));
    need(out != nullptr, FWD_ERR_NULL, "out is NULL");
    need_range(offset, n, "fwd_philox_words");
    fwdcore::philox_words(seed, n, offset, out, fwdcore::resolve_threads(num_threads));
  });
}

fwd_status fwd_perturb(uint64_t seed, int64_t n, int64_t offset, int dist, int out_dtype, void* out,
                       int num_threads) {
  return guarded("fwd_perturb", [&] {
    need(n > 0, FWD_ERR_SIZE, "n must be positive, got " + num(n));
    need(offset >= 0, FWD_ERR_SIZE, "offset must be non-negative, got " + num(offset));
    need(out != nullptr, FWD_ERR_NULL, "out is NULL");
    need(dist == FWD_DIST_RADEMACHER || dist == FWD_DIST_NORMAL, FWD_ERR_ARG,
         "dist must be FWD_DIST_RADEMACHER (0) or FWD_DIST_NORMAL (1), got " + num(dist));
    need(out_dtype == FWD_F32 || out_dtype == FWD_BF16, FWD_ERR_ARG,
         "out_dtype must be FWD_F32 (0) or FWD_BF16 (1), got " + num(out_dtype));
    need_range(offset, n, "fwd_perturb");
    fwdcore::perturb(seed, n, offset, dist, out_dtype, out, fwdcore::resolve_threads(num_threads));
  });
}

fwd_status fwd_perturb_combine(const uint64_t* seeds, const float* coefs, int64_t n_seeds, int64_t n,
                               int64_t offset, int dist, float* out, int num_threads) {
  return guarded("fwd_perturb_combine", [&] {
    need(n > 0, FWD_ERR_SIZE, "n must be positive, got " + num(n));
    need(n_seeds > 0, FWD_ERR_SIZE, "n_seeds must be positive, got " + num(n_seeds));
    need(offset >= 0, FWD_ERR_SIZE, "offset must be non-negative, got " + num(offset));
    need(seeds != nullptr && coefs != nullptr && out != nullptr, FWD_ERR_NULL, "seeds, coefs or out is NULL");
    need(dist == FWD_DIST_RADEMACHER || dist == FWD_DIST_NORMAL, FWD_ERR_ARG,
         "dist must be FWD_DIST_RADEMACHER (0) or FWD_DIST_NORMAL (1), got " + num(dist));
    need_range(offset, n, "fwd_perturb_combine");
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
    need(args != nullptr, FWD_ERR_NULL, "args is NULL");
    const fwd_lora_dual_args& a = *args;
    need(a.M > 0 && a.d_in > 0 && a.d_out > 0, FWD_ERR_SIZE,
         "M, d_in, d_out must be positive, got " + num(a.M) + ", " + num(a.d_in) + ", " + num(a.d_out));
    need(a.K > 0, FWD_ERR_SIZE, "K (number of tangents) must be positive, got " + num(a.K));
    need(a.in_dtype == FWD_F32 || a.in_dtype == FWD_BF16, FWD_ERR_ARG, "in_dtype must be FWD_F32 or FWD_BF16");
    need(a.out_dtype == FWD_F32 || a.out_dtype == FWD_BF16, FWD_ERR_ARG, "out_dtype must be FWD_F32 or FWD_BF16");
    need(a.dist == FWD_DIST_RADEMACHER || a.dist == FWD_DIST_NORMAL, FWD_ERR_ARG,
         "dist must be FWD_DIST_RADEMACHER (0) or FWD_DIST_NORMAL (1), got " + num(a.dist));
    need(a.x && a.W && a.y && a.y_dot, FWD_ERR_NULL, "x, W, y and y_dot must not be NULL");
    need(a.ldx >= a.d_in && a.ldw >= a.d_in && a.ldy >= a.d_out && a.ldy_dot >= a.d_out, FWD_ERR_SIZE,
         "a leading dimension is smaller than its row length");
    need(!a.x_dot || a.ldx_dot >= a.d_in, FWD_ERR_SIZE, "ldx_dot is smaller than d_in");
    need((a.A == nullptr) == (a.B == nullptr), FWD_ERR_NULL, "lora_A and lora_B must be given together");
    const bool lora = a.A != nullptr;
    if (lora) {
      need(a.r > 0, FWD_ERR_SIZE, "LoRA rank r must be positive, got " + num(a.r));
      need(a.lda >= a.d_in && a.ldb >= a.r, FWD_ERR_SIZE, "lda < d_in or ldb < r");
      need(a.A_dot || a.offset_A >= 0, FWD_ERR_SIZE, "offset_A must be non-negative, got " + num(a.offset_A));
      need(a.B_dot || a.offset_B >= 0, FWD_ERR_SIZE, "offset_B must be non-negative, got " + num(a.offset_B));
      need(a.r <= INT64_MAX / a.d_in && a.r <= INT64_MAX / a.d_out, FWD_ERR_SIZE, "r * d_in or d_out * r overflows");
      if (!a.A_dot) need_range(a.offset_A, a.r * a.d_in, "lora_A's perturbation slice");
      if (!a.B_dot) need_range(a.offset_B, a.d_out * a.r, "lora_B's perturbation slice");
    } else {
      need(!a.A_dot && !a.B_dot, FWD_ERR_ARG, "A_dot/B_dot given without lora_A/lora_B");
    }
    need(a.K < (int64_t)1 << 30, FWD_ERR_SIZE, "K is too large: " + num(a.K));
    need(!(a.bias == nullptr && (a.bias_dot != nullptr || a.offset_bias >= 0)), FWD_ERR_ARG,
         "a bias tangent (offset_bias >= 0 or bias_dot) was given but bias is NULL");
    if (!a.bias_dot && a.offset_bias >= 0) need_range(a.offset_bias, a.d_out, "the bias's perturbation slice");
    const bool gen = (lora && (!a.A_dot || !a.B_dot)) || (!a.bias_dot && a.offset_bias >= 0);
    need(!gen || a.seeds != nullptr, FWD_ERR_NULL, "seeds is NULL but a perturbation slice must be generated");
    fwdcore::lora_linear_dual(a);
  });
}

fwd_status fwd_attention_dual(const fwd_attention_dual_args* args) {
  return guarded("fwd_attention_dual", [&] {
    need(args != nullptr, FWD_ERR_NULL, "args is NULL");
    fwdcore::attention_dual(*args);  // validates (throws ArgError naming the problem), then runs
  });
}

fwd_status fwd_sgemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                        float* C, int64_t ldc, int num_threads) {
  return guarded("fwd_sgemm_nt", [&] {
    need(M > 0 && N > 0 && K > 0, FWD_ERR_SIZE, "M, N, K must be positive");
    need(A && B && C, FWD_ERR_NULL, "A, B and C must not be NULL");
    need(lda >= K && ldb >= K && ldc >= N, FWD_ERR_SIZE, "a leading dimension is smaller than its row length");
    fwdcore::sgemm_nt(M, N, K, A, lda, B, ldb, C, ldc, num_threads);
  });
}

}  // extern "C"
