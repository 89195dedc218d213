// CUDA kernels of the fused conv + max-pool patch projection, forward and backward, and their launchers.
//
// Torch-free on purpose: nvcc compiles this through patch_projection.cu, and g++ compiles the very same
// source against emulation.h (EIT_FAST_EMULATE_CUDA) so the tests run these kernels on the CPU.
//
// All three kernels are tiled implicit GEMMs on one 256-thread layout: a 32 x 64 output tile, each thread
// owning a 2 x 4 micro-tile at rows ty + 16 r and columns tx + 16 q (conflict-free shared reads), and a
// reduction chunk of 16 staged in shared memory. Row index of the conv output that pooled output n sees at
// window offset w (0 <= w < pool*pool, row-major in the window): (n, w).
#pragma once
#include <cstdint>

#include "../shape.h"

#ifdef EIT_FAST_EMULATE_CUDA
#include "emulation.h"
#define EIT_LAUNCH(kernel, grid, block, stream, ...) ::eit_fast::emu::launch(grid, block, kernel, __VA_ARGS__)
#define EIT_UNROLL
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define EIT_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#define EIT_UNROLL _Pragma("unroll")
#endif

namespace eit_fast {
namespace kernels {

constexpr int kThreads = 256;
constexpr int kRows = 32;   // tile rows: 16 thread rows x 2
constexpr int kCols = 64;   // tile columns: 16 thread columns x 4
constexpr int kChunk = 16;  // reduction chunk staged in shared memory

// Loads and stores in T, arithmetic in Acc (float for fp32/fp16/bf16, double for fp64).
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
template <typename T> __device__ __forceinline__ T from_acc(typename AccOf<T>::type v) { return T(v); }
#ifndef EIT_FAST_EMULATE_CUDA
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
#endif

// Index math fixed per launch, in 32-bit (the launchers refuse larger tensors).
struct Geo {
  int C, H, W, D, k, stride, pad, pool, Wp, T, N, K, kk2;
  static Geo of(const PatchShape& s) {
    return Geo{int(s.C), int(s.H), int(s.W), int(s.D), int(s.k), int(s.stride), int(s.pad), int(s.pool),
               int(s.Wp), int(s.T()), int(s.N()), int(s.K()), int(s.k * s.k)};
  }
};

// Input offset that conv row (n, w) reads at reduction index kidx (c, kh, kw), or -1 in the zero padding.
__device__ __forceinline__ int patch_offset(const Geo& g, int n, int w, int kidx) {
  const int b = n / g.T, t = n - b * g.T;
  const int ph = t / g.Wp, pw = t - ph * g.Wp;
  const int i = w / g.pool, j = w - i * g.pool;
  const int c = kidx / g.kk2, r = kidx - c * g.kk2;
  const int kh = r / g.k, kw = r - kh * g.k;
  const int iy = (ph * g.pool + i) * g.stride - g.pad + kh;
  const int ix = (pw * g.pool + j) * g.stride - g.pad + kw;
  if (iy < 0 || iy >= g.H || ix < 0 || ix >= g.W) return -1;
  return ((b * g.C + c) * g.H + iy) * g.W + ix;
}

// acc[r][q] += sum_c A[c][ty + 16 r] * Bm[c][tx + 16 q] over one staged chunk.
template <typename Acc>
__device__ __forceinline__ void tile_fma(const Acc (*A)[kRows], const Acc (*Bm)[kCols], int tx, int ty,
                                         Acc (&acc)[2][4]) {
  EIT_UNROLL
  for (int c = 0; c < kChunk; ++c) {
    const Acc a0 = A[c][ty], a1 = A[c][ty + 16];
    EIT_UNROLL
    for (int q = 0; q < 4; ++q) {
      const Acc bq = Bm[c][tx + 16 * q];
      acc[0][q] += a0 * bq;
      acc[1][q] += a1 * bq;
    }
  }
}

// Forward. Tile: 32 pooled outputs (rows n) x 64 channels (columns d). For each window offset w the
// thread computes its conv values over the whole reduction, adds the bias and folds them into a running
// max kept in registers; only the pooled value and its window index are written.
// Max-pool semantics of PyTorch: a later value replaces the max if it is larger or NaN, so the first
// maximum in row-major window order wins ties and NaN propagates.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
forward_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
               T* __restrict__ out, uint8_t* __restrict__ argmax, Geo g) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc Ps[kChunk][kRows];
  __shared__ Acc Ws[kChunk][kCols];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int n0 = blockIdx.x * kRows, d0 = blockIdx.y * kCols;
  Acc best[2][4];
  int best_w[2][4];
  Acc bias_q[4];
  EIT_UNROLL
  for (int q = 0; q < 4; ++q) {
    const int d = d0 + tx + 16 * q;
    bias_q[q] = d < g.D ? to_acc(bias[d]) : Acc(0);
    EIT_UNROLL
    for (int r = 0; r < 2; ++r) { best[r][q] = -INFINITY; best_w[r][q] = 0; }
  }
  const int windows = g.pool * g.pool;
  for (int w = 0; w < windows; ++w) {
    Acc acc[2][4] = {};
    for (int k0 = 0; k0 < g.K; k0 += kChunk) {
      for (int e = tid; e < kChunk * kRows; e += kThreads) {  // patches: rows fastest
        const int c = e / kRows, row = e % kRows, n = n0 + row, kidx = k0 + c;
        int off = -1;
        if (n < g.N && kidx < g.K) off = patch_offset(g, n, w, kidx);
        Ps[c][row] = off >= 0 ? to_acc(x[off]) : Acc(0);
      }
      for (int e = tid; e < kChunk * kCols; e += kThreads) {  // weights: reduction fastest (contiguous)
        const int col = e / kChunk, c = e % kChunk, d = d0 + col, kidx = k0 + c;
        Ws[c][col] = (d < g.D && kidx < g.K) ? to_acc(weight[d * g.K + kidx]) : Acc(0);
      }
      __syncthreads();
      tile_fma<Acc>(Ps, Ws, tx, ty, acc);
      __syncthreads();
    }
    EIT_UNROLL
    for (int r = 0; r < 2; ++r) {
      EIT_UNROLL
      for (int q = 0; q < 4; ++q) {
        const Acc v = acc[r][q] + bias_q[q];
        if (v > best[r][q] || v != v) { best[r][q] = v; best_w[r][q] = w; }
      }
    }
  }
  EIT_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int n = n0 + ty + 16 * r;
    if (n >= g.N) continue;
    EIT_UNROLL
    for (int q = 0; q < 4; ++q) {
      const int d = d0 + tx + 16 * q;
      if (d >= g.D) continue;
      out[n * g.D + d] = from_acc<T>(best[r][q]);
      argmax[n * g.D + d] = uint8_t(best_w[r][q]);
    }
  }
}

