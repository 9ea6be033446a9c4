// Seeded perturbations on the GPU: Philox words, perturbation values and combinations of perturbations.
//
// Element i of perturbation `seed` at global offset `off` is philox.h's Philox4x32-10(key = seed,
// counter = off + i), the very function the CPU core runs (philox.h is __host__ __device__ under nvcc),
// so the words are the CPU's and Triton's bit for bit. Each thread computes its elements independently
// (counter-based: no state), consecutive threads take consecutive elements (coalesced stores), and a
// grid-stride loop covers any n with a bounded grid.
#include "common.cuh"

namespace FWDCUDA_NS {

constexpr int kThreads = 256;

// Enough blocks to fill any current GPU several times over; the grid-stride loops do the rest.
inline unsigned stride_blocks(int64_t n, int64_t per_block) {
  return (unsigned)imax(1, imin(cdiv(n, per_block), 8192));
}

__global__ void __launch_bounds__(kThreads) k_philox_words(uint64_t seed, int64_t n, int64_t offset, uint32_t* out) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const fwdcore::Words4 w = fwdcore::philox4x32_10(seed, (uint64_t)(offset + i));
    uint32_t* o = out + 4 * i;
    o[0] = w.w[0];
    o[1] = w.w[1];
    o[2] = w.w[2];
    o[3] = w.w[3];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) k_perturb(uint64_t seed, int64_t n, int64_t offset, int dist, T* out) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    store(out + i, fwdcore::perturb_value(seed, (uint64_t)(offset + i), dist));
}

// out[i] += sum_j coefs[j] v_j(offset + i). A block owns kPer * kThreads consecutive elements at a time
// (kept in registers) and streams every seed over them; the (seed, coefficient) pairs are staged through
// shared memory kThreads at a time so each is read from global memory once per block. The sum runs over
// j in order from out[i], skipping zero coefficients, exactly as the CPU core does.
constexpr int kPer = 4;

__global__ void __launch_bounds__(kThreads) k_perturb_combine(const uint64_t* seeds, const float* coefs,
                                                              int64_t n_seeds, int64_t n, int64_t offset, int dist,
                                                              float* out) {
  __shared__ uint64_t s_seed[kThreads];
  __shared__ float s_coef[kThreads];
  const int tid = threadIdx.x;
  const int64_t span = (int64_t)kPer * kThreads;
  // block-uniform loop (base depends on blockIdx only), so the barriers inside are safe
  for (int64_t base = (int64_t)blockIdx.x * span; base < n; base += (int64_t)gridDim.x * span) {
    float acc[kPer];
    FWD_UNROLL
    for (int e = 0; e < kPer; ++e) {
      const int64_t i = base + (int64_t)e * kThreads + tid;
      acc[e] = i < n ? out[i] : 0.0f;
    }
    for (int64_t j0 = 0; j0 < n_seeds; j0 += kThreads) {
      const int nj = (int)imin(kThreads, n_seeds - j0);
      __syncthreads();  // the previous chunk is consumed
      if (tid < nj) {
        s_seed[tid] = seeds[j0 + tid];
        s_coef[tid] = coefs[j0 + tid];
      }
      __syncthreads();
      for (int j = 0; j < nj; ++j) {
        const float c = s_coef[j];
        if (c == 0.0f) continue;
        const uint64_t sd = s_seed[j];
        FWD_UNROLL
        for (int e = 0; e < kPer; ++e) {
          const int64_t i = base + (int64_t)e * kThreads + tid;
          if (i < n) acc[e] += c * fwdcore::perturb_value(sd, (uint64_t)(offset + i), dist);
        }
      }
    }
    FWD_UNROLL
    for (int e = 0; e < kPer; ++e) {
      const int64_t i = base + (int64_t)e * kThreads + tid;
      if (i < n) out[i] = acc[e];
    }
  }
}

}  // namespace FWDCUDA_NS

using namespace FWDCUDA_NS;

extern "C" {

fwd_status fwd_cuda_philox_words(uint64_t seed, int64_t n, int64_t offset, uint32_t* out, void* stream) {
  return fwdcore::guarded_call("fwd_cuda_philox_words", [&] {
    need_positive(n, "n");
    need_nonnegative(offset, "offset");
    need_product(n, 4, "the output's element count n * 4");
    need_range(offset, n, "offset + n");
    need_device(out, "out");
    launch(k_philox_words, dim3(stride_blocks(n, kThreads)), dim3(kThreads), (cudaStream_t)stream, "philox_words",
           seed, n, offset, out);
  });
}

fwd_status fwd_cuda_perturb(uint64_t seed, int64_t n, int64_t offset, int dist, int out_dtype, void* out,
                            void* stream) {
  return fwdcore::guarded_call("fwd_cuda_perturb", [&] {
    fwdcore::validate_perturb(n, offset, dist, out_dtype, out);
    need_device(out, "out");
    const dim3 grid(stride_blocks(n, kThreads)), block(kThreads);
    if (out_dtype == FWD_BF16)
      launch(k_perturb<uint16_t>, grid, block, (cudaStream_t)stream, "perturb", seed, n, offset, dist, (uint16_t*)out);
    else
      launch(k_perturb<float>, grid, block, (cudaStream_t)stream, "perturb", seed, n, offset, dist, (float*)out);
  });
}

fwd_status fwd_cuda_perturb_combine(const uint64_t* seeds, const float* coefs, int64_t n_seeds, int64_t n,
                                    int64_t offset, int dist, float* out, void* stream) {
  return fwdcore::guarded_call("fwd_cuda_perturb_combine", [&] {
    fwdcore::validate_perturb_combine(seeds, coefs, n_seeds, n, offset, dist, out);
    need_device(seeds, "seeds");
    need_device(coefs, "coefs");
    need_device(out, "out");
    launch(k_perturb_combine, dim3(stride_blocks(n, (int64_t)kPer * kThreads)), dim3(kThreads), (cudaStream_t)stream,
           "perturb_combine", seeds, coefs, n_seeds, n, offset, dist, out);
  });
}

}  // extern "C"
