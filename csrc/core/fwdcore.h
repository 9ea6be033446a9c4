/* fwdcore: the torch-free core of fwdllm's kernels, behind a plain C API.
 *
 * Conventions
 *  - Matrices are row-major with an explicit leading dimension (elements between rows).
 *  - Every entry point returns fwd_status; FWD_OK is 0. Invalid arguments are rejected before anything
 *    is written: FWD_ERR_NULL (a required pointer is NULL), FWD_ERR_SIZE (a size, leading dimension,
 *    stride or offset out of range, or sizes whose element indices overflow int64), FWD_ERR_ARG (an
 *    unsupported option or an inconsistent combination). On error, fwd_last_error() returns a message
 *    "<function>: <what>" naming the offending argument and its value (thread-local; valid until the
 *    next failing call on that thread; "" before any). No C++ exception ever crosses this API and
 *    nothing aborts the host program. Values (NaN/Inf in the data) are not checked; the scalar
 *    hyper-parameters (LoRA scaling, attention scale) must be finite (FWD_ERR_ARG).
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
  FWD_ERR_INTERNAL = 5, /* a bug: please report */
  FWD_ERR_CUDA = 6      /* the CUDA runtime failed (csrc/cuda's fwd_cuda_* only: no device, launch error, ...) */
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

/* derive_seed(base, ints[0], ..., ints[n-1]) = fold s <- splitmix64(s ^ splitmix64(ints[j])), s0 = base.
 * No status: ints == NULL or n <= 0 fold nothing and return base. */
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
 * K = 0 computes the primal y only: x_dot, A_dot, B_dot and bias_dot must then be NULL, y_dot, seeds
 * and the offsets are ignored. y = NULL (with K > 0) computes the tangents only: the primal rows are
 * skipped (a caller that already has y, e.g. computing the tangents of a row subset later).
 * scaling must be finite when A/B are given.
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
  void* y; int64_t ldy;                       /* (M, d_out), or NULL: tangents only (K > 0) */
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

/* ---------------------------------------------------------------------------------------------------
 * Small dual ops: the rest of a transformer block (norms, activations, rotary, the loss).
 *
 * Layout: dense row-major. A primal is (rows, d) = n elements; its K tangent streams are (K, rows, d),
 * stream k starting at element k*n. K = 0 computes the primal only (every tangent input must then be
 * NULL and y_dot may be NULL). With K > 0 and no tangent input at all, y_dot is set to zero. dtype
 * FWD_F32 or FWD_BF16 applies to every floating-point tensor of a call; arithmetic and reductions are in
 * float32 (norm statistics in double), results are rounded once to dtype. Tangent outputs may alias the
 * tangent input named in each comment exactly (in place); no other overlap is allowed.
 * ------------------------------------------------------------------------------------------------- */

/* LayerNorm / RMSNorm over the last dim (d), with trainable-parameter tangents.
 *   layer:  y = x̂ w + b,  x̂ = (x - mean) / sqrt(var + eps)  (biased variance)
 *           y_dot = w (x_dot - mean(x_dot) - x̂ mean(x̂ x_dot)) / sqrt(var + eps) + w_dot x̂ + b_dot
 *   rms:    h = x / sqrt(mean(x^2) + eps),  y = w (h rounded to dtype)   (HF LlamaRMSNorm)
 *           y_dot = w (x_dot - h mean(h x_dot)) / sqrt(mean(x^2) + eps) + w_dot h
 * (means over the last dim; w = 1 / b = 0 when weight / bias is NULL). */
typedef struct {
  int64_t rows, d, K;
  int dtype;
  const void* x;          /* (rows, d) */
  const void* x_dot;      /* (K, rows, d) or NULL */
  const void* weight;     /* (d) or NULL */
  const void* bias;       /* (d) or NULL; must be NULL for RMSNorm */
  const void* weight_dot; /* (K, d) or NULL (needs weight) */
  const void* bias_dot;   /* (K, d) or NULL (needs bias) */
  float eps;              /* >= 0 */
  void* y;                /* (rows, d) */
  void* y_dot;            /* (K, rows, d); may be x_dot (in place) */
  int num_threads;
} fwd_norm_dual_args;

FWD_API fwd_status fwd_layer_norm_dual(const fwd_norm_dual_args* args);
FWD_API fwd_status fwd_rms_norm_dual(const fwd_norm_dual_args* args);

