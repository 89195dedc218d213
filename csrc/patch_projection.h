// Argument checks of the patch projection ops, shared by the CPU and CUDA implementations.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>

#include "shape.h"

namespace eit_fast {

// Validates x (B, C, H, W), weight (D, C, k, k), bias (D) and the conv/pool settings; returns the geometry.
PatchShape check_forward_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              int64_t stride, int64_t padding, int64_t pool);

// Also checks that grad (B, Hp*Wp, D) and argmax (uint8, same shape) belong to this x and weight.
PatchShape check_backward_args(const at::Tensor& grad, const at::Tensor& argmax, const at::Tensor& x,
                               const at::Tensor& weight, int64_t stride, int64_t padding, int64_t pool);

// The math the CUDA kernels use for a dtype: "bf16" / "fp16" on tensor cores; for float32 "tf32" (tensor
// cores) when PyTorch's convolution precision setting allows TF32 (torch.backends.cudnn.conv.fp32_precision,
// or torch.backends.cudnn.allow_tf32 before torch 2.9), which is what the cuDNN convolution it replaces
// follows, else "fp32" (exact FMA). The one judge of that rule; eit_fast::patch_projection_cuda_math
// reports it to Python.
std::string cuda_math(at::ScalarType dtype);

}  // namespace eit_fast
