// CPU implementation of the patch projection ops.
//
// Forward, two schedules (use_direct() is the one place that chooses):
// - direct, when the kernel is a whole number of strides (k = kk * stride, the 224 px stem's 16 = 4 x 4) and
//   fp32/bf16 on AVX2 or AVX-512: the conv is then a kk x kk stride-1 conv over cells, stride x stride blocks
//   of x holding Cp = C * stride^2 values each (space-to-depth). x is read once into that cell image, stored
//   in 8-channel blocks ([Cp / 8][X][8] per cell row), so neighbouring conv positions along ox read the same
//   values 8 floats apart and the micro-kernel reads its MR rows in place: no patch is ever gathered, and the
//   patch matrix never exists. The reduction runs one cell row at a time, so the weight block in use
//   (kk * Cp x NR) stays in L1.
// - gather, otherwise (the 32 px stem's 3 x 3 / stride 1, odd strides, fp64, the generic kernel): a tile of
//   pooled tokens has its patches gathered into a cache-sized buffer as panels of MR rows, [K/16][MR][16].
// Both fold the conv values into each token's running max and argmax; only pooled tokens are written, the
// conv map never exists.
// Micro-kernels, chosen at run time (EIT_FAST_CPU_ISA=avx2|avx512|generic forces one): AVX-512 12 x 32 (24
// zmm accumulators), AVX2 + FMA 6 x 16 (12 ymm), and a generic one (any dtype, gather only).
// x is read with its own strides: NCHW rows run along kw, channels_last (NHWC) rows run over (kw, c), k*C
// values at a time, so gathered patch elements are then ordered (kh, kw, c) and the weights are packed to
// match; other strides are read element by element. No copy of x is made.
// Backward follows each pooled gradient to its argmax conv position only (see backward_weight_cpu).
// Arithmetic in float for fp32/bf16 inputs, double for fp64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define EIT_FAST_X86 1
#endif

#include "../patch_projection.h"

