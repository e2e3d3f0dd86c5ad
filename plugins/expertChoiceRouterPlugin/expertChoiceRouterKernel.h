/*
 * Expert-choice router kernels: plain C launch API (pointers, sizes, stream). See ../README.md for the op.
 *
 *   logits   [B, S, E]  float32 / float16 / bfloat16 (dtype: NucleusDType)
 *   indices  [B, E, C]  int64: per batch row and expert, the C tokens with the highest score, in descending score
 *                       order; equal scores are ordered by ascending token index.
 *   gating   [B, E, C]  float32: score / (sum over the experts that chose the same token, ascending expert order,
 *                       + 1e-12) * routeScale.
 *
 * Scores are computed in float32 (softmax over E per token, or sigmoid). Results are deterministic: no atomics take
 * part in any floating-point sum. Supported: 1 <= E <= 256, 1 <= C <= min(S, 4096), B * S * E < 2^31.
 */
#ifndef NUCLEUS_EXPERT_CHOICE_ROUTER_KERNEL_H
#define NUCLEUS_EXPERT_CHOICE_ROUTER_KERNEL_H

#include "../common/nucleusKernelTypes.h"

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Largest expert count and capacity the router kernels accept. */
#define NUCLEUS_ROUTER_MAX_EXPERTS 256
#define NUCLEUS_ROUTER_MAX_CAPACITY 4096

/* C = max(1, ceil(num * S / (den * E))) in 64-bit integer arithmetic (the op's capacity rule); -1 if an argument
 * is not positive. */
NUCLEUS_KERNEL_API int64_t nucleusExpertChoiceRouterCapacity(
    int64_t capacityNumerator, int64_t capacityDenominator, int64_t S, int64_t E);

/* Bytes of device workspace nucleusExpertChoiceRouterLaunch needs (0 for invalid sizes). */
NUCLEUS_KERNEL_API size_t nucleusExpertChoiceRouterWorkspaceSize(int B, int S, int E, int C);

/* Enqueue the router on `stream`. Returns a NucleusStatus. `workspace` must be 256-byte aligned (cudaMalloc and
 * TensorRT workspaces are). Every element of `indices` and `gating` is written. */
NUCLEUS_KERNEL_API int nucleusExpertChoiceRouterLaunch(void const* logits, int dtype, int B, int S, int E, int C,
    int useSigmoid, float routeScale, int64_t* indices, float* gating, void* workspace, size_t workspaceBytes,
    cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* NUCLEUS_EXPERT_CHOICE_ROUTER_KERNEL_H */
