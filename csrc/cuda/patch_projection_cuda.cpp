// CUDA implementation of the patch projection ops: checks, device guard, current stream, the precision
// rule (cuda_math), scratch memory and the fp32 gradient buffers; the kernels are behind launch.h.
// x is read with its own strides (NCHW, channels_last or any other), never copied.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../patch_projection.h"
#include "launch.h"

namespace eit_fast {
namespace {

cuda::Math math_of(const at::Tensor& x) {
  const std::string m = cuda_math(x.scalar_type());
  return m == "bf16" ? cuda::Math::bf16 : m == "fp16" ? cuda::Math::f16 : m == "tf32" ? cuda::Math::tf32
                                                                                       : cuda::Math::fma;
}

cuda::XStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

cuda::Device device_limits(const at::Tensor& on) {
  int value = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, on.get_device());
  TORCH_CHECK(err == cudaSuccess, "patch_projection: cannot read the device's shared-memory limit: ",
              cudaGetErrorString(err));
  cuda::Device d;
  d.max_smem = size_t(value);
  return d;
}

void check_problem(const PatchShape& s, const cuda::XStrides& xs, const cuda::Device& dev) {
  const char* why = cuda::refusal(s, xs, dev);
  TORCH_CHECK(why == nullptr, "patch_projection on CUDA: ", why == nullptr ? "" : why);
}

void check_launch(const char* why, const char* what) {
  TORCH_CHECK(why == nullptr, "patch_projection: the ", what, " kernels cannot run: ", why == nullptr ? "" : why);
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "patch_projection: launching the ", what, " kernels failed: ",
              cudaGetErrorString(err));
}

