/*
 * Plain C types shared by the nucleus CUDA kernels and their callers (TensorRT glue, ctypes, tests).
 * No TensorRT and no CUDA runtime types beyond cudaStream_t appear in the launch API.
 */
#ifndef NUCLEUS_KERNEL_TYPES_H
#define NUCLEUS_KERNEL_TYPES_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define NUCLEUS_KERNEL_API __declspec(dllexport)
#else
#define NUCLEUS_KERNEL_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Element type of the floating-point tensors a kernel reads or writes (values fixed: ctypes callers use them). */
typedef enum NucleusDType
{
    NUCLEUS_DTYPE_FLOAT32 = 0,
    NUCLEUS_DTYPE_FLOAT16 = 1,
    NUCLEUS_DTYPE_BFLOAT16 = 2
} NucleusDType;

/* Status codes every launcher returns; nucleusKernelStatusString() names them. */
typedef enum NucleusStatus
{
    NUCLEUS_STATUS_SUCCESS = 0,
    NUCLEUS_STATUS_INVALID_ARGUMENT = 1,
    NUCLEUS_STATUS_WORKSPACE_TOO_SMALL = 2,
    NUCLEUS_STATUS_UNSUPPORTED_SHAPE = 3,
    NUCLEUS_STATUS_CUDA_ERROR = 4
} NucleusStatus;

NUCLEUS_KERNEL_API char const* nucleusKernelStatusString(int status);

/* The CUDA error of the last launcher call on this host thread that returned NUCLEUS_STATUS_CUDA_ERROR (0 if none). */
NUCLEUS_KERNEL_API int nucleusKernelLastCudaError(void);

#ifdef __cplusplus
}
#endif

#endif /* NUCLEUS_KERNEL_TYPES_H */
