// CUDA implementation of the patch projection ops: checks, device guard, current stream, fp32 accumulation
// buffers for the gradients; the kernels themselves are behind launch.h (patch_projection.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../patch_projection.h"
#include "launch.h"

namespace eit_fast {
namespace {

cuda::DType cuda_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::f32;
    case at::kHalf: return cuda::DType::f16;
    case at::kBFloat16: return cuda::DType::bf16;
    default:
      TORCH_CHECK(false, "patch_projection on CUDA supports float32, float16 and bfloat16, got ", t.scalar_type());
  }
}

// The kernels index in 32 bits.
void check_sizes(const PatchShape& s) {
  const int64_t limit = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(s.B * s.C * s.H * s.W < limit && s.N() * s.D < limit && s.N() * s.window() < limit,
              "patch_projection on CUDA: tensors of more than 2^31 elements are not supported; split the batch");
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "patch_projection: launching the ", what, " kernel failed: ",
              cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                const at::Tensor& bias_in, int64_t stride, int64_t padding,
                                                int64_t pool) {
  const PatchShape s = check_forward_args(x_in, weight_in, bias_in, stride, padding, pool);
  const cuda::DType dtype = cuda_dtype(x_in);
  check_sizes(s);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous();
  at::Tensor out = at::empty({s.B, s.T(), s.D}, x.options());
  at::Tensor argmax = at::empty({s.B, s.T(), s.D}, x.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, argmax};
  check_launch(cuda::forward(dtype, x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(),
                             argmax.data_ptr<uint8_t>(), s, c10::cuda::getCurrentCUDAStream()),
               "forward");
  return {out, argmax};
}

std::tuple<at::Tensor, at::Tensor> backward_weight_cuda(const at::Tensor& grad_in, const at::Tensor& argmax_in,
                                                        const at::Tensor& x_in, const at::Tensor& weight,
                                                        int64_t stride, int64_t padding, int64_t pool) {
  const PatchShape s = check_backward_args(grad_in, argmax_in, x_in, weight, stride, padding, pool);
  const cuda::DType dtype = cuda_dtype(x_in);
  check_sizes(s);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor grad = grad_in.contiguous(), argmax = argmax_in.contiguous(), x = x_in.contiguous();
  at::Tensor dweight = at::zeros({s.D, s.K()}, x.options().dtype(at::kFloat));
  const at::Tensor dbias = grad.sum({0, 1}, false, at::kFloat).to(weight.scalar_type());
  if (grad.numel() > 0) {
    check_launch(cuda::weight_grad(dtype, grad.data_ptr(), argmax.data_ptr<uint8_t>(), x.data_ptr(),
                                   dweight.data_ptr<float>(), s, c10::cuda::getCurrentCUDAStream()),
                 "weight-gradient");
  }
  // The kernel sums over every window position, zero gradients included, so a non-finite input gives NaN as
  // in the reference (0 * inf); conv positions the pool windows cut off are not summed (the reference's
  // NaN from those is not reproduced; checking would cost a host sync per backward).
  return {dweight.view(weight.sizes()).to(weight.scalar_type()), dbias};
}

at::Tensor backward_input_cuda(const at::Tensor& grad_in, const at::Tensor& argmax_in, const at::Tensor& x,
                               const at::Tensor& weight_in, int64_t stride, int64_t padding, int64_t pool) {
  const PatchShape s = check_backward_args(grad_in, argmax_in, x, weight_in, stride, padding, pool);
  const cuda::DType dtype = cuda_dtype(x);
  check_sizes(s);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor grad = grad_in.contiguous(), argmax = argmax_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor dx = at::zeros({s.B, s.C, s.H, s.W}, x.options().dtype(at::kFloat));
  if (grad.numel() > 0) {
    check_launch(cuda::input_grad(dtype, grad.data_ptr(), argmax.data_ptr<uint8_t>(), weight.data_ptr(),
                                  dx.data_ptr<float>(), s, c10::cuda::getCurrentCUDAStream()),
                 "input-gradient");
  }
  return dx.to(x.scalar_type());  // dense over channels: a non-finite weight gives NaN as in the reference
}

}  // namespace
}  // namespace eit_fast

TORCH_LIBRARY_IMPL(eit_fast, CUDA, m) {
  m.impl("patch_projection", &eit_fast::forward_cuda);
  m.impl("patch_projection_backward_weight", &eit_fast::backward_weight_cuda);
  m.impl("patch_projection_backward_input", &eit_fast::backward_input_cuda);
}
