/* Forward gradients through fwdcore's C API only: a LoRA linear then a causal attention block.
 *
 *   q = x Wq^T + bq + s (x A^T) B^T     (trainable: the LoRA adapter theta = [A | B])
 *   k = x Wk^T, v = x Wv^T              (frozen; one kv head shared by H query heads)
 *   o = attention(q, k, v), loss = sum(o * Wo)
 *
 * For K perturbations with seeds from fwd_derive_seed, one dual forward (fwd_lora_linear_dual carrying
 * K tangent streams of q into fwd_attention_dual) gives jvp_k = dloss/dtheta . v_k, where v_k is never
 * stored: the kernels regenerate it from seed k at theta's offsets (A at 0, B at r * d). The program then
 * checks every jvp against a central finite difference (loss(theta + eps v_k) - loss(theta - eps v_k)) /
 * 2 eps, with v_k materialised by fwd_perturb at the same offsets and primal-only (K = 0) passes, prints
 * both columns and exits non-zero if they disagree. Finally it rebuilds the gradient estimate
 * (1/K) sum_k jvp_k v_k from the (seed, jvp) pairs with fwd_perturb_combine, as a server would.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fwdcore.h"

#define NTOK 8            /* tokens L = S */
#define DM 16             /* model width d */
#define NH 2              /* query heads H */
#define NKV 1             /* kv heads Hkv */
#define HD 8              /* head dim D (DM = NH * HD) */
#define RANK 4            /* LoRA rank r */
#define KP 4              /* perturbations K */
#define NA (RANK * DM)    /* elements of A (offset 0 in theta) */
#define NB (DM * RANK)    /* elements of B (offset NA) */
#define DIST FWD_DIST_RADEMACHER

/* Every C API status is checked; on failure print the call and fwd_last_error() and exit. */
#define CHECK(call)                                                                                   \
  do {                                                                                                \
    const fwd_status st_ = (call);                                                                    \
    if (st_ != FWD_OK) {                                                                              \
      fprintf(stderr, "%s:%d: %s failed with status %d: %s\n", __FILE__, __LINE__, #call, (int)st_, \
              fwd_last_error());                                                                      \
      exit(2);                                                                                        \
    }                                                                                                 \
  } while (0)

/* The model (frozen weights, input, loss weights) and the trainable adapter. */
static float x[NTOK * DM], Wq[DM * DM], bq[DM], Wk[NKV * HD * DM], Wv[NKV * HD * DM], Wo[NH * NTOK * HD];
static float A[NA], B[NB];
static const float scaling = 2.0f; /* lora_alpha / r */

static float uniform(unsigned long long* s, float lo, float hi) { /* xorshift64*, deterministic */
  *s ^= *s >> 12;
  *s ^= *s << 25;
  *s ^= *s >> 27;
  return lo + (hi - lo) * (float)((*s * 0x2545F4914F6CDD1Dull) >> 40) / 16777216.0f;
}

/* (NTOK, nh * HD) rows -> (1, nh, NTOK, HD), the attention layout. */
static void to_heads(const float* rows, int nh, float* heads) {
  int l, h, d;
  for (l = 0; l < NTOK; ++l)
    for (h = 0; h < nh; ++h)
      for (d = 0; d < HD; ++d) heads[(h * NTOK + l) * HD + d] = rows[l * nh * HD + h * HD + d];
}

