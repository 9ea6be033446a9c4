// The fused dual (LoRA) linear on the CPU, as three passes of the packed GEMM engine.
//
// With h = x A^T (M, r) and, for tangent k, u_k = x_dot_k A^T + x V_A,k^T (M, r):
//   y       = x W^T + s h B^T + b
//   y_dot_k = x_dot_k W^T + [s u_k | s h] . [B | V_B,k]^T + V_b,k
// so the whole output is one GEMM whose reduction is d_in (against W, packed once per block and
// shared by the primal rows and all K tangent streams) followed by a 2r-wide segment whose B panel
// [B | V_B,k] is regenerated from seed k while it is packed. h and x V_A,k^T for every k come from one
// small GEMM x . [A; V_A,0; ...; V_A,K-1]^T (V_A regenerated while packing), and x_dot A^T from one
// more over all K*M tangent rows. No perturbation slice ever exists outside a packing buffer.
#include <string.h>

#include <vector>

#include "internal.h"

namespace fwdcore {

namespace {

template <typename T>
struct Src {  // a row-major matrix of T with leading dimension ld
  const T* p;
  int64_t ld;
  const T* row(int64_t i) const { return p + i * ld; }
};

template <typename T>
void run(const fwd_lora_dual_args& a) {
  const int64_t M = a.M, d_in = a.d_in, d_out = a.d_out, K = a.K;
  const bool lora = a.A != nullptr;
  const int64_t r = lora ? a.r : 0;
  const bool has_xdot = a.x_dot != nullptr;
  const bool primal = a.y != nullptr;  // else the tangents only: group 0 (the primal rows) is skipped
  const bool bias_trainable = a.bias_dot != nullptr || a.offset_bias >= 0;
  const int nt = resolve_threads(a.num_threads);
  const float s = a.scaling;
  const Src<T> x{(const T*)a.x, a.ldx}, xd{(const T*)a.x_dot, a.ldx_dot}, W{(const T*)a.W, a.ldw};
  const Src<T> A{(const T*)a.A, a.lda}, B{(const T*)a.B, a.ldb};
  const T* A_dot = (const T*)a.A_dot;
  const T* B_dot = (const T*)a.B_dot;
  const T* bias_dot = (const T*)a.bias_dot;
  const int dist = a.dist;
  const int64_t* seeds = a.seeds;

  // Output in float32: the caller's buffers when they are float32, else a scratch copy.
  const int G = (int)(1 + K);
  std::vector<float> scratch;
  GemmOutput out;
  out.c.resize(G);
  out.ldc.resize(G);
  if (a.out_dtype == FWD_F32) {
    out.c[0] = (float*)a.y;
    out.ldc[0] = primal ? a.ldy : d_out;
    for (int64_t k = 0; k < K; ++k) {
      out.c[1 + k] = (float*)a.y_dot + k * M * a.ldy_dot;
      out.ldc[1 + k] = a.ldy_dot;
    }
  } else {
    scratch.resize((size_t)G * M * d_out);
    for (int g = 0; g < G; ++g) {
      out.c[g] = g == 0 && !primal ? nullptr : scratch.data() + (size_t)g * M * d_out;
      out.ldc[g] = d_out;
    }
  }

  // Init rows: the bias for the primal, the bias tangent V_b,k for tangent k (if the bias trains).
  std::vector<float> init_rows((size_t)(a.bias ? d_out : 0) + (size_t)(bias_trainable ? K * d_out : 0));
  out.init.assign(G, nullptr);
  {
    float* q = init_rows.data();
    if (a.bias) {
      for (int64_t j = 0; j < d_out; ++j) q[j] = to_f32(((const T*)a.bias)[j]);
      out.init[0] = q;
      q += d_out;
    }
    if (bias_trainable)
      for (int64_t k = 0; k < K; ++k, q += d_out) {
        if (bias_dot)
          for (int64_t j = 0; j < d_out; ++j) q[j] = to_f32(bias_dot[k * d_out + j]);
        else
          perturb_fill((uint64_t)seeds[k], (uint64_t)a.offset_bias, d_out, dist, q);
        out.init[1 + k] = q;
      }
  }

  // Augmented operands: hs = s h (M, r); ut_k = [s u_k | s h] (M, 2r) for each k.
  std::vector<float> hs, ut;
  if (lora) {
    const int64_t NP = (1 + K) * r;
    std::vector<float> P((size_t)M * NP);
    {  // P = x . [A; V_A,0; ...]^T
      std::vector<GemmSegment> segs(1);
      GemmSegment& sg = segs[0];
      sg.kdim = d_in;
      sg.active.assign(1, 1);
      sg.pack_a = [&](int, int64_t i0, int64_t n, int64_t p0, int64_t kc, int Pn, float* dst) {
        pack_panel(x.row(i0), x.ld, n, p0, kc, Pn, dst);
      };
      sg.pack_b = [&](int, int64_t j0, int64_t n, int64_t p0, int64_t kc, int Pn, float* dst) {
        std::vector<float> row((size_t)kc);
        pack_panel_rows(n, kc, Pn, dst, row.data(), [&](int64_t jj, float* out) {
          const int64_t j = j0 + jj;
          if (j < r) {
            for (int64_t p = 0; p < kc; ++p) out[p] = to_f32(A.row(j)[p0 + p]);
            return;
          }
          const int64_t k = (j - r) / r, i = (j - r) % r;
          if (A_dot) {
            for (int64_t p = 0; p < kc; ++p) out[p] = to_f32(A_dot[(k * r + i) * d_in + p0 + p]);
            return;
          }
          // V_A,k row i, columns p0.. : consecutive counters, generated 8 at a time
          perturb_fill((uint64_t)seeds[k], (uint64_t)(a.offset_A + i * d_in + p0), kc, dist, out);
        });
      };
      GemmOutput po;
      po.c = {P.data()};
      po.ldc = {NP};
      gemm_run(1, M, NP, segs, po, nt);
    }
    std::vector<float> Q;
    if (has_xdot) {  // Q = x_dot A^T over all K*M rows
      Q.resize((size_t)K * M * r);
      std::vector<GemmSegment> segs(1);
      GemmSegment& sg = segs[0];
      sg.kdim = d_in;
      sg.active.assign(1, 1);
      sg.pack_a = [&](int, int64_t i0, int64_t n, int64_t p0, int64_t kc, int Pn, float* dst) {
        pack_panel(xd.row(i0), xd.ld, n, p0, kc, Pn, dst);
      };
      sg.pack_b = [&](int, int64_t j0, int64_t n, int64_t p0, int64_t kc, int Pn, float* dst) {
        pack_panel(A.row(j0), A.ld, n, p0, kc, Pn, dst);
      };
      GemmOutput qo;
      qo.c = {Q.data()};
      qo.ldc = {r};
      gemm_run(1, K * M, r, segs, qo, nt);
    }
    hs.resize((size_t)M * r);
    ut.resize((size_t)K * M * 2 * r);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < r; ++i) hs[m * r + i] = s * P[m * NP + i];
    for (int64_t k = 0; k < K; ++k)
      for (int64_t m = 0; m < M; ++m) {
        float* dst = ut.data() + (k * M + m) * 2 * r;
        for (int64_t i = 0; i < r; ++i) {
          const float q = has_xdot ? Q[(k * M + m) * r + i] : 0.0f;
          dst[i] = s * (q + P[m * NP + (1 + k) * r + i]);
          dst[r + i] = hs[m * r + i];
        }
      }
  }

