// The fused dual (LoRA) linear on the GPU: tiled shared-memory GEMMs, perturbation slices regenerated
// per tile from the seeds (no cuBLAS, nothing materialised).
//
// The math (fwdcore.h): with s the LoRA scaling, h = x A^T (M, r) and, for tangent k,
// u_k = x_dot_k A^T + x V_A,k^T (M, r),
//   y       = x W^T + b + [s h] B^T
//   y_dot_k = x_dot_k W^T + [s u_k | s h] [B | V_B,k]^T + V_b,k
// Two kernels:
//  1. k_lora_down: hs = s h and us_k = s u_k for every k (a float32 workspace of (K + 1) M r values).
//     Tangent k's reduction is the concatenation [x_dot_k | x] . [A | V_A,k] over 2 d_in, the V_A,k
//     tile regenerated from seeds[k] (or read from A_dot) while it is staged in shared memory.
//  2. k_lora_main: one batched GEMM over the row groups g = 0 (primal: x) and g = 1 + k (tangent k:
//     x_dot_k) against W. Group varies fastest over consecutive blocks, so the K + 1 blocks that read the
//     same W tile run together and find it in L2. The low-rank term is folded into the same
//     accumulators as a second, r- or 2r-wide reduction ([s h] . B^T, resp. [s u_k | s h] . [B | V_B,k]^T,
//     the V_B,k tile regenerated in shared memory), and the bias / V_b,k are added in the epilogue,
//     which rounds once to the output dtype.
// Both use the same block tile: BM x BN outputs per block, the reduction staged BK at a time through
// shared memory as transposed A and B tiles (loads coalesced along the contiguous reduction dimension,
// tiles padded by one column against bank conflicts), each thread accumulating a TM x TN micro-tile in
// registers with rows ty + TY*i and columns tx + TX*j (strided, so that a warp's shared-memory reads are
// broadcasts or consecutive words and its stores to global memory are row segments).
#include <vector>

#include "common.cuh"

