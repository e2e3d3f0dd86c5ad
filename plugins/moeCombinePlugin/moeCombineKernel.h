/*
 * MoE combine kernels: plain C launch API (pointers, sizes, stream). See ../README.md for the op.
 *
 *   sharedOutput [B, S, H]     dtype (NucleusDType: float32 / float16 / bfloat16)
 *   expertOutput [E, B, C, H]  dtype
 *   indices      [B, E, C]     int64 token of each (b, e, c); tokens of one (b, e) must be distinct (the router's are)
 *   gating       [B, E, C]     float32
 *   output       [B, S, H]     dtype; may alias sharedOutput
 *
 * output[b, s] = round(float(sharedOutput[b, s]) + sum over e ascending of float(round(float(expertOutput[e, b, c])
 * * gating[b, e, c]))) for the c with indices[b, e, c] == s: contributions rounded to dtype, summed in float32, one
 * final rounding -- what PyTorch's CPU scatter_add computes for diffusers' layer. The order is
 * fixed (an inverse map [B, S, E] -> c is built first; one block sums one token row), so results never change
 * between runs. Indices outside [0, S) are ignored. Supported: E <= 1024, B * S * E < 2^31.
 */
#ifndef NUCLEUS_MOE_COMBINE_KERNEL_H
#define NUCLEUS_MOE_COMBINE_KERNEL_H

#include "../common/nucleusKernelTypes.h"

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NUCLEUS_COMBINE_MAX_EXPERTS 1024

/* Bytes of device workspace nucleusMoECombineLaunch needs (0 for invalid sizes). */
NUCLEUS_KERNEL_API size_t nucleusMoECombineWorkspaceSize(int B, int S, int E, int C);

/* Enqueue the combine on `stream`. Returns a NucleusStatus. `workspace` must be 256-byte aligned. Every element of
 * `output` is written. */
NUCLEUS_KERNEL_API int nucleusMoECombineLaunch(void const* sharedOutput, void const* expertOutput,
    int64_t const* indices, float const* gating, void* output, int dtype, int B, int S, int E, int C, int H,
    void* workspace, size_t workspaceBytes, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* NUCLEUS_MOE_COMBINE_KERNEL_H */
