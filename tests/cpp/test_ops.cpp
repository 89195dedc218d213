// The eit_fast_ops library through the dispatcher, as a libtorch user calls it: forward and both backward
// ops against at::conv2d + at::max_pool2d and their autograd gradients, on the CPU and, when present, CUDA.
#include <ATen/Context.h>
#include <torch/torch.h>

#include <cstdio>
#include <string>

#include "patch_projection.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  failures += !ok;
}

double rel(const at::Tensor& a, const at::Tensor& ref) {
  return (a.to(at::kDouble) - ref.to(at::kDouble)).norm().item<double>() /
         ref.to(at::kDouble).norm().item<double>();
}

void check_case(at::Device dev, int64_t B, int64_t H, int64_t W, int64_t D, int64_t k, int64_t s, int64_t p) {
  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("eit_fast::patch_projection", "")
                        .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, int64_t, int64_t, int64_t)>();
  static auto bwd_w = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("eit_fast::patch_projection_backward_weight", "")
                          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, const at::Tensor&, int64_t,
                                                                    int64_t, int64_t)>();
  static auto bwd_x = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("eit_fast::patch_projection_backward_input", "")
                          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, int64_t, int64_t, int64_t)>();
  const auto opts = torch::TensorOptions().dtype(at::kDouble).device(dev);
  const auto dtype = dev.is_cuda() ? at::kFloat : at::kDouble;  // fp64 on CPU; the CUDA kernels take fp32
  auto x = torch::randn({B, 3, H, W}, opts).requires_grad_();
  auto w = torch::randn({D, 3, k, k}, opts).requires_grad_();
  auto b = torch::randn({D}, opts).requires_grad_();
  auto ref = at::max_pool2d(at::conv2d(x, w, b, s, k / 2), p, p).flatten(2).transpose(1, 2);
  auto grad = torch::randn_like(ref);
  ref.backward(grad);
  auto [out, argmax] = fwd.call(x.detach().to(dtype), w.detach().to(dtype), b.detach().to(dtype), s, k / 2, p);
  auto [dw, db] = bwd_w.call(grad.to(dtype), argmax, x.detach().to(dtype), w.detach().to(dtype), s, k / 2, p);
  auto dx = bwd_x.call(grad.to(dtype), argmax, x.detach().to(dtype), w.detach().to(dtype), s, k / 2, p);
  const double tol = dtype == at::kDouble ? 1e-12 : 1e-5;
  char name[160];
  std::snprintf(name, sizeof(name), "%s B=%lld %lldx%lld D=%lld k=%lld s=%lld p=%lld: out %.1e dw %.1e db %.1e dx %.1e",
                dev.str().c_str(), (long long)B, (long long)H, (long long)W, (long long)D, (long long)k,
                (long long)s, (long long)p, rel(out, ref.detach()), rel(dw, w.grad()), rel(db, b.grad()),
                rel(dx, x.grad()));
  expect(rel(out, ref.detach()) < tol && rel(dw, w.grad()) < tol && rel(db, b.grad()) < tol &&
             rel(dx, x.grad()) < tol,
         name);
}

}  // namespace

int main() {
  torch::manual_seed(0);
  // fp32 at 1e-5 needs exact arithmetic: turn off TF32 for convolutions (PyTorch's default allows it, and the
  // CUDA kernels follow that setting as cuDNN does).
  at::globalContext().setAllowTF32CuDNN(false);
  std::vector<at::Device> devices{at::kCPU};
  if (torch::cuda::is_available()) devices.emplace_back(at::kCUDA);
  for (const auto& dev : devices) {
    check_case(dev, 2, 32, 32, 250, 3, 1, 4);  // eit_cifar stem
    check_case(dev, 1, 61, 47, 33, 16, 4, 3);  // 16/4/3 stem, odd non-square size
    check_case(dev, 3, 9, 13, 17, 1, 1, 2);
  }
  bool refused = false;  // argument checks are part of the library
  try {
    eit_fast::check_forward_args(torch::randn({1, 3, 8, 8}), torch::randn({4, 3, 3, 3}), torch::randn({4}), 1, 1, 17);
  } catch (const c10::Error& e) {
    refused = std::string(e.what()).find("at most 16") != std::string::npos;
  }
  expect(refused, "pool 17 is refused with a clear message");
  expect(eit_fast::make_patch_shape(8, 3, 224, 224, 250, 16, 4, 8, 3).T() == 361, "224 px, 16/4/3: 361 tokens");
  return failures ? 1 : 0;
}