// Gradient of the conv output at row (n, w), channel d: the pooled gradient where w was the argmax.
template <typename T>
__device__ __forceinline__ typename AccOf<T>::type routed_grad(const T* grad, const uint8_t* argmax, int n,
                                                               int w, int d, int D) {
  using Acc = typename AccOf<T>::type;
  return argmax[n * D + d] == w ? to_acc(grad[n * D + d]) : Acc(0);
}

// dW[d][kidx] = sum over conv rows (n, w) of routed_grad(n, w, d) * patch(n, w, kidx).
// Tile: 32 reduction indices (rows) x 64 channels (columns); blockIdx.z takes a slice of the conv rows and
// adds its partial sums into the fp32 (fp64) dW with atomics.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
weight_grad_kernel(const T* __restrict__ grad, const uint8_t* __restrict__ argmax, const T* __restrict__ x,
                   typename AccOf<T>::type* __restrict__ dweight, Geo g, int rows_per_slice) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc Ps[kChunk][kRows];
  __shared__ Acc Gs[kChunk][kCols];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int k0 = blockIdx.x * kRows, d0 = blockIdx.y * kCols;
  const int windows = g.pool * g.pool, total = g.N * windows;
  const int row_begin = blockIdx.z * rows_per_slice;
  const int row_end = row_begin + rows_per_slice < total ? row_begin + rows_per_slice : total;
  Acc acc[2][4] = {};
  for (int r0 = row_begin; r0 < row_end; r0 += kChunk) {
    for (int e = tid; e < kChunk * kRows; e += kThreads) {
      const int c = e / kRows, col = e % kRows, row = r0 + c, kidx = k0 + col;
      int off = -1;
      if (row < row_end && kidx < g.K) off = patch_offset(g, row / windows, row % windows, kidx);
      Ps[c][col] = off >= 0 ? to_acc(x[off]) : Acc(0);
    }
    for (int e = tid; e < kChunk * kCols; e += kThreads) {  // channels fastest (contiguous)
      const int c = e / kCols, col = e % kCols, row = r0 + c, d = d0 + col;
      Gs[c][col] = (row < row_end && d < g.D) ? routed_grad(grad, argmax, row / windows, row % windows, d, g.D)
                                              : Acc(0);
    }
    __syncthreads();
    tile_fma<Acc>(Ps, Gs, tx, ty, acc);
    __syncthreads();
  }
  EIT_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int kidx = k0 + ty + 16 * r;
    if (kidx >= g.K) continue;
    EIT_UNROLL
    for (int q = 0; q < 4; ++q) {
      const int d = d0 + tx + 16 * q;
      if (d < g.D) atomicAdd(&dweight[d * g.K + kidx], acc[r][q]);
    }
  }
}