namespace eit_fast {
namespace {

// ---- how x is read -----------------------------------------------------------------------------------------

// Strides of x and the order of a patch's elements ("kidx"): (c, kh, kw), or (kh, kw, c) for channels_last.
struct XView {
  enum Kind { nchw, nhwc, strided } kind;
  int64_t sB, sC, sH, sW;
};

XView view_of(const at::Tensor& x) {
  XView v{XView::strided, x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  if (v.sW == 1) v.kind = XView::nchw;
  else if (v.sC == 1 && v.sW == x.size(1) && x.size(1) > 1) v.kind = XView::nhwc;
  return v;
}

// Natural index ((c * k + kh) * k + kw) of each kidx in this view's order.
std::vector<int64_t> natural_index(const PatchShape& s, const XView& v) {
  std::vector<int64_t> nat(size_t(s.K()));
  for (int64_t i = 0; i < s.K(); ++i) {
    if (v.kind != XView::nhwc) {
      nat[size_t(i)] = i;
    } else {
      const int64_t c = i % s.C, r = i / s.C, kw = r % s.k, kh = r / s.k;
      nat[size_t(i)] = (c * s.k + kh) * s.k + kw;
    }
  }
  return nat;
}

// Walks the patch of the conv position whose first input pixel is (iy0, ix0) in image b, in kidx order:
// copy(kidx, offset, n) for n elements contiguous in x from `offset` (n = 1 for other strides),
// zero(kidx, n) for n elements in the zero padding.
template <class Copy, class Zero>
inline void for_runs(const PatchShape& s, const XView& v, int64_t b, int64_t iy0, int64_t ix0, Copy&& copy,
                     Zero&& zero) {
  const int64_t k = s.k;
  const int64_t kw_lo = std::clamp<int64_t>(-ix0, 0, k), kw_hi = std::clamp<int64_t>(s.W - ix0, kw_lo, k);
  const int64_t base = b * v.sB + ix0 * v.sW;
  if (v.kind == XView::nhwc) {  // rows of k*C values
    const int64_t row = k * s.C;
    for (int64_t kh = 0; kh < k; ++kh) {
      const int64_t iy = iy0 + kh, kidx = kh * row;
      if (iy < 0 || iy >= s.H) { zero(kidx, row); continue; }
      if (kw_lo > 0) zero(kidx, kw_lo * s.C);
      if (kw_hi > kw_lo) copy(kidx + kw_lo * s.C, base + iy * v.sH + kw_lo * s.C, (kw_hi - kw_lo) * s.C);
      if (kw_hi < k) zero(kidx + kw_hi * s.C, (k - kw_hi) * s.C);
    }
    return;
  }
  for (int64_t c = 0; c < s.C; ++c)
    for (int64_t kh = 0; kh < k; ++kh) {
      const int64_t iy = iy0 + kh, kidx = (c * k + kh) * k;
      if (iy < 0 || iy >= s.H) { zero(kidx, k); continue; }
      if (kw_lo > 0) zero(kidx, kw_lo);
      const int64_t off = base + c * v.sC + iy * v.sH;
      if (v.kind == XView::nchw) {
        if (kw_hi > kw_lo) copy(kidx + kw_lo, off + kw_lo, kw_hi - kw_lo);
      } else {
        for (int64_t kw = kw_lo; kw < kw_hi; ++kw) copy(kidx + kw, off + kw * v.sW, 1);
      }
      if (kw_hi < k) zero(kidx + kw_hi, k - kw_hi);
    }
}

// First input pixel of conv row (token t of the image, window offset w).
inline void conv_origin(const PatchShape& s, int64_t t, int64_t w, int64_t& iy0, int64_t& ix0) {
  iy0 = ((t / s.Wp) * s.pool + w / s.pool) * s.stride - s.pad;
  ix0 = ((t % s.Wp) * s.pool + w % s.pool) * s.stride - s.pad;
}

// The patch of conv row (b, t, w) into dst[kidx] (one contiguous row).
template <typename scalar_t, typename acc_t>
inline void gather_row(const PatchShape& s, const XView& v, const scalar_t* x, int64_t b, int64_t t, int64_t w,
                       acc_t* dst) {
  int64_t iy0, ix0;
  conv_origin(s, t, w, iy0, ix0);
  for_runs(s, v, b, iy0, ix0,
           [&](int64_t kidx, int64_t off, int64_t n) {
             for (int64_t i = 0; i < n; ++i) dst[kidx + i] = static_cast<acc_t>(x[off + i]);
           },
           [&](int64_t kidx, int64_t n) { std::fill(dst + kidx, dst + kidx + n, acc_t(0)); });
}

constexpr int64_t KC = 16;  // patch elements per panel chunk

// The patch of conv row (b, t, w) as row r of an MR-row panel [K/KC][MR][KC] at dst.
template <int MR, typename scalar_t, typename acc_t>
inline void gather_panel_row(const PatchShape& s, const XView& v, const scalar_t* x, int64_t b, int64_t t,
                             int64_t w, acc_t* dst, int r) {
  auto at = [&](int64_t kidx) { return dst + ((kidx / KC) * MR + r) * KC + kidx % KC; };
  int64_t iy0, ix0;
  conv_origin(s, t, w, iy0, ix0);
  for_runs(s, v, b, iy0, ix0,
           [&](int64_t kidx, int64_t off, int64_t n) {
             while (n > 0) {  // split at chunk boundaries; each piece is contiguous at both ends
               const int64_t m = std::min(n, KC - kidx % KC);
               acc_t* d = at(kidx);
               for (int64_t i = 0; i < m; ++i) d[i] = static_cast<acc_t>(x[off + i]);
               kidx += m, off += m, n -= m;
             }
           },
           [&](int64_t kidx, int64_t n) {
             while (n > 0) {
               const int64_t m = std::min(n, KC - kidx % KC);
               std::fill(at(kidx), at(kidx) + m, acc_t(0));
               kidx += m, n -= m;
             }
           });
}

// Functions compiled for AVX-512, AVX2 and the baseline, picked when the library loads (the file itself is
// built for the baseline x86-64 ISA).
#ifdef EIT_FAST_X86
#define EIT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define EIT_CLONES
#endif

// ---- micro-kernels -----------------------------------------------------------------------------------------

// One step of the fused conv + max-pool for MR rows (tokens at one window offset) x NR channels:
//   v[r][j] = bias[j] + sum_kk P[r][kk] * W[kk * NR + j],  P[r][kk] at ((kk / KC) * MR + r) * KC + kk % KC
//   best[r][j], best_w[r][j] <- v[r][j], w   when w == 0, v > best or v is NaN
// which is PyTorch's max-pool rule (the first maximum in window order wins ties; NaN propagates).
template <typename acc_t>
using MicroKernel = void (*)(const acc_t* P, int64_t chunks, const acc_t* W, const acc_t* bias, acc_t* best,
                             int32_t* best_w, int32_t w);

template <typename acc_t, int MR, int NR>
void micro_kernel_generic(const acc_t* P, int64_t chunks, const acc_t* W, const acc_t* bias, acc_t* best,
                          int32_t* best_w, int32_t w) {
  acc_t acc[MR][NR] = {};
  for (int64_t kk = 0; kk < chunks * KC; ++kk)
    for (int r = 0; r < MR; ++r) {
      const acc_t a = P[((kk / KC) * MR + r) * KC + kk % KC];
      for (int j = 0; j < NR; ++j) acc[r][j] += a * W[kk * NR + j];
    }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) {
      const acc_t v = acc[r][j] + bias[j];
      if (w == 0 || v > best[r * NR + j] || std::isnan(v)) { best[r * NR + j] = v; best_w[r * NR + j] = w; }
    }
}

#ifdef EIT_FAST_X86
// AVX2 + FMA, 6 x 16: 12 accumulators, 2 weight vectors and a broadcast fill the 16 ymm registers. Named
// accumulators: an array here makes GCC store them to the stack on every iteration.
__attribute__((target("avx2,fma"))) void micro_kernel_avx2(const float* P, int64_t chunks, const float* W,
                                                            const float* bias, float* best, int32_t* best_w,
                                                            int32_t w) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
         c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t ch = 0; ch < chunks; ++ch, P += 6 * KC, W += KC * 16) {
#pragma GCC unroll 16
    for (int kw = 0; kw < KC; ++kw) {
      const __m256 w0 = _mm256_loadu_ps(W + kw * 16), w1 = _mm256_loadu_ps(W + kw * 16 + 8);
      __m256 a = _mm256_broadcast_ss(P + kw);
      c00 = _mm256_fmadd_ps(a, w0, c00); c01 = _mm256_fmadd_ps(a, w1, c01);
      a = _mm256_broadcast_ss(P + KC + kw);
      c10 = _mm256_fmadd_ps(a, w0, c10); c11 = _mm256_fmadd_ps(a, w1, c11);
      a = _mm256_broadcast_ss(P + 2 * KC + kw);
      c20 = _mm256_fmadd_ps(a, w0, c20); c21 = _mm256_fmadd_ps(a, w1, c21);
      a = _mm256_broadcast_ss(P + 3 * KC + kw);
      c30 = _mm256_fmadd_ps(a, w0, c30); c31 = _mm256_fmadd_ps(a, w1, c31);
      a = _mm256_broadcast_ss(P + 4 * KC + kw);
      c40 = _mm256_fmadd_ps(a, w0, c40); c41 = _mm256_fmadd_ps(a, w1, c41);
      a = _mm256_broadcast_ss(P + 5 * KC + kw);
      c50 = _mm256_fmadd_ps(a, w0, c50); c51 = _mm256_fmadd_ps(a, w1, c51);
    }
  }
  const __m256 acc[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  const __m256 wv = _mm256_castsi256_ps(_mm256_set1_epi32(w));
  const __m256 all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (int r = 0; r < 6; ++r)
    for (int h = 0; h < 2; ++h) {
      float* bp = best + r * 16 + 8 * h;
      float* ip = reinterpret_cast<float*>(best_w + r * 16 + 8 * h);
      const __m256 v = _mm256_add_ps(acc[r][h], _mm256_loadu_ps(bias + 8 * h));
      const __m256 b = _mm256_loadu_ps(bp);
      const __m256 take = w == 0 ? all : _mm256_or_ps(_mm256_cmp_ps(v, b, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      _mm256_storeu_ps(bp, _mm256_blendv_ps(b, v, take));
      _mm256_storeu_ps(ip, _mm256_blendv_ps(_mm256_loadu_ps(ip), wv, take));
    }
}

// AVX-512, 12 x 32: 24 zmm accumulators, 2 weight vectors and a broadcast (27 of the 32 registers).
#define EIT_ROW(r) __m512 c##r##0 = _mm512_setzero_ps(), c##r##1 = _mm512_setzero_ps();
#define EIT_FMA(r)                                        \
  {                                                       \
    const __m512 a = _mm512_set1_ps(P[0x##r * KC + kw]);  \
    c##r##0 = _mm512_fmadd_ps(a, w0, c##r##0);            \
    c##r##1 = _mm512_fmadd_ps(a, w1, c##r##1);            \
  }
#define EIT_FOLD(r, v0, v1) fold_avx512(r, v0, v1, bias, best, best_w, w);
// best, best_w <- v + bias, w where w == 0, the new value is larger or NaN (two 16-lane halves of a row)
__attribute__((target("avx512f"))) inline void fold_avx512(int r, __m512 v0, __m512 v1, const float* bias,
                                                            float* best, int32_t* best_w, int32_t w) {
  const __m512 v[2] = {_mm512_add_ps(v0, _mm512_loadu_ps(bias)), _mm512_add_ps(v1, _mm512_loadu_ps(bias + 16))};
  const __m512i wv = _mm512_set1_epi32(w);
  for (int h = 0; h < 2; ++h) {
    float* bp = best + r * 32 + 16 * h;
    int32_t* ip = best_w + r * 32 + 16 * h;
    const __m512 b = _mm512_loadu_ps(bp);
    const __mmask16 take = w == 0 ? __mmask16(0xffff)
                                  : __mmask16(_mm512_cmp_ps_mask(v[h], b, _CMP_GT_OQ) |
                                              _mm512_cmp_ps_mask(v[h], v[h], _CMP_UNORD_Q));
    _mm512_storeu_ps(bp, _mm512_mask_blend_ps(take, b, v[h]));
    _mm512_storeu_si512(ip, _mm512_mask_blend_epi32(take, _mm512_loadu_si512(ip), wv));
  }
}
__attribute__((target("avx512f"))) void micro_kernel_avx512(const float* P, int64_t chunks, const float* W,
                                                             const float* bias, float* best, int32_t* best_w,
                                                             int32_t w) {
  EIT_ROW(0) EIT_ROW(1) EIT_ROW(2) EIT_ROW(3) EIT_ROW(4) EIT_ROW(5)
  EIT_ROW(6) EIT_ROW(7) EIT_ROW(8) EIT_ROW(9) EIT_ROW(a) EIT_ROW(b)
  for (int64_t ch = 0; ch < chunks; ++ch, P += 12 * KC, W += KC * 32) {
#pragma GCC unroll 16
    for (int kw = 0; kw < KC; ++kw) {
      const __m512 w0 = _mm512_loadu_ps(W + kw * 32), w1 = _mm512_loadu_ps(W + kw * 32 + 16);
      EIT_FMA(0) EIT_FMA(1) EIT_FMA(2) EIT_FMA(3) EIT_FMA(4) EIT_FMA(5)
      EIT_FMA(6) EIT_FMA(7) EIT_FMA(8) EIT_FMA(9) EIT_FMA(a) EIT_FMA(b)
    }
  }
  EIT_FOLD(0, c00, c01) EIT_FOLD(1, c10, c11) EIT_FOLD(2, c20, c21) EIT_FOLD(3, c30, c31)
  EIT_FOLD(4, c40, c41) EIT_FOLD(5, c50, c51) EIT_FOLD(6, c60, c61) EIT_FOLD(7, c70, c71)
  EIT_FOLD(8, c80, c81) EIT_FOLD(9, c90, c91) EIT_FOLD(10, ca0, ca1) EIT_FOLD(11, cb0, cb1)
}
#undef EIT_ROW
#undef EIT_FMA
#undef EIT_FOLD
#endif

// Direct-path micro-kernels: C[r][0:NR] (+)= sum_j A_r[j] * W[j * NR : j * NR + NR] for r < MR, where A_r is
// conv position r of a run along ox in one cell row: kk cells of Cp values, stored in blocks of 8 channels
// with the cells of a row side by side ([cb][X][8], `block` = Xc * 8 floats per channel block), so rows are
// 8 floats apart at every j and every address is a fixed offset from one pointer (a runtime row stride
// makes GCC keep 96 addresses on the stack). acc: add to C.
using DirectKernel = void (*)(const float* A, int64_t block, int64_t kk, int64_t blocks, const float* W, float* C,
                              bool acc);

#ifdef EIT_FAST_X86
template <int MR>
__attribute__((target("avx512f"))) void direct_avx512(const float* A, int64_t block, int64_t kk, int64_t blocks,
                                                       const float* W, float* C, bool acc) {
  __m512 c[MR][2];  // fully unrolled below, so GCC keeps these in registers
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    c[r][0] = acc ? _mm512_loadu_ps(C + r * 32) : _mm512_setzero_ps();
    c[r][1] = acc ? _mm512_loadu_ps(C + r * 32 + 16) : _mm512_setzero_ps();
  }
  for (int64_t q = 0; q < kk; ++q) {
    const float* a = A + q * 8;
    for (int64_t cb = 0; cb < blocks; ++cb, a += block, W += 8 * 32) {
#pragma GCC unroll 8
      for (int kw = 0; kw < 8; ++kw) {
        const __m512 w0 = _mm512_loadu_ps(W + kw * 32), w1 = _mm512_loadu_ps(W + kw * 32 + 16);
#pragma GCC unroll 12
        for (int r = 0; r < MR; ++r) {
          const __m512 x = _mm512_set1_ps(a[r * 8 + kw]);
          c[r][0] = _mm512_fmadd_ps(x, w0, c[r][0]);
          c[r][1] = _mm512_fmadd_ps(x, w1, c[r][1]);
        }
      }
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(C + r * 32, c[r][0]);
    _mm512_storeu_ps(C + r * 32 + 16, c[r][1]);
  }
}

template <int MR>
__attribute__((target("avx2,fma"))) void direct_avx2(const float* A, int64_t block, int64_t kk, int64_t blocks,
                                                      const float* W, float* C, bool acc) {
  __m256 c[MR][2];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    c[r][0] = acc ? _mm256_loadu_ps(C + r * 16) : _mm256_setzero_ps();
    c[r][1] = acc ? _mm256_loadu_ps(C + r * 16 + 8) : _mm256_setzero_ps();
  }
  for (int64_t q = 0; q < kk; ++q) {
    const float* a = A + q * 8;
    for (int64_t cb = 0; cb < blocks; ++cb, a += block, W += 8 * 16) {
#pragma GCC unroll 8
      for (int kw = 0; kw < 8; ++kw) {
        const __m256 w0 = _mm256_loadu_ps(W + kw * 16), w1 = _mm256_loadu_ps(W + kw * 16 + 8);
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) {
          const __m256 x = _mm256_broadcast_ss(a + r * 8 + kw);
          c[r][0] = _mm256_fmadd_ps(x, w0, c[r][0]);
          c[r][1] = _mm256_fmadd_ps(x, w1, c[r][1]);
        }
      }
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(C + r * 16, c[r][0]);
    _mm256_storeu_ps(C + r * 16 + 8, c[r][1]);
  }
}

// [m - 1]: the kernel for m rows, the full MR and every shorter tail of a conv row.
template <int... M>
constexpr std::array<DirectKernel, sizeof...(M)> avx512_rows(std::integer_sequence<int, M...>) {
  return {&direct_avx512<M + 1>...};
}
template <int... M>
constexpr std::array<DirectKernel, sizeof...(M)> avx2_rows(std::integer_sequence<int, M...>) {
  return {&direct_avx2<M + 1>...};
}
#endif

// ---- which micro-kernel --------------------------------------------------------------------------------------

enum class Isa { generic, avx2, avx512 };

bool supported(Isa isa) {
#ifdef EIT_FAST_X86
  if (isa == Isa::avx512) return __builtin_cpu_supports("avx512f");
  if (isa == Isa::avx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == Isa::generic;
}

// The best this CPU has, unless EIT_FAST_CPU_ISA names one (read at every call, so tests can switch it).
Isa cpu_isa() {
  const char* env = std::getenv("EIT_FAST_CPU_ISA");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto") {
    for (Isa isa : {Isa::avx512, Isa::avx2})
      if (supported(isa)) return isa;
    return Isa::generic;
  }
  const Isa isa = want == "avx512" ? Isa::avx512 : want == "avx2" ? Isa::avx2 : Isa::generic;
  TORCH_CHECK(want == "avx512" || want == "avx2" || want == "generic",
              "EIT_FAST_CPU_ISA must be avx512, avx2, generic or auto, got '", want, "'");
  TORCH_CHECK(supported(isa), "EIT_FAST_CPU_ISA=", want, " but this CPU does not support it");
  return isa;
}

std::string isa_name(Isa isa) { return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "generic"; }

// ---- forward, gather schedule ----------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t, int MR, int NR>
void forward_tiles(const PatchShape& s, const XView& v, const scalar_t* xptr, const at::Tensor& weight,
                   const at::Tensor& bias, scalar_t* optr, uint8_t* aptr, MicroKernel<acc_t> mk) {
  const int64_t K = s.K(), chunks = (K + KC - 1) / KC, Kp = chunks * KC, D = s.D, win = s.window();
  const int64_t panels = (D + NR - 1) / NR, Dpad = panels * NR;
  // Weights packed in panels of NR channels, (panels, Kp, NR) in kidx order, zero-padded: each micro-kernel
  // call streams one contiguous panel. Bias zero-padded to Dpad.
  std::vector<acc_t> wpk(size_t(panels * Kp * NR), acc_t(0)), bpad(size_t(Dpad), acc_t(0));
  {
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor w = weight.detach().reshape({D, K}).to(acc_type).contiguous();
    const at::Tensor bb = bias.detach().to(acc_type).contiguous();
    const acc_t* wp = w.data_ptr<acc_t>();
    const std::vector<int64_t> nat = natural_index(s, v);
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t kk = 0; kk < K; ++kk) wpk[size_t(((d / NR) * Kp + kk) * NR + d % NR)] = wp[d * K + nat[size_t(kk)]];
      bpad[size_t(d)] = bb.data_ptr<acc_t>()[d];
    }
  }
  // Tokens per tile, a multiple of MR: the tile's patches (window x tokens x Kp) stay within about 256 KB.
  const int64_t fit = (256 * 1024) / int64_t(win * Kp * int64_t(sizeof(acc_t)));
  const int64_t tpt = std::min(std::max<int64_t>(MR, fit / MR * MR), (s.T() + MR - 1) / MR * MR);
  const int64_t tiles = (s.T() + tpt - 1) / tpt;
  at::parallel_for(0, s.B * tiles, 1, [&](int64_t begin, int64_t end) {
    // P: per window, panels of MR tokens, each [Kp / KC][MR][KC]; best / best_w: the running max and its
    // window index, (panels, tokens, NR).
    std::vector<acc_t> P(size_t(win * tpt * Kp)), best(size_t(panels * tpt * NR));
    std::vector<int32_t> best_w(size_t(panels * tpt * NR));
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / tiles, t0 = (u % tiles) * tpt, nt = std::min(tpt, s.T() - t0);
      const int64_t ntp = (nt + MR - 1) / MR * MR;  // padded to whole micro-kernel rows (zero patches)
      for (int64_t w = 0; w < win; ++w)
        for (int64_t tt = 0; tt < ntp; tt += MR) {
          acc_t* panel = P.data() + (w * tpt + tt) * Kp;
          if (Kp > K)  // the last chunk's tail: zero (the padded weights are zero too, but 0 * garbage is not)
            for (int r = 0; r < MR; ++r) std::fill(panel + ((chunks - 1) * MR + r) * KC, panel + ((chunks - 1) * MR + r + 1) * KC, acc_t(0));
          for (int r = 0; r < MR; ++r) {
            if (tt + r < nt) gather_panel_row<MR>(s, v, xptr, b, t0 + tt + r, w, panel, r);
            else for (int64_t ch = 0; ch < chunks; ++ch) std::fill(panel + (ch * MR + r) * KC, panel + (ch * MR + r + 1) * KC, acc_t(0));
          }
        }
      for (int64_t pn = 0; pn < panels; ++pn)
        for (int64_t w = 0; w < win; ++w)
          for (int64_t tb = 0; tb < ntp; tb += MR)
            mk(P.data() + (w * tpt + tb) * Kp, chunks, wpk.data() + pn * Kp * NR, bpad.data() + pn * NR,
               best.data() + (pn * tpt + tb) * NR, best_w.data() + (pn * tpt + tb) * NR, int32_t(w));
      for (int64_t tt = 0; tt < nt; ++tt) {
        const int64_t n = b * s.T() + t0 + tt;
        for (int64_t d = 0; d < D; ++d) {
          const int64_t i = ((d / NR) * tpt + tt) * NR + d % NR;
          optr[n * D + d] = static_cast<scalar_t>(best[size_t(i)]);
          aptr[n * D + d] = uint8_t(best_w[size_t(i)]);
        }
      }
    }
  });
}

// ---- forward, direct schedule -----------------------------------------------------------------------------

// Cells cover the conv positions the pool keeps (Hcut x Wcut): cell (Y, X) holds x rows
// Y*stride - pad + a and columns X*stride - pad + c2 (a, c2 < stride) as channel ch = (a * stride + c2) * C + c,
// zero outside x. Conv position (oy, ox) reads cells (oy + p, ox + q), p, q < kk. A cell row is stored as
// [Cp / 8][Xc][8] (see DirectKernel).
struct CellGrid {
  int64_t kk, Cp, Hcut, Wcut, Yc, Xc;
  explicit CellGrid(const PatchShape& s)
      : kk(s.k / s.stride), Cp(s.C * s.stride * s.stride), Hcut(s.Hp * s.pool), Wcut(s.Wp * s.pool),
        Yc(Hcut + kk - 1), Xc(Wcut + kk - 1) {}
  int64_t row() const { return Xc * Cp; }  // floats per cell row
  int64_t image() const { return Yc * row(); }
  int64_t at(int64_t Y, int64_t X, int64_t ch) const { return Y * row() + ((ch / 8) * Xc + X) * 8 + ch % 8; }
  // Natural weight index ((c * k + kh) * k + kw) of reduction index j = (p * kk + q) * Cp + ch, the order the
  // micro-kernel walks a conv position's cells.
  int64_t natural(const PatchShape& s, int64_t j) const {
    const int64_t ch = j % Cp, pq = j / Cp, c = ch % s.C, c2 = (ch / s.C) % s.stride, a = ch / (s.C * s.stride);
    return (c * s.k + (pq / kk) * s.stride + a) * s.k + (pq % kk) * s.stride + c2;
  }
};

// Image b of x into its cells (float), zero where the cells reach past x.
template <typename scalar_t>
void to_cells(const PatchShape& s, const XView& v, const scalar_t* x, int64_t b, const CellGrid& g, float* dst) {
  std::fill(dst, dst + g.image(), 0.f);
  for (int64_t Y = 0; Y < g.Yc; ++Y)
    for (int64_t a = 0; a < s.stride; ++a) {
      const int64_t iy = Y * s.stride - s.pad + a;
      if (iy < 0 || iy >= s.H) continue;
      for (int64_t c = 0; c < s.C; ++c)
        for (int64_t c2 = 0; c2 < s.stride; ++c2) {
          const scalar_t* src = x + b * v.sB + c * v.sC + iy * v.sH;
          float* out = dst + g.at(Y, 0, (a * s.stride + c2) * s.C + c);  // cell X is 8 floats further
          // columns ix = X * stride - pad + c2 inside x
          const int64_t X_lo = std::max<int64_t>(0, (s.pad - c2 + s.stride - 1) / s.stride);
          const int64_t X_hi = std::min(g.Xc, (s.W - 1 + s.pad - c2) / s.stride + 1);
          for (int64_t X = X_lo; X < X_hi; ++X) out[X * 8] = static_cast<float>(src[(X * s.stride - s.pad + c2) * v.sW]);
        }
    }
}

// One conv row (Wcut positions x NR channels, at pool-window row wy) into its tokens' running max and argmax:
// best, best_w <- v + bias, w where w == 0, the new value is larger or NaN: PyTorch's max-pool rule (the
// first maximum in window order wins ties; NaN propagates). Rows come in order, so windows do too.
EIT_CLONES void fold_row(const float* __restrict__ conv, int64_t Wcut, int64_t pool, int64_t wy, int64_t nr,
                         const float* __restrict__ bias, float* __restrict__ best, int32_t* __restrict__ best_w) {
  for (int64_t ox = 0; ox < Wcut; ++ox) {
    const int32_t w = int32_t(wy * pool + ox % pool);
    const float* v = conv + ox * nr;
    float* bt = best + (ox / pool) * nr;
    int32_t* bw = best_w + (ox / pool) * nr;
    for (int64_t j = 0; j < nr; ++j) {
      const float x = v[j] + bias[j];
      const bool take = (w == 0) | (x > bt[j]) | (x != x);
      bt[j] = take ? x : bt[j];
      bw[j] = take ? w : bw[j];
    }
  }
}

template <typename scalar_t, int MR, int NR>
void forward_direct(const PatchShape& s, const XView& v, const scalar_t* xptr, const at::Tensor& weight,
                    const at::Tensor& bias, scalar_t* optr, uint8_t* aptr, const DirectKernel* rows) {
  const CellGrid g(s);
  const int64_t K = s.K(), D = s.D, T = s.T(), seg = g.kk * g.Cp;  // reduction values per kernel cell row
  const int64_t panels = (D + NR - 1) / NR;
  // Weights in panels of NR channels, (panels, K, NR) in the cells' reduction order, zero-padded past D.
  std::vector<float> wpk(size_t(panels * K * NR), 0.f), bpad(size_t(panels * NR), 0.f);
  {
    const at::Tensor w = weight.detach().reshape({D, K}).to(at::kFloat).contiguous();
    const at::Tensor bb = bias.detach().to(at::kFloat).contiguous();
    const float* wp = w.const_data_ptr<float>();
    std::vector<int64_t> nat(static_cast<size_t>(K));
    for (int64_t i = 0; i < K; ++i) nat[size_t(i)] = g.natural(s, i);
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t pn = begin; pn < end; ++pn)
        for (int64_t d = pn * NR; d < std::min(D, pn * NR + NR); ++d)
          for (int64_t i = 0; i < K; ++i) wpk[size_t((pn * K + i) * NR + d % NR)] = wp[d * K + nat[size_t(i)]];
    });
    std::copy(bb.const_data_ptr<float>(), bb.const_data_ptr<float>() + D, bpad.begin());
  }
  // A cell row that lies wholly in the padding adds exactly zero, so it is skipped, unless a weight is not
  // finite (then 0 * w is NaN, as in the reference).
  const bool skip_padding = std::all_of(wpk.begin(), wpk.end(), [](float w) { return std::isfinite(w); });
  std::vector<char> row_in_x(size_t(g.Yc));
  for (int64_t Y = 0; Y < g.Yc; ++Y)
    row_in_x[size_t(Y)] = Y * s.stride - s.pad + s.stride > 0 && Y * s.stride - s.pad < s.H;

  // Images in groups whose cells stay within about 64 MB; within a group, one task per (image, panel).
  const int64_t group = std::clamp<int64_t>((64 << 20) / (g.image() * int64_t(sizeof(float))), 1, s.B);
  std::vector<float> cells(size_t(group * g.image()));
  for (int64_t b0 = 0; b0 < s.B; b0 += group) {
    const int64_t nb = std::min(group, s.B - b0);
    at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) to_cells(s, v, xptr, b0 + i, g, cells.data() + i * g.image());
    });
    at::parallel_for(0, nb * panels, 1, [&](int64_t begin, int64_t end) {
      // One token row (pool conv rows) at a time, so the buffers stay in L1 at any image size:
      // conv (pool, Wcut, NR) for this panel, best / best_w (Wp, NR) for the row's tokens.
      std::vector<float> conv(size_t(s.pool * g.Wcut * NR)), best(size_t(s.Wp * NR));
      std::vector<int32_t> best_w(size_t(s.Wp * NR));
      std::vector<char> started(size_t(s.pool));
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = b0 + u / panels, pn = u % panels, d0 = pn * NR, nd = std::min<int64_t>(NR, D - d0);
        const float* img = cells.data() + (u / panels) * g.image();
        for (int64_t ty = 0; ty < s.Hp; ++ty) {
          std::fill(started.begin(), started.end(), 0);
          for (int64_t p = 0; p < g.kk; ++p) {  // one cell row of the kernel at a time: 24 KB of weights
            const float* wq = wpk.data() + (pn * K + p * seg) * NR;
            for (int64_t wy = 0; wy < s.pool; ++wy) {
              const int64_t oy = ty * s.pool + wy;
              if (skip_padding && !row_in_x[size_t(oy + p)]) continue;
              const float* arow = img + (oy + p) * g.row();
              for (int64_t ox = 0; ox < g.Wcut; ox += MR) {
                const int64_t m = std::min<int64_t>(MR, g.Wcut - ox);
                rows[m - 1](arow + ox * 8, g.Xc * 8, g.kk, g.Cp / 8, wq, conv.data() + (wy * g.Wcut + ox) * NR,
                            started[size_t(wy)]);
              }
              started[size_t(wy)] = 1;
            }
          }
          // Fold in window order: for each token, its windows (wy, ox % pool) come row-major.
          for (int64_t wy = 0; wy < s.pool; ++wy) {
            float* row = conv.data() + wy * g.Wcut * NR;
            if (!started[size_t(wy)]) std::fill(row, row + g.Wcut * NR, 0.f);
            fold_row(row, g.Wcut, s.pool, wy, NR, bpad.data() + pn * NR, best.data(), best_w.data());
          }
          for (int64_t tx = 0; tx < s.Wp; ++tx) {
            const int64_t n = b * T + ty * s.Wp + tx;
            for (int64_t j = 0; j < nd; ++j) {
              optr[n * D + d0 + j] = static_cast<scalar_t>(best[size_t(tx * NR + j)]);
              aptr[n * D + d0 + j] = uint8_t(best_w[size_t(tx * NR + j)]);
            }
          }
        }
      }
    });
  }
}

