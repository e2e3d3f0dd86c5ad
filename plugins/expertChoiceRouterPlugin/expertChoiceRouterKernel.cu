/*
 * Expert-choice router: scores -> per-expert top-C over tokens -> per-token normalization -> route scale.
 *
 * Three kernels (plus one memset), all deterministic:
 *  1. routerScoresKernel: one warp per token computes softmax (or sigmoid) over E in float32, the way PyTorch's
 *     warp softmax does (max and sum by xor-butterfly, exp(x - max) / sum); a 32-token tile is transposed in shared
 *     memory and written as scoresT [B, E, S] so each expert's row is contiguous.
 *  2. expertTopKKernel: one block per (b, e) row. An 8-bit radix select over the order-preserving uint32 image of the
 *     scores finds the C-th largest score T (4 passes, histogram in shared memory with warp-aggregated atomics);
 *     ties at T are broken by a second radix select over ~token (lower token first). The C winners are packed as
 *     (score key << 32 | ~token) -- distinct keys, so the bitonic sort in shared memory has exactly one result: the
 *     torch.topk order with ties by ascending token. Winners also land in dense [B, S, E] (zero elsewhere).
 *  3. routerGatingKernel: one thread per (b, e, c) sums its token's dense row in ascending expert order (adding the
 *     zeros of unchosen experts leaves the sum bit-identical to summing only the chosen ones in that order, which is
 *     what scatter_add does on the CPU), then gating = score / (sum + 1e-12) * routeScale.
 */
#include "expertChoiceRouterKernel.h"

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
constexpr int kScoreThreads = 256;
constexpr int kScoreTokens = 32; // tokens per score block (one transposed tile)
constexpr int kScoreMaxPerLane = NUCLEUS_ROUTER_MAX_EXPERTS / kWarp;
constexpr int kTopKThreads = 1024;
constexpr int kGatingThreads = 256;
constexpr float kGatingEps = 1e-12f;

__device__ __forceinline__ float negInf()
{
    return __int_as_float(static_cast<int>(0xff800000u));
}

