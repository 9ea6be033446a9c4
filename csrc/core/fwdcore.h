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

/* out[i] += sum_j coefs[j] * v_{seeds[j]}(offset + i) for i in [0, n): a combination of seeded
 * perturbations (a gradient estimate rebuilt from (seed, coefficient) pairs) without materialising
 * any of them. float32 out; n_seeds >= 1; seeds/coefs hold n_seeds values. */
FWD_API fwd_status fwd_perturb_combine(const uint64_t* seeds, const float* coefs, int64_t n_seeds, int64_t n,
                                       int64_t offset, int dist, float* out, int num_threads);

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

/* The fused dual (forward-mode) attention, one flash-style pass over the keys.
 *
 * Per batch b, query head h (kv head hk = h / (H / Hkv): grouped-query attention) and query row i, with
 * scores s_j = scale q_i.k_j + mask_ij and tangent scores sd_j = scale (q_dot_i.k_j + q_i.k_dot_j):
 *   p      = softmax_j(s)
 *   o_i    = sum_j p_j v_j                                                       (B, H, L, D)
 *   o_dot_i = sum_j p_j (sd_j v_j + v_dot_j) - (sum_j p_j sd_j) o_i  per tangent   (K, B, H, L, D)
 * computed with a running max m, l = sum e^(s_j - m), a = sum e^(s_j - m) v_j and per tangent stream
 * b = sum e^(s_j - m)(sd_j v_j + v_dot_j), c = sum e^(s_j - m) sd_j (all rescaled when m grows);
 * o = a / l, o_dot = b / l - (c / l) o. The K tangent streams share the primal scores and every K/V
 * load; no (L, S) score matrix is ever formed (per-task tiles of at most 32 x 64 scores).
 *
 * Layout: every tensor is dense row-major (contiguous) in the shape given; tangent stream k of q_dot
 * starts at element k*B*H*L*D, of k_dot / v_dot at k*B*Hkv*S*D. Any of q_dot, k_dot, v_dot may be NULL
 * (a zero tangent). K = 0 computes the primal only (tangents must then be NULL; o_dot may be NULL).
 * mask (optional) is an additive float32 mask read as mask[b*ms[0] + h*ms[1] + i*ms[2] + j*ms[3]] with
 * non-negative element strides ms = mask_stride (0 broadcasts a dimension); -INFINITY masks a key.
 * causal != 0 additionally masks key j for query i unless j <= i + (S - L) (bottom-right aligned).
 * A query row whose every key is masked gets o = 0 and o_dot = 0 (not NaN).
 * dtype FWD_F32 or FWD_BF16 applies to q, k, v, the tangents, o and o_dot; accumulation is float32.
 * Threads (OpenMP) split (b, h, 32-row query blocks); the result does not depend on the thread count.
 */
typedef struct {
  int64_t B, H, Hkv, L, S, D, K;
  int dtype;
  const void* q;                            /* (B, H, L, D) */
  const void* k; const void* v;             /* (B, Hkv, S, D) */
  const void* q_dot;                        /* (K, B, H, L, D) or NULL */
  const void* k_dot; const void* v_dot;     /* (K, B, Hkv, S, D) or NULL */
  const float* mask; int64_t mask_stride[4];/* additive float32 mask (see above) or NULL */
  int causal;
  float scale;
  void* o;                                  /* (B, H, L, D) */
  void* o_dot;                              /* (K, B, H, L, D); may be NULL when K == 0 */
  int num_threads;
} fwd_attention_dual_args;

FWD_API fwd_status fwd_attention_dual(const fwd_attention_dual_args* args);

/* Plain GEMM used by the kernels, exposed for benchmarks and tests: C (M,N) = A (M,K) B(N,K)^T. */
FWD_API fwd_status fwd_sgemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                                int64_t ldb, float* C, int64_t ldc, int num_threads);

#ifdef __cplusplus
}
#endif
#endif /* FWDCORE_H */
