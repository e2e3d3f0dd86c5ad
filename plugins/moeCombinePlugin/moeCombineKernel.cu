/*
 * MoE combine: output = shared + gated expert outputs, summed per token in ascending expert order.
 *
 *  1. memset the inverse map slot [B, S, E] to -1, then combineInverseMapKernel writes slot[b, indices[b,e,c], e] = c
 *     (atomicMax, so even duplicate tokens resolve the same way every run).
 *  2. moeCombineKernel: one block per token row (b, s). Warp 0 compacts the row's chosen (e, c, gate) triples in
 *     ascending e with ballots; then every thread owns 16-byte column chunks of H and accumulates in float32
 *     acc = float(shared); acc += float(round(float(x) * gate)) expert by expert; one rounding to dtype at the end.
 *     That is bit for bit what torch's (routed.float() * gating).to(dtype) followed by its CPU scatter_add computes
 *     (the CPU kernel accumulates reduced-precision rows in float32, in source order = ascending expert).
 */
#include "moeCombineKernel.h"

#include "../common/nucleusKernelUtils.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace nucleus
{
namespace kernels
{
namespace
{

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMapThreads = 256;
constexpr int kCombineThreads = 128;

__global__ void __launch_bounds__(kMapThreads) combineInverseMapKernel(
    int64_t const* __restrict__ indices, int S, int E, int C, int64_t total, int* __restrict__ slot)
{
    int64_t const i = static_cast<int64_t>(blockIdx.x) * kMapThreads + threadIdx.x;
    if (i >= total)
    {
        return;
    }
    int64_t const row = i / C; // b * E + e
    int const c = static_cast<int>(i - row * C);
    int64_t const b = row / E;
    int64_t const e = row - b * E;
    int64_t const token = indices[i];
    if (token >= 0 && token < S)
    {
        atomicMax(&slot[(b * S + token) * E + e], c);
    }
}

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack
{
    T v[kVec];
};

template <typename T, int kVec>
__global__ void __launch_bounds__(kCombineThreads) moeCombineKernel(T const* sharedOutput, // may alias output
    T const* __restrict__ expertOutput, float const* __restrict__ gating, int const* __restrict__ slot, T* output,
    int B, int S, int E, int C, int H)
{
    extern __shared__ int chosen[]; // [E] expert, [E] capacity slot, [E] gate (as float bits)
    int* chosenExpert = chosen;
    int* chosenSlot = chosen + E;
    float* chosenGate = reinterpret_cast<float*>(chosen + 2 * E);
    __shared__ int chosenCount;

    int64_t const token = blockIdx.x; // b * S + s
    int64_t const b = token / S;
    int const lane = threadIdx.x % kWarp;

    if (threadIdx.x < kWarp)
    {
        int n = 0;
        int const* mapRow = slot + token * E;
        for (int base = 0; base < E; base += kWarp)
        {
            int const e = base + lane;
            int const c = e < E ? mapRow[e] : -1;
            unsigned const ballot = __ballot_sync(kFullMask, c >= 0);
            if (c >= 0)
            {
                int const pos = n + __popc(ballot & ((1u << lane) - 1u));
                chosenExpert[pos] = e;
                chosenSlot[pos] = c;
                chosenGate[pos] = gating[(b * E + e) * C + c];
            }
            n += __popc(ballot);
        }
        if (lane == 0)
        {
            chosenCount = n;
        }
    }
    __syncthreads();

    int const n = chosenCount;
    int const chunks = H / kVec;
    T const* sharedRow = sharedOutput + token * H;
    T* outRow = output + token * H;
    for (int chunk = threadIdx.x; chunk < chunks; chunk += kCombineThreads)
    {
        Pack<T, kVec> const base = reinterpret_cast<Pack<T, kVec> const*>(sharedRow)[chunk];
        float acc[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k)
        {
            acc[k] = toFloat<T>(base.v[k]);
        }
        for (int j = 0; j < n; ++j)
        {
            int64_t const expertRow = (static_cast<int64_t>(chosenExpert[j]) * B + b) * C + chosenSlot[j];
            float const gate = chosenGate[j];
            Pack<T, kVec> const x = reinterpret_cast<Pack<T, kVec> const*>(expertOutput + expertRow * H)[chunk];
#pragma unroll
            for (int k = 0; k < kVec; ++k)
            {
                acc[k] += roundTo<T>(toFloat<T>(x.v[k]) * gate);
            }
        }
        Pack<T, kVec> result;
#pragma unroll
        for (int k = 0; k < kVec; ++k)
        {
            result.v[k] = fromFloat<T>(acc[k]);
        }
        reinterpret_cast<Pack<T, kVec>*>(outRow)[chunk] = result;
    }
}

bool aligned16(void const* p)
{
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

template <typename T>
void launchCombine(void const* sharedOutput, void const* expertOutput, float const* gating, int const* slot,
    void* output, int B, int S, int E, int C, int H, cudaStream_t stream)
{
    constexpr int kVec = 16 / sizeof(T);
    unsigned const blocks = static_cast<unsigned>(static_cast<int64_t>(B) * S);
    size_t const smem = static_cast<size_t>(E) * 3 * sizeof(int);
    T const* sharedTyped = static_cast<T const*>(sharedOutput);
    T const* expertTyped = static_cast<T const*>(expertOutput);
    T* outTyped = static_cast<T*>(output);
    bool const vectorized
        = H % kVec == 0 && aligned16(sharedOutput) && aligned16(expertOutput) && aligned16(output);
    if (vectorized)
    {
        moeCombineKernel<T, kVec><<<blocks, kCombineThreads, smem, stream>>>(
            sharedTyped, expertTyped, gating, slot, outTyped, B, S, E, C, H);
    }
    else
    {
        moeCombineKernel<T, 1><<<blocks, kCombineThreads, smem, stream>>>(
            sharedTyped, expertTyped, gating, slot, outTyped, B, S, E, C, H);
    }
}

bool combineShapeSupported(int B, int S, int E, int C)
{
    if (B <= 0 || S <= 0 || E <= 0 || C <= 0 || E > NUCLEUS_COMBINE_MAX_EXPERTS)
    {
        return false;
    }
    return static_cast<int64_t>(B) * S * E < (static_cast<int64_t>(1) << 31);
}

} // namespace
} // namespace kernels
} // namespace nucleus

using namespace nucleus::kernels;

extern "C" size_t nucleusMoECombineWorkspaceSize(int B, int S, int E, int C)
{
    if (!combineShapeSupported(B, S, E, C))
    {
        return 0;
    }
    return alignedBytes(static_cast<size_t>(B) * S * E * sizeof(int));
}

extern "C" int nucleusMoECombineLaunch(void const* sharedOutput, void const* expertOutput, int64_t const* indices,
    float const* gating, void* output, int dtype, int B, int S, int E, int C, int H, void* workspace,
    size_t workspaceBytes, cudaStream_t stream)
{
    if (sharedOutput == nullptr || expertOutput == nullptr || indices == nullptr || gating == nullptr
        || output == nullptr || workspace == nullptr)
    {
        return NUCLEUS_STATUS_INVALID_ARGUMENT;
    }
    if (dtype != NUCLEUS_DTYPE_FLOAT32 && dtype != NUCLEUS_DTYPE_FLOAT16 && dtype != NUCLEUS_DTYPE_BFLOAT16)
    {
        return NUCLEUS_STATUS_INVALID_ARGUMENT;
    }
    if (B <= 0 || S <= 0 || E <= 0 || C <= 0 || H <= 0)
    {
        return NUCLEUS_STATUS_INVALID_ARGUMENT;
    }
    if (!combineShapeSupported(B, S, E, C))
    {
        return NUCLEUS_STATUS_UNSUPPORTED_SHAPE;
    }
    if (workspaceBytes < nucleusMoECombineWorkspaceSize(B, S, E, C))
    {
        return NUCLEUS_STATUS_WORKSPACE_TOO_SMALL;
    }
    int* slot = static_cast<int*>(workspace);
    cudaError_t const err
        = cudaMemsetAsync(slot, 0xff, static_cast<size_t>(B) * S * E * sizeof(int), stream); // every slot = -1
    if (err != cudaSuccess)
    {
        return recordCudaStatus(err);
    }
    int64_t const total = static_cast<int64_t>(B) * E * C;
    if (total > 0)
    {
        unsigned const mapBlocks = static_cast<unsigned>((total + kMapThreads - 1) / kMapThreads);
        combineInverseMapKernel<<<mapBlocks, kMapThreads, 0, stream>>>(indices, S, E, C, total, slot);
    }
    switch (dtype)
    {
    case NUCLEUS_DTYPE_FLOAT32:
        launchCombine<float>(sharedOutput, expertOutput, gating, slot, output, B, S, E, C, H, stream);
        break;
    case NUCLEUS_DTYPE_FLOAT16:
        launchCombine<__half>(sharedOutput, expertOutput, gating, slot, output, B, S, E, C, H, stream);
        break;
    default:
        launchCombine<__nv_bfloat16>(sharedOutput, expertOutput, gating, slot, output, B, S, E, C, H, stream);
        break;
    }
    return recordCudaStatus(cudaGetLastError());
}