/* Elementwise activations y = f(x), y_dot_k = f'(x) x_dot_k over n elements (any shape).
 *   FWD_ACT_GELU       x Φ(x)                       (erf form, F.gelu default)
 *   FWD_ACT_GELU_TANH  ½ x (1 + tanh(√(2/π)(x + 0.044715 x³)))   (F.gelu(approximate="tanh"))
 *   FWD_ACT_SILU       x σ(x)
 *   FWD_ACT_TANH       tanh(x)
 * x (n), x_dot (K, n) or NULL, y (n), y_dot (K, n) (may be x_dot). */
typedef enum { FWD_ACT_GELU = 0, FWD_ACT_GELU_TANH = 1, FWD_ACT_SILU = 2, FWD_ACT_TANH = 3 } fwd_activation;

FWD_API fwd_status fwd_activation_dual(int act, int64_t n, int64_t K, int dtype, const void* x, const void* x_dot,
                                       void* y, void* y_dot, int num_threads);

/* The LLaMA MLP activation y = silu(gate) * up (product rule):
 *   y_dot_k = silu'(gate) up gate_dot_k + silu(gate) up_dot_k,  silu'(g) = σ(g) (1 + g (1 - σ(g))).
 * gate, up (n); gate_dot, up_dot (K, n) or NULL; y (n); y_dot (K, n) (may be gate_dot or up_dot). */
FWD_API fwd_status fwd_gated_act_dual(int64_t n, int64_t K, int dtype, const void* gate, const void* gate_dot,
                                      const void* up, const void* up_dot, void* y, void* y_dot, int num_threads);

/* Rotary position embedding, HF LLaMA convention (rotate_half over the two halves of D):
 *   y1 = x1 cos1 - x2 sin1,  y2 = x2 cos2 + x1 sin2    (x1 = x[..., :D/2], x2 = x[..., D/2:])
 * and the same map on every tangent stream (it is linear in x). x and x_dot are read through element
 * strides (b, h, l; d contiguous), so a (B, L, H, D) buffer viewed as (B, H, L, D) needs no copy; cos and
 * sin (rows of D) through strides (b, h, l) where 0 broadcasts. y (B, H, L, D) and y_dot (K, B, H, L, D)
 * are written dense; neither may overlap an input. D must be even. */
typedef struct {
  int64_t B, H, L, D, K;
  int dtype;
  const void* x; int64_t x_stride[3];         /* element (b, h, l, d) at b*s[0] + h*s[1] + l*s[2] + d */
  const void* x_dot; int64_t x_dot_stride[4]; /* stream k, (b, h, l, d) at k*s[0] + b*s[1] + h*s[2] + l*s[3] + d */
  const void* cos; const void* sin; int64_t cs_stride[3]; /* (b, h, l) strides, >= 0 (0 broadcasts) */
  void* y;                                    /* (B, H, L, D) */
  void* y_dot;                                /* (K, B, H, L, D) */
  int num_threads;
} fwd_rotary_dual_args;

FWD_API fwd_status fwd_rotary_dual(const fwd_rotary_dual_args* args);

/* Softmax cross-entropy, mean over the rows whose label is not ignore_index, and its K directional
 * derivatives: with p = softmax(logits row) and n the number of counted rows,
 *   loss = (1/n) Σ_rows [logsumexp(l) - l[label]],   loss_dot_k = (1/n) Σ_rows Σ_c (p_c - [c = label]) l_dot_k,c
 * logits (N, C), logits_dot (K, N, C) or NULL, labels (N) int64 in [0, C) or ignore_index. loss (1) and
 * loss_dot (K) are float32 whatever dtype is. No row counted: loss = 0 and loss_dot = 0. A label out of
 * range is FWD_ERR_ARG (the message names the row). The result does not depend on the thread count. */
FWD_API fwd_status fwd_cross_entropy_dual(int64_t N, int64_t C, int64_t K, int dtype, const void* logits,
                                          const void* logits_dot, const int64_t* labels, int64_t ignore_index,
                                          float* loss, float* loss_dot, int num_threads);

/* Plain GEMM used by the kernels, exposed for benchmarks and tests: C (M,N) = A (M,K) B(N,K)^T. */
FWD_API fwd_status fwd_sgemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                                int64_t ldb, float* C, int64_t ldc, int num_threads);

#ifdef __cplusplus
}
#endif
#endif /* FWDCORE_H */