//! Order-preserving map float -> uint32 (larger float, larger key).
__device__ __forceinline__ uint32_t orderedKey(float f)
{
    uint32_t const u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float keyToFloat(uint32_t k)
{
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

template <typename T, bool kSigmoid>
__global__ void __launch_bounds__(kScoreThreads) routerScoresKernel(
    T const* __restrict__ logits, int S, int E, int64_t totalTokens, float* __restrict__ scoresT)
{
    extern __shared__ float tile[]; // [E][kScoreTokens + 1]
    int const warp = threadIdx.x / kWarp;
    int const lane = threadIdx.x % kWarp;
    int64_t const tok0 = static_cast<int64_t>(blockIdx.x) * kScoreTokens;

    for (int t = warp; t < kScoreTokens; t += kScoreThreads / kWarp)
    {
        int64_t const tok = tok0 + t;
        if (tok >= totalTokens)
        {
            break; // uniform across the warp
        }
        T const* row = logits + tok * E;
        float v[kScoreMaxPerLane];
        float m = negInf();
#pragma unroll
        for (int j = 0; j < kScoreMaxPerLane; ++j)
        {
            int const e = lane + j * kWarp;
            v[j] = e < E ? toFloat<T>(row[e]) : negInf();
            m = fmaxf(m, v[j]);
        }
        if (kSigmoid)
        {
#pragma unroll
            for (int j = 0; j < kScoreMaxPerLane; ++j)
            {
                v[j] = 1.0f / (1.0f + expf(-v[j]));
            }
        }
        else
        {
#pragma unroll
            for (int offset = kWarp / 2; offset > 0; offset /= 2)
            {
                m = fmaxf(m, __shfl_xor_sync(kFullMask, m, offset));
            }
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < kScoreMaxPerLane; ++j)
            {
                if (lane + j * kWarp < E)
                {
                    v[j] = expf(v[j] - m);
                    sum += v[j];
                }
            }
#pragma unroll
            for (int offset = kWarp / 2; offset > 0; offset /= 2)
            {
                sum += __shfl_xor_sync(kFullMask, sum, offset);
            }
#pragma unroll
            for (int j = 0; j < kScoreMaxPerLane; ++j)
            {
                v[j] = v[j] / sum;
            }
        }
#pragma unroll
        for (int j = 0; j < kScoreMaxPerLane; ++j)
        {
            int const e = lane + j * kWarp;
            if (e < E)
            {
                tile[e * (kScoreTokens + 1) + t] = v[j];
            }
        }
    }
    __syncthreads();

    for (int i = threadIdx.x; i < E * kScoreTokens; i += kScoreThreads)
    {
        int const e = i / kScoreTokens;
        int const t = i % kScoreTokens;
        int64_t const tok = tok0 + t;
        if (tok < totalTokens)
        {
            int64_t const b = tok / S;
            int64_t const s = tok - b * S;
            scoresT[(b * E + e) * S + s] = tile[e * (kScoreTokens + 1) + t];
        }
    }
}

//! Add one to hist[digit] for every lane of the (fully active) warp; digit 256 means "no element".
__device__ __forceinline__ void warpAggregatedCount(uint32_t* hist, uint32_t digit)
{
    unsigned const peers = __match_any_sync(kFullMask, digit);
    int const leader = __ffs(peers) - 1;
    if (static_cast<int>(threadIdx.x % kWarp) == leader && digit < 256u)
    {
        atomicAdd(&hist[digit], static_cast<uint32_t>(__popc(peers)));
    }
}

struct SelectState
{
    uint32_t prefix; // digits fixed so far
    uint32_t k;      // rank (1-based, from the top) still to find among elements matching prefix
    uint32_t equal;  // elements in the chosen bin after the last pass
};

//! Warp 0: find the bin holding the k-th largest element, narrow the prefix and k.
__device__ __forceinline__ void chooseDigit(uint32_t const* hist, int shift, SelectState* st)
{
    int const lane = threadIdx.x % kWarp;
    uint32_t local[8];
    uint32_t own = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j)
    {
        local[j] = hist[lane * 8 + j];
        own += local[j];
    }
    // Inclusive suffix sum over lanes: bins at and above this lane's bins.
    uint32_t incl = own;
#pragma unroll
    for (int offset = 1; offset < kWarp; offset *= 2)
    {
        uint32_t const other = __shfl_down_sync(kFullMask, incl, offset);
        if (lane + offset < kWarp)
        {
            incl += other;
        }
    }
    uint32_t const excl = incl - own;
    uint32_t const k = st->k;
    if (excl < k && k <= incl)
    {
        uint32_t running = excl;
#pragma unroll
        for (int j = 7; j >= 0; --j)
        {
            if (running + local[j] >= k)
            {
                st->prefix |= static_cast<uint32_t>(lane * 8 + j) << shift;
                st->k = k - running;
                st->equal = local[j];
                break;
            }
            running += local[j];
        }
    }
}

