// Schemas of the eit_fast patch projection ops (implemented per device in cpu/ and cuda/) and their
// argument checks. Forward returns the tokens (B, Hp*Wp, D) and the argmax window index of each token
// (uint8, row-major in the pool window), which the two backward ops route gradients through.
#include "patch_projection.h"

#include <ATen/Context.h>
#include <torch/library.h>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

namespace eit_fast {

PatchShape check_forward_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              int64_t stride, int64_t padding, int64_t pool) {
  TORCH_CHECK(x.dim() == 4, "patch_projection: x must be a 4-D image batch (B, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == weight.size(3),
              "patch_projection: weight must be (D, C, k, k) with a square kernel, got shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), "patch_projection: weight expects ", weight.size(1),
              " input channels, x has ", x.size(1));
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), "patch_projection: bias must be (",
              weight.size(0), "), got shape ", bias.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && x.scalar_type() == bias.scalar_type(),
              "patch_projection: x, weight and bias must share a dtype, got ", x.scalar_type(), ", ",
              weight.scalar_type(), " and ", bias.scalar_type());
  TORCH_CHECK(x.device() == weight.device() && x.device() == bias.device(),
              "patch_projection: x, weight and bias must be on one device, got ", x.device(), ", ",
              weight.device(), " and ", bias.device());
  TORCH_CHECK(stride >= 1 && padding >= 0 && pool >= 1, "patch_projection: need stride >= 1, padding >= 0 and "
              "pool >= 1, got stride=", stride, " padding=", padding, " pool=", pool);
  TORCH_CHECK(pool * pool <= 256, "patch_projection: pool=", pool, " has ", pool * pool,
              " window positions; the saved argmax is one byte, so pool must be at most 16");
  const int64_t k = weight.size(2);
  TORCH_CHECK(x.size(2) + 2 * padding >= k && x.size(3) + 2 * padding >= k, "patch_projection: a ",
              x.size(2), "x", x.size(3), " image with padding ", padding, " is smaller than the ", k, "x", k,
              " kernel");
  const PatchShape s = make_patch_shape(x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), k, stride,
                                        padding, pool);
  TORCH_CHECK(s.Hp >= 1 && s.Wp >= 1, "patch_projection: the ", s.Hc, "x", s.Wc, " conv output of a ", s.H, "x",
              s.W, " image is smaller than the ", pool, "x", pool, " pool window");
  return s;
}

PatchShape check_backward_args(const at::Tensor& grad, const at::Tensor& argmax, const at::Tensor& x,
                               const at::Tensor& weight, int64_t stride, int64_t padding, int64_t pool) {
  TORCH_CHECK(weight.dim() == 4, "patch_projection backward: weight must be (D, C, k, k), got shape ",
              weight.sizes());
  const PatchShape s = check_forward_args(x, weight, weight.new_empty({weight.size(0)}), stride, padding, pool);
  const std::vector<int64_t> expected{s.B, s.T(), s.D};
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(expected), "patch_projection backward: grad must be ",
              at::IntArrayRef(expected), ", got ", grad.sizes());
  TORCH_CHECK(argmax.sizes() == grad.sizes() && argmax.scalar_type() == at::kByte,
              "patch_projection backward: argmax must be uint8 of shape ", grad.sizes(), ", got ",
              argmax.scalar_type(), " ", argmax.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "patch_projection backward: grad dtype ",
              grad.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(grad.device() == x.device() && argmax.device() == x.device(),
              "patch_projection backward: grad, argmax and x must be on one device");
  return s;
}

std::string cuda_math(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return "bf16";
    case at::kHalf: return "fp16";
    case at::kFloat: {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
      const bool tf32 = at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
#else
      const bool tf32 = at::globalContext().allowTF32CuDNN();
#endif
      return tf32 ? "tf32" : "fp32";
    }
    default:
      TORCH_CHECK(false, "patch_projection on CUDA supports float32, float16 and bfloat16, got ", dtype);
  }
}

}  // namespace eit_fast

TORCH_LIBRARY(eit_fast, m) {
  m.def("patch_projection_cuda_math(ScalarType dtype) -> str", [](at::ScalarType dtype) { return eit_fast::cuda_math(dtype); });
  m.def("patch_projection(Tensor x, Tensor weight, Tensor bias, int stride, int padding, int pool) "
        "-> (Tensor, Tensor)");
  m.def("patch_projection_backward_weight(Tensor grad, Tensor argmax, Tensor x, Tensor weight, int stride, "
        "int padding, int pool) -> (Tensor, Tensor)");
  m.def("patch_projection_backward_input(Tensor grad, Tensor argmax, Tensor x, Tensor weight, int stride, "
        "int padding, int pool) -> Tensor");
}
