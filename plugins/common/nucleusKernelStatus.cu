/*
 * Status strings and the last CUDA error of the nucleus kernel launchers.
 */
#include "nucleusKernelUtils.cuh"

namespace nucleus
{
namespace kernels
{
namespace
{
thread_local int gLastCudaError = 0;
} // namespace

int recordCudaStatus(cudaError_t err)
{
    if (err == cudaSuccess)
    {
        return NUCLEUS_STATUS_SUCCESS;
    }
    gLastCudaError = static_cast<int>(err);
    return NUCLEUS_STATUS_CUDA_ERROR;
}

} // namespace kernels
} // namespace nucleus

extern "C" char const* nucleusKernelStatusString(int status)
{
    switch (status)
    {
    case NUCLEUS_STATUS_SUCCESS: return "success";
    case NUCLEUS_STATUS_INVALID_ARGUMENT: return "invalid argument (null pointer, non-positive size or unknown dtype)";
    case NUCLEUS_STATUS_WORKSPACE_TOO_SMALL: return "workspace smaller than the matching *WorkspaceSize() query";
    case NUCLEUS_STATUS_UNSUPPORTED_SHAPE: return "shape outside what the kernel supports (see the launcher's header)";
    case NUCLEUS_STATUS_CUDA_ERROR: return "CUDA error (see nucleusKernelLastCudaError())";
    default: return "unknown status";
    }
}

extern "C" int nucleusKernelLastCudaError(void)
{
    return nucleus::kernels::gLastCudaError;
}
