// Shared pieces of the CUDA kernels (csrc/cuda/*.cu): element access for float32 / bfloat16, launch and
// error helpers, and the switch between nvcc (the GPU) and the host SIMT emulation (simt_host.h, used by
// the ctest suite on machines without a GPU; FWD_CUDA_EMULATE=1).
#pragma once
#include <stdint.h>
#include <math.h>

#include <string>

#if defined(FWD_CUDA_EMULATE)
#include "simt_host.h"
#else
#include <cuda_runtime.h>
#endif

#include "../core/internal.h"  // fwd_status, ArgError, guarded_call, philox.h (FWD_HD, philox4x32_10, ...)
#include "fwdcore_cuda.h"

// Host-emulation builds put everything in another namespace (and fwdcore_cuda.h renames the C entry
// points), so that an emulated and a real CUDA layer can be linked into one test program.
#if defined(FWD_CUDA_EMULATE)
#define FWDCUDA_NS fwdcuda_emu
#else
#define FWDCUDA_NS fwdcuda
#endif

#if defined(__CUDACC__)
#define FWD_DEV __device__ __forceinline__
#define FWD_UNROLL _Pragma("unroll")
#define FWD_PRAGMA_(x) _Pragma(#x)
#define FWD_UNROLL_N(n) FWD_PRAGMA_(unroll n)
#else
#define FWD_UNROLL_N(n)
#define FWD_DEV static inline
#define FWD_UNROLL
#endif

namespace FWDCUDA_NS {

// ---------------------------------------------------------------------------------------------------
// Elements: float32 as is, bfloat16 as its uint16_t bits (no cuda_bf16.h: the same bit manipulation as
// the CPU core's gemm.h, so that a float32 -> bfloat16 rounding is the CPU's by construction).

FWD_HD float to_f32(float v) { return v; }
FWD_HD float to_f32(uint16_t b) {
  union {
    uint32_t u;
    float f;
  } c;
  c.u = (uint32_t)b << 16;
  return c.f;
}
FWD_HD void store(float* p, float v) { *p = v; }
FWD_HD void store(uint16_t* p, float v) {  // round to nearest even; NaN stays NaN
  union {
    uint32_t u;
    float f;
  } c;
  c.f = v;
  if ((c.u & 0x7fffffffu) > 0x7f800000u) {
    *p = (uint16_t)((c.u >> 16) | 0x40);
    return;
  }
  c.u += 0x7fffu + ((c.u >> 16) & 1u);
  *p = (uint16_t)(c.u >> 16);
}

FWD_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
FWD_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
FWD_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Perturbation value (rademacher / normal) of element `index` of perturbation `seed`: philox.h's, i.e.
// bit-identical words to the CPU core and Triton on any device.
FWD_HD float pv(int64_t seed, int64_t index, int dist) {
  return fwdcore::perturb_value((uint64_t)seed, (uint64_t)index, dist);
}

// ---------------------------------------------------------------------------------------------------
// Host side: launching and errors.

// An error of the CUDA runtime (or of the emulator): FWD_ERR_CUDA at the C API boundary.
inline void cuda_fail(const std::string& what) { throw fwdcore::ArgError(FWD_ERR_CUDA, what); }

#if defined(FWD_CUDA_EMULATE)
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, cudaStream_t, const char* name, Args... args) {
  try {
    simt::launch(grid, block, [&] { kernel(args...); });
  } catch (const simt::Error& e) {
    cuda_fail(std::string(name) + ": emulated launch failed: " + e.what());
  }
}
#else
inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear a non-sticky error so that it does not leak into the caller's next check
    cuda_fail(std::string(what) + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
  }
}
// kernel<<<grid, block, 0, stream>>>(args...) and a check of the launch (configuration errors, no
// device, ...). Asynchronous faults inside the kernel surface at the caller's next synchronisation.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, cudaStream_t stream, const char* name, Args... args) {
  kernel<<<grid, block, 0, stream>>>(static_cast<KArgs>(args)...);
  check_cuda(cudaGetLastError(), (std::string(name) + " kernel launch").c_str());
}
#endif

}  // namespace FWDCUDA_NS

namespace FWDCUDA_NS {

// ---------------------------------------------------------------------------------------------------
// Host-side validation: the core's checks (internal.h), plus grid limits and device pointers.

using fwdcore::mul_ok;
using fwdcore::need;
using fwdcore::need_dist;
using fwdcore::need_dtype;
using fwdcore::need_extent;
using fwdcore::need_ld;
using fwdcore::need_nonnegative;
using fwdcore::need_positive;
using fwdcore::need_product;
using fwdcore::need_ptr;
using fwdcore::need_range;
using fwdcore::num;

// Grid dimension limits: x < 2^31, y and z <= 65535.
inline unsigned grid_x(int64_t n, const char* what) {
  need(n >= 1 && n <= 0x7fffffffLL, FWD_ERR_SIZE, std::string(what) + ": " + num(n) + " blocks exceed the CUDA grid");
  return (unsigned)n;
}
inline unsigned grid_yz(int64_t n, const char* what) {
  need(n >= 1 && n <= 65535, FWD_ERR_SIZE, std::string(what) + ": " + num(n) + " blocks exceed the CUDA grid (65535)");
  return (unsigned)n;
}

// A pointer the kernels will dereference must be device-accessible memory of the current device. Cheap
// (a driver query, no synchronisation); skipped under the host emulation, where everything is host memory.
inline void need_device(const void* p, const char* name) {
  need_ptr(p, name);
#if !defined(FWD_CUDA_EMULATE)
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  cudaPointerAttributes at;
  cudaError_t e = cudaPointerGetAttributes(&at, p);
  if (e == cudaErrorInvalidValue) {  // runtimes before 11.0 answered so for plain host memory
    (void)cudaGetLastError();
    at.type = cudaMemoryTypeUnregistered;
    e = cudaSuccess;
  }
  check_cuda(e, (std::string("cudaPointerGetAttributes(") + name + ")").c_str());
  if (at.type == cudaMemoryTypeDevice) {
    need(at.device == dev, FWD_ERR_ARG,
         std::string(name) + " is memory of CUDA device " + num(at.device) + " but the current device is " + num(dev));
  } else if (at.type == cudaMemoryTypeUnregistered) {
    int pageable = 0;
    if (cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, dev) != cudaSuccess) {
      (void)cudaGetLastError();
      pageable = 0;
    }
    need(pageable != 0, FWD_ERR_ARG,
         std::string(name) + " is not device memory (a host pointer?); the fwd_cuda_* functions take device pointers");
  }  // managed and (mapped) pinned host memory are device-accessible
#endif
}

}  // namespace FWDCUDA_NS
