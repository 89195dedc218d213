// Instantiates the kernels for fp32, fp16 and bf16 behind launch.h. No torch headers here (faster nvcc).
#include "launch.h"
#include "patch_projection_kernels.cuh"

namespace eit_fast {
namespace cuda {

namespace {
template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: f(float{}); break;
    case DType::f16: f(__half{}); break;
    case DType::bf16: f(__nv_bfloat16{}); break;
  }
  return cudaGetLastError();
}
}  // namespace

cudaError_t forward(DType dtype, const void* x, const void* weight, const void* bias, void* out, uint8_t* argmax,
                    const PatchShape& s, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    kernels::launch_forward<T>(static_cast<const T*>(x), static_cast<const T*>(weight),
                               static_cast<const T*>(bias), static_cast<T*>(out), argmax, s, stream);
  });
}

cudaError_t weight_grad(DType dtype, const void* grad, const uint8_t* argmax, const void* x, float* dweight,
                        const PatchShape& s, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    kernels::launch_weight_grad<T>(static_cast<const T*>(grad), argmax, static_cast<const T*>(x), dweight, s,
                                   stream);
  });
}

cudaError_t input_grad(DType dtype, const void* grad, const uint8_t* argmax, const void* weight, float* dx,
                       const PatchShape& s, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    kernels::launch_input_grad<T>(static_cast<const T*>(grad), argmax, static_cast<const T*>(weight), dx, s,
                                  stream);
  });
}

}  // namespace cuda
}  // namespace eit_fast
