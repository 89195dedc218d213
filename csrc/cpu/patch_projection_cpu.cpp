// CPU implementation of the patch projection ops.
//
// The image is cut into tiles of pooled tokens. For a tile, the patches of every conv position its pool
// windows cover are gathered into a cache-sized matrix P (rows = token x window offset, columns = C*k*k),
// one BLAS GEMM gives their conv values (rows x D, D innermost), and a pass over the window offsets keeps the
// running max and its window index per channel. Only the pooled tokens leave the cache; the full conv map is
// never written. Backward rebuilds the same tiles: the pooled gradient routed through the argmax gives a
// sparse conv-output gradient G for the tile, dW += G^T P and dP = G W (folded back onto the input).
// Arithmetic in float for fp32/bf16 inputs, double for fp64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../patch_projection.h"

namespace eit_fast {
namespace {

// Pooled tokens per tile: keep P (rows x K) and the conv tile (rows x D) within about half of L2.
int64_t tokens_per_tile(const PatchShape& s) {
  const int64_t rows = std::clamp<int64_t>((128 * 1024) / (s.K() + s.D), s.window(), 512);
  return std::max<int64_t>(1, rows / s.window());
}

// P[row][c*k*k + kh*k + kw] for the conv positions of tokens [t0, t0 + nt) of image b; row = tt*window + w.
template <typename scalar_t, typename acc_t>
void gather_patches(const PatchShape& s, const scalar_t* x, int64_t b, int64_t t0, int64_t nt, acc_t* P) {
  const int64_t K = s.K(), k = s.k;
  for (int64_t tt = 0; tt < nt; ++tt) {
    const int64_t t = t0 + tt, ph = t / s.Wp, pw = t % s.Wp;
    for (int64_t w = 0; w < s.window(); ++w) {
      acc_t* row = P + (tt * s.window() + w) * K;
      const int64_t iy0 = (ph * s.pool + w / s.pool) * s.stride - s.pad;
      const int64_t ix0 = (pw * s.pool + w % s.pool) * s.stride - s.pad;
      const int64_t kw_lo = std::max<int64_t>(0, -ix0), kw_hi = std::min<int64_t>(k, s.W - ix0);
      for (int64_t c = 0; c < s.C; ++c) {
        for (int64_t kh = 0; kh < k; ++kh) {
          acc_t* dst = row + (c * k + kh) * k;
          const int64_t iy = iy0 + kh;
          if (iy < 0 || iy >= s.H || kw_lo >= kw_hi) {
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

// G[row][d]: the pooled gradient of token tt where w is its argmax, else 0.
template <typename scalar_t, typename acc_t>
void route_grad(const PatchShape& s, const scalar_t* grad, const uint8_t* argmax, int64_t n0, int64_t nt,
                acc_t* G) {
  const int64_t D = s.D;
  for (int64_t tt = 0; tt < nt; ++tt) {
    const scalar_t* g = grad + (n0 + tt) * D;
    const uint8_t* a = argmax + (n0 + tt) * D;
    for (int64_t w = 0; w < s.window(); ++w) {
      acc_t* row = G + (tt * s.window() + w) * D;
      for (int64_t d = 0; d < D; ++d) row[d] = a[d] == w ? static_cast<acc_t>(g[d]) : acc_t(0);
    }
  }
}

at::Tensor matrix(void* data, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  return at::from_blob(data, {rows, cols}, opts);
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
    const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor wt = weight.detach().reshape({s.D, s.K()}).to(acc_opts).t();  // (K, D): D innermost in the GEMM
    const at::Tensor bias_acc = bias.detach().to(acc_opts).contiguous();
    const acc_t* bptr = bias_acc.data_ptr<acc_t>();
    const scalar_t* xptr = x.data_ptr<scalar_t>();
    scalar_t* optr = out.data_ptr<scalar_t>();
    uint8_t* aptr = argmax.data_ptr<uint8_t>();
    const int64_t tpt = tokens_per_tile(s), tiles = (s.T() + tpt - 1) / tpt, win = s.window(), D = s.D;
    at::parallel_for(0, s.B * tiles, 1, [&](int64_t begin, int64_t end) {
      at::NoGradGuard no_grad;  // the GEMMs write into plain buffers; autograd is the op's own
      std::vector<acc_t> P(tpt * win * s.K()), conv(tpt * win * D), best(D);
      std::vector<uint8_t> best_w(D);
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u / tiles, t0 = (u % tiles) * tpt, nt = std::min(tpt, s.T() - t0), rows = nt * win;
        gather_patches(s, xptr, b, t0, nt, P.data());
        at::Tensor conv_m = matrix(conv.data(), rows, D, acc_opts);
        at::mm_out(conv_m, matrix(P.data(), rows, s.K(), acc_opts), wt);
        for (int64_t tt = 0; tt < nt; ++tt) {
          const acc_t* c0 = conv.data() + tt * win * D;
          for (int64_t d = 0; d < D; ++d) { best[d] = c0[d] + bptr[d]; best_w[d] = 0; }
          for (int64_t w = 1; w < win; ++w) {
            const acc_t* cw = c0 + w * D;
            for (int64_t d = 0; d < D; ++d) {
              const acc_t v = cw[d] + bptr[d];
              const bool take = v > best[d] || v != v;  // PyTorch's rule: first max wins, NaN propagates
              best[d] = take ? v : best[d];
              best_w[d] = take ? uint8_t(w) : best_w[d];
            }
          }
          const int64_t n = b * s.T() + t0 + tt;
          for (int64_t d = 0; d < D; ++d) optr[n * D + d] = static_cast<scalar_t>(best[d]);
          std::memcpy(aptr + n * D, best_w.data(), D);
        }
      }
    });
  });
  return {out, argmax};
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
    dbias = grad.sum({0, 1}, false, acc_opts.dtype().toScalarType()).to(weight.scalar_type());
    // One (D, K) accumulator per thread, summed at the end: no shared writes in the parallel loop.
    at::Tensor partial = at::zeros({at::get_num_threads(), s.D, s.K()}, acc_opts);
    const int64_t tpt = tokens_per_tile(s), tiles = (s.T() + tpt - 1) / tpt, win = s.window();
    const scalar_t* xptr = x.data_ptr<scalar_t>();
    const scalar_t* gptr = grad.data_ptr<scalar_t>();
    const uint8_t* aptr = argmax.data_ptr<uint8_t>();
    at::parallel_for(0, s.B * tiles, 1, [&](int64_t begin, int64_t end) {
      at::NoGradGuard no_grad;
      at::Tensor acc = partial[at::get_thread_num()];
      std::vector<acc_t> P(tpt * win * s.K()), G(tpt * win * s.D);
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u / tiles, t0 = (u % tiles) * tpt, nt = std::min(tpt, s.T() - t0), rows = nt * win;
        gather_patches(s, xptr, b, t0, nt, P.data());
        route_grad(s, gptr, aptr, b * s.T() + t0, nt, G.data());
        acc.addmm_(matrix(G.data(), rows, s.D, acc_opts).t(), matrix(P.data(), rows, s.K(), acc_opts));
      }
    });
    dweight = partial.sum(0).view(weight.sizes()).to(weight.scalar_type());
  });
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
    const at::Tensor wmat = weight.detach().reshape({s.D, s.K()}).to(acc_opts).contiguous();
    at::Tensor dx_acc = at::zeros({s.B, s.C, s.H, s.W}, acc_opts);
    acc_t* dxptr = dx_acc.data_ptr<acc_t>();
    const scalar_t* gptr = grad.data_ptr<scalar_t>();
    const uint8_t* aptr = argmax.data_ptr<uint8_t>();
    const int64_t tpt = tokens_per_tile(s), win = s.window(), K = s.K(), k = s.k;
    // One image per task: overlapping patches of an image add into the same pixels.
    at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
      at::NoGradGuard no_grad;
      std::vector<acc_t> G(tpt * win * s.D), dP(tpt * win * K);
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t t0 = 0; t0 < s.T(); t0 += tpt) {
          const int64_t nt = std::min(tpt, s.T() - t0), rows = nt * win;
          route_grad(s, gptr, aptr, b * s.T() + t0, nt, G.data());
          at::Tensor dP_m = matrix(dP.data(), rows, K, acc_opts);
          at::mm_out(dP_m, matrix(G.data(), rows, s.D, acc_opts), wmat);
          for (int64_t tt = 0; tt < nt; ++tt) {  // fold dP back onto the input (col2im)
            const int64_t t = t0 + tt, ph = t / s.Wp, pw = t % s.Wp;
            for (int64_t w = 0; w < win; ++w) {
              const acc_t* row = dP.data() + (tt * win + w) * K;
              const int64_t iy0 = (ph * s.pool + w / s.pool) * s.stride - s.pad;
              const int64_t ix0 = (pw * s.pool + w % s.pool) * s.stride - s.pad;
              const int64_t kw_lo = std::max<int64_t>(0, -ix0), kw_hi = std::min<int64_t>(k, s.W - ix0);
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