at::Tensor scratch(size_t bytes, const at::Tensor& like) {
  return at::empty({int64_t(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& x, const at::Tensor& weight_in,
                                                const at::Tensor& bias_in, int64_t stride, int64_t padding,
                                                int64_t pool) {
  const PatchShape s = check_forward_args(x, weight_in, bias_in, stride, padding, pool);
  const cuda::Math m = math_of(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda::XStrides xs = strides_of(x);
  const cuda::Device dev = device_limits(x);
  check_problem(s, xs, dev);
  const at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  at::Tensor out = at::empty({s.B, s.T(), s.D}, x.options());
  at::Tensor argmax = at::empty({s.B, s.T(), s.D}, x.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, argmax};
  at::Tensor work = scratch(cuda::forward_scratch(s, m), x);
  check_launch(cuda::forward(m, x.data_ptr(), xs, weight.data_ptr(), bias.data_ptr(), out.data_ptr(),
                             argmax.data_ptr<uint8_t>(), s, work.data_ptr(), dev, c10::cuda::getCurrentCUDAStream()),
               "forward");
  return {out, argmax};
}

std::tuple<at::Tensor, at::Tensor> backward_weight_cuda(const at::Tensor& grad_in, const at::Tensor& argmax_in,
                                                        const at::Tensor& x, const at::Tensor& weight,
                                                        int64_t stride, int64_t padding, int64_t pool) {
  const PatchShape s = check_backward_args(grad_in, argmax_in, x, weight, stride, padding, pool);
  const cuda::Math m = math_of(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda::XStrides xs = strides_of(x);
  const cuda::Device dev = device_limits(x);
  check_problem(s, xs, dev);
  const at::Tensor grad = grad_in.contiguous(), argmax = argmax_in.contiguous();
  at::Tensor dweight = at::empty({s.D, s.C, s.k, s.k}, x.options().dtype(at::kFloat));
  const at::Tensor dbias = grad.sum(at::IntArrayRef{0, 1}, false, at::kFloat).to(weight.scalar_type());
  if (grad.numel() == 0) {
    dweight.zero_();
  } else {
    at::Tensor work = scratch(cuda::weight_grad_scratch(s, xs, m, dev), x);
    check_launch(cuda::weight_grad(m, grad.data_ptr(), argmax.data_ptr<uint8_t>(), x.data_ptr(), xs,
                                   dweight.data_ptr<float>(), s, work.data_ptr(), dev,
                                   c10::cuda::getCurrentCUDAStream()),
                 "weight-gradient");
  }
  // The kernels sum over every window position, zero gradients included, so a non-finite input gives NaN as
  // in the reference (0 * inf); conv positions the pool windows cut off are not summed (the reference's NaN
  // from those is not reproduced: finding them would cost a host sync per backward).
  return {dweight.to(weight.scalar_type()), dbias};
}

at::Tensor backward_input_cuda(const at::Tensor& grad_in, const at::Tensor& argmax_in, const at::Tensor& x,
                               const at::Tensor& weight_in, int64_t stride, int64_t padding, int64_t pool) {
  const PatchShape s = check_backward_args(grad_in, argmax_in, x, weight_in, stride, padding, pool);
  // Overlapping patches meet at the pixels they share: the kernel adds there with fp32 atomics.
  at::globalContext().alertNotDeterministic("eit_fast::patch_projection_backward_input (CUDA)");
  const cuda::Math m = math_of(x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::zeros_like(x, x.options().dtype(at::kFloat), at::MemoryFormat::Preserve);
  const cuda::XStrides dxs = strides_of(dx);
  const cuda::Device dev = device_limits(x);
  check_problem(s, dxs, dev);
  const at::Tensor grad = grad_in.contiguous(), argmax = argmax_in.contiguous(), weight = weight_in.contiguous();
  if (grad.numel() > 0) {
    at::Tensor work = scratch(cuda::input_grad_scratch(s, m), x);
    check_launch(cuda::input_grad(m, grad.data_ptr(), argmax.data_ptr<uint8_t>(), weight.data_ptr(),
                                  dx.data_ptr<float>(), dxs, s, work.data_ptr(), dev,
                                  c10::cuda::getCurrentCUDAStream()),
                 "input-gradient");
  }
  return dx.to(x.scalar_type());  // dense over channels: a non-finite weight gives NaN as in the reference
}

// [BN, Dpad, Kpad, Kt, Dk, slices] the launchers pick for a contiguous x of this shape (for the model).
std::vector<int64_t> plan_op(at::IntArrayRef x_shape, int64_t D, int64_t k, int64_t stride, int64_t padding,
                             int64_t pool, at::ScalarType dtype) {
  TORCH_CHECK(x_shape.size() == 4, "patch_projection_cuda_plan: x_shape must be (B, C, H, W)");
  const PatchShape s = make_patch_shape(x_shape[0], x_shape[1], x_shape[2], x_shape[3], D, k, stride, padding, pool);
  const std::string name = cuda_math(dtype);
  const cuda::Math m = name == "bf16" ? cuda::Math::bf16 : name == "fp16" ? cuda::Math::f16
                       : name == "tf32" ? cuda::Math::tf32 : cuda::Math::fma;
  const cuda::XStrides xs{s.C * s.H * s.W, s.H * s.W, s.W, 1};
  const cuda::PlanSummary p = cuda::plan_summary(s, xs, m, cuda::Device{});
  return {p.BN, p.Dpad, p.Kpad, p.Kt, p.Dk, p.slices};
}

}  // namespace
}  // namespace eit_fast

TORCH_LIBRARY_FRAGMENT(eit_fast, m) {
  m.def("patch_projection_cuda_plan(int[] x_shape, int D, int k, int stride, int padding, int pool, "
        "ScalarType dtype) -> int[]", &eit_fast::plan_op);
}

TORCH_LIBRARY_IMPL(eit_fast, CUDA, m) {
  m.impl("patch_projection", &eit_fast::forward_cuda);
  m.impl("patch_projection_backward_weight", &eit_fast::backward_weight_cuda);
  m.impl("patch_projection_backward_input", &eit_fast::backward_input_cuda);
}
