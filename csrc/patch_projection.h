// Argument checks of the patch projection ops, shared by the CPU and CUDA implementations.
#pragma once
#include <ATen/core/Tensor.h>

#include "shape.h"

namespace eit_fast {

// Validates x (B, C, H, W), weight (D, C, k, k), bias (D) and the conv/pool settings; returns the geometry.
PatchShape check_forward_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              int64_t stride, int64_t padding, int64_t pool);

// Also checks that grad (B, Hp*Wp, D) and argmax (uint8, same shape) belong to this x and weight.
PatchShape check_backward_args(const at::Tensor& grad, const at::Tensor& argmax, const at::Tensor& x,
                               const at::Tensor& weight, int64_t stride, int64_t padding, int64_t pool);

}  // namespace eit_fast