// ---- forward: the op -------------------------------------------------------------------------------------------

// The one place that picks the forward's schedule: direct where the kernel is a whole number of strides
// (k = kk * stride), cells are whole 8-channel blocks (Cp = C * stride^2) and the CPU has a vector kernel for
// the input's type (fp32, bf16); else gather.
bool use_direct(const PatchShape& s, at::ScalarType dtype, Isa isa) {
  return s.k % s.stride == 0 && s.C * s.stride * s.stride % 8 == 0 && isa != Isa::generic &&
         (dtype == at::kFloat || dtype == at::kBFloat16);
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                               int64_t stride, int64_t padding, int64_t pool) {
  const PatchShape s = check_forward_args(x, weight, bias, stride, padding, pool);
  const XView v = view_of(x);
  at::Tensor out = at::empty({s.B, s.T(), s.D}, x.options());
  at::Tensor argmax = at::empty({s.B, s.T(), s.D}, x.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, argmax};
  const Isa isa = cpu_isa();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "eit_fast::patch_projection (CPU)", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xptr = x.const_data_ptr<scalar_t>();
    scalar_t* optr = out.data_ptr<scalar_t>();
    uint8_t* aptr = argmax.data_ptr<uint8_t>();
    if constexpr (std::is_same_v<acc_t, float>) {
#ifdef EIT_FAST_X86
      static constexpr auto rows512 = avx512_rows(std::make_integer_sequence<int, 12>{});
      static constexpr auto rows2 = avx2_rows(std::make_integer_sequence<int, 6>{});
      if (use_direct(s, x.scalar_type(), isa)) {
        if (isa == Isa::avx512) return forward_direct<scalar_t, 12, 32>(s, v, xptr, weight, bias, optr, aptr, rows512.data());
        if (isa == Isa::avx2) return forward_direct<scalar_t, 6, 16>(s, v, xptr, weight, bias, optr, aptr, rows2.data());
      }
      if (isa == Isa::avx512) return forward_tiles<scalar_t, float, 12, 32>(s, v, xptr, weight, bias, optr, aptr, &micro_kernel_avx512);
      if (isa == Isa::avx2) return forward_tiles<scalar_t, float, 6, 16>(s, v, xptr, weight, bias, optr, aptr, &micro_kernel_avx2);
#endif
    }
    forward_tiles<scalar_t, acc_t, 6, 16>(s, v, xptr, weight, bias, optr, aptr, &micro_kernel_generic<acc_t, 6, 16>);
  });
  return {out, argmax};
}

