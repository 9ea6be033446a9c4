/* fwdcore's CUDA layer: the kernels of fwdcore.h for device pointers, behind a plain C API.
 *
 * Same conventions, argument structs, status codes and error messages as fwdcore.h (include it first or
 * let this header include it): every entry point validates everything on the host before anything is
 * launched, returns fwd_status, and on error sets the thread's fwd_last_error() (the core's one message
 * store) to "<function>: <what>". Nothing aborts the host program.
 *
 * Differences from the CPU entry points
 *  - Every data pointer (including seeds, coefs and the args structs' seeds) is device memory of the
 *    current device (or managed / mapped pinned memory). Where cheap, this is checked with
 *    cudaPointerGetAttributes: a plain host pointer is FWD_ERR_ARG (unless the device can access
 *    pageable host memory), a pointer of another device FWD_ERR_ARG.
 *  - `stream` is a cudaStream_t (NULL: the legacy default stream). The call returns once the kernels are
 *    queued; results are ready when the stream is synchronised. num_threads fields are ignored.
 *  - FWD_ERR_CUDA: the CUDA runtime failed (no device, launch failure, ...); the message carries the
 *    runtime's error name and string. A fault inside a kernel surfaces asynchronously, in the caller's
 *    next CUDA call on that stream, as for any CUDA library.
 *  - fwd_cuda_attention_dual supports head dimensions D <= 256 (FWD_ERR_ARG beyond).
 *  - The perturbation words are the CPU core's bit for bit (philox.h is shared); normal values come from
 *    the device's logf / cosf / sqrtf and may differ from the CPU's in the last bit or two.
 */
#ifndef FWDCORE_CUDA_H
#define FWDCORE_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "fwdcore.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Host-emulation builds of the CUDA layer (FWD_CUDA_EMULATE, tests only) export distinct symbols so that
 * they can be linked next to a real CUDA build. */
#if defined(FWD_CUDA_EMULATE)
#define fwd_cuda_philox_words fwd_cuda_emu_philox_words
#define fwd_cuda_perturb fwd_cuda_emu_perturb
#define fwd_cuda_perturb_combine fwd_cuda_emu_perturb_combine
#define fwd_cuda_lora_dual_workspace_bytes fwd_cuda_emu_lora_dual_workspace_bytes
#define fwd_cuda_lora_linear_dual fwd_cuda_emu_lora_linear_dual
#define fwd_cuda_lora_linear_dual_ws fwd_cuda_emu_lora_linear_dual_ws
#define fwd_cuda_attention_dual fwd_cuda_emu_attention_dual
#define fwd_cuda_attention_max_head_dim fwd_cuda_emu_attention_max_head_dim
#endif

/* Philox4x32-10 words for counters offset .. offset+n-1 into out (n, 4) uint32 (device). */
FWD_API fwd_status fwd_cuda_philox_words(uint64_t seed, int64_t n, int64_t offset, uint32_t* out, void* stream);

/* Perturbation values, as fwd_perturb: out (n) float32, or bfloat16 bits (uint16_t) for FWD_BF16. */
FWD_API fwd_status fwd_cuda_perturb(uint64_t seed, int64_t n, int64_t offset, int dist, int out_dtype, void* out,
                                    void* stream);

/* out[i] += sum_j coefs[j] * v_{seeds[j]}(offset + i), as fwd_perturb_combine; seeds (n_seeds) and coefs
 * (n_seeds) are device arrays. The seeds are summed in order, as on the CPU. */
FWD_API fwd_status fwd_cuda_perturb_combine(const uint64_t* seeds, const float* coefs, int64_t n_seeds, int64_t n,
                                            int64_t offset, int dist, float* out, void* stream);

/* The fused dual (LoRA) linear of fwd_lora_linear_dual (same args; every pointer device memory, seeds
 * included). Two kernels on `stream`: the rank-r down projections h = s x A^T and
 * u_k = s (x_dot_k A^T + x V_A,k^T) for all k (V_A,k regenerated per tile from seeds[k]), then one
 * batched tiled GEMM over the primal and K tangent row groups against W with the low-rank
 * [u_k | h] [B | V_B,k]^T folded into its reduction (V_B,k regenerated per tile) and the bias / V_b,k
 * added in its epilogue. The down projections need a float32 scratch of
 * fwd_cuda_lora_dual_workspace_bytes(args) bytes: fwd_cuda_lora_linear_dual_ws takes it from the caller
 * (device memory, float-aligned; NULL is allowed when the size is 0), fwd_cuda_lora_linear_dual
 * allocates it stream-ordered (cudaMallocAsync / cudaFreeAsync, or cudaMalloc and a synchronisation
 * where the device has no memory pools). */
FWD_API size_t fwd_cuda_lora_dual_workspace_bytes(const fwd_lora_dual_args* args);
FWD_API fwd_status fwd_cuda_lora_linear_dual_ws(const fwd_lora_dual_args* args, void* workspace,
                                                size_t workspace_bytes, void* stream);
FWD_API fwd_status fwd_cuda_lora_linear_dual(const fwd_lora_dual_args* args, void* stream);

/* The fused dual attention of fwd_attention_dual (same args and semantics; device pointers, mask
 * included), one flash-style pass over the keys per (batch, head, query block, chunk of up to 4 tangent
 * streams): the streams of a chunk share the primal scores, the softmax statistics and every K/V tile;
 * no (L, S) matrix exists. Head dimension D <= fwd_cuda_attention_max_head_dim() (256). */
FWD_API fwd_status fwd_cuda_attention_dual(const fwd_attention_dual_args* args, void* stream);
FWD_API int fwd_cuda_attention_max_head_dim(void);

#ifdef __cplusplus
}
#endif
#endif /* FWDCORE_CUDA_H */