  std::vector<GemmSegment> segs;
  {  // main segment: rows of x (primal) and x_dot_k (tangents) against W
    GemmSegment sg;
    sg.kdim = d_in;
    sg.active.assign(G, has_xdot ? 1 : 0);
    sg.active[0] = primal;
    sg.pack_a = [&](int g, int64_t i0, int64_t n, int64_t p0, int64_t kc, int Pn, float* dst) {
      if (g == 0)
        pack_panel(x.row(i0), x.ld, n, p0, kc, Pn, dst);
      else
        pack_panel(xd.row((g - 1) * M + i0), xd.ld, n, p0, kc, Pn, dst);
    };
    sg.pack_b = [&](int, int64_t j0, int64_t n, int64_t p0, int64_t kc, int Pn, float* dst) {
      pack_panel(W.row(j0), W.ld, n, p0, kc, Pn, dst);
    };
    segs.push_back(std::move(sg));
  }
  if (lora) {  // low-rank segment: [s u_k | s h] . [B | V_B,k]^T, and [s h | 0] . [B | 0]^T for the primal
    GemmSegment sg;
    sg.kdim = 2 * r;
    sg.b_per_group = true;
    sg.fuse_with_prev = true;
    sg.active.assign(G, 1);
    sg.active[0] = primal;
    sg.pack_a = [&](int g, int64_t i0, int64_t n, int64_t p0, int64_t kc, int Pn, float* dst) {
      if (g == 0)
        pack_panel_gen(n, kc, Pn, dst, [&](int64_t i, int64_t p) -> float {
          const int64_t c = p0 + p;
          return c < r ? hs[(i0 + i) * r + c] : 0.0f;
        });
      else
        pack_panel(ut.data() + ((g - 1) * M + i0) * 2 * r, 2 * r, n, p0, kc, Pn, dst);
    };
    sg.pack_b = [&](int g, int64_t j0, int64_t n, int64_t p0, int64_t kc, int Pn, float* dst) {
      const int64_t k = g - 1;
      // Rows j0 .. j0+n of V_B,k are the consecutive counters offset_B + j0*r .. offset_B + (j0+n)*r.
      std::vector<float> vb;
      if (g > 0 && !B_dot) {
        vb.resize((size_t)(n * r));
        perturb_fill((uint64_t)seeds[k], (uint64_t)(a.offset_B + j0 * r), n * r, dist, vb.data());
      }
      pack_panel_gen(n, kc, Pn, dst, [&](int64_t jj, int64_t p) -> float {
        const int64_t j = j0 + jj, c = p0 + p;
        if (c < r) return to_f32(B.row(j)[c]);
        if (g == 0) return 0.0f;
        const int64_t i = c - r;
        if (B_dot) return to_f32(B_dot[(k * d_out + j) * r + i]);
        return vb[jj * r + i];
      });
    };
    segs.push_back(std::move(sg));
  }
  gemm_run(G, M, d_out, segs, out, nt);

