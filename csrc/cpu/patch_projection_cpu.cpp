// CPU implementation of the patch projection ops.
//
// Forward: the image is cut into tiles of pooled tokens. A tile's patches (every conv position its pool
// windows cover) are gathered into a cache-sized matrix P; a register-blocked micro-kernel multiplies 6 rows
// of P by 16 channels of the packed weights at a time (D is the vector dimension) and folds the result,
// still in registers, into the tile's running max and argmax. Only pooled tokens are written; the conv map never exists.
// Backward follows each pooled gradient to its argmax conv position only (see backward_weight_cpu).
// Arithmetic in float for fp32/bf16 inputs, double for fp64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define EIT_FAST_X86 1
#endif

#include "../patch_projection.h"

namespace eit_fast {
namespace {

constexpr int64_t MR = 6;   // micro-kernel rows (tokens at one window offset)
constexpr int64_t NR = 16;  // micro-kernel columns (channels)

// One step of the fused conv + max-pool for MR tokens x NR channels at window offset w:
//   v[r][j] = bias[j] + sum_kk P[r*K + kk] * W[kk*NR + j]
//   best[r][j], best_w[r][j] <- v[r][j], w   when w == 0, v > best or v is NaN
// which is PyTorch's max-pool rule (the first maximum in window order wins ties; NaN propagates).
template <typename acc_t>
void micro_kernel_generic(const acc_t* P, int64_t K, const acc_t* W, const acc_t* bias, acc_t* best,
                          int32_t* best_w, int32_t w) {
  acc_t acc[MR][NR] = {};
  for (int64_t kk = 0; kk < K; ++kk)
    for (int64_t r = 0; r < MR; ++r) {
      const acc_t a = P[r * K + kk];
      for (int64_t j = 0; j < NR; ++j) acc[r][j] += a * W[kk * NR + j];
    }
  for (int64_t r = 0; r < MR; ++r)
    for (int64_t j = 0; j < NR; ++j) {
      const acc_t v = acc[r][j] + bias[j];
      if (w == 0 || v > best[r * NR + j] || std::isnan(v)) { best[r * NR + j] = v; best_w[r * NR + j] = w; }
    }
}

#ifdef EIT_FAST_X86
// The same with AVX2 + FMA: 12 accumulators, 2 weight vectors and a broadcast fill the 16 ymm registers.
__attribute__((target("avx2,fma"))) void micro_kernel_avx2(const float* P, int64_t K, const float* W,
                                                            const float* bias, float* best, int32_t* best_w,
                                                            int32_t w) {
  // Twelve named accumulators: an array here makes GCC store them to the stack on every iteration.
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
         c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t kk = 0; kk < K; ++kk) {
    const __m256 w0 = _mm256_loadu_ps(W + kk * NR), w1 = _mm256_loadu_ps(W + kk * NR + 8);
    const float* p = P + kk;
    __m256 a = _mm256_broadcast_ss(p);
    c00 = _mm256_fmadd_ps(a, w0, c00); c01 = _mm256_fmadd_ps(a, w1, c01);
    a = _mm256_broadcast_ss(p + K);
    c10 = _mm256_fmadd_ps(a, w0, c10); c11 = _mm256_fmadd_ps(a, w1, c11);
    a = _mm256_broadcast_ss(p + 2 * K);
    c20 = _mm256_fmadd_ps(a, w0, c20); c21 = _mm256_fmadd_ps(a, w1, c21);
    a = _mm256_broadcast_ss(p + 3 * K);
    c30 = _mm256_fmadd_ps(a, w0, c30); c31 = _mm256_fmadd_ps(a, w1, c31);
    a = _mm256_broadcast_ss(p + 4 * K);
    c40 = _mm256_fmadd_ps(a, w0, c40); c41 = _mm256_fmadd_ps(a, w1, c41);
    a = _mm256_broadcast_ss(p + 5 * K);
    c50 = _mm256_fmadd_ps(a, w0, c50); c51 = _mm256_fmadd_ps(a, w1, c51);
  }
  const __m256 acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  const __m256 wv = _mm256_castsi256_ps(_mm256_set1_epi32(w));
  const __m256 all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (int64_t r = 0; r < MR; ++r)
    for (int64_t h = 0; h < 2; ++h) {
      float* bp = best + r * NR + 8 * h;
      float* ip = reinterpret_cast<float*>(best_w + r * NR + 8 * h);
      const __m256 v = _mm256_add_ps(acc[r][h], _mm256_loadu_ps(bias + 8 * h));
      const __m256 b = _mm256_loadu_ps(bp);
      const __m256 take = w == 0 ? all : _mm256_or_ps(_mm256_cmp_ps(v, b, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      _mm256_storeu_ps(bp, _mm256_blendv_ps(b, v, take));
      _mm256_storeu_ps(ip, _mm256_blendv_ps(_mm256_loadu_ps(ip), wv, take));
    }
}
#endif

template <typename acc_t>
using MicroKernel = void (*)(const acc_t*, int64_t, const acc_t*, const acc_t*, acc_t*, int32_t*, int32_t);

template <typename acc_t>
MicroKernel<acc_t> pick_micro_kernel() {
  if constexpr (std::is_same_v<acc_t, float>) {
#ifdef EIT_FAST_X86
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &micro_kernel_avx2;
#endif
  }
  return &micro_kernel_generic<acc_t>;
}

// P[tt * tok_stride + w * win_stride][c*k*k + kh*k + kw]: the patches of tokens [t0, t0 + nt) of image b.
template <typename scalar_t, typename acc_t>
void gather_patches(const PatchShape& s, const scalar_t* x, int64_t b, int64_t t0, int64_t nt,
                    int64_t tok_stride, int64_t win_stride, acc_t* P) {
  const int64_t K = s.K(), k = s.k;
  for (int64_t tt = 0; tt < nt; ++tt) {
    const int64_t t = t0 + tt, ph = t / s.Wp, pw = t % s.Wp;
    for (int64_t w = 0; w < s.window(); ++w) {
      acc_t* row = P + (tt * tok_stride + w * win_stride) * K;
      const int64_t iy0 = (ph * s.pool + w / s.pool) * s.stride - s.pad;
      const int64_t ix0 = (pw * s.pool + w % s.pool) * s.stride - s.pad;
      const int64_t kw_lo = std::clamp<int64_t>(-ix0, 0, k), kw_hi = std::clamp<int64_t>(s.W - ix0, kw_lo, k);
      for (int64_t c = 0; c < s.C; ++c) {
        for (int64_t kh = 0; kh < k; ++kh) {
          acc_t* dst = row + (c * k + kh) * k;
          const int64_t iy = iy0 + kh;
          if (iy < 0 || iy >= s.H) {
            std::fill(dst, dst + k, acc_t(0));
            continue;
          }
          const scalar_t* src = x + ((b * s.C + c) * s.H + iy) * s.W + ix0;
          for (int64_t kw = 0; kw < kw_lo; ++kw) dst[kw] = acc_t(0);
          for (int64_t kw = kw_lo; kw < kw_hi; ++kw) dst[kw] = static_cast<acc_t>(src[kw]);
          for (int64_t kw = kw_hi; kw < k; ++kw) dst[kw] = acc_t(0);
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                               const at::Tensor& bias, int64_t stride, int64_t padding,
                                               int64_t pool) {
  const PatchShape s = check_forward_args(x_in, weight, bias, stride, padding, pool);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({s.B, s.T(), s.D}, x.options());
  at::Tensor argmax = at::empty({s.B, s.T(), s.D}, x.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, argmax};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "eit_fast::patch_projection (CPU)", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t K = s.K(), D = s.D, win = s.window(), panels = (D + NR - 1) / NR, Dpad = panels * NR;
    // Weights packed in panels of NR channels, (panels, K, NR), zero-padded: each micro-kernel call streams
    // one contiguous panel. Bias zero-padded to Dpad.
    std::vector<acc_t> wpk(panels * K * NR, acc_t(0)), bpad(Dpad, acc_t(0));
    {
      const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
      const at::Tensor w = weight.detach().reshape({D, K}).to(acc_type).contiguous();
      const at::Tensor bb = bias.detach().to(acc_type).contiguous();
      const acc_t* wp = w.data_ptr<acc_t>();
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t kk = 0; kk < K; ++kk) wpk[((d / NR) * K + kk) * NR + d % NR] = wp[d * K + kk];
        bpad[d] = bb.data_ptr<acc_t>()[d];
      }
    }
    // Tokens per tile, a multiple of MR: P (window x tokens x K) stays within about 256 KB.
    const int64_t fit = (256 * 1024) / int64_t(win * K * sizeof(acc_t));
    const int64_t tpt = std::min(std::max<int64_t>(MR, fit / MR * MR), (s.T() + MR - 1) / MR * MR);
    const int64_t tiles = (s.T() + tpt - 1) / tpt;
    const MicroKernel<acc_t> mk = pick_micro_kernel<acc_t>();
    const scalar_t* xptr = x.data_ptr<scalar_t>();
    scalar_t* optr = out.data_ptr<scalar_t>();
    uint8_t* aptr = argmax.data_ptr<uint8_t>();
    at::parallel_for(0, s.B * tiles, 1, [&](int64_t begin, int64_t end) {
      // best / best_w: the tile's running max and its window index, (panels, tokens, NR).
      std::vector<acc_t> P(win * tpt * K), best(panels * tpt * NR);
      std::vector<int32_t> best_w(panels * tpt * NR);
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u / tiles, t0 = (u % tiles) * tpt, nt = std::min(tpt, s.T() - t0);
        const int64_t ntp = (nt + MR - 1) / MR * MR;  // padded to whole micro-kernel rows (zero patches)
        for (int64_t w = 0; w < win; ++w)
          std::fill(P.begin() + (w * ntp + nt) * K, P.begin() + (w + 1) * ntp * K, acc_t(0));
        gather_patches(s, xptr, b, t0, nt, 1, ntp, P.data());  // rows (w, tt): MR tokens at one offset
        for (int64_t pn = 0; pn < panels; ++pn)
          for (int64_t w = 0; w < win; ++w)
            for (int64_t tb = 0; tb < ntp; tb += MR)
              mk(P.data() + (w * ntp + tb) * K, K, wpk.data() + pn * K * NR, bpad.data() + pn * NR,
                 best.data() + (pn * tpt + tb) * NR, best_w.data() + (pn * tpt + tb) * NR, int32_t(w));
        for (int64_t tt = 0; tt < nt; ++tt) {
          const int64_t n = b * s.T() + t0 + tt;
          for (int64_t d = 0; d < D; ++d) {
            const int64_t i = ((d / NR) * tpt + tt) * NR + d % NR;
            optr[n * D + d] = static_cast<scalar_t>(best[i]);
            aptr[n * D + d] = uint8_t(best_w[i]);
          }
        }
      }
    });
  });
  return {out, argmax};
}

// The backward is sparse: each pooled gradient g[n][d] belongs to one conv position, the argmax window w, so
// dW[d] += g[n][d] * P[n][w] and dP[n][w] += g[n][d] * W[d] (rows of length C*k*k), which is window^2 times
// less work than a dense GEMM on the routed conv-output gradient, and never materialises that gradient.

template <typename acc_t>
inline void axpy(acc_t* __restrict__ y, const acc_t* __restrict__ x, acc_t a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// The reference multiplies the whole conv-output gradient, zeros included, by the patches, so a non-finite
// pixel read at a conv position that did not receive the gradient of channel d still makes dW[d] NaN there
// (0 * inf). The sparse sum above only sees routed positions; mark the others. Costs nothing when x is
// finite; otherwise a small GEMM over the conv positions that read a non-finite pixel.
void nonfinite_like_reference(const at::Tensor& dweight, const at::Tensor& grad, const at::Tensor& argmax,
                              const at::Tensor& x, const PatchShape& s) {
  const at::Tensor bad = at::isfinite(x).logical_not();
  if (!bad.any().item<bool>()) return;
  const int64_t L = s.Hc * s.Wc, K = s.K(), D = s.D;
  const at::Tensor reads = at::im2col(bad.to(at::kFloat), {s.k, s.k}, {1, 1}, {s.pad, s.pad}, {s.stride, s.stride})
                               .transpose(1, 2).reshape({s.B * L, K});  // (conv position, offset) reads bad
  const at::Tensor rows = reads.amax(1).gt(0).nonzero().squeeze(1);
  const at::Tensor b = rows.div(L, "floor"), pos = rows.remainder(L);
  const at::Tensor oy = pos.div(s.Wc, "floor"), ox = pos.remainder(s.Wc);
  const at::Tensor inside = oy.lt(s.Hp * s.pool).logical_and(ox.lt(s.Wp * s.pool));
  const at::Tensor n = b * s.T() + oy.div(s.pool, "floor").clamp_max(s.Hp - 1) * s.Wp +
                       ox.div(s.pool, "floor").clamp_max(s.Wp - 1);
  const at::Tensor w = oy.remainder(s.pool) * s.pool + ox.remainder(s.pool);
  const at::Tensor routed = inside.unsqueeze(1)
                                .logical_and(argmax.reshape({-1, D}).index_select(0, n).to(at::kLong).eq(w.unsqueeze(1)))
                                .logical_and(grad.reshape({-1, D}).index_select(0, n).ne(0));  // (rows, D)
  const at::Tensor zero_times_bad = routed.logical_not().to(at::kFloat).t().mm(reads.index_select(0, rows));
  dweight.view({D, K}).masked_fill_(zero_times_bad.gt(0), std::numeric_limits<double>::quiet_NaN());
}

std::tuple<at::Tensor, at::Tensor> backward_weight_cpu(const at::Tensor& grad_in, const at::Tensor& argmax_in,
                                                       const at::Tensor& x_in, const at::Tensor& weight,
                                                       int64_t stride, int64_t padding, int64_t pool) {
  const PatchShape s = check_backward_args(grad_in, argmax_in, x_in, weight, stride, padding, pool);
  const at::Tensor grad = grad_in.contiguous(), argmax = argmax_in.contiguous(), x = x_in.contiguous();
  at::Tensor dweight, dbias;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "eit_fast::patch_projection_backward_weight (CPU)",
                                 [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const int64_t K = s.K(), D = s.D, win = s.window(), T = s.T();
    // One (D, K) accumulator per thread, summed at the end: no shared writes in the parallel loop.
    at::Tensor partial = at::zeros({at::get_num_threads(), D, K}, acc_opts);
    const scalar_t* xptr = x.data_ptr<scalar_t>();
    const scalar_t* gptr = grad.data_ptr<scalar_t>();
    const uint8_t* aptr = argmax.data_ptr<uint8_t>();
    acc_t* part = partial.data_ptr<acc_t>();
    at::parallel_for(0, s.N(), 1, [&](int64_t begin, int64_t end) {
      acc_t* dw = part + at::get_thread_num() * D * K;
      std::vector<acc_t> P(win * K);
      for (int64_t n = begin; n < end; ++n) {
        gather_patches(s, xptr, n / T, n % T, 1, win, 1, P.data());
        const scalar_t* g = gptr + n * D;
        const uint8_t* a = aptr + n * D;
        for (int64_t d = 0; d < D; ++d) {
          const acc_t gd = static_cast<acc_t>(g[d]);
          if (gd != acc_t(0)) axpy(dw + d * K, P.data() + a[d] * K, gd, K);
        }
      }
    });
    dweight = partial.sum(0).view(weight.sizes()).to(weight.scalar_type());
    dbias = grad.sum({0, 1}, false, acc_opts.dtype().toScalarType()).to(weight.scalar_type());
  });
  nonfinite_like_reference(dweight, grad, argmax, x, s);
  return {dweight, dbias};
}

at::Tensor backward_input_cpu(const at::Tensor& grad_in, const at::Tensor& argmax_in, const at::Tensor& x,
                              const at::Tensor& weight, int64_t stride, int64_t padding, int64_t pool) {
  const PatchShape s = check_backward_args(grad_in, argmax_in, x, weight, stride, padding, pool);
  const at::Tensor grad = grad_in.contiguous(), argmax = argmax_in.contiguous();
  at::Tensor dx;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "eit_fast::patch_projection_backward_input (CPU)",
                                 [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const int64_t K = s.K(), k = s.k, win = s.window(), T = s.T(), D = s.D;
    const at::Tensor wmat = weight.detach().reshape({D, K}).to(acc_opts).contiguous();
    const acc_t* wptr = wmat.data_ptr<acc_t>();
    at::Tensor dx_acc = at::zeros({s.B, s.C, s.H, s.W}, acc_opts);
    acc_t* dxptr = dx_acc.data_ptr<acc_t>();
    const scalar_t* gptr = grad.data_ptr<scalar_t>();
    const uint8_t* aptr = argmax.data_ptr<uint8_t>();
    // One image per task: an image's patches overlap, so its pixels take adds from many tokens.
    at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> dP(win * K);
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t t = 0; t < T; ++t) {
          const int64_t n = b * T + t, ph = t / s.Wp, pw = t % s.Wp;
          std::fill(dP.begin(), dP.end(), acc_t(0));
          for (int64_t d = 0; d < D; ++d) {
            const acc_t gd = static_cast<acc_t>(gptr[n * D + d]);
            if (gd != acc_t(0)) axpy(dP.data() + aptr[n * D + d] * K, wptr + d * K, gd, K);
          }
          for (int64_t w = 0; w < win; ++w) {  // fold the token's patch gradients back onto the input
            const acc_t* row = dP.data() + w * K;
            const int64_t iy0 = (ph * s.pool + w / s.pool) * s.stride - s.pad;
            const int64_t ix0 = (pw * s.pool + w % s.pool) * s.stride - s.pad;
            const int64_t kw_lo = std::clamp<int64_t>(-ix0, 0, k), kw_hi = std::clamp<int64_t>(s.W - ix0, kw_lo, k);
            for (int64_t c = 0; c < s.C; ++c)
              for (int64_t kh = 0; kh < k; ++kh) {
                const int64_t iy = iy0 + kh;
                if (iy < 0 || iy >= s.H) continue;
                acc_t* dst = dxptr + ((b * s.C + c) * s.H + iy) * s.W + ix0;
                const acc_t* src = row + (c * k + kh) * k;
                for (int64_t kw = kw_lo; kw < kw_hi; ++kw) dst[kw] += src[kw];
              }
          }
        }
      }
    });
    dx = dx_acc.to(x.scalar_type());
  });
  return dx;
}

}  // namespace
}  // namespace eit_fast

TORCH_LIBRARY_IMPL(eit_fast, CPU, m) {
  m.impl("patch_projection", &eit_fast::forward_cpu);
  m.impl("patch_projection_backward_weight", &eit_fast::backward_weight_cpu);
  m.impl("patch_projection_backward_input", &eit_fast::backward_input_cpu);
}