__global__ void __launch_bounds__(kTopKThreads) expertTopKKernel(float const* __restrict__ scoresT, int S, int E,
    int C, int P, int64_t* __restrict__ indices, float* __restrict__ dense)
{
    extern __shared__ unsigned long long cand[]; // [P] packed (key << 32 | ~token), descending after the sort
    __shared__ uint32_t hist[256];
    __shared__ SelectState high;
    __shared__ SelectState low;
    __shared__ uint32_t count;

    int const row = blockIdx.x; // b * E + e
    int const b = row / E;
    int const e = row - b * E;
    float const* rowScores = scoresT + static_cast<int64_t>(row) * S;
    int const lane = threadIdx.x % kWarp;

    if (threadIdx.x == 0)
    {
        high.prefix = 0;
        high.k = static_cast<uint32_t>(C);
        high.equal = 0;
        low.prefix = 0;
        low.equal = 0;
        count = 0;
    }

    // Radix select over the score keys: T = key of the C-th largest score.
    uint32_t mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8)
    {
        for (int i = threadIdx.x; i < 256; i += kTopKThreads)
        {
            hist[i] = 0;
        }
        __syncthreads();
        uint32_t const prefix = high.prefix;
        for (int base = 0; base < S; base += kTopKThreads)
        {
            int const i = base + threadIdx.x;
            uint32_t digit = 256u;
            if (i < S)
            {
                uint32_t const key = orderedKey(rowScores[i]);
                if ((key & mask) == prefix)
                {
                    digit = (key >> shift) & 255u;
                }
            }
            warpAggregatedCount(hist, digit);
        }
        __syncthreads();
        if (threadIdx.x < kWarp)
        {
            chooseDigit(hist, shift, &high);
        }
        __syncthreads();
        mask |= 255u << shift;
    }
    uint32_t const threshold = high.prefix;
    uint32_t const takeEqual = high.k;

    // Ties at T: keep the takeEqual lowest tokens, i.e. the largest ~token (radix select over ~token).
    uint32_t lowThreshold = 0;
    if (takeEqual < high.equal)
    {
        if (threadIdx.x == 0)
        {
            low.k = takeEqual;
        }
        uint32_t lowMask = 0;
        for (int shift = 24; shift >= 0; shift -= 8)
        {
            for (int i = threadIdx.x; i < 256; i += kTopKThreads)
            {
                hist[i] = 0;
            }
            __syncthreads();
            uint32_t const prefix = low.prefix;
            for (int base = 0; base < S; base += kTopKThreads)
            {
                int const i = base + threadIdx.x;
                uint32_t digit = 256u;
                if (i < S && orderedKey(rowScores[i]) == threshold)
                {
                    uint32_t const key = ~static_cast<uint32_t>(i);
                    if ((key & lowMask) == prefix)
                    {
                        digit = (key >> shift) & 255u;
                    }
                }
                warpAggregatedCount(hist, digit);
            }
            __syncthreads();
            if (threadIdx.x < kWarp)
            {
                chooseDigit(hist, shift, &low);
            }
            __syncthreads();
            lowMask |= 255u << shift;
        }
        lowThreshold = low.prefix;
    }

    // Collect exactly C winners (their order here does not matter: the keys are distinct and get sorted).
    for (int base = 0; base < S; base += kTopKThreads)
    {
        int const i = base + threadIdx.x;
        bool take = false;
        uint32_t key = 0;
        if (i < S)
        {
            key = orderedKey(rowScores[i]);
            take = key > threshold || (key == threshold && ~static_cast<uint32_t>(i) >= lowThreshold);
        }
        unsigned const ballot = __ballot_sync(kFullMask, take);
        uint32_t warpBase = 0;
        if (lane == 0 && ballot != 0u)
        {
            warpBase = atomicAdd(&count, static_cast<uint32_t>(__popc(ballot)));
        }
        warpBase = __shfl_sync(kFullMask, warpBase, 0);
        if (take)
        {
            uint32_t const pos = warpBase + static_cast<uint32_t>(__popc(ballot & ((1u << lane) - 1u)));
            cand[pos] = (static_cast<unsigned long long>(key) << 32) | ~static_cast<uint32_t>(i);
        }
    }
    for (int i = C + threadIdx.x; i < P; i += kTopKThreads)
    {
        cand[i] = 0ull; // below every real entry: no real key is 0 with a token of 2^32 - 1
    }
    __syncthreads();

    // Bitonic sort, descending.
    for (int k = 2; k <= P; k *= 2)
    {
        for (int j = k / 2; j > 0; j /= 2)
        {
            for (int i = threadIdx.x; i < P; i += kTopKThreads)
            {
                int const partner = i ^ j;
                if (partner > i)
                {
                    unsigned long long const a = cand[i];
                    unsigned long long const c = cand[partner];
                    bool const descending = (i & k) == 0;
                    if (descending ? (a < c) : (a > c))
                    {
                        cand[i] = c;
                        cand[partner] = a;
                    }
                }
            }
            __syncthreads();
        }
    }

    for (int c = threadIdx.x; c < C; c += kTopKThreads)
    {
        unsigned long long const packed = cand[c];
        int64_t const token = static_cast<int64_t>(~static_cast<uint32_t>(packed & 0xffffffffull));
        indices[static_cast<int64_t>(row) * C + c] = token;
        dense[(static_cast<int64_t>(b) * S + token) * E + e] = keyToFloat(static_cast<uint32_t>(packed >> 32));
    }
}