/* loss(theta = [a | b]); with K > 0 also jvp[k] = dloss/dtheta . v_{seeds[k]}. */
static double forward(const float* a, const float* b, int64_t K, const int64_t* seeds, double* jvp) {
  static float kr[NTOK * NKV * HD], vr[NTOK * NKV * HD], kh[NTOK * NKV * HD], vh[NTOK * NKV * HD];
  static float q[NTOK * DM], qd[KP * NTOK * DM], qh[NTOK * DM], qdh[KP * NTOK * DM];
  static float o[NH * NTOK * HD], od[KP * NH * NTOK * HD];
  fwd_lora_dual_args la;
  fwd_attention_dual_args aa;
  double loss = 0.0;
  int64_t k, i;

  /* frozen k and v projections: C = x W^T */
  CHECK(fwd_sgemm_nt(NTOK, NKV * HD, DM, x, DM, Wk, DM, kr, NKV * HD, 1));
  CHECK(fwd_sgemm_nt(NTOK, NKV * HD, DM, x, DM, Wv, DM, vr, NKV * HD, 1));
  to_heads(kr, NKV, kh);
  to_heads(vr, NKV, vh);

  /* q and its K tangent streams from the fused dual LoRA linear */
  memset(&la, 0, sizeof la);
  la.M = NTOK; la.d_in = DM; la.d_out = DM; la.r = RANK; la.K = K;
  la.in_dtype = FWD_F32; la.out_dtype = FWD_F32;
  la.x = x; la.ldx = DM;
  la.x_dot = NULL;                 /* x does not depend on theta */
  la.W = Wq; la.ldw = DM;
  la.bias = bq;
  la.A = a; la.lda = DM;
  la.B = b; la.ldb = RANK;
  la.scaling = scaling;
  la.seeds = seeds;
  la.offset_A = 0; la.offset_B = NA;
  la.offset_bias = -1;             /* frozen bias */
  la.dist = DIST;
  la.y = q; la.ldy = DM;
  la.y_dot = K > 0 ? qd : NULL; la.ldy_dot = DM;
  la.num_threads = 0;              /* the OpenMP default */
  CHECK(fwd_lora_linear_dual(&la));
  to_heads(q, NH, qh);
  for (k = 0; k < K; ++k) to_heads(qd + k * NTOK * DM, NH, qdh + k * NTOK * DM);

  /* causal grouped-query attention, tangents through q only (k, v frozen) */
  memset(&aa, 0, sizeof aa);
  aa.B = 1; aa.H = NH; aa.Hkv = NKV; aa.L = NTOK; aa.S = NTOK; aa.D = HD; aa.K = K;
  aa.dtype = FWD_F32;
  aa.q = qh; aa.k = kh; aa.v = vh;
  aa.q_dot = K > 0 ? qdh : NULL;
  aa.k_dot = NULL; aa.v_dot = NULL;
  aa.mask = NULL;
  aa.causal = 1;
  aa.scale = 1.0f / sqrtf((float)HD);
  aa.o = o;
  aa.o_dot = K > 0 ? od : NULL;
  aa.num_threads = 0;
  CHECK(fwd_attention_dual(&aa));

  for (i = 0; i < NH * NTOK * HD; ++i) loss += (double)o[i] * Wo[i];
  for (k = 0; k < K; ++k) {
    jvp[k] = 0.0;
    for (i = 0; i < NH * NTOK * HD; ++i) jvp[k] += (double)od[k * NH * NTOK * HD + i] * Wo[i];
  }
  return loss;
}

