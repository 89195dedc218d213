// The CUDA kernels as the torch binding sees them: plain types, pointers as void*, no torch and no device
// code (patch_projection.cu implements these with the templates of patch_projection_kernels.cuh, which the
// CPU emulation of the tests calls directly).
#pragma once
#include <cstddef>
#include <cstdint>

#ifdef EIT_FAST_EMULATE_CUDA
#include "emulation.h"  // dim3, cudaStream_t
#else
#include <cuda_runtime_api.h>
#endif

#include "../shape.h"

namespace eit_fast {
namespace cuda {

// bf16 / fp16 operands on tensor cores; fp32 operands on tensor cores as tf32, or exactly with FMA.
enum class Math { bf16, f16, tf32, fma };

struct XStrides { int64_t b, c, h, w; };  // element strides of x (or of dx)

struct Device {
  size_t max_smem = 99 * 1024;                     // opt-in shared memory per block (sm_86 / sm_89: 99 KB)
  int64_t index_limit = (int64_t(1) << 31) - 1;    // each launch indexes below this (tests lower it)
};

// Why the kernels refuse this problem (a clear sentence), or nullptr.
const char* refusal(const PatchShape& s, const XStrides& xs, const Device& dev);

// What the launchers pick for a problem (the performance model reads it): the tile's channel count, the
// padded sizes of the packed operands, and the weight gradient's number of split-reduction slices.
struct PlanSummary { int64_t BN, Dpad, Kpad, Kt, Dk, slices; };
PlanSummary plan_summary(const PatchShape& s, const XStrides& xs, Math m, const Device& dev);

// Device scratch (bytes) each op needs: packed operands, the weight gradient's split-reduction workspace.
size_t forward_scratch(const PatchShape& s, Math m);
size_t weight_grad_scratch(const PatchShape& s, const XStrides& xs, Math m, const Device& dev);
size_t input_grad_scratch(const PatchShape& s, Math m);

// Each returns nullptr or why it could not launch; the caller checks cudaGetLastError() after it.
// forward: x with strides xs, weight (D, C, k, k) and bias (D) contiguous -> out (N, D), argmax (N, D) uint8.
const char* forward(Math m, const void* x, const XStrides& xs, const void* weight, const void* bias, void* out,
                    uint8_t* argmax, const PatchShape& s, void* scratch, const Device& dev, cudaStream_t stream);
// weight_grad: dweight (D, C, k, k) fp32, written (deterministic: a fixed-order split reduction).
const char* weight_grad(Math m, const void* grad, const uint8_t* argmax, const void* x, const XStrides& xs,
                        float* dweight, const PatchShape& s, void* scratch, const Device& dev, cudaStream_t stream);
// input_grad: dx fp32 with strides dxs, zeroed by the caller; added into with atomics (not deterministic).
const char* input_grad(Math m, const void* grad, const uint8_t* argmax, const void* weight, float* dx,
                       const XStrides& dxs, const PatchShape& s, void* scratch, const Device& dev,
                       cudaStream_t stream);

}  // namespace cuda
}  // namespace eit_fast