// ---- backward --------------------------------------------------------------------------------------------------

// The backward is sparse: each pooled gradient g[n][d] belongs to one conv position, the argmax window w, so
// dW[d] += g[n][d] * P[n][w] and dP[n][w] += g[n][d] * W[d] (rows of length C*k*k), which is window^2 times
// less work than a dense GEMM on the routed conv-output gradient, and never materialises that gradient.

// y += a x (EIT_CLONES: compiled for AVX-512, AVX2 and the baseline, picked when the library loads).
EIT_CLONES void axpy(float* __restrict__ y, const float* __restrict__ x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}
EIT_CLONES void axpy(double* __restrict__ y, const double* __restrict__ x, double a, int64_t n) {
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

// (D, K) in kidx order -> (D, C, k, k)
at::Tensor to_natural(const at::Tensor& dw_kidx, const PatchShape& s, const XView& v) {
  if (v.kind != XView::nhwc) return dw_kidx.view({s.D, s.C, s.k, s.k});
  return dw_kidx.view({s.D, s.k, s.k, s.C}).permute({0, 3, 1, 2}).contiguous();
}

std::tuple<at::Tensor, at::Tensor> backward_weight_cpu(const at::Tensor& grad_in, const at::Tensor& argmax_in,
                                                       const at::Tensor& x, const at::Tensor& weight,
                                                       int64_t stride, int64_t padding, int64_t pool) {
  const PatchShape s = check_backward_args(grad_in, argmax_in, x, weight, stride, padding, pool);
  const at::Tensor grad = grad_in.contiguous(), argmax = argmax_in.contiguous();
  const XView v = view_of(x);
  at::Tensor dweight, dbias;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "eit_fast::patch_projection_backward_weight (CPU)",
                                 [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const int64_t K = s.K(), D = s.D, win = s.window(), T = s.T();
    // One (D, K) accumulator per thread, summed at the end: no shared writes in the parallel loop.
    at::Tensor partial = at::zeros({at::get_num_threads(), D, K}, acc_opts);
    const scalar_t* xptr = x.const_data_ptr<scalar_t>();
    const scalar_t* gptr = grad.const_data_ptr<scalar_t>();
    const uint8_t* aptr = argmax.const_data_ptr<uint8_t>();
    acc_t* part = partial.data_ptr<acc_t>();
    at::parallel_for(0, s.N(), 1, [&](int64_t begin, int64_t end) {
      acc_t* dw = part + at::get_thread_num() * D * K;
      std::vector<acc_t> P(size_t(win * K));
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t w = 0; w < win; ++w) gather_row(s, v, xptr, n / T, n % T, w, P.data() + w * K);
        const scalar_t* g = gptr + n * D;
        const uint8_t* a = aptr + n * D;
        for (int64_t d = 0; d < D; ++d) {
          const acc_t gd = static_cast<acc_t>(g[d]);
          if (gd != acc_t(0)) axpy(dw + d * K, P.data() + a[d] * K, gd, K);
        }
      }
    });
    dweight = to_natural(partial.sum(0), s, v).to(weight.scalar_type());
    dbias = grad.sum(at::IntArrayRef{0, 1}, false, acc_opts.dtype().toScalarType()).to(weight.scalar_type());
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
    const int64_t K = s.K(), win = s.window(), T = s.T(), D = s.D;
    // dx in x's memory format (dense x) or contiguous; its strides and kidx order drive the fold-back.
    at::Tensor dx_acc = at::zeros_like(x, acc_opts, at::MemoryFormat::Preserve);
    const XView v = view_of(dx_acc);
    const std::vector<int64_t> nat = natural_index(s, v);
    const at::Tensor wnat = weight.detach().reshape({D, K}).to(acc_opts).contiguous();
    std::vector<acc_t> wk(size_t(D * K));  // W rows in kidx order
    for (int64_t d = 0; d < D; ++d)
      for (int64_t kk = 0; kk < K; ++kk) wk[size_t(d * K + kk)] = wnat.data_ptr<acc_t>()[d * K + nat[size_t(kk)]];
    acc_t* dxptr = dx_acc.data_ptr<acc_t>();
    const scalar_t* gptr = grad.const_data_ptr<scalar_t>();
    const uint8_t* aptr = argmax.const_data_ptr<uint8_t>();
    // One image per task: an image's patches overlap, so its pixels take adds from many tokens.
    at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> dP(size_t(win * K));
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t t = 0; t < T; ++t) {
          const int64_t n = b * T + t;
          std::fill(dP.begin(), dP.end(), acc_t(0));
          for (int64_t d = 0; d < D; ++d) {
            const acc_t gd = static_cast<acc_t>(gptr[n * D + d]);
            if (gd != acc_t(0)) axpy(dP.data() + aptr[n * D + d] * K, wk.data() + d * K, gd, K);
          }
          for (int64_t w = 0; w < win; ++w) {  // fold the token's patch gradients back onto the input
            const acc_t* row = dP.data() + w * K;
            int64_t iy0, ix0;
            conv_origin(s, t, w, iy0, ix0);
            for_runs(s, v, b, iy0, ix0,
                     [&](int64_t kidx, int64_t off, int64_t cnt) {
                       for (int64_t i = 0; i < cnt; ++i) dxptr[off + i] += row[kidx + i];
                     },
                     [](int64_t, int64_t) {});
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

TORCH_LIBRARY_FRAGMENT(eit_fast, m) {
  // Which CPU micro-kernel the next call uses: avx512, avx2 or generic (EIT_FAST_CPU_ISA can force one).
  m.def("patch_projection_cpu_isa() -> str", [] { return eit_fast::isa_name(eit_fast::cpu_isa()); });
  // Distinct threads one at::parallel_for of this library runs on (1 if it was built without OpenMP).
  m.def("cpu_parallel_threads() -> int", [] {
    std::vector<char> seen(size_t(at::get_num_threads()), 0);
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { seen[size_t(at::get_thread_num())] = 1; });
    return int64_t(std::count(seen.begin(), seen.end(), 1));
  });
  // The schedule the next forward of this stem takes: "direct" or "gather" (see the top of this file).
  m.def("patch_projection_cpu_schedule(int channels, int kernel, int stride, ScalarType dtype) -> str",
        [](int64_t channels, int64_t kernel, int64_t stride, at::ScalarType dtype) -> std::string {
          TORCH_CHECK(channels >= 1 && kernel >= 1 && stride >= 1, "patch_projection_cpu_schedule: need channels, ",
                      "kernel and stride >= 1, got ", channels, ", ", kernel, ", ", stride);
          const eit_fast::PatchShape s = eit_fast::make_patch_shape(1, channels, kernel, kernel, 1, kernel, stride, 0, 1);
          return eit_fast::use_direct(s, dtype, eit_fast::cpu_isa()) ? "direct" : "gather";
        });
}

TORCH_LIBRARY_IMPL(eit_fast, CPU, m) {
  m.impl("patch_projection", &eit_fast::forward_cpu);
  m.impl("patch_projection_backward_weight", &eit_fast::backward_weight_cpu);
  m.impl("patch_projection_backward_input", &eit_fast::backward_input_cpu);
}
