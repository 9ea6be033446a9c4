// The fused dual (forward-mode) attention on the GPU: one flash-style pass over the keys.
//
// The math (fwdcore.h): per (b, h, query row i), scores s_j = scale q.k_j + mask_ij, tangent scores
// sd_j = scale (q_dot.k_j + q.k_dot_j), p = softmax(s):
//   o     = sum_j p_j v_j
//   o_dot = sum_j p_j (sd_j v_j + v_dot_j) - (sum_j p_j sd_j) o                 (per tangent stream)
// computed online over key blocks with a running max m, mu = m (0 while every key so far is masked),
// alpha = e^(m_old - mu) and p_j = e^(s_j - mu):
//   l = alpha l + sum_j p_j,  a = alpha a + sum_j p_j v_j
//   per stream: w_j = p_j sd_j,  c = alpha c + sum_j w_j,  b = alpha b + sum_j (w_j v_j + p_j v_dot_j)
// and at the end o = a / l, o_dot = b / l - (c / l) o (l = 0, a fully masked row: o = o_dot = 0).
//
// One block = (batch b, query head h, block of BQ query rows, chunk of up to KC = 4 tangent streams).
// Per key block of BKV keys the K and V tiles are staged in shared memory once and serve the primal
// and every stream of the chunk: the scores, the softmax statistics (m, l, alpha) and p are computed
// once and shared by the streams; each stream then stages its q_dot rows and k_dot / v_dot tiles, forms
// w = p * sd into the score tile and updates its b (registers) and c (shared). The primal accumulator a
// and the chunk's b live in registers: each thread owns EV = BQ * DP / 128 (= 8) elements of the BQ x D
// output tile (consecutive threads own consecutive columns: conflict-free shared reads of V, coalesced
// stores). With K > 4 the grid has ceil(K / 4) chunks per query block and each recomputes the primal
// part (only chunk 0 stores o), about half a stream's work per chunk; KC = 8 would save that but
// doubles the registers (lower occupancy) and the compile time. Shared tiles are padded to DP + 1
// columns against bank conflicts. Head dimensions up to 256, in four tile shapes (DP = 32, 64, 128, 256
// padded columns).
#include "common.cuh"