namespace FWDCUDA_NS {

// acc[i][j] += sum_{p < kdim} la(i, p) lb(j, p) for the thread's micro-tile of a BM x BN block tile.
// la(i, p): row i (0 <= i < BM, relative to the tile) of the left operand at reduction index p; lb(j, p)
// likewise for the right operand; both return 0 outside the matrices. Every thread of the block must
// call it (it synchronises).
template <int BM, int BN, int BK, int TM, int TN, class LA, class LB>
FWD_DEV void tile_mma(int64_t kdim, const LA& la, const LB& lb, float (*As)[BM + 1], float (*Bs)[BN + 1],
                      float (&acc)[TM][TN]) {
  constexpr int TX = BN / TN, TY = BM / TM, NT = TX * TY;
  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
  for (int64_t p0 = 0; p0 < kdim; p0 += BK) {
    const int kc = (int)imin(BK, kdim - p0);
    // consecutive threads take consecutive reduction indices of one row: coalesced global loads
    for (int e = tid; e < BM * BK; e += NT) {
      const int i = e / BK, p = e % BK;
      As[p][i] = p < kc ? la(i, p0 + p) : 0.0f;
    }
    for (int e = tid; e < BN * BK; e += NT) {
      const int j = e / BK, p = e % BK;
      Bs[p][j] = p < kc ? lb(j, p0 + p) : 0.0f;
    }
    __syncthreads();
    FWD_UNROLL
    for (int p = 0; p < BK; ++p) {
      float av[TM], bv[TN];
      FWD_UNROLL
      for (int i = 0; i < TM; ++i) av[i] = As[p][ty + TY * i];
      FWD_UNROLL
      for (int j = 0; j < TN; ++j) bv[j] = Bs[p][tx + TX * j];
      FWD_UNROLL
      for (int i = 0; i < TM; ++i)
        FWD_UNROLL
        for (int j = 0; j < TN; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();  // the tiles are consumed before the next ones are staged
  }
}

// ---------------------------------------------------------------------------------------------------
// 1. Down projections: grid (m tiles * (K + 1), r tiles); block (m tile, group g) computes rows m of
//    hs (g = 0) or us_k (g = 1 + k), columns [j0, j0 + DBN) of r.

constexpr int DBM = 64, DBN = 16, DBK = 32, DTM = 4, DTN = 1;
constexpr int kDownThreads = (DBM / DTM) * (DBN / DTN);  // 256

template <typename T>
__global__ void __launch_bounds__(kDownThreads) k_lora_down(fwd_lora_dual_args a, float* hs, float* us) {
  __shared__ float As[DBK][DBM + 1];
  __shared__ float Bs[DBK][DBN + 1];
  const int64_t M = a.M, d_in = a.d_in, r = a.r;
  const int64_t mt = cdiv(M, DBM);
  const int64_t g = (int64_t)blockIdx.x / mt, m0 = ((int64_t)blockIdx.x % mt) * DBM, j0 = (int64_t)blockIdx.y * DBN;
  const int64_t k = g - 1;
  const T* x = (const T*)a.x;
  const T* A = (const T*)a.A;
  float acc[DTM][DTN];
  FWD_UNROLL
  for (int i = 0; i < DTM; ++i)
    FWD_UNROLL
    for (int j = 0; j < DTN; ++j) acc[i][j] = 0.0f;

  auto x_rows = [&](int i, int64_t p) -> float {
    const int64_t m = m0 + i;
    return m < M ? to_f32(x[m * a.ldx + p]) : 0.0f;
  };
  auto A_rows = [&](int j, int64_t p) -> float {
    const int64_t jj = j0 + j;
    return jj < r ? to_f32(A[jj * a.lda + p]) : 0.0f;
  };
  if (g == 0) {  // h = x A^T
    tile_mma<DBM, DBN, DBK, DTM, DTN>(d_in, x_rows, A_rows, As, Bs, acc);
  } else {  // u_k = x_dot_k A^T + x V_A,k^T
    if (a.x_dot) {
      const T* xd = (const T*)a.x_dot + k * M * a.ldx_dot;
      auto xd_rows = [&](int i, int64_t p) -> float {
        const int64_t m = m0 + i;
        return m < M ? to_f32(xd[m * a.ldx_dot + p]) : 0.0f;
      };
      tile_mma<DBM, DBN, DBK, DTM, DTN>(d_in, xd_rows, A_rows, As, Bs, acc);
    }
    const T* Ad = (const T*)a.A_dot;
    const int64_t seed = Ad ? 0 : a.seeds[k];
    const int64_t offA = a.offset_A;
    const int dist = a.dist;
    auto VA_rows = [&](int j, int64_t p) -> float {  // V_A,k (r, d_in), row-major element jj * d_in + p
      const int64_t jj = j0 + j;
      if (jj >= r) return 0.0f;
      return Ad ? to_f32(Ad[(k * r + jj) * d_in + p]) : pv(seed, offA + jj * d_in + p, dist);
    };
    tile_mma<DBM, DBN, DBK, DTM, DTN>(d_in, x_rows, VA_rows, As, Bs, acc);
  }
  constexpr int TX = DBN / DTN, TY = DBM / DTM;
  const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
  float* out = g == 0 ? hs : us + k * M * r;
  FWD_UNROLL
  for (int i = 0; i < DTM; ++i) {
    const int64_t m = m0 + ty + TY * i;
    FWD_UNROLL
    for (int j = 0; j < DTN; ++j) {
      const int64_t jj = j0 + tx + TX * j;
      if (m < M && jj < r) out[m * r + jj] = a.scaling * acc[i][j];
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// 2. The batched main GEMM: grid ((K + 1) * m tiles * n tiles), group fastest.

constexpr int BM = 64, BN = 64, BK = 16, TM = 4, TN = 4;
constexpr int kMainThreads = (BM / TM) * (BN / TN);  // 256

template <typename T, typename TO>
__global__ void __launch_bounds__(kMainThreads) k_lora_main(fwd_lora_dual_args a, const float* hs, const float* us) {
  __shared__ float As[BK][BM + 1];
  __shared__ float Bs[BK][BN + 1];
  const int64_t M = a.M, d_in = a.d_in, d_out = a.d_out, r = a.A ? a.r : 0, G = a.K + 1;
  int64_t pid = blockIdx.x;
  const int64_t g = pid % G;
  pid /= G;
  const int64_t mt = cdiv(M, BM);
  const int64_t m0 = (pid % mt) * BM, n0 = (pid / mt) * BN;
  const int64_t k = g - 1;
  const bool bias_trainable = a.bias_dot != nullptr || a.offset_bias >= 0;
  const bool needs_seed = g > 0 && ((a.A && !a.B_dot) || (a.offset_bias >= 0 && !a.bias_dot));
  const int64_t seed = needs_seed ? a.seeds[k] : 0;
  const int dist = a.dist;
  float acc[TM][TN];
  FWD_UNROLL
  for (int i = 0; i < TM; ++i)
    FWD_UNROLL
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

  const T* W = (const T*)a.W;
  auto W_rows = [&](int j, int64_t p) -> float {
    const int64_t jj = n0 + j;
    return jj < d_out ? to_f32(W[jj * a.ldw + p]) : 0.0f;
  };
  if (g == 0 || a.x_dot) {  // x W^T, or x_dot_k W^T
    const T* src = g == 0 ? (const T*)a.x : (const T*)a.x_dot + k * M * a.ldx_dot;
    const int64_t ld = g == 0 ? a.ldx : a.ldx_dot;
    auto src_rows = [&](int i, int64_t p) -> float {
      const int64_t m = m0 + i;
      return m < M ? to_f32(src[m * ld + p]) : 0.0f;
    };
    tile_mma<BM, BN, BK, TM, TN>(d_in, src_rows, W_rows, As, Bs, acc);
  }
  if (a.A) {  // [s h] . B^T (primal) or [s u_k | s h] . [B | V_B,k]^T (tangent k)
    const T* B = (const T*)a.B;
    const T* Bd = (const T*)a.B_dot;
    const float* uk = g == 0 ? hs : us + k * M * r;
    const int64_t offB = a.offset_B;
    auto low_rows = [&](int i, int64_t c) -> float {
      const int64_t m = m0 + i;
      if (m >= M) return 0.0f;
      return c < r ? uk[m * r + c] : hs[m * r + (c - r)];
    };
    auto B_rows = [&](int j, int64_t c) -> float {
      const int64_t jj = n0 + j;
      if (jj >= d_out) return 0.0f;
      if (c < r) return to_f32(B[jj * a.ldb + c]);
      const int64_t i = c - r;  // V_B,k (d_out, r), row-major element jj * r + i
      return Bd ? to_f32(Bd[(k * d_out + jj) * r + i]) : pv(seed, offB + jj * r + i, dist);
    };
    tile_mma<BM, BN, BK, TM, TN>(g == 0 ? r : 2 * r, low_rows, B_rows, As, Bs, acc);
  }
  // epilogue: + b (primal) or + V_b,k (tangent k of a trainable bias), one rounding to the output dtype
  constexpr int TX = BN / TN, TY = BM / TM;
  const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
  TO* dst = g == 0 ? (TO*)a.y : (TO*)a.y_dot + k * M * a.ldy_dot;
  const int64_t ldd = g == 0 ? a.ldy : a.ldy_dot;
  FWD_UNROLL
  for (int j = 0; j < TN; ++j) {
    const int64_t jj = n0 + tx + TX * j;
    if (jj >= d_out) continue;
    float add = 0.0f;
    if (g == 0) {
      if (a.bias) add = to_f32(((const T*)a.bias)[jj]);
    } else if (bias_trainable) {
      add = a.bias_dot ? to_f32(((const T*)a.bias_dot)[k * d_out + jj]) : pv(seed, a.offset_bias + jj, dist);
    }
    FWD_UNROLL
    for (int i = 0; i < TM; ++i) {
      const int64_t m = m0 + ty + TY * i;
      if (m < M) store(dst + m * ldd + jj, acc[i][j] + add);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side

size_t workspace_floats(const fwd_lora_dual_args& a) {
  if (!a.A || a.M <= 0 || a.r <= 0 || a.K < 0) return 0;
  return (size_t)(a.K + 1) * (size_t)a.M * (size_t)a.r;
}

// The checks of the CPU entry point (the core's validate_lora_dual: same messages), then the
// device-side ones.
void validate(const fwd_lora_dual_args* args) {
  need_ptr(args, "args");
  const fwd_lora_dual_args& a = *args;
  fwdcore::validate_lora_dual(a);
  need_ptr(a.y, "y (the CUDA kernel always writes the primal; the tangents-only mode is CPU-only)");
  const bool tangents = a.K > 0, lora = a.A != nullptr;
  const bool gen_any = tangents && ((lora && (!a.A_dot || !a.B_dot)) || (!a.bias_dot && a.offset_bias >= 0));
  // the grids
  const int64_t mt = cdiv(a.M, BM), nt = cdiv(a.d_out, BN);
  need(mul_ok(mt, nt) && mul_ok(mt * nt, a.K + 1) && mt * nt * (a.K + 1) <= 0x7fffffffLL, FWD_ERR_SIZE,
       "(K + 1) * ceil(M / 64) * ceil(d_out / 64) = " + num(a.K + 1) + " * " + num(mt) + " * " + num(nt) +
           " blocks exceed the CUDA grid");
  if (lora) {
    need(mul_ok(cdiv(a.M, DBM), a.K + 1) && cdiv(a.M, DBM) * (a.K + 1) <= 0x7fffffffLL, FWD_ERR_SIZE,
         "(K + 1) * ceil(M / 64) blocks exceed the CUDA grid");
    need(cdiv(a.r, DBN) <= 65535, FWD_ERR_SIZE, "r is too large for the CUDA grid: " + num(a.r));
  }
  // device memory (the pointers the kernels will read or write)
  need_device(a.x, "x");
  need_device(a.W, "W");
  need_device(a.y, "y");
  if (tangents) need_device(a.y_dot, "y_dot");
  if (a.x_dot) need_device(a.x_dot, "x_dot");
  if (a.bias) need_device(a.bias, "bias");
  if (lora) {
    need_device(a.A, "A");
    need_device(a.B, "B");
  }
  if (a.A_dot) need_device(a.A_dot, "A_dot");
  if (a.B_dot) need_device(a.B_dot, "B_dot");
  if (a.bias_dot && tangents) need_device(a.bias_dot, "bias_dot");
  if (gen_any) need_device(a.seeds, "seeds");
}

template <typename T, typename TO>
void run_typed(const fwd_lora_dual_args& a, float* ws, cudaStream_t st) {
  const bool lora = a.A != nullptr;
  float* hs = lora ? ws : nullptr;
  float* us = lora ? ws + (size_t)a.M * (size_t)a.r : nullptr;
  if (lora)
    launch(k_lora_down<T>, dim3((unsigned)(cdiv(a.M, DBM) * (a.K + 1)), (unsigned)cdiv(a.r, DBN)),
           dim3(kDownThreads), st, "lora_linear_dual (down projections)", a, hs, us);
  launch(k_lora_main<T, TO>, dim3((unsigned)((a.K + 1) * cdiv(a.M, BM) * cdiv(a.d_out, BN))), dim3(kMainThreads), st,
         "lora_linear_dual (main GEMM)", a, (const float*)hs, (const float*)us);
}

void run(const fwd_lora_dual_args& a0, float* ws, cudaStream_t st) {
  fwd_lora_dual_args a = a0;
  if (a.K == 0) {  // the primal only: nothing of the tangents is touched
    a.x_dot = a.A_dot = a.B_dot = a.bias_dot = nullptr;
    a.y_dot = nullptr;
    a.offset_bias = -1;
  }
  if (!a.bias) a.offset_bias = -1;
  if (a.in_dtype == FWD_BF16) {
    if (a.out_dtype == FWD_BF16)
      run_typed<uint16_t, uint16_t>(a, ws, st);
    else
      run_typed<uint16_t, float>(a, ws, st);
  } else {
    if (a.out_dtype == FWD_BF16)
      run_typed<float, uint16_t>(a, ws, st);
    else
      run_typed<float, float>(a, ws, st);
  }
}

}  // namespace FWDCUDA_NS

using namespace FWDCUDA_NS;

extern "C" {

size_t fwd_cuda_lora_dual_workspace_bytes(const fwd_lora_dual_args* args) {
  return args ? workspace_floats(*args) * sizeof(float) : 0;
}

fwd_status fwd_cuda_lora_linear_dual_ws(const fwd_lora_dual_args* args, void* workspace, size_t workspace_bytes,
                                        void* stream) {
  return fwdcore::guarded_call("fwd_cuda_lora_linear_dual_ws", [&] {
    validate(args);
    const size_t need_bytes = workspace_floats(*args) * sizeof(float);
    need(workspace_bytes >= need_bytes, FWD_ERR_SIZE,
         "workspace_bytes (" + std::to_string(workspace_bytes) + ") is smaller than fwd_cuda_lora_dual_workspace_bytes (" +
             std::to_string(need_bytes) + ")");
    if (need_bytes > 0) {
      need_ptr(workspace, "workspace");
      need((uintptr_t)workspace % alignof(float) == 0, FWD_ERR_ARG, "workspace is not 4-byte aligned");
      need_device(workspace, "workspace");
    }
    run(*args, (float*)workspace, (cudaStream_t)stream);
  });
}

fwd_status fwd_cuda_lora_linear_dual(const fwd_lora_dual_args* args, void* stream) {
  return fwdcore::guarded_call("fwd_cuda_lora_linear_dual", [&] {
    validate(args);
    const size_t n = workspace_floats(*args);
    cudaStream_t st = (cudaStream_t)stream;
#if defined(FWD_CUDA_EMULATE)
    std::vector<float> ws(n);
    run(*args, ws.data(), st);
#else
    if (n == 0) {
      run(*args, nullptr, st);
      return;
    }
    int dev = 0, pools = 0;
    check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
    if (cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, dev) != cudaSuccess) {
      (void)cudaGetLastError();
      pools = 0;
    }
    void* ws = nullptr;
    const cudaError_t e = pools ? cudaMallocAsync(&ws, n * sizeof(float), st) : cudaMalloc(&ws, n * sizeof(float));
    if (e == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      throw fwdcore::ArgError(FWD_ERR_ALLOC, "out of device memory for the " + std::to_string(n * sizeof(float)) +
                                                 "-byte workspace");
    }
    check_cuda(e, "workspace allocation");
    struct Free {  // stream-ordered: the kernels queued before it still use the workspace
      void* p;
      cudaStream_t st;
      bool pools;
      ~Free() {
        if (pools) {
          (void)cudaFreeAsync(p, st);
        } else {
          (void)cudaStreamSynchronize(st);
          (void)cudaFree(p);
        }
      }
    } release{ws, st, pools != 0};
    run(*args, (float*)ws, st);
#endif
  });
}

}  // extern "C"