int main(void) {
  unsigned long long rng = 42;
  int64_t seeds[KP];
  double jvp[KP], fd[KP], loss;
  const float eps = 3e-3f; /* float32: truncation ~ eps^2, round-off ~ 1e-7 / eps */
  const double rtol = 1e-2, atol = 1e-3;
  float vA[NA], vB[NB], Ap[NA], Bp[NB], Am[NA], Bm[NB], g[NA + NB];
  uint64_t useeds[KP];
  float coefs[KP];
  double gnorm = 0.0;
  int i, k, bad = 0;

  for (i = 0; i < NTOK * DM; ++i) x[i] = uniform(&rng, -1.0f, 1.0f);
  for (i = 0; i < DM * DM; ++i) Wq[i] = uniform(&rng, -0.5f, 0.5f);
  for (i = 0; i < DM; ++i) bq[i] = uniform(&rng, -0.1f, 0.1f);
  for (i = 0; i < NKV * HD * DM; ++i) Wk[i] = uniform(&rng, -0.5f, 0.5f);
  for (i = 0; i < NKV * HD * DM; ++i) Wv[i] = uniform(&rng, -0.5f, 0.5f);
  for (i = 0; i < NH * NTOK * HD; ++i) Wo[i] = uniform(&rng, -1.0f, 1.0f);
  for (i = 0; i < NA; ++i) A[i] = uniform(&rng, -0.25f, 0.25f);
  for (i = 0; i < NB; ++i) B[i] = uniform(&rng, -0.25f, 0.25f); /* as after some training (B = 0 at init) */

  /* Perturbation k of round 0 for client 3: derive_seed(1234, round, client, k). */
  for (k = 0; k < KP; ++k) {
    const int64_t ints[3] = {0, 3, k};
    seeds[k] = (int64_t)fwd_derive_seed(1234, ints, 3);
  }

  printf("fwdcore %s (%s): LoRA linear (M=%d, d=%d, r=%d) -> causal attention (H=%d, Hkv=%d, L=S=%d, D=%d)\n",
         fwd_version(), fwd_simd(), NTOK, DM, RANK, NH, NKV, NTOK, HD);
  loss = forward(A, B, KP, seeds, jvp); /* ONE dual forward for all K perturbations */
  printf("loss = %.6f; K = %d rademacher perturbations of theta = [A | B] (%d parameters)\n", loss, KP, NA + NB);

  /* The check: central differences along the same v_k, materialised with fwd_perturb. */
  for (k = 0; k < KP; ++k) {
    CHECK(fwd_perturb((uint64_t)seeds[k], NA, 0, DIST, FWD_F32, vA, 1));
    CHECK(fwd_perturb((uint64_t)seeds[k], NB, NA, DIST, FWD_F32, vB, 1));
    for (i = 0; i < NA; ++i) Ap[i] = A[i] + eps * vA[i], Am[i] = A[i] - eps * vA[i];
    for (i = 0; i < NB; ++i) Bp[i] = B[i] + eps * vB[i], Bm[i] = B[i] - eps * vB[i];
    fd[k] = (forward(Ap, Bp, 0, NULL, NULL) - forward(Am, Bm, 0, NULL, NULL)) / (2.0 * eps);
  }
  printf("  k  seed                jvp (dual forward)  central difference (eps=%g)  |diff|\n", (double)eps);
  for (k = 0; k < KP; ++k) {
    const double diff = fabs(jvp[k] - fd[k]);
    const int ok = diff <= atol + rtol * fabs(fd[k]);
    bad += !ok;
    printf("  %d  0x%016llx  %+18.6f  %+27.6f  %.2e%s\n", k, (unsigned long long)seeds[k], jvp[k], fd[k], diff,
           ok ? "" : "  MISMATCH");
  }

  /* Server side: the gradient estimate (1/K) sum_k jvp_k v_k from the (seed, jvp) pairs alone. */
  memset(g, 0, sizeof g);
  for (k = 0; k < KP; ++k) useeds[k] = (uint64_t)seeds[k], coefs[k] = (float)(jvp[k] / KP);
  CHECK(fwd_perturb_combine(useeds, coefs, KP, NA + NB, 0, DIST, g, 1));
  for (i = 0; i < NA + NB; ++i) gnorm += (double)g[i] * g[i];
  printf("gradient estimate (1/K) sum_k jvp_k v_k: |g| = %.6f\n", sqrt(gnorm));

  /* The error contract: a bad argument is a status and a message, never an abort. */
  {
    const fwd_status st = fwd_perturb(1, 0, 0, DIST, FWD_F32, vA, 1);
    printf("fwd_perturb(n = 0) -> status %d: %s\n", (int)st, fwd_last_error());
    if (st != FWD_ERR_SIZE) return 1;
  }

  if (bad) {
    fprintf(stderr, "FAILED: %d of %d jvps disagree with central differences (tolerance %g + %g |fd|)\n", bad, KP,
            atol, rtol);
    return 1;
  }
  printf("ok: %d jvps agree with central differences (tolerance %g + %g |fd|)\n", KP, atol, rtol);
  return 0;
}