namespace FWDCUDA_NS {

constexpr int kAttnThreads = 128;
constexpr int kChunk = 4;  // tangent streams per block
constexpr int kMaxHeadDim = 256;

template <typename T, int DP, int BQ, int BKV>
__global__ void __launch_bounds__(kAttnThreads) k_attention_dual(fwd_attention_dual_args a) {
  constexpr int NT = kAttnThreads, KC = kChunk, LD = DP + 1, EV = BQ * DP / NT;
  static_assert((BQ * DP) % NT == 0, "the output tile must split evenly over the threads");
  static_assert(sizeof(float) * (2 * BQ * LD + 4 * BKV * LD + 2 * BQ * BKV + (4 + KC) * BQ) <= 48 * 1024,
                "static shared memory is limited to 48 KiB");
  __shared__ float Qs[BQ][LD];   // q rows of the block
  __shared__ float Qd[BQ][LD];   // q_dot rows of the current stream
  __shared__ float Ks[BKV][LD];  // key tile
  __shared__ float Vs[BKV][LD];  // value tile
  __shared__ float Kd[BKV][LD];  // k_dot tile of the current stream
  __shared__ float Vd[BKV][LD];  // v_dot tile of the current stream
  __shared__ float Sc[BQ][BKV];  // primal scores, then w = p * sd of the current stream
  __shared__ float Pr[BQ][BKV];  // p = e^(s - mu)
  __shared__ float m_row[BQ], l_row[BQ], alpha_row[BQ], mu_row[BQ];
  __shared__ float c_row[KC][BQ];

  const int tid = threadIdx.x;
  const int64_t H = a.H, Hkv = a.Hkv, L = a.L, S = a.S, D = a.D, K = a.K;
  const int64_t nqb = cdiv(L, BQ);
  const int64_t qb = (int64_t)blockIdx.x % nqb, bh = (int64_t)blockIdx.x / nqb;
  const int64_t b = bh / H, h = bh % H, hk = h / (H / Hkv);
  const int64_t i0 = qb * BQ, nq = imin(BQ, L - i0);
  const int64_t k0 = (int64_t)blockIdx.y * KC;
  const int nstreams = (int)imax(0, imin(KC, K - k0));
  const int64_t strideQ = a.B * H * L * D, strideKV = a.B * Hkv * S * D;
  const int64_t shift = S - L;  // causal: query i attends key j iff j <= i + shift
  const int64_t qrow0 = bh * L + i0, kv0 = (b * Hkv + hk) * S;
  const T* q = (const T*)a.q;
  const T* kp = (const T*)a.k;
  const T* vp = (const T*)a.v;
  const bool has_qd = nstreams > 0 && a.q_dot, has_kd = nstreams > 0 && a.k_dot, has_vd = nstreams > 0 && a.v_dot;
  const bool has_sd = has_qd || has_kd;
  const bool causal = a.causal != 0;
  const float scale = a.scale;
  const float* mask = a.mask;

  for (int e = tid; e < BQ * DP; e += NT) {
    const int i = e / DP, d = e % DP;
    Qs[i][d] = (i < nq && d < D) ? to_f32(q[(qrow0 + i) * D + d]) : 0.0f;
  }
  if (tid < BQ) {
    m_row[tid] = -INFINITY;
    l_row[tid] = 0.0f;
    for (int kk = 0; kk < KC; ++kk) c_row[kk][tid] = 0.0f;
  }
  float acc[EV], bacc[KC][EV];
  FWD_UNROLL
  for (int u = 0; u < EV; ++u) {
    acc[u] = 0.0f;
    FWD_UNROLL
    for (int kk = 0; kk < KC; ++kk) bacc[kk][u] = 0.0f;
  }

  // keys past the last row's causal limit are never attended
  const int64_t jend = causal ? imin(S, i0 + nq + shift) : S;
  for (int64_t j0 = 0; j0 < jend; j0 += BKV) {
    const int64_t nk = imin(BKV, jend - j0);
    __syncthreads();  // every reader of the previous tiles is done (and Qs / the row state are visible)
    for (int e = tid; e < BKV * DP; e += NT) {
      const int j = e / DP, d = e % DP;
      const bool ok = j < nk && d < D;
      const int64_t src = (kv0 + j0 + j) * D + d;
      Ks[j][d] = ok ? to_f32(kp[src]) : 0.0f;
      Vs[j][d] = ok ? to_f32(vp[src]) : 0.0f;
    }
    __syncthreads();
    // primal scores s = scale q.k + mask (-inf where masked or out of range)
    for (int e = tid; e < BQ * BKV; e += NT) {
      const int i = e / BKV, j = e % BKV;
      const int64_t gi = i0 + i, gj = j0 + j;
      float s = -INFINITY;
      if (i < nq && j < nk && (!causal || gj <= gi + shift)) {
        float dot = 0.0f;
        FWD_UNROLL_N(4) for (int d = 0; d < DP; ++d) dot += Qs[i][d] * Ks[j][d];
        s = dot * scale;
        if (mask) s += mask[b * a.mask_stride[0] + h * a.mask_stride[1] + gi * a.mask_stride[2] + gj * a.mask_stride[3]];
      }
      Sc[i][j] = s;
    }
    __syncthreads();
    // running max and the rescale factor of everything accumulated so far
    if (tid < BQ) {
      float mt = -INFINITY;
      for (int j = 0; j < BKV; ++j) mt = fmaxf(mt, Sc[tid][j]);
      const float m_old = m_row[tid], m_new = fmaxf(m_old, mt);
      const float mu = m_new == -INFINITY ? 0.0f : m_new;  // every key so far masked: p = 0, not NaN
      alpha_row[tid] = expf(m_old - mu);
      mu_row[tid] = mu;
      m_row[tid] = m_new;
    }
    __syncthreads();
    for (int e = tid; e < BQ * BKV; e += NT) {
      const int i = e / BKV, j = e % BKV;
      Pr[i][j] = expf(Sc[i][j] - mu_row[i]);
    }
    __syncthreads();
    if (tid < BQ) {
      float sum = 0.0f;
      for (int j = 0; j < BKV; ++j) sum += Pr[tid][j];
      l_row[tid] = l_row[tid] * alpha_row[tid] + sum;
    }
    FWD_UNROLL
    for (int u = 0; u < EV; ++u) {  // a = alpha a + p V
      const int e = tid + u * NT, i = e / DP, d = e % DP;
      float v = alpha_row[i] * acc[u];
      FWD_UNROLL_N(4) for (int j = 0; j < BKV; ++j) v += Pr[i][j] * Vs[j][d];
      acc[u] = v;
    }
    // the chunk's tangent streams, sharing p, alpha and the K / V tiles
    FWD_UNROLL
    for (int kk = 0; kk < KC; ++kk) {
      if (kk < nstreams) {  // block-uniform
        const int64_t ks = k0 + kk;
        __syncthreads();  // Sc / Qd / Kd / Vd are free again
        if (has_qd) {
          const T* qd = (const T*)a.q_dot + ks * strideQ;
          for (int e = tid; e < BQ * DP; e += NT) {
            const int i = e / DP, d = e % DP;
            Qd[i][d] = (i < nq && d < D) ? to_f32(qd[(qrow0 + i) * D + d]) : 0.0f;
          }
        }
        if (has_kd || has_vd) {
          const T* kd = has_kd ? (const T*)a.k_dot + ks * strideKV : nullptr;
          const T* vd = has_vd ? (const T*)a.v_dot + ks * strideKV : nullptr;
          for (int e = tid; e < BKV * DP; e += NT) {
            const int j = e / DP, d = e % DP;
            const bool ok = j < nk && d < D;
            const int64_t src = (kv0 + j0 + j) * D + d;
            if (has_kd) Kd[j][d] = ok ? to_f32(kd[src]) : 0.0f;
            if (has_vd) Vd[j][d] = ok ? to_f32(vd[src]) : 0.0f;
          }
        }
        __syncthreads();
        if (has_sd) {  // w = p * scale (q_dot.k + q.k_dot), c = alpha c + sum_j w
          for (int e = tid; e < BQ * BKV; e += NT) {
            const int i = e / BKV, j = e % BKV;
            float sd = 0.0f;
            if (has_qd && has_kd) {
              FWD_UNROLL_N(4) for (int d = 0; d < DP; ++d) sd += Qd[i][d] * Ks[j][d] + Qs[i][d] * Kd[j][d];
            } else if (has_qd) {
              FWD_UNROLL_N(4) for (int d = 0; d < DP; ++d) sd += Qd[i][d] * Ks[j][d];
            } else {
              FWD_UNROLL_N(4) for (int d = 0; d < DP; ++d) sd += Qs[i][d] * Kd[j][d];
            }
            Sc[i][j] = Pr[i][j] * (sd * scale);
          }
          __syncthreads();
          if (tid < BQ) {
            float sum = 0.0f;
            for (int j = 0; j < BKV; ++j) sum += Sc[tid][j];
            c_row[kk][tid] = c_row[kk][tid] * alpha_row[tid] + sum;
          }
        }
        FWD_UNROLL
        for (int u = 0; u < EV; ++u) {  // b = alpha b + w V + p V_dot
          const int e = tid + u * NT, i = e / DP, d = e % DP;
          float v = alpha_row[i] * bacc[kk][u];
          if (has_sd && has_vd) {
            FWD_UNROLL_N(4) for (int j = 0; j < BKV; ++j) v += Sc[i][j] * Vs[j][d] + Pr[i][j] * Vd[j][d];
          } else if (has_sd) {
            FWD_UNROLL_N(4) for (int j = 0; j < BKV; ++j) v += Sc[i][j] * Vs[j][d];
          } else if (has_vd) {
            FWD_UNROLL_N(4) for (int j = 0; j < BKV; ++j) v += Pr[i][j] * Vd[j][d];
          }
          bacc[kk][u] = v;
        }
      }
    }
  }
  __syncthreads();
  // o = a / l, o_dot = b / l - (c / l) o; l == 0 (every key masked, or no key block at all) gives zeros
  T* o = (T*)a.o;
  T* od = (T*)a.o_dot;
  FWD_UNROLL
  for (int u = 0; u < EV; ++u) {
    const int e = tid + u * NT, i = e / DP, d = e % DP;
    if (i >= nq || d >= D) continue;
    const float l = l_row[i];
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const float ov = l > 0.0f ? acc[u] * inv : 0.0f;
    const int64_t off = (qrow0 + i) * D + d;
    if (blockIdx.y == 0) store(o + off, ov);
    FWD_UNROLL
    for (int kk = 0; kk < KC; ++kk) {
      if (kk < nstreams) {
        const float v = l > 0.0f ? bacc[kk][u] * inv - (c_row[kk][i] * inv) * ov : 0.0f;
        store(od + (k0 + kk) * strideQ + off, v);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side

// The checks of the CPU entry point (the core's validate_attention_dual: same messages), then the
// CUDA-specific ones.
void validate(const fwd_attention_dual_args* args) {
  need_ptr(args, "args");
  const fwd_attention_dual_args& a = *args;
  fwdcore::validate_attention_dual(a);
  const int64_t kk = a.K > 0 ? a.K : 1;
  // CUDA-specific limits
  need(a.D <= kMaxHeadDim, FWD_ERR_ARG,
       "the CUDA kernel supports head dimensions D <= " + num(kMaxHeadDim) + ", got " + num(a.D));
  const int64_t bq = a.D <= 32 ? 32 : a.D <= 64 ? 16 : a.D <= 128 ? 8 : 4;
  const int64_t nqb = cdiv(a.L, bq);
  need(mul_ok(nqb, a.B * a.H) && nqb * a.B * a.H <= 0x7fffffffLL, FWD_ERR_SIZE,
       "B * H * ceil(L / " + num(bq) + ") blocks exceed the CUDA grid");
  grid_yz(cdiv(kk, kChunk), "ceil(K / 4) tangent-stream chunks");
  need_device(a.q, "q");
  need_device(a.k, "k");
  need_device(a.v, "v");
  need_device(a.o, "o");
  if (a.K > 0) {
    need_device(a.o_dot, "o_dot");
    if (a.q_dot) need_device(a.q_dot, "q_dot");
    if (a.k_dot) need_device(a.k_dot, "k_dot");
    if (a.v_dot) need_device(a.v_dot, "v_dot");
  }
  if (a.mask) need_device(a.mask, "mask");
}

template <typename T, int DP, int BQ, int BKV>
void run_shape(const fwd_attention_dual_args& a, cudaStream_t st) {
  const int64_t blocks = cdiv(a.L, BQ) * a.B * a.H;
  const int64_t chunks = a.K > 0 ? cdiv(a.K, kChunk) : 1;
  launch(k_attention_dual<T, DP, BQ, BKV>, dim3((unsigned)blocks, (unsigned)chunks), dim3(kAttnThreads), st,
         "attention_dual", a);
}

template <typename T>
void run_typed(const fwd_attention_dual_args& a, cudaStream_t st) {
  if (a.D <= 32)
    run_shape<T, 32, 32, 32>(a, st);
  else if (a.D <= 64)
    run_shape<T, 64, 16, 32>(a, st);
  else if (a.D <= 128)
    run_shape<T, 128, 8, 16>(a, st);
  else
    run_shape<T, 256, 4, 8>(a, st);
}

}  // namespace FWDCUDA_NS

using namespace FWDCUDA_NS;

extern "C" {

int fwd_cuda_attention_max_head_dim(void) { return kMaxHeadDim; }

fwd_status fwd_cuda_attention_dual(const fwd_attention_dual_args* args, void* stream) {
  return fwdcore::guarded_call("fwd_cuda_attention_dual", [&] {
    validate(args);
    fwd_attention_dual_args a = *args;
    if (a.K == 0) a.q_dot = a.k_dot = a.v_dot = a.o_dot = nullptr;
    if (a.dtype == FWD_BF16)
      run_typed<uint16_t>(a, (cudaStream_t)stream);
    else
      run_typed<float>(a, (cudaStream_t)stream);
  });
}

}  // extern "C"
