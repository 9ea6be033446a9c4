// A tiny host emulation of CUDA's SIMT model, so that the kernels of csrc/cuda compile with a plain C++
// compiler and run (slowly) on the CPU: the SAME kernel source is built with nvcc for the GPU and with
// g++ -DFWD_CUDA_EMULATE=1 for the host tests (csrc/cuda/tests), which compare it with the CPU core.
//
// Model
//  - A launch runs the blocks of the grid one after another (x fastest, then y, then z).
//  - The threads of a block are ucontext fibers on one OS thread. A fiber runs until it calls
//    __syncthreads() or returns; the scheduler resumes the fibers round-robin, so every thread reaches
//    barrier n before any thread passes it (the semantics CUDA guarantees, nothing more). A block whose
//    threads disagree about a barrier (some returned, some wait) is reported as an error: on a GPU that
//    is undefined behaviour (usually a hang).
//  - `__shared__` becomes `static`: one object shared by the fibers of the running block, which is
//    exactly shared memory since blocks run sequentially. (Unlike real shared memory it starts
//    zeroed, so a kernel reading shared memory it never wrote is not caught here.)
//  - threadIdx / blockIdx / blockDim / gridDim are thread-local variables the scheduler sets before it
//    resumes a fiber.
//  - Not emulated: warp shuffles/votes, atomics, dynamic shared memory, streams (ignored), memory spaces
//    (every pointer is host memory). The kernels here use none of the first four.
//
// Host-only; never included by nvcc builds.
#pragma once
#if defined(__CUDACC__)
#error "simt_host.h is the host emulation of CUDA; nvcc builds use the real thing"
#endif

#include <stdint.h>
#include <stdlib.h>
#include <ucontext.h>

#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct simt_uint3 {
  unsigned x, y, z;
};

namespace simt {

struct Error : std::runtime_error {
  explicit Error(const std::string& m) : std::runtime_error(m) {}
};

inline thread_local simt_uint3 t_threadIdx{0, 0, 0};
inline thread_local simt_uint3 t_blockIdx{0, 0, 0};
inline thread_local dim3 t_blockDim{1, 1, 1};
inline thread_local dim3 t_gridDim{1, 1, 1};

enum class FiberState { kReady, kAtBarrier, kDone };

struct Scheduler {
  ucontext_t main_ctx;
  std::vector<ucontext_t> ctx;
  std::vector<FiberState> state;
  std::vector<char> stacks;
  size_t stack_bytes = 0;
  int current = -1;
  const std::function<void()>* body = nullptr;
};

inline thread_local Scheduler* t_sched = nullptr;

inline void fiber_entry() {
  Scheduler* s = t_sched;
  (*s->body)();
  s->state[s->current] = FiberState::kDone;
  // returning switches to uc_link (the scheduler)
}

// __syncthreads(): park this fiber until every thread of the block has arrived.
inline void syncthreads() {
  Scheduler* s = t_sched;
  if (s == nullptr) throw Error("__syncthreads() called outside an emulated kernel launch");
  const int me = s->current;
  s->state[me] = FiberState::kAtBarrier;
  swapcontext(&s->ctx[me], &s->main_ctx);
}

// The context switches live in functions of their own: getcontext / swapcontext return twice (GCC
// warns about locals of their caller), and the scheduler's loops should not care.
__attribute__((noinline)) inline void start_fiber(Scheduler& s, size_t t) {
  ucontext_t& c = s.ctx[t];
  getcontext(&c);
  c.uc_stack.ss_sp = s.stacks.data() + t * s.stack_bytes;
  c.uc_stack.ss_size = s.stack_bytes;
  c.uc_link = &s.main_ctx;
  makecontext(&c, fiber_entry, 0);
  s.state[t] = FiberState::kReady;
}
__attribute__((noinline)) inline void resume_fiber(Scheduler& s, size_t t) {
  s.current = (int)t;
  s.state[t] = FiberState::kReady;
  swapcontext(&s.main_ctx, &s.ctx[t]);
}

// One block: every thread runs to its next barrier (or to its end), round after round.
inline void run_block(Scheduler& s, size_t nthreads, dim3 block) {
  for (size_t t = 0; t < nthreads; ++t) start_fiber(s, t);
  for (;;) {
    for (size_t t = 0; t < nthreads; ++t) {
      if (s.state[t] == FiberState::kDone) continue;
      t_threadIdx = {(unsigned)(t % block.x), (unsigned)(t / block.x % block.y),
                     (unsigned)(t / ((size_t)block.x * block.y))};
      resume_fiber(s, t);
    }
    size_t done = 0;
    for (FiberState st : s.state) done += st == FiberState::kDone;
    if (done == nthreads) return;
    if (done != 0)
      throw Error("block (" + std::to_string(t_blockIdx.x) + ", " + std::to_string(t_blockIdx.y) + ", " +
                  std::to_string(t_blockIdx.z) + "): " + std::to_string(done) + " of " + std::to_string(nthreads) +
                  " threads returned while the others wait at __syncthreads() (divergent barrier)");
  }
}

// Runs body() as a kernel over grid x block. Throws simt::Error on a barrier mismatch.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body, size_t stack_bytes = 64 * 1024) {
  const size_t nthreads = (size_t)block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024) throw Error("invalid block size " + std::to_string(nthreads));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw Error("invalid (empty) grid");
  Scheduler sched;
  sched.ctx.resize(nthreads);
  sched.state.resize(nthreads);
  sched.stack_bytes = stack_bytes;
  sched.stacks.resize(nthreads * stack_bytes);
  sched.body = &body;
  Scheduler* saved = t_sched;
  t_sched = &sched;
  struct Restore {
    Scheduler* s;
    ~Restore() {
      t_sched = s;
      t_threadIdx = {0, 0, 0};
      t_blockIdx = {0, 0, 0};
    }
  } restore{saved};
  t_gridDim = grid;
  t_blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        t_blockIdx = {bx, by, bz};
        run_block(sched, nthreads, block);
      }
}

}  // namespace simt

// The CUDA vocabulary the kernels use.
#define threadIdx (::simt::t_threadIdx)
#define blockIdx (::simt::t_blockIdx)
#define blockDim (::simt::t_blockDim)
#define gridDim (::simt::t_gridDim)
#define __syncthreads() ::simt::syncthreads()
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

typedef void* cudaStream_t;
