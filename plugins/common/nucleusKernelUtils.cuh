/*
 * Device helpers shared by the nucleus kernels: element conversions, rounding to the compute dtype,
 * workspace carving and the status bookkeeping behind nucleusKernelLastCudaError().
 */
#ifndef NUCLEUS_KERNEL_UTILS_CUH
#define NUCLEUS_KERNEL_UTILS_CUH

#include "nucleusKernelTypes.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace nucleus
{
namespace kernels
{

template <typename T>
__device__ __forceinline__ float toFloat(T v);

template <>
__device__ __forceinline__ float toFloat<float>(float v)
{
    return v;
}

template <>
__device__ __forceinline__ float toFloat<__half>(__half v)
{
    return __half2float(v);
}

template <>
__device__ __forceinline__ float toFloat<__nv_bfloat16>(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T fromFloat(float v);

template <>
__device__ __forceinline__ float fromFloat<float>(float v)
{
    return v;
}

template <>
__device__ __forceinline__ __half fromFloat<__half>(float v)
{
    return __float2half_rn(v);
}

template <>
__device__ __forceinline__ __nv_bfloat16 fromFloat<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}

//! Round a float to T's precision (round to nearest even) and return it as a float again.
template <typename T>
__device__ __forceinline__ float roundTo(float v)
{
    return toFloat<T>(fromFloat<T>(v));
}

//! Bytes of workspace a buffer takes once aligned to 256 bytes (every carved buffer starts 256-aligned).
inline size_t alignedBytes(size_t bytes)
{
    return (bytes + 255u) & ~static_cast<size_t>(255u);
}

//! Record a CUDA error for nucleusKernelLastCudaError() and turn it into a status.
int recordCudaStatus(cudaError_t err);

} // namespace kernels
} // namespace nucleus

#endif // NUCLEUS_KERNEL_UTILS_CUH