template <bool kVec4>
__global__ void __launch_bounds__(kGatingThreads) routerGatingKernel(int64_t const* __restrict__ indices,
    float const* __restrict__ dense, int S, int E, int C, int64_t total, float routeScale, float* __restrict__ gating)
{
    int64_t const i = static_cast<int64_t>(blockIdx.x) * kGatingThreads + threadIdx.x;
    if (i >= total)
    {
        return;
    }
    int64_t const row = i / C; // b * E + e
    int64_t const b = row / E;
    int const e = static_cast<int>(row - b * E);
    float const* tokenRow = dense + (b * S + indices[i]) * E;
    float sum = 0.0f;
    if (kVec4)
    {
        float4 const* v = reinterpret_cast<float4 const*>(tokenRow);
        for (int q = 0; q < E / 4; ++q)
        {
            float4 const x = v[q];
            sum += x.x;
            sum += x.y;
            sum += x.z;
            sum += x.w;
        }
    }
    else
    {
        for (int q = 0; q < E; ++q)
        {
            sum += tokenRow[q];
        }
    }
    float const normalized = tokenRow[e] / (sum + kGatingEps);
    gating[i] = normalized * routeScale;
}

int nextPow2(int v)
{
    int p = 1;
    while (p < v)
    {
        p *= 2;
    }
    return p;
}

template <typename T>
void launchScores(void const* logits, int S, int E, int64_t totalTokens, bool sigmoid, float* scoresT,
    cudaStream_t stream)
{
    unsigned const blocks = static_cast<unsigned>((totalTokens + kScoreTokens - 1) / kScoreTokens);
    size_t const smem = static_cast<size_t>(E) * (kScoreTokens + 1) * sizeof(float);
    T const* typed = static_cast<T const*>(logits);
    if (sigmoid)
    {
        routerScoresKernel<T, true><<<blocks, kScoreThreads, smem, stream>>>(typed, S, E, totalTokens, scoresT);
    }
    else
    {
        routerScoresKernel<T, false><<<blocks, kScoreThreads, smem, stream>>>(typed, S, E, totalTokens, scoresT);
    }
}

bool routerShapeSupported(int B, int S, int E, int C)
{
    if (B <= 0 || S <= 0 || E <= 0 || C <= 0)
    {
        return false;
    }
    if (E > NUCLEUS_ROUTER_MAX_EXPERTS || C > NUCLEUS_ROUTER_MAX_CAPACITY || C > S)
    {
        return false;
    }
    int64_t const elements = static_cast<int64_t>(B) * S * E;
    return elements < (static_cast<int64_t>(1) << 31);
}

} // namespace
} // namespace kernels
} // namespace nucleus

using namespace nucleus::kernels;

extern "C" int64_t nucleusExpertChoiceRouterCapacity(
    int64_t capacityNumerator, int64_t capacityDenominator, int64_t S, int64_t E)
{
    if (capacityNumerator <= 0 || capacityDenominator <= 0 || S <= 0 || E <= 0)
    {
        return -1;
    }
    int64_t const a = capacityNumerator * S;
    int64_t const b = capacityDenominator * E;
    int64_t const c = (a + b - 1) / b;
    return c < 1 ? 1 : c;
}

