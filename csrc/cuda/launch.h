// The CUDA kernels as the torch binding sees them: typed by an enum, pointers as void*, no torch and no
// fp16/bf16 device types (patch_projection.cu instantiates the kernels behind these functions).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../shape.h"

namespace eit_fast {
namespace cuda {

enum class DType { f32, f16, bf16 };

// Each returns the launch's error (cudaGetLastError right after it).
cudaError_t forward(DType dtype, const void* x, const void* weight, const void* bias, void* out, uint8_t* argmax,
                    const PatchShape& s, cudaStream_t stream);
// dweight: zeroed fp32 (D, C*k*k).
cudaError_t weight_grad(DType dtype, const void* grad, const uint8_t* argmax, const void* x, float* dweight,
                        const PatchShape& s, cudaStream_t stream);
// dx: zeroed fp32 (B, C, H, W).
cudaError_t input_grad(DType dtype, const void* grad, const uint8_t* argmax, const void* weight, float* dx,
                       const PatchShape& s, cudaStream_t stream);

}  // namespace cuda
}  // namespace eit_fast