  if (a.out_dtype != FWD_F32) {
    uint16_t* y = (uint16_t*)a.y;
    uint16_t* yd = (uint16_t*)a.y_dot;
    for (int g = primal ? 0 : 1; g < G; ++g)
      for (int64_t m = 0; m < M; ++m) {
        uint16_t* dst = g == 0 ? y + m * a.ldy : yd + ((g - 1) * M + m) * a.ldy_dot;
        const float* src = out.c[g] + m * d_out;
        for (int64_t j = 0; j < d_out; ++j) dst[j] = f32_to_bf16(src[j]);
      }
  }
}

}  // namespace

void lora_linear_dual(const fwd_lora_dual_args& a) {
  if (a.in_dtype == FWD_BF16)
    run<uint16_t>(a);
  else
    run<float>(a);
}

void sgemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
              int64_t ldc, int nt) {
  std::vector<GemmSegment> segs(1);
  segs[0].kdim = K;
  segs[0].active.assign(1, 1);
  segs[0].pack_a = [&](int, int64_t i0, int64_t n, int64_t p0, int64_t kc, int P, float* dst) {
    pack_panel(A + i0 * lda, lda, n, p0, kc, P, dst);
  };
  segs[0].pack_b = [&](int, int64_t j0, int64_t n, int64_t p0, int64_t kc, int P, float* dst) {
    pack_panel(B + j0 * ldb, ldb, n, p0, kc, P, dst);
  };
  GemmOutput o;
  o.c = {C};
  o.ldc = {ldc};
  gemm_run(1, M, N, segs, o, resolve_threads(nt));
}

}  // namespace fwdcore
