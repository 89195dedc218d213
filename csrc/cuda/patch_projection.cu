// The kernels behind launch.h: instantiates the templates of patch_projection_kernels.cuh for bf16, fp16,
// tf32 and exact fp32. No torch headers here (faster nvcc). The static_asserts check, per target
// architecture, that every kernel's shared memory fits one block there at the EIT shapes (K = 768).
#include "launch.h"
#include "patch_projection_kernels.cuh"

namespace eit_fast {
namespace cuda {
namespace {

namespace k = kernels;

// Opt-in shared memory per block (CUDA C Programming Guide, compute capabilities table).
constexpr size_t smem_limit(int arch) {
  return arch >= 900 ? 227 * 1024 : arch == 800 || arch == 870 ? 163 * 1024 : 99 * 1024;
}
template <class O, class Tl>
constexpr size_t max_smem() {
  constexpr size_t f = k::FwdLayout<O, Tl>::bytes(768), w = k::WgradLayout<O, Tl>::bytes, d = k::DgradLayout<O>::bytes;
  return f > w ? (f > d ? f : d) : (w > d ? w : d);
}
template <class O>
constexpr size_t max_smem_all() {
  constexpr size_t a = max_smem<O, k::TileA>(), b = max_smem<O, k::TileB>(), c = max_smem<O, k::TileC>();
  return a > b ? (a > c ? a : c) : (b > c ? b : c);
}
#ifdef __CUDA_ARCH__
static_assert(max_smem_all<k::Op<k::Math::bf16>>() <= smem_limit(__CUDA_ARCH__), "bf16 kernels: shared memory");
static_assert(max_smem_all<k::Op<k::Math::f16>>() <= smem_limit(__CUDA_ARCH__), "fp16 kernels: shared memory");
static_assert(max_smem_all<k::Op<k::Math::tf32>>() <= smem_limit(__CUDA_ARCH__), "tf32 kernels: shared memory");
static_assert(max_smem<k::Op<k::Math::fma>, k::TileF>() <= smem_limit(__CUDA_ARCH__), "fp32 kernels: shared memory");
#endif
// sm_86 / sm_89 (99 KB) bound every architecture this code runs on.
static_assert(max_smem_all<k::Op<k::Math::tf32>>() <= smem_limit(860) && max_smem_all<k::Op<k::Math::bf16>>() <= smem_limit(860),
              "the kernels must fit a 99 KB block (RTX 30/40)");

}  // namespace

const char* refusal(const PatchShape& s, const XStrides& xs, const Device& dev) { return k::refusal(s, xs, dev); }
PlanSummary plan_summary(const PatchShape& s, const XStrides& xs, Math m, const Device& dev) {
  const k::Plan p = k::plan(s, m);
  return {p.BN, p.Dpad, p.Kpad, p.Kt, p.Dk, k::wgrad_split(s, xs, m, k::elem_size(m), dev).slices_total};
}
size_t forward_scratch(const PatchShape& s, Math m) { return k::forward_scratch(s, m, k::elem_size(m)); }
size_t weight_grad_scratch(const PatchShape& s, const XStrides& xs, Math m, const Device& dev) {
  return k::weight_grad_scratch(s, xs, m, k::elem_size(m), dev);
}
size_t input_grad_scratch(const PatchShape& s, Math m) { return k::input_grad_scratch(s, m, k::elem_size(m)); }

const char* forward(Math m, const void* x, const XStrides& xs, const void* weight, const void* bias, void* out,
                    uint8_t* argmax, const PatchShape& s, void* scratch, const Device& dev, cudaStream_t stream) {
  return k::forward(m, x, xs, weight, bias, out, argmax, s, static_cast<unsigned char*>(scratch), dev, stream);
}
const char* weight_grad(Math m, const void* grad, const uint8_t* argmax, const void* x, const XStrides& xs,
                        float* dweight, const PatchShape& s, void* scratch, const Device& dev, cudaStream_t stream) {
  return k::weight_grad(m, grad, argmax, x, xs, dweight, s, static_cast<unsigned char*>(scratch), dev, stream);
}
const char* input_grad(Math m, const void* grad, const uint8_t* argmax, const void* weight, float* dx,
                       const XStrides& dxs, const PatchShape& s, void* scratch, const Device& dev,
                       cudaStream_t stream) {
  return k::input_grad(m, grad, argmax, weight, dx, dxs, s, static_cast<unsigned char*>(scratch), dev, stream);
}

}  // namespace cuda
}  // namespace eit_fast
