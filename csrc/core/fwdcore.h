/* fwdcore: the torch-free core of fwdllm's kernels, behind a plain C API.
 *
 * Conventions
 *  - Matrices are row-major with an explicit leading dimension (elements between rows).
 *  - Every entry point returns fwd_status; FWD_OK is 0. On error, fwd_last_error() returns a message
 *    naming the problem (thread-local; valid until the next failing call on that thread). No C++
 *    exception ever crosses this API and nothing aborts the host program.
 *  - Perturbations are never stored: element i of perturbation `seed` at global offset `off` is
 *    regenerated from Philox4x32-10(key = seed, counter = off + i) (see philox.h), bit-identical to
 *    Triton's tl.randint(seed, off + i). Rademacher: +1 when bit 31 of the first word is clear.
 *    Normal: Triton's tl.randn (Box-Muller on the first two words).
 *  - num_threads <= 0 means "the OpenMP default".
 */
#ifndef FWDCORE_H
#define FWDCORE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define FWD_API __declspec(dllexport)
#else
#define FWD_API __attribute__((visibility("default")))
#endif

typedef enum {
  FWD_OK = 0,
  FWD_ERR_NULL = 1,    /* a required pointer is NULL */
  FWD_ERR_SIZE = 2,    /* a size is zero/negative or inconsistent */
  FWD_ERR_ARG = 3,     /* an unsupported option (distribution, dtype, ...) */
  FWD_ERR_ALLOC = 4,   /* out of memory */
  FWD_ERR_INTERNAL = 5 /* a bug: please report */
} fwd_status;

typedef enum { FWD_DIST_RADEMACHER = 0, FWD_DIST_NORMAL = 1 } fwd_dist;
typedef enum { FWD_F32 = 0, FWD_BF16 = 1 } fwd_dtype;

FWD_API const char* fwd_last_error(void);
FWD_API const char* fwd_version(void);
/* Which SIMD path the GEMM micro-kernel was compiled for ("avx2+fma", "neon", "generic"). */
FWD_API const char* fwd_simd(void);

/* Philox4x32-10 words for counters offset .. offset+n-1: out is (n, 4) uint32, row-major. */
FWD_API fwd_status fwd_philox_words(uint64_t seed, int64_t n, int64_t offset, uint32_t* out, int num_threads);

/* Perturbation values v[i] for i in [0, n), global offset `offset` (>= 0). out_dtype FWD_F32 or
 * FWD_BF16 (out points to uint16_t bfloat16 bits then; normal values are rounded to nearest even). */
FWD_API fwd_status fwd_perturb(uint64_t seed, int64_t n, int64_t offset, int dist, int out_dtype, void* out,
                               int num_threads);

/* derive_seed(base, ints[0], ..., ints[n-1]) = fold s <- splitmix64(s ^ splitmix64(ints[j])), s0 = base. */
FWD_API uint64_t fwd_derive_seed(uint64_t base, const int64_t* ints, int n);

/* The fused dual (LoRA) linear.
 *
 *   y       = x W^T + b + s (x A^T) B^T                                  (M, d_out)
 *   y_dot_k = x_dot_k W^T + s [(x_dot_k A^T + x V_A,k^T) B^T + (x A^T) V_B,k^T] + V_b,k   (K, M, d_out)
 *
 * V_A,k (r, d_in), V_B,k (d_out, r), V_b,k (d_out) are perturbation k's slices, regenerated inside the
 * kernel from seeds[k] at offset_A / offset_B / offset_bias (row-major element order), or read from
 * explicit tangents A_dot (K, r, d_in) / B_dot (K, d_out, r) / bias_dot (K, d_out) when given.
 * Any of x_dot, bias, A/B (both or neither), the trainable-bias tangent may be absent (NULL / -1).
 * Inputs are float32 or bfloat16 (in_dtype, for x, x_dot, W, A, B, bias and explicit tangents);
 * accumulation is float32; y, y_dot have out_dtype. All matrices contiguous in their last dim.
 */
typedef struct {
  int64_t M, d_in, d_out, r, K;
  int in_dtype, out_dtype;
  const void* x; int64_t ldx;                 /* (M, d_in) */
  const void* x_dot; int64_t ldx_dot;         /* (K, M, d_in) rows at x_dot + (k*M + m)*ldx_dot, or NULL */
  const void* W; int64_t ldw;                 /* (d_out, d_in) */
  const void* bias;                           /* (d_out) or NULL */
  const void* A; int64_t lda;                 /* (r, d_in) or NULL */
  const void* B; int64_t ldb;                 /* (d_out, r) or NULL */
  float scaling;
  const int64_t* seeds;                       /* (K) seeds, used for slices without explicit tangents */
  int64_t offset_A, offset_B, offset_bias;    /* offset_bias < 0: bias is frozen (no tangent) */
  int dist;
  const void* A_dot; const void* B_dot; const void* bias_dot; /* explicit tangents or NULL */
  void* y; int64_t ldy;                       /* (M, d_out) */
  void* y_dot; int64_t ldy_dot;               /* (K, M, d_out) rows at y_dot + (k*M + m)*ldy_dot */
  int num_threads;
} fwd_lora_dual_args;

FWD_API fwd_status fwd_lora_linear_dual(const fwd_lora_dual_args* args);

/* Plain GEMM used by the kernels, exposed for benchmarks and tests: C (M,N) = A (M,K) B(N,K)^T. */
FWD_API fwd_status fwd_sgemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                                int64_t ldb, float* C, int64_t ldc, int num_threads);

#ifdef __cplusplus
}
#endif
#endif /* FWDCORE_H */