// dX: dpatch(n, w, kidx) = sum_d routed_grad(n, w, d) * W[d][kidx], added into the fp32 (fp64) dx at the
// input pixel that patch element reads (overlapping patches meet there, hence atomics).
// Tile: 32 conv rows x 64 reduction indices; the sum runs over channels.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
input_grad_kernel(const T* __restrict__ grad, const uint8_t* __restrict__ argmax, const T* __restrict__ weight,
                  typename AccOf<T>::type* __restrict__ dx, Geo g) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc Gs[kChunk][kRows];
  __shared__ Acc Ws[kChunk][kCols];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int windows = g.pool * g.pool, total = g.N * windows;
  const int row0 = blockIdx.x * kRows, k0 = blockIdx.y * kCols;
  Acc acc[2][4] = {};
  for (int c0 = 0; c0 < g.D; c0 += kChunk) {
    for (int e = tid; e < kChunk * kRows; e += kThreads) {  // channels fastest (contiguous)
      const int row = row0 + e / kChunk, c = e % kChunk, d = c0 + c;
      Gs[c][e / kChunk] = (row < total && d < g.D) ? routed_grad(grad, argmax, row / windows, row % windows, d, g.D)
                                                   : Acc(0);
    }
    for (int e = tid; e < kChunk * kCols; e += kThreads) {  // reduction index fastest (contiguous)
      const int c = e / kCols, col = e % kCols, d = c0 + c, kidx = k0 + col;
      Ws[c][col] = (d < g.D && kidx < g.K) ? to_acc(weight[d * g.K + kidx]) : Acc(0);
    }
    __syncthreads();
    tile_fma<Acc>(Gs, Ws, tx, ty, acc);
    __syncthreads();
  }
  EIT_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + ty + 16 * r;
    if (row >= total) continue;
    EIT_UNROLL
    for (int q = 0; q < 4; ++q) {
      const int kidx = k0 + tx + 16 * q;
      if (kidx >= g.K) continue;
      const int off = patch_offset(g, row / windows, row % windows, kidx);
      if (off >= 0) atomicAdd(&dx[off], acc[r][q]);
    }
  }
}

inline int ceil_div(int64_t a, int64_t b) { return int((a + b - 1) / b); }

// Launchers. `stream` is the caller's (torch's current) stream; the caller checks the launch error.
template <typename T>
void launch_forward(const T* x, const T* weight, const T* bias, T* out, uint8_t* argmax, const PatchShape& s,
                    cudaStream_t stream) {
  const Geo g = Geo::of(s);
  auto* kernel = &forward_kernel<T>;
  EIT_LAUNCH(kernel, dim3(ceil_div(s.N(), kRows), ceil_div(s.D, kCols)), dim3(kThreads), stream,
             x, weight, bias, out, argmax, g);
}

// dweight: zeroed (D, K) buffer in the accumulation type.
template <typename T>
void launch_weight_grad(const T* grad, const uint8_t* argmax, const T* x, typename AccOf<T>::type* dweight,
                        const PatchShape& s, cudaStream_t stream) {
  const Geo g = Geo::of(s);
  const int64_t total = s.N() * s.window();
  const int rows_per_slice = 1024;  // a few hundred blocks at the EIT shapes; few atomics per block
  auto* kernel = &weight_grad_kernel<T>;
  EIT_LAUNCH(kernel, dim3(ceil_div(s.K(), kRows), ceil_div(s.D, kCols), ceil_div(total, rows_per_slice)),
             dim3(kThreads), stream, grad, argmax, x, dweight, g, rows_per_slice);
}

// dx: zeroed (B, C, H, W) buffer in the accumulation type.
template <typename T>
void launch_input_grad(const T* grad, const uint8_t* argmax, const T* weight, typename AccOf<T>::type* dx,
                       const PatchShape& s, cudaStream_t stream) {
  const Geo g = Geo::of(s);
  auto* kernel = &input_grad_kernel<T>;
  EIT_LAUNCH(kernel, dim3(ceil_div(s.N() * s.window(), kRows), ceil_div(s.K(), kCols)), dim3(kThreads), stream,
             grad, argmax, weight, dx, g);
}

}  // namespace kernels
}  // namespace eit_fast