extern "C" size_t nucleusExpertChoiceRouterWorkspaceSize(int B, int S, int E, int C)
{
    if (!routerShapeSupported(B, S, E, C))
    {
        return 0;
    }
    size_t const elements = static_cast<size_t>(B) * S * E;
    return alignedBytes(elements * sizeof(float)) /* scoresT */ + alignedBytes(elements * sizeof(float)) /* dense */;
}

extern "C" int nucleusExpertChoiceRouterLaunch(void const* logits, int dtype, int B, int S, int E, int C,
    int useSigmoid, float routeScale, int64_t* indices, float* gating, void* workspace, size_t workspaceBytes,
    cudaStream_t stream)
{
    if (logits == nullptr || indices == nullptr || gating == nullptr || workspace == nullptr)
    {
        return NUCLEUS_STATUS_INVALID_ARGUMENT;
    }
    if (dtype != NUCLEUS_DTYPE_FLOAT32 && dtype != NUCLEUS_DTYPE_FLOAT16 && dtype != NUCLEUS_DTYPE_BFLOAT16)
    {
        return NUCLEUS_STATUS_INVALID_ARGUMENT;
    }
    if (B <= 0 || S <= 0 || E <= 0 || C <= 0)
    {
        return NUCLEUS_STATUS_INVALID_ARGUMENT;
    }
    if (!routerShapeSupported(B, S, E, C))
    {
        return NUCLEUS_STATUS_UNSUPPORTED_SHAPE;
    }
    if (workspaceBytes < nucleusExpertChoiceRouterWorkspaceSize(B, S, E, C))
    {
        return NUCLEUS_STATUS_WORKSPACE_TOO_SMALL;
    }
    size_t const elements = static_cast<size_t>(B) * S * E;
    float* scoresT = static_cast<float*>(workspace);
    float* dense = reinterpret_cast<float*>(static_cast<char*>(workspace) + alignedBytes(elements * sizeof(float)));
    int64_t const totalTokens = static_cast<int64_t>(B) * S;
    bool const sigmoid = useSigmoid != 0;

    cudaError_t err = cudaMemsetAsync(dense, 0, elements * sizeof(float), stream);
    if (err != cudaSuccess)
    {
        return recordCudaStatus(err);
    }
    switch (dtype)
    {
    case NUCLEUS_DTYPE_FLOAT32: launchScores<float>(logits, S, E, totalTokens, sigmoid, scoresT, stream); break;
    case NUCLEUS_DTYPE_FLOAT16: launchScores<__half>(logits, S, E, totalTokens, sigmoid, scoresT, stream); break;
    default: launchScores<__nv_bfloat16>(logits, S, E, totalTokens, sigmoid, scoresT, stream); break;
    }

    int const P = nextPow2(C);
    size_t const sortBytes = static_cast<size_t>(P) * sizeof(unsigned long long);
    expertTopKKernel<<<static_cast<unsigned>(B * E), kTopKThreads, sortBytes, stream>>>(
        scoresT, S, E, C, P, indices, dense);

    int64_t const total = static_cast<int64_t>(B) * E * C;
    unsigned const gatingBlocks = static_cast<unsigned>((total + kGatingThreads - 1) / kGatingThreads);
    if (E % 4 == 0)
    {
        routerGatingKernel<true><<<gatingBlocks, kGatingThreads, 0, stream>>>(
            indices, dense, S, E, C, total, routeScale, gating);
    }
    else
    {
        routerGatingKernel<false><<<gatingBlocks, kGatingThreads, 0, stream>>>(
            indices, dense, S, E, C, total, routeScale, gating);
    }
    return recordCudaStatus(cudaGetLastError());
}
