// CUDA kernels of the fused conv + max-pool patch projection (forward, weight gradient, input gradient) and
// their launchers. Torch-free: nvcc compiles this through patch_projection.cu, and g++ compiles the same
// source against emulation.h (EIT_FAST_EMULATE_CUDA) so the tests run these kernels on the CPU.
//
// All three are implicit GEMMs over "conv rows": conv row (n, w) is the conv position that pooled token n
// sees at window offset w (row-major in the pool window), and its patch is the K = C*k*k input values the
// kernel reads there, in "kidx" order (c, kh, kw), or (kh, kw, c) for channels_last input, whose
// contiguous runs are then k*C long. The patches are never written to memory: each block gathers the piece
// it needs into shared memory.
//   forward  out[n][d] = max_w (bias[d] + W[d] . patch(n, w)), argmax[n][d] = the first w reaching it
//   weight   dW[d] = sum_(n, w) routed(n, w, d) patch(n, w),  routed = grad[n][d] where argmax[n][d] == w
//   input    dx  += routed(n, w, :) W, folded back onto the pixels each patch element read
// Math: bf16 and fp16 operands on tensor cores (mma.sync m16n8k16), fp32 operands on tensor cores as tf32
// (m16n8k8) or exactly with FMA; accumulation in fp32 throughout (docs/design.md section 3).
//
// Block tile: 8 warps, 128 rows x BN columns (BN = 128, 112 or 80, picked per D so that D = 250, 330, 400, 464
// waste little padding), each warp a (16 MI) x (8 NI) tile of mma fragments. The reduction is staged 64 bytes
// at a time (32 bf16/fp16 or 16 fp32 values) through a 3-stage cp.async ring in shared memory: one
// __syncthreads per stage. Shared-memory rows are padded so that ldmatrix, the cp.async writes and the
// epilogue's stores are free of bank conflicts (the padding rules are next to each layout).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdio>

#include "../shape.h"
#include "launch.h"
#include "warp_ops.cuh"

#ifdef EIT_FAST_EMULATE_CUDA
#define EIT_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::eit_fast::emu::launch(grid, block, smem, kernel, __VA_ARGS__)
#define EIT_HD
#else
#define EIT_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define EIT_HD __host__ __device__
#endif

namespace eit_fast {
namespace kernels {

// ---- geometry --------------------------------------------------------------------------------------------

// n / d by a multiply-high and a shift (no division instruction): for 0 <= n < 2^31, 1 <= d < 2^31.
struct FastDiv {
  uint32_t m = 1, s = 0;
  static FastDiv of(uint32_t d) {
    FastDiv f;
    while (f.s < 31 && (uint32_t(1) << f.s) < d) ++f.s;
    f.m = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << f.s) - d)) / d + 1);
    return f;
  }
  EIT_HD uint32_t div(uint32_t n) const { return (dev::umulhi(n, m) + n) >> s; }
};

// Index math of one launch, 32-bit (a launch covers at most kIndexLimit elements of any tensor).
struct Geo {
  int C, H, W, D, k, stride, pad, pool, Hp, Wp, T, N, K, Kpad;
  int sB, sC, sH, sW;  // element strides of x (and of the fp32 dx buffer)
  int channels_last;   // kidx order (kh, kw, c) instead of (c, kh, kw)
  int vec;             // x's runs of 4 kidx are contiguous, aligned and in or out of the image together
  FastDiv divT, divWp;
};

// Where patch element kidx lies relative to the conv position's first pixel; padding entries (kidx >= K)
// get an offset that is out of bounds for every row (images are limited to kMaxSide pixels a side).
struct Tap {
  int delta;
  int16_t kh, kw;
};
constexpr int kMaxSide = 8192;

// kidx -> (c, kh, kw) in the launch's order. Used once per table entry or packed element, never per MAC.
EIT_HD inline void decompose(const Geo& g, int kidx, int& c, int& kh, int& kw) {
  if (g.channels_last) {
    c = kidx % g.C;
    const int r = kidx / g.C;
    kw = r % g.k;
    kh = r / g.k;
  } else {
    kw = kidx % g.k;
    const int r = kidx / g.k;
    kh = r % g.k;
    c = r / g.k;
  }
}

EIT_HD inline Tap make_tap(const Geo& g, int kidx) {
  if (kidx >= g.K) return Tap{0, int16_t(0x7fff), int16_t(0x7fff)};
  int c, kh, kw;
  decompose(g, kidx, c, kh, kw);
  return Tap{c * g.sC + kh * g.sH + kw * g.sW, int16_t(kh), int16_t(kw)};
}

// A conv row's position: first pixel offset of its image, and the top-left input coordinate of window
// offset 0 (the window offset adds (wi, wj) * stride).
struct RowPos {
  int base, oy, ox;
};
__device__ __forceinline__ RowPos row_pos(const Geo& g, int n) {
  if (n >= g.N) return RowPos{0, -(g.pool * g.stride + g.k + 1), 0};  // out of bounds for every tap
  const int b = int(g.divT.div(uint32_t(n))), t = n - b * g.T;
  const int ph = int(g.divWp.div(uint32_t(t))), pw = t - ph * g.Wp;
  return RowPos{b * g.sB, ph * g.pool * g.stride - g.pad, pw * g.pool * g.stride - g.pad};
}

// ---- math policies ---------------------------------------------------------------------------------------

using cuda::Math;
using cuda::XStrides;
using cuda::Device;

template <Math M> struct Op;
template <> struct Op<Math::bf16> {
  using T = dev::bf16_t;
  static constexpr bool mma = true, tf32 = false;
  __device__ static void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { dev::mma_bf16(d, a, b); }
};
template <> struct Op<Math::f16> {
  using T = dev::half_t;
  static constexpr bool mma = true, tf32 = false;
  __device__ static void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { dev::mma_f16(d, a, b); }
};
template <> struct Op<Math::tf32> {
  using T = float;
  static constexpr bool mma = true, tf32 = true;
  __device__ static void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { dev::mma_tf32(d, a, b); }
};
template <> struct Op<Math::fma> {
  using T = float;
  static constexpr bool mma = false, tf32 = false;
};

// ---- tiles -----------------------------------------------------------------------------------------------

template <int MI_, int NI_, int WM_, int WN_>
struct Tile {
  static constexpr int MI = MI_, NI = NI_, WM = WM_, WN = WN_;
  static constexpr int BM = 16 * MI * WM, BN = 8 * NI * WN;
  static constexpr int kThreads = 256, kStages = 3;
  static_assert(WM * WN == 8 && BM == 128, "the copy layouts assume 8 warps and 128 rows");
};
using TileA = Tile<4, 4, 2, 4>;  // 128 x 128: D = 250 in 2 tiles (2.3% padding)
using TileB = Tile<2, 7, 4, 2>;  // 128 x 112: D = 330 in 3 tiles (1.8%)
using TileC = Tile<2, 5, 4, 2>;  // 128 x 80:  D = 400 in 5 tiles (exact), D = 464 in 6 (3.4%)
using TileF = Tile<2, 4, 4, 2>;  // 128 x 64:  the exact fp32 (FMA) path, whose fragments need more registers
enum class TileKind { A, B, C, F };

inline int tile_columns(TileKind t) {
  return t == TileKind::A ? 128 : t == TileKind::B ? 112 : t == TileKind::C ? 80 : 64;
}

// The tile whose column count pads D least (TileA on ties); the exact FMA path has TileF only.
inline TileKind choose_tile(int64_t D, Math m) {
  if (m == Math::fma) return TileKind::F;
  TileKind best = TileKind::A;
  int64_t best_cols = (D + 127) / 128 * 128;
  for (TileKind t : {TileKind::B, TileKind::C}) {
    const int64_t bn = tile_columns(t), cols = (D + bn - 1) / bn * bn;
    if (cols < best_cols) { best = t; best_cols = cols; }
  }
  return best;
}

constexpr int kRow = 80;  // bytes of a row of the [row][k] tiles: 64 bytes of reduction + 16 (see warp_nt)
constexpr int kKAlign = 32;  // Kpad: K rounded up to whole stages of every dtype (32 bf16 = 16 fp32 = 64 B)

template <int Size> struct alignas(4 * Size) Piece { uint32_t v[Size]; };  // 4 elements of Size bytes
struct alignas(8) F2 { float v[2]; };

// Row pitch of a [k][col] tile (weight gradient) or of the epilogue's output tile, in bytes: 16 bytes of
// padding makes ldmatrix(.trans) rows and 16-bit fragment stores conflict-free (a pitch of an odd number of
// 16-byte units); fp32 rows get 32 bytes, so that the pitch is 8 (mod 32) words and the scalar tf32 fragment
// loads and the float2 stores of eight rows hit distinct banks.
constexpr int padded_pitch(int cols, int size) { return cols * size + (size == 4 ? 32 : 16); }

// ---- warp tile arithmetic --------------------------------------------------------------------------------

// acc += A B^T over one 64-byte stage of the reduction, for [row][k] tiles (rows kRow = 80 bytes apart:
// eight consecutive rows start in eight different 16-byte bank groups, so ldmatrix is conflict-free).
// As and Bs point at the warp's first row. Fragment layouts: PTX ISA, mma.m16n8k16 / m16n8k8 and ldmatrix.
template <class O, int MI, int NI>
__device__ __forceinline__ void warp_nt(float (&acc)[MI][NI][4], const unsigned char* As, const unsigned char* Bs,
                                        int lane) {
  if constexpr (O::mma) {
    EIT_UNROLL
    for (int ks = 0; ks < 2; ++ks) {  // 32 bytes each: k16 of bf16/fp16, k8 of tf32
      uint32_t a[MI][4], b[NI][2];
      EIT_UNROLL
      for (int mi = 0; mi < MI; ++mi) {
        dev::ldmatrix_x4(a[mi], As + (mi * 16 + (lane & 15)) * kRow + ks * 32 + (lane >> 4) * 16);
        if constexpr (O::tf32) {
          EIT_UNROLL
          for (int j = 0; j < 4; ++j) a[mi][j] = dev::tf32_round(a[mi][j]);
        }
      }
      EIT_UNROLL
      for (int ni = 0; ni < NI; ni += 2) {
        if (ni + 1 < NI) {
          uint32_t r[4];
          dev::ldmatrix_x4(r, Bs + (ni * 8 + (lane & 7) + ((lane >> 4) << 3)) * kRow + ks * 32 + ((lane >> 3) & 1) * 16);
          b[ni][0] = r[0];
          b[ni][1] = r[1];
          b[ni + 1][0] = r[2];
          b[ni + 1][1] = r[3];
        } else {
          uint32_t r[2];
          dev::ldmatrix_x2(r, Bs + (ni * 8 + (lane & 7)) * kRow + ks * 32 + ((lane >> 3) & 1) * 16);
          b[ni][0] = r[0];
          b[ni][1] = r[1];
        }
      }
      EIT_UNROLL
      for (int mi = 0; mi < MI; ++mi) {
        EIT_UNROLL
        for (int ni = 0; ni < NI; ++ni) O::run(acc[mi][ni], a[mi], b[ni]);
      }
    }
  } else {  // exact fp32: the same (row, col) ownership as the mma accumulators, 2 k at a time (8-byte loads
            // of 8 distinct rows 80 bytes apart: conflict-free)
    const int g = lane >> 2, t = lane & 3;
    EIT_UNROLL
    for (int kq = 0; kq < 8; ++kq) {
      F2 a[MI][2], b[NI][2];
      EIT_UNROLL
      for (int mi = 0; mi < MI; ++mi) {
        a[mi][0] = *reinterpret_cast<const F2*>(As + (mi * 16 + g) * kRow + kq * 8);
        a[mi][1] = *reinterpret_cast<const F2*>(As + (mi * 16 + g + 8) * kRow + kq * 8);
      }
      EIT_UNROLL
      for (int ni = 0; ni < NI; ++ni) {
        b[ni][0] = *reinterpret_cast<const F2*>(Bs + (ni * 8 + 2 * t) * kRow + kq * 8);
        b[ni][1] = *reinterpret_cast<const F2*>(Bs + (ni * 8 + 2 * t + 1) * kRow + kq * 8);
      }
      EIT_UNROLL
      for (int kk = 0; kk < 2; ++kk) {
        EIT_UNROLL
        for (int mi = 0; mi < MI; ++mi) {
          EIT_UNROLL
          for (int ni = 0; ni < NI; ++ni) {
            EIT_UNROLL
            for (int r = 0; r < 4; ++r) acc[mi][ni][r] += a[mi][r >> 1].v[kk] * b[ni][r & 1].v[kk];
          }
        }
      }
    }
  }
}

// acc += A B^T over one stage for [k][row] tiles (weight gradient): the reduction runs down the rows, which
// are RSA / RSB bytes apart (padded_pitch). As / Bs point at the warp's first column.
template <class O, int MI, int NI, int RSA, int RSB>
__device__ __forceinline__ void warp_tt(float (&acc)[MI][NI][4], const unsigned char* As, const unsigned char* Bs,
                                        int lane) {
  if constexpr (O::mma && !O::tf32) {
    EIT_UNROLL
    for (int ks = 0; ks < 2; ++ks) {  // k16 each: 32 rows per stage
      uint32_t a[MI][4], b[NI][2];
      EIT_UNROLL
      for (int mi = 0; mi < MI; ++mi)
        dev::ldmatrix_x4_trans(a[mi], As + (ks * 16 + ((lane >> 4) << 3) + (lane & 7)) * RSA +
                                          (mi * 16 + ((lane >> 3) & 1) * 8) * 2);
      EIT_UNROLL
      for (int ni = 0; ni < NI; ni += 2) {
        const unsigned char* row = Bs + (ks * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * RSB;
        if (ni + 1 < NI) {
          uint32_t r[4];
          dev::ldmatrix_x4_trans(r, row + (ni * 8 + ((lane >> 4) << 3)) * 2);
          b[ni][0] = r[0];
          b[ni][1] = r[1];
          b[ni + 1][0] = r[2];
          b[ni + 1][1] = r[3];
        } else {
          uint32_t r[2];
          dev::ldmatrix_x2_trans(r, row + ni * 8 * 2);
          b[ni][0] = r[0];
          b[ni][1] = r[1];
        }
      }
      EIT_UNROLL
      for (int mi = 0; mi < MI; ++mi) {
        EIT_UNROLL
        for (int ni = 0; ni < NI; ++ni) O::run(acc[mi][ni], a[mi], b[ni]);
      }
    }
  } else if constexpr (O::mma) {  // tf32: ldmatrix cannot transpose 32-bit values; scalar loads instead
    const int g = lane >> 2, t = lane & 3;
    const float* Af = reinterpret_cast<const float*>(As);
    const float* Bf = reinterpret_cast<const float*>(Bs);
    constexpr int ra = RSA / 4, rb = RSB / 4;
    EIT_UNROLL
    for (int ks = 0; ks < 2; ++ks) {  // k8 each: 16 rows per stage
      uint32_t a[MI][4], b[NI][2];
      EIT_UNROLL
      for (int mi = 0; mi < MI; ++mi) {
        a[mi][0] = dev::tf32_round(dev::float_bits(Af[(ks * 8 + t) * ra + mi * 16 + g]));
        a[mi][1] = dev::tf32_round(dev::float_bits(Af[(ks * 8 + t) * ra + mi * 16 + g + 8]));
        a[mi][2] = dev::tf32_round(dev::float_bits(Af[(ks * 8 + t + 4) * ra + mi * 16 + g]));
        a[mi][3] = dev::tf32_round(dev::float_bits(Af[(ks * 8 + t + 4) * ra + mi * 16 + g + 8]));
      }
      EIT_UNROLL
      for (int ni = 0; ni < NI; ++ni) {
        b[ni][0] = dev::tf32_round(dev::float_bits(Bf[(ks * 8 + t) * rb + ni * 8 + g]));
        b[ni][1] = dev::tf32_round(dev::float_bits(Bf[(ks * 8 + t + 4) * rb + ni * 8 + g]));
      }
      EIT_UNROLL
      for (int mi = 0; mi < MI; ++mi) {
        EIT_UNROLL
        for (int ni = 0; ni < NI; ++ni) O::run(acc[mi][ni], a[mi], b[ni]);
      }
    }
  } else {
    const int g = lane >> 2, t = lane & 3;
    const float* Af = reinterpret_cast<const float*>(As);
    const float* Bf = reinterpret_cast<const float*>(Bs);
    constexpr int ra = RSA / 4, rb = RSB / 4;
    EIT_UNROLL
    for (int kk = 0; kk < 16; ++kk) {
      float a[MI][2];
      F2 b[NI];
      EIT_UNROLL
      for (int mi = 0; mi < MI; ++mi) {
        a[mi][0] = Af[kk * ra + mi * 16 + g];
        a[mi][1] = Af[kk * ra + mi * 16 + g + 8];
      }
      EIT_UNROLL
      for (int ni = 0; ni < NI; ++ni) b[ni] = *reinterpret_cast<const F2*>(Bf + kk * rb + ni * 8 + 2 * t);
      EIT_UNROLL
      for (int mi = 0; mi < MI; ++mi) {
        EIT_UNROLL
        for (int ni = 0; ni < NI; ++ni) {
          EIT_UNROLL
          for (int r = 0; r < 4; ++r) acc[mi][ni][r] += a[mi][r >> 1] * b[ni].v[r & 1];
        }
      }
    }
  }
}

// Raw bits of one element of x (or of grad): 16 or 32 bits.
template <int Size> struct BitsOf;
template <> struct BitsOf<2> { using type = uint16_t; };
template <> struct BitsOf<4> { using type = uint32_t; };

__device__ __forceinline__ uint32_t set_byte(uint32_t word, int i, uint32_t v) {
  return (word & ~(0xffu << (8 * i))) | (v << (8 * i));
}

// Gathers 4 consecutive patch elements of one conv row into shared memory: one cp.async when the run is
// contiguous (g.vec), else 4 loads into `regs`, written by store_piece once the stage's arithmetic is done.
template <typename T>
__device__ __forceinline__ void gather_piece(const Geo& g, const T* x, const Tap* taps, int kidx, int iy0, int ix0,
                                             int base, unsigned char* dst, Piece<sizeof(T)>& regs) {
  using Bits = typename BitsOf<sizeof(T)>::type;
  if (g.vec) {
    const Tap tp = taps[kidx];
    const bool ok = unsigned(iy0 + tp.kh) < unsigned(g.H) && unsigned(ix0 + tp.kw) < unsigned(g.W);
    dev::cp_async_ca<4 * sizeof(T)>(dst, ok ? static_cast<const void*>(x + (base + tp.delta)) : x, ok);
  } else {
    const Bits* xb = reinterpret_cast<const Bits*>(x);
    Bits v[4];
    EIT_UNROLL
    for (int e = 0; e < 4; ++e) {
      const Tap tp = taps[kidx + e];
      const bool ok = unsigned(iy0 + tp.kh) < unsigned(g.H) && unsigned(ix0 + tp.kw) < unsigned(g.W);
      v[e] = ok ? xb[base + tp.delta] : Bits(0);
    }
    if constexpr (sizeof(T) == 2) {
      regs.v[0] = uint32_t(v[0]) | (uint32_t(v[1]) << 16);
      regs.v[1] = uint32_t(v[2]) | (uint32_t(v[3]) << 16);
    } else {
      EIT_UNROLL
      for (int e = 0; e < 4; ++e) regs.v[e] = v[e];
    }
  }
}

// ---- forward ---------------------------------------------------------------------------------------------

template <typename T> struct FwdArgs {
  const T* x;
  const T* w;          // (Dpad, Kpad) in kidx order, zero padded (tf32-rounded for the tf32 path)
  const float* bias;   // (Dpad), zero padded
  T* out;              // (N, D)
  uint8_t* argmax;     // (N, D)
  Geo g;
  int tiles_n;
};

template <class O, class Tl> struct FwdLayout {
  static constexpr int size = sizeof(typename O::T), BK = 64 / size;
  static constexpr int stage = (Tl::BM + Tl::BN) * kRow;
  static constexpr int pipeline = Tl::kStages * stage;
  static constexpr int out_pitch = padded_pitch(Tl::BN, size);
  // argmax rows: round_up(BN, 32) + 16 bytes, 4 (mod 8) words, so the 2-byte stores of 8 rows are conflict-free
  static constexpr int am_pitch = (Tl::BN + 31) / 32 * 32 + 16;
  static constexpr int staging = Tl::BM * (out_pitch + am_pitch);
  static constexpr size_t bytes(int Kpad) {
    return size_t(pipeline + Kpad * int(sizeof(Tap))) > size_t(staging) ? size_t(pipeline + Kpad * int(sizeof(Tap)))
                                                                       : size_t(staging);
  }
};

// One block: 128 tokens x BN channels. For each window offset w (outer) the whole reduction runs through the
// pipeline; at its end the accumulators (initialised with the bias) fold into a running max and argmax in
// registers, PyTorch's max-pool rule: a later value replaces the max if larger or NaN, so the first maximum
// in window order wins ties and NaN propagates. The result is staged through shared memory so that the
// global stores are contiguous per token row.
template <class O, class Tl>
__global__ void __launch_bounds__(256, 1) forward_kernel(const FwdArgs<typename O::T> a) {
  using T = typename O::T;
  using L = FwdLayout<O, Tl>;
  constexpr int MI = Tl::MI, NI = Tl::NI, BM = Tl::BM, BN = Tl::BN, S = Tl::kStages, BK = L::BK;
  constexpr int kPieces = 16 / int(sizeof(T)) / 4;  // 4-element pieces per row per thread: 2 (16-bit) or 1
  EIT_DYNAMIC_SMEM(smem);
  const Geo& g = a.g;
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int tile_m = int(blockIdx.x) / a.tiles_n, tile_n = int(blockIdx.x) - tile_m * a.tiles_n;
  const int n0 = tile_m * BM, d0 = tile_n * BN;
  Tap* taps = reinterpret_cast<Tap*>(smem + L::pipeline);
  for (int i = tid; i < g.Kpad; i += 256) taps[i] = make_tap(g, i);

  // Copy layout of a stage: lane -> (row lane/4 of its warp's 8, piece lane%4), 8 warps cover 64 rows; a
  // warp's stores then fill each 4-byte bank exactly as often as the bytes require.
  RowPos rows[2];
  EIT_UNROLL
  for (int j = 0; j < 2; ++j) rows[j] = row_pos(g, n0 + j * 64 + warp * 8 + (lane >> 2));
  Piece<sizeof(T)> staged[2][kPieces];

  const int kchunks = g.Kpad / BK, iters = g.pool * g.pool * kchunks;
  int i_kc = 0, i_wi = 0, i_wj = 0, issued = 0;  // the stage the next issue() fetches
  auto issue = [&](unsigned char* st) {
    if (issued < iters) {
      const int kbase = i_kc * BK;
      EIT_UNROLL
      for (int j = 0; j < 2; ++j) {
        const int iy0 = rows[j].oy + i_wi * g.stride, ix0 = rows[j].ox + i_wj * g.stride;
        const int base = rows[j].base + iy0 * g.sH + ix0 * g.sW;
        const int r = j * 64 + warp * 8 + (lane >> 2);
        EIT_UNROLL
        for (int q = 0; q < kPieces; ++q) {
          const int col = (q * 4 + (lane & 3)) * 4;
          gather_piece<T>(g, a.x, taps, kbase + col, iy0, ix0, base, st + r * kRow + col * int(sizeof(T)),
                          staged[j][q]);
        }
      }
      unsigned char* Bs = st + BM * kRow;
      EIT_UNROLL
      for (int i = 0; i < (BN + 63) / 64; ++i) {
        const int row = i * 64 + warp * 8 + (lane >> 2);
        if (row < BN)
          dev::cp_async_cg<16>(Bs + row * kRow + (lane & 3) * 16,
                               a.w + (d0 + row) * g.Kpad + kbase + (lane & 3) * (16 / int(sizeof(T))), true);
      }
    }
    dev::cp_async_commit();  // an empty group past the end keeps the wait counts uniform
  };
  auto land = [&](unsigned char* st) {  // the element-wise gather's stores, after the stage's arithmetic
    if (!g.vec && issued < iters) {
      EIT_UNROLL
      for (int j = 0; j < 2; ++j) {
        const int r = j * 64 + warp * 8 + (lane >> 2);
        EIT_UNROLL
        for (int q = 0; q < kPieces; ++q)
          *reinterpret_cast<Piece<sizeof(T)>*>(st + r * kRow + (q * 4 + (lane & 3)) * 4 * int(sizeof(T))) =
              staged[j][q];
      }
    }
  };
  auto advance = [&] {
    ++issued;
    if (++i_kc == kchunks) {
      i_kc = 0;
      if (++i_wj == g.pool) { i_wj = 0; ++i_wi; }
    }
  };

  const int wm = warp / Tl::WN, wn = warp - wm * Tl::WN, gq = lane >> 2, tq = lane & 3;
  float bias[NI][2];
  EIT_UNROLL
  for (int ni = 0; ni < NI; ++ni) {
    bias[ni][0] = a.bias[d0 + wn * NI * 8 + ni * 8 + 2 * tq];
    bias[ni][1] = a.bias[d0 + wn * NI * 8 + ni * 8 + 2 * tq + 1];
  }
  float acc[MI][NI][4], best[MI][NI][4];
  uint32_t arg[MI][NI];
  EIT_UNROLL
  for (int mi = 0; mi < MI; ++mi) {
    EIT_UNROLL
    for (int ni = 0; ni < NI; ++ni) {
      arg[mi][ni] = 0;
      EIT_UNROLL
      for (int r = 0; r < 4; ++r) { acc[mi][ni][r] = bias[ni][r & 1]; best[mi][ni][r] = -INFINITY; }
    }
  }

  __syncthreads();  // taps
  EIT_UNROLL
  for (int s = 0; s < S - 1; ++s) {
    issue(smem + s * L::stage);
    land(smem + s * L::stage);
    advance();
  }
  int read = 0, write = S - 1, c_kc = 0, c_w = 0;
  for (int it = 0; it < iters; ++it) {
    dev::cp_async_wait<S - 2>();
    __syncthreads();  // stage `read` landed for every thread; stage `write` is no longer read by anyone
    unsigned char* st = smem + write * L::stage;
    issue(st);
    const unsigned char* rs = smem + read * L::stage;
    warp_nt<O, MI, NI>(acc, rs + wm * MI * 16 * kRow, rs + (BM + wn * NI * 8) * kRow, lane);
    land(st);
    advance();
    read = read + 1 == S ? 0 : read + 1;
    write = write + 1 == S ? 0 : write + 1;
    if (++c_kc == kchunks) {  // window c_w done: fold into the running max
      c_kc = 0;
      EIT_UNROLL
      for (int mi = 0; mi < MI; ++mi) {
        EIT_UNROLL
        for (int ni = 0; ni < NI; ++ni) {
          EIT_UNROLL
          for (int r = 0; r < 4; ++r) {
            const float v = acc[mi][ni][r];
            if (v > best[mi][ni][r] || v != v) {
              best[mi][ni][r] = v;
              arg[mi][ni] = set_byte(arg[mi][ni], r, uint32_t(c_w));
            }
            acc[mi][ni][r] = bias[ni][r & 1];
          }
        }
      }
      ++c_w;
    }
  }

  // No copy is in flight: the loop's last wait landed the last stage, and later groups are empty.
  __syncthreads();  // every warp is done with the pipeline's shared memory: reuse it for the output tile
  unsigned char* Os = smem;
  unsigned char* As = smem + BM * L::out_pitch;
  EIT_UNROLL
  for (int mi = 0; mi < MI; ++mi) {
    EIT_UNROLL
    for (int ni = 0; ni < NI; ++ni) {
      EIT_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int row = wm * MI * 16 + mi * 16 + gq + 8 * h, col = wn * NI * 8 + ni * 8 + 2 * tq;
        T* o = reinterpret_cast<T*>(Os + row * L::out_pitch) + col;
        if constexpr (sizeof(T) == 4) {
          *reinterpret_cast<F2*>(o) = F2{{best[mi][ni][2 * h], best[mi][ni][2 * h + 1]}};
        } else {
          o[0] = dev::from_float<T>(best[mi][ni][2 * h]);
          o[1] = dev::from_float<T>(best[mi][ni][2 * h + 1]);
        }
        const uint32_t idx = arg[mi][ni] >> (16 * h);
        *reinterpret_cast<uint16_t*>(As + row * L::am_pitch + col) = uint16_t(idx & 0xffffu);
      }
    }
  }
  __syncthreads();
  for (int e = tid; e < BM * BN; e += 256) {  // consecutive threads, consecutive channels of a token
    const int row = e / BN, col = e - row * BN, n = n0 + row, d = d0 + col;
    if (n < g.N && d < g.D) {
      a.out[n * g.D + d] = reinterpret_cast<const T*>(Os + row * L::out_pitch)[col];
      a.argmax[n * g.D + d] = As[row * L::am_pitch + col];
    }
  }
}

// ---- weight gradient -------------------------------------------------------------------------------------

template <typename T> struct WgradArgs {
  const T* grad;            // (N, D)
  const uint8_t* argmax;    // (N, D)
  const T* x;
  float* ws;                // (slices, Kt, Dt): this launch's slices, fp32
  Geo g;
  int tiles_n, tiles, chunks, chunks_per_slice, Dt, slice_stride;  // slice_stride = Kt * Dt
};

template <class O, class Tl> struct WgradLayout {
  static constexpr int size = sizeof(typename O::T), BK = 64 / size;  // tokens per stage
  static constexpr int pa = padded_pitch(Tl::BM, size), pb = padded_pitch(Tl::BN, size);
  static constexpr int stage = BK * (pa + pb);
  static constexpr int pipeline = Tl::kStages * stage;
  static constexpr size_t bytes = size_t(pipeline) + Tl::BM * sizeof(Tap);
};

// dW^T tile: 128 patch elements (kidx) x BN channels, summed over a slice of the conv rows. A stage holds
// BK tokens at one window offset: their patch elements [token][kidx] (cp.async) and their routed gradients
// [token][d] (from registers: the gradient and argmax of a token chunk are loaded once and masked per
// window). The partial tile goes to the workspace; reduce_slices_kernel adds the slices in a fixed order,
// so the result does not depend on scheduling (no atomics).
template <class O, class Tl>
__global__ void __launch_bounds__(256, 1) weight_grad_kernel(const WgradArgs<typename O::T> a) {
  using T = typename O::T;
  using L = WgradLayout<O, Tl>;
  using Bits = typename BitsOf<sizeof(T)>::type;
  constexpr int MI = Tl::MI, NI = Tl::NI, BN = Tl::BN, S = Tl::kStages, BK = L::BK;
  constexpr int kRows = BK / 8;                           // token rows per thread: warp + 8 i
  constexpr int kE = 4 / int(sizeof(T));                  // elements per 32-bit word
  constexpr int kWords = BN / kE, kWq = (kWords + 31) / 32;  // gradient words per row, per lane
  EIT_DYNAMIC_SMEM(smem);
  const Geo& g = a.g;
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int slice = int(blockIdx.x) / a.tiles, tile = int(blockIdx.x) - slice * a.tiles;
  const int tile_m = tile / a.tiles_n, tile_n = tile - tile_m * a.tiles_n;
  const int k0 = tile_m * Tl::BM, d0 = tile_n * BN;
  Tap* taps = reinterpret_cast<Tap*>(smem + L::pipeline);
  if (tid < Tl::BM) taps[tid] = make_tap(g, k0 + tid);

  const int c_begin = slice * a.chunks_per_slice;
  const int c_end = c_begin + a.chunks_per_slice < a.chunks ? c_begin + a.chunks_per_slice : a.chunks;
  const int windows = g.pool * g.pool, iters = (c_end - c_begin) * windows;

  RowPos rows[kRows];
  Piece<sizeof(T)> staged[kRows];
  Bits gv[kRows][kWq][kE];
  uint8_t gm[kRows][kWq][kE];
  int i_chunk = c_begin, i_wi = 0, i_wj = 0, issued = 0;
  auto issue = [&](unsigned char* st) {
    if (issued < iters) {
      if (i_wi == 0 && i_wj == 0) {  // a new chunk of BK tokens: positions, gradients and argmax
        EIT_UNROLL
        for (int i = 0; i < kRows; ++i) {
          const int n = i_chunk * BK + warp + 8 * i;
          rows[i] = row_pos(g, n);
          EIT_UNROLL
          for (int q = 0; q < kWq; ++q) {
            EIT_UNROLL
            for (int e = 0; e < kE; ++e) {
              const int d = d0 + (lane + 32 * q) * kE + e;
              const bool ok = n < g.N && d < g.D;
              gv[i][q][e] = ok ? reinterpret_cast<const Bits*>(a.grad)[n * g.D + d] : Bits(0);
              gm[i][q][e] = ok ? a.argmax[n * g.D + d] : uint8_t(255);
            }
          }
        }
      }
      const int w = i_wi * g.pool + i_wj;
      unsigned char* Ps = st;
      unsigned char* Gs = st + BK * L::pa;
      EIT_UNROLL
      for (int i = 0; i < kRows; ++i) {
        const int r = warp + 8 * i;
        const int iy0 = rows[i].oy + i_wi * g.stride, ix0 = rows[i].ox + i_wj * g.stride;
        const int base = rows[i].base + iy0 * g.sH + ix0 * g.sW;
        // lanes take consecutive 4-element pieces of the row: contiguous stores, no bank conflicts
        gather_piece<T>(g, a.x, taps, 4 * lane, iy0, ix0, base, Ps + r * L::pa + 4 * lane * int(sizeof(T)), staged[i]);
        EIT_UNROLL
        for (int q = 0; q < kWq; ++q) {
          const int u = lane + 32 * q;
          if (u < kWords) {
            uint32_t word = 0;
            EIT_UNROLL
            for (int e = 0; e < kE; ++e)
              if (gm[i][q][e] == w) word |= uint32_t(gv[i][q][e]) << (16 * e);
            *reinterpret_cast<uint32_t*>(Gs + r * L::pb + 4 * u) = word;
          }
        }
      }
    }
    dev::cp_async_commit();
  };
  auto land = [&](unsigned char* st) {
    if (!g.vec && issued < iters) {
      EIT_UNROLL
      for (int i = 0; i < kRows; ++i)
        *reinterpret_cast<Piece<sizeof(T)>*>(st + (warp + 8 * i) * L::pa + 4 * lane * int(sizeof(T))) = staged[i];
    }
  };
  auto advance = [&] {
    ++issued;
    if (++i_wj == g.pool) {
      i_wj = 0;
      if (++i_wi == g.pool) { i_wi = 0; ++i_chunk; }
    }
  };

  const int wm = warp / Tl::WN, wn = warp - wm * Tl::WN, gq = lane >> 2, tq = lane & 3;
  float acc[MI][NI][4];
  EIT_UNROLL
  for (int mi = 0; mi < MI; ++mi) {
    EIT_UNROLL
    for (int ni = 0; ni < NI; ++ni) {
      EIT_UNROLL
      for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.0f;
    }
  }
  __syncthreads();  // taps
  EIT_UNROLL
  for (int s = 0; s < S - 1; ++s) {
    issue(smem + s * L::stage);
    land(smem + s * L::stage);
    advance();
  }
  int read = 0, write = S - 1;
  for (int it = 0; it < iters; ++it) {
    dev::cp_async_wait<S - 2>();
    __syncthreads();
    unsigned char* st = smem + write * L::stage;
    issue(st);
    const unsigned char* rs = smem + read * L::stage;
    warp_tt<O, MI, NI, L::pa, L::pb>(acc, rs + wm * MI * 16 * int(sizeof(T)),
                                     rs + BK * L::pa + wn * NI * 8 * int(sizeof(T)), lane);
    land(st);
    advance();
    read = read + 1 == S ? 0 : read + 1;
    write = write + 1 == S ? 0 : write + 1;
  }
  // Each element of the partial tile is written once: (kidx row, d column) pairs as float2.
  float* out = a.ws + size_t(slice) * size_t(a.slice_stride);
  EIT_UNROLL
  for (int mi = 0; mi < MI; ++mi) {
    EIT_UNROLL
    for (int ni = 0; ni < NI; ++ni) {
      EIT_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int row = k0 + wm * MI * 16 + mi * 16 + gq + 8 * h, col = d0 + wn * NI * 8 + ni * 8 + 2 * tq;
        *reinterpret_cast<F2*>(out + row * a.Dt + col) = F2{{acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]}};
      }
    }
  }
}

// dW (D, C, k, k) in fp32 = the sum of the workspace slices, in slice order (deterministic).
__global__ void __launch_bounds__(256) reduce_slices_kernel(const float* __restrict__ ws, float* __restrict__ dw,
                                                            int slices, int slice_stride, int Dt, Geo g) {
  const int i = int(blockIdx.x) * 256 + int(threadIdx.x);
  if (i >= g.K * g.D) return;
  const int kidx = i / g.D, d = i - kidx * g.D;  // consecutive threads read consecutive channels
  const float* p = ws + kidx * Dt + d;
  float s = 0.0f;
  for (int sl = 0; sl < slices; ++sl) s += p[size_t(sl) * size_t(slice_stride)];
  int c, kh, kw;
  decompose(g, kidx, c, kh, kw);
  dw[((d * g.C + c) * g.k + kh) * g.k + kw] = s;
}

// ---- input gradient --------------------------------------------------------------------------------------

template <typename T> struct DgradArgs {
  const T* grad;
  const uint8_t* argmax;
  const T* wt;     // (Kt, Dk): W^T in kidx order, zero padded (tf32-rounded for the tf32 path)
  float* dx;       // fp32, x's strides
  Geo g;
  int tiles_n, Dk;
};

template <class O> struct DgradLayout {
  static constexpr int size = sizeof(typename O::T), BK = 64 / size;
  static constexpr int stage = (128 + 128) * kRow;
  static constexpr int pipeline = 3 * stage;
  static constexpr size_t bytes = size_t(pipeline) + 128 * sizeof(Tap);
};

// dpatch tile: 128 tokens at one window offset x 128 patch elements, summed over the channels; at the end of
// each window the tile is added into dx at the pixels its patch elements read. Overlapping patches meet
// there, so these are fp32 atomics: the input gradient is not deterministic (the op says so to PyTorch).
template <class O>
__global__ void __launch_bounds__(256, 1) input_grad_kernel(const DgradArgs<typename O::T> a) {
  using T = typename O::T;
  using Tl = TileA;
  using L = DgradLayout<O>;
  using Bits = typename BitsOf<sizeof(T)>::type;
  constexpr int MI = Tl::MI, NI = Tl::NI, BM = Tl::BM, S = Tl::kStages, BK = L::BK;
  constexpr int kPieces = 16 / int(sizeof(T)) / 4;
  EIT_DYNAMIC_SMEM(smem);
  const Geo& g = a.g;
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int tile_m = int(blockIdx.x) / a.tiles_n, tile_n = int(blockIdx.x) - tile_m * a.tiles_n;
  const int n0 = tile_m * BM, k0 = tile_n * 128;
  Tap* taps = reinterpret_cast<Tap*>(smem + L::pipeline);  // read at the first window's end, after barriers
  if (tid < 128) taps[tid] = make_tap(g, k0 + tid);

  const int dchunks = a.Dk / BK, iters = g.pool * g.pool * dchunks;
  int i_dc = 0, i_w = 0, issued = 0;
  auto issue = [&](unsigned char* st) {
    if (issued < iters) {
      const int dbase = i_dc * BK;
      EIT_UNROLL
      for (int j = 0; j < 2; ++j) {  // routed gradient [token][d]: the same conflict-free layout as forward
        const int r = j * 64 + warp * 8 + (lane >> 2), n = n0 + r;
        EIT_UNROLL
        for (int q = 0; q < kPieces; ++q) {
          const int col = (q * 4 + (lane & 3)) * 4;
          Bits v[4];
          EIT_UNROLL
          for (int e = 0; e < 4; ++e) {
            const int d = dbase + col + e;
            const bool ok = n < g.N && d < g.D && a.argmax[n * g.D + d] == i_w;
            v[e] = ok ? reinterpret_cast<const Bits*>(a.grad)[n * g.D + d] : Bits(0);
          }
          Piece<sizeof(T)> p;
          if constexpr (sizeof(T) == 2) {
            p.v[0] = uint32_t(v[0]) | (uint32_t(v[1]) << 16);
            p.v[1] = uint32_t(v[2]) | (uint32_t(v[3]) << 16);
          } else {
            EIT_UNROLL
            for (int e = 0; e < 4; ++e) p.v[e] = v[e];
          }
          *reinterpret_cast<Piece<sizeof(T)>*>(st + r * kRow + col * int(sizeof(T))) = p;
        }
      }
      unsigned char* Bs = st + BM * kRow;
      EIT_UNROLL
      for (int i = 0; i < 2; ++i) {
        const int row = i * 64 + warp * 8 + (lane >> 2);
        dev::cp_async_cg<16>(Bs + row * kRow + (lane & 3) * 16,
                             a.wt + (k0 + row) * a.Dk + dbase + (lane & 3) * (16 / int(sizeof(T))), true);
      }
    }
    dev::cp_async_commit();
  };
  auto advance = [&] {
    ++issued;
    if (++i_dc == dchunks) { i_dc = 0; ++i_w; }
  };

  const int wm = warp / Tl::WN, wn = warp - wm * Tl::WN, gq = lane >> 2, tq = lane & 3;
  RowPos mine[MI][2];  // the conv rows this lane's accumulators belong to
  EIT_UNROLL
  for (int mi = 0; mi < MI; ++mi) {
    EIT_UNROLL
    for (int h = 0; h < 2; ++h) mine[mi][h] = row_pos(g, n0 + wm * MI * 16 + mi * 16 + gq + 8 * h);
  }
  float acc[MI][NI][4];
  EIT_UNROLL
  for (int mi = 0; mi < MI; ++mi) {
    EIT_UNROLL
    for (int ni = 0; ni < NI; ++ni) {
      EIT_UNROLL
      for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.0f;
    }
  }
  EIT_UNROLL
  for (int s = 0; s < S - 1; ++s) {
    issue(smem + s * L::stage);
    advance();
  }
  int read = 0, write = S - 1, c_dc = 0, c_wi = 0, c_wj = 0;
  for (int it = 0; it < iters; ++it) {
    dev::cp_async_wait<S - 2>();
    __syncthreads();
    issue(smem + write * L::stage);
    const unsigned char* rs = smem + read * L::stage;
    warp_nt<O, MI, NI>(acc, rs + wm * MI * 16 * kRow, rs + (BM + wn * NI * 8) * kRow, lane);
    advance();
    read = read + 1 == S ? 0 : read + 1;
    write = write + 1 == S ? 0 : write + 1;
    if (++c_dc == dchunks) {  // window done: add this window's patch gradients into dx
      c_dc = 0;
      EIT_UNROLL
      for (int mi = 0; mi < MI; ++mi) {
        EIT_UNROLL
        for (int h = 0; h < 2; ++h) {
          const int iy0 = mine[mi][h].oy + c_wi * g.stride, ix0 = mine[mi][h].ox + c_wj * g.stride;
          const int base = mine[mi][h].base + iy0 * g.sH + ix0 * g.sW;
          EIT_UNROLL
          for (int ni = 0; ni < NI; ++ni) {
            EIT_UNROLL
            for (int j = 0; j < 2; ++j) {
              const Tap tp = taps[wn * NI * 8 + ni * 8 + 2 * tq + j];
              if (unsigned(iy0 + tp.kh) < unsigned(g.H) && unsigned(ix0 + tp.kw) < unsigned(g.W))
                atomicAdd(a.dx + (base + tp.delta), acc[mi][ni][2 * h + j]);
              acc[mi][ni][2 * h + j] = 0.0f;
            }
          }
        }
      }
      if (++c_wj == g.pool) { c_wj = 0; ++c_wi; }
    }
  }
}

// ---- operand packing -------------------------------------------------------------------------------------

// out (rows, cols) = the weight (D, C, k, k) as (d, kidx), or transposed as (kidx, d), zero padded; rounded
// to tf32 (nearest, ties away: cvt.rna) for the tf32 path so that the kernels read the operand as it is.
template <typename T>
__global__ void __launch_bounds__(256) pack_weight_kernel(const T* __restrict__ w, T* __restrict__ out, Geo g,
                                                          int rows, int cols, int transposed, int tf32) {
  const int i = int(blockIdx.x) * 256 + int(threadIdx.x);
  if (i >= rows * cols) return;
  const int r = i / cols, col = i - r * cols;
  const int d = transposed ? col : r, kidx = transposed ? r : col;
  T v = dev::from_float<T>(0.0f);
  if (d < g.D && kidx < g.K) {
    int c, kh, kw;
    decompose(g, kidx, c, kh, kw);
    v = w[((d * g.C + c) * g.k + kh) * g.k + kw];
    if constexpr (sizeof(T) == 4) {
      if (tf32) v = dev::bits_float(dev::tf32_round(dev::float_bits(v)));
    }
  }
  out[i] = v;
}

template <typename T>
__global__ void __launch_bounds__(256) pack_bias_kernel(const T* __restrict__ b, float* __restrict__ out, int D,
                                                        int Dpad) {
  const int i = int(blockIdx.x) * 256 + int(threadIdx.x);
  if (i < Dpad) out[i] = i < D ? dev::to_float(b[i]) : 0.0f;
}

// ---- host side: plans, checks, launches -------------------------------------------------------------------

constexpr int64_t kIndexLimit = (int64_t(1) << 31) - 1;  // every launch indexes in 32 bits below this
constexpr int kWgradTargetBlocks = 4 * 132;              // weight-gradient split: shape-only, so reproducible

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct Plan {
  TileKind tile;
  int BN, tiles_n, Dpad, Kpad, Kt, Dk;
};
inline Plan plan(const PatchShape& s, Math m) {
  Plan p;
  p.tile = choose_tile(s.D, m);
  p.BN = tile_columns(p.tile);
  p.tiles_n = int((s.D + p.BN - 1) / p.BN);
  p.Dpad = p.tiles_n * p.BN;
  p.Kpad = int(round_up(s.K(), kKAlign));
  p.Kt = int(round_up(s.K(), 128));
  p.Dk = int(round_up(s.D, kKAlign));
  return p;
}

inline bool is_channels_last(const PatchShape& s, const XStrides& xs) { return s.C > 1 && xs.c == 1 && xs.w == s.C; }

// Whether runs of 4 kidx starting at multiples of 4 are contiguous, 4-element aligned and in or out of the
// image together (then one cp.async moves them).
inline bool vec_ok(const PatchShape& s, const XStrides& xs, const void* x, int elem_size) {
  if (reinterpret_cast<uintptr_t>(x) % uintptr_t(4 * elem_size) != 0) return false;
  if (s.stride % 4 || s.pad % 4 || s.W % 4 || xs.b % 4 || xs.h % 4) return false;
  if (is_channels_last(s, xs)) return (s.k * s.C) % 4 == 0;
  return xs.w == 1 && s.k % 4 == 0 && xs.c % 4 == 0;
}

// Images per launch so that x (or dx), the tokens and every (N, D) tensor stay below the index limit; 0 when
// one image alone exceeds it.
inline int64_t images_per_launch(const PatchShape& s, const XStrides& xs, int64_t limit) {
  const int64_t image = (s.C - 1) * xs.c + (s.H - 1) * xs.h + (s.W - 1) * xs.w + 1, rows = s.T() * s.D;
  if (image > limit || rows > limit) return 0;
  int64_t nb = limit / rows;
  if (xs.b > 0) nb = nb < (limit - image) / xs.b + 1 ? nb : (limit - image) / xs.b + 1;
  nb = nb < s.B ? nb : s.B;
  return nb > 1 ? nb : 1;
}

// Why the CUDA kernels refuse this problem, or nullptr.
inline const char* refusal(const PatchShape& s, const XStrides& xs, const Device& dev) {
  if (xs.b < 0 || xs.c < 0 || xs.h < 0 || xs.w < 0) return "negative strides are not supported";
  if (s.H > kMaxSide || s.W > kMaxSide || s.k > kMaxSide || s.pad > kMaxSide)
    return "images, kernels and padding are limited to 8192 pixels a side";
  if (images_per_launch(s, xs, dev.index_limit) == 0)
    return "one image's tensors exceed 2^31 elements (the kernels index in 32 bits per launch)";
  return nullptr;
}

inline Geo make_geo(const PatchShape& s, int64_t images, const XStrides& xs, bool vec) {
  Geo g;
  g.C = int(s.C); g.H = int(s.H); g.W = int(s.W); g.D = int(s.D); g.k = int(s.k); g.stride = int(s.stride);
  g.pad = int(s.pad); g.pool = int(s.pool); g.Hp = int(s.Hp); g.Wp = int(s.Wp); g.T = int(s.T());
  g.N = int(images * s.T()); g.K = int(s.K()); g.Kpad = int(round_up(s.K(), kKAlign));
  g.sB = int(xs.b); g.sC = int(xs.c); g.sH = int(xs.h); g.sW = int(xs.w);
  g.channels_last = is_channels_last(s, xs);
  g.vec = vec;
  g.divT = FastDiv::of(uint32_t(g.T));
  g.divWp = FastDiv::of(uint32_t(g.Wp));
  return g;
}

inline const char* check_grid(dim3 grid) {
  if (grid.x < 1 || grid.x > 2147483647u || grid.y < 1 || grid.y > 65535u || grid.z < 1 || grid.z > 65535u)
    return "launch grid out of range (x <= 2^31-1, y and z <= 65535)";
  return nullptr;
}

inline const char* smem_message(size_t need, size_t have) {
  static thread_local char buf[160];
  std::snprintf(buf, sizeof(buf), "a block needs %zu bytes of shared memory, the device allows %zu", need, have);
  return buf;
}

// Launches kernel over `blocks` 256-thread blocks (a 1-D grid), after checking the grid and shared memory.
template <typename... KArgs, typename... Args>
const char* launch(void (*kernel)(KArgs...), int64_t blocks, size_t smem, const Device& dev, cudaStream_t stream,
                   Args... args) {
  if (blocks <= 0) return nullptr;
  const dim3 grid(blocks > 2147483647 ? 0u : unsigned(blocks));
  if (const char* e = check_grid(grid)) return e;
  if (smem > dev.max_smem) return smem_message(smem, dev.max_smem);
#ifndef EIT_FAST_EMULATE_CUDA
  if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
#endif
  EIT_LAUNCH(kernel, grid, dim3(256), smem, stream, args...);
  return nullptr;
}

inline int64_t blocks_for(int64_t n) { return (n + 255) / 256; }

template <Math M> using TypeOf = typename Op<M>::T;

// Scratch the launchers need, in bytes (the caller allocates it on the device).
inline size_t align256(size_t v) { return (v + 255) / 256 * 256; }
inline size_t forward_scratch(const PatchShape& s, Math m, int elem_size) {
  const Plan p = plan(s, m);
  return align256(size_t(p.Dpad) * p.Kpad * elem_size) + align256(size_t(p.Dpad) * 4);
}
inline size_t input_grad_scratch(const PatchShape& s, Math m, int elem_size) {
  const Plan p = plan(s, m);
  return align256(size_t(p.Kt) * p.Dk * elem_size);
}

// The weight gradient's split of the conv rows: per launch (batch chunk), `slices` blocks per output tile,
// each over `per_slice` chunks of `tokens` tokens. Depends on the shape only, so results are bitwise
// reproducible across runs and GPUs.
struct WgradSplit {
  int64_t images, slices_total;
};
inline int wgrad_tokens_per_stage(int elem_size) { return 64 / elem_size; }
constexpr int kMinChunksPerSlice = 8;  // a block runs at least 8 * windows stages; bounds the workspace
inline void wgrad_slices(int64_t N, int tokens, int tiles, int& chunks, int& per_slice, int& slices) {
  chunks = int((N + tokens - 1) / tokens);
  const int most = (chunks + kMinChunksPerSlice - 1) / kMinChunksPerSlice;
  int want = (kWgradTargetBlocks + tiles - 1) / tiles;
  want = want < 1 ? 1 : (want > most ? most : want);
  per_slice = (chunks + want - 1) / want;
  slices = (chunks + per_slice - 1) / per_slice;
}
inline WgradSplit wgrad_split(const PatchShape& s, const XStrides& xs, Math m, int elem_size, const Device& dev) {
  const Plan p = plan(s, m);
  const int tiles = (p.Kt / 128) * p.tiles_n;
  WgradSplit w{images_per_launch(s, xs, dev.index_limit), 0};
  for (int64_t b0 = 0; w.images > 0 && b0 < s.B; b0 += w.images) {
    const int64_t nb = s.B - b0 < w.images ? s.B - b0 : w.images;
    int chunks, per_slice, slices;
    wgrad_slices(nb * s.T(), wgrad_tokens_per_stage(elem_size), tiles, chunks, per_slice, slices);
    w.slices_total += slices;
  }
  return w;
}
inline size_t weight_grad_scratch(const PatchShape& s, const XStrides& xs, Math m, int elem_size, const Device& dev) {
  const Plan p = plan(s, m);
  return align256(size_t(wgrad_split(s, xs, m, elem_size, dev).slices_total) * p.Kt * p.Dpad * 4);
}

template <Math M, class Tl>
const char* forward_t(const TypeOf<M>* x, const XStrides& xs, const TypeOf<M>* w, const TypeOf<M>* b,
                      TypeOf<M>* out, uint8_t* argmax, const PatchShape& s, unsigned char* scratch,
                      const Device& dev, cudaStream_t stream) {
  using T = TypeOf<M>;
  const Plan p = plan(s, M);
  T* wpack = reinterpret_cast<T*>(scratch);
  float* bpad = reinterpret_cast<float*>(scratch + align256(size_t(p.Dpad) * p.Kpad * sizeof(T)));
  const Geo g0 = make_geo(s, 1, xs, false);
  if (const char* e = launch(&pack_weight_kernel<T>, blocks_for(int64_t(p.Dpad) * p.Kpad), 0, dev, stream, w,
                             wpack, g0, p.Dpad, p.Kpad, 0, int(M == Math::tf32)))
    return e;
  if (const char* e = launch(&pack_bias_kernel<T>, blocks_for(p.Dpad), 0, dev, stream, b, bpad, int(s.D), p.Dpad))
    return e;
  const int64_t per = images_per_launch(s, xs, dev.index_limit);
  for (int64_t b0 = 0; b0 < s.B; b0 += per) {
    const int64_t nb = s.B - b0 < per ? s.B - b0 : per;
    const T* xc = x + b0 * xs.b;
    FwdArgs<T> a{xc, wpack, bpad, out + b0 * s.T() * s.D, argmax + b0 * s.T() * s.D,
                 make_geo(s, nb, xs, vec_ok(s, xs, xc, int(sizeof(T)))), p.tiles_n};
    const int64_t blocks = (nb * s.T() + 127) / 128 * p.tiles_n;
    if (const char* e = launch(&forward_kernel<Op<M>, Tl>, blocks, FwdLayout<Op<M>, Tl>::bytes(p.Kpad), dev, stream, a))
      return e;
  }
  return nullptr;
}

// dw: (D, C, k, k) fp32, written (not accumulated).
template <Math M, class Tl>
const char* weight_grad_t(const TypeOf<M>* grad, const uint8_t* argmax, const TypeOf<M>* x, const XStrides& xs,
                          float* dw, const PatchShape& s, unsigned char* scratch, const Device& dev,
                          cudaStream_t stream) {
  using T = TypeOf<M>;
  const Plan p = plan(s, M);
  const int tiles = (p.Kt / 128) * p.tiles_n, slice_stride = p.Kt * p.Dpad;
  float* ws = reinterpret_cast<float*>(scratch);
  const int64_t per = images_per_launch(s, xs, dev.index_limit);
  int64_t slice0 = 0;
  for (int64_t b0 = 0; b0 < s.B; b0 += per) {
    const int64_t nb = s.B - b0 < per ? s.B - b0 : per;
    int chunks, per_slice, slices;
    wgrad_slices(nb * s.T(), wgrad_tokens_per_stage(int(sizeof(T))), tiles, chunks, per_slice, slices);
    const T* xc = x + b0 * xs.b;
    WgradArgs<T> a{grad + b0 * s.T() * s.D, argmax + b0 * s.T() * s.D, xc, ws + slice0 * slice_stride,
                   make_geo(s, nb, xs, vec_ok(s, xs, xc, int(sizeof(T)))), p.tiles_n, tiles, chunks, per_slice,
                   p.Dpad, slice_stride};
    if (const char* e = launch(&weight_grad_kernel<Op<M>, Tl>, int64_t(slices) * tiles, WgradLayout<Op<M>, Tl>::bytes,
                               dev, stream, a))
      return e;
    slice0 += slices;
  }
  return launch(&reduce_slices_kernel, blocks_for(s.K() * s.D), 0, dev, stream, static_cast<const float*>(ws), dw,
                int(slice0), slice_stride, p.Dpad, make_geo(s, 1, xs, false));
}

// dx: fp32 with strides dxs, zeroed by the caller; the kernel adds into it.
template <Math M>
const char* input_grad_t(const TypeOf<M>* grad, const uint8_t* argmax, const TypeOf<M>* w, float* dx,
                         const XStrides& dxs, const PatchShape& s, unsigned char* scratch, const Device& dev,
                         cudaStream_t stream) {
  using T = TypeOf<M>;
  const Plan p = plan(s, M);
  T* wt = reinterpret_cast<T*>(scratch);
  if (const char* e = launch(&pack_weight_kernel<T>, blocks_for(int64_t(p.Kt) * p.Dk), 0, dev, stream, w, wt,
                             make_geo(s, 1, dxs, false), p.Kt, p.Dk, 1, int(M == Math::tf32)))
    return e;
  const int64_t per = images_per_launch(s, dxs, dev.index_limit);
  for (int64_t b0 = 0; b0 < s.B; b0 += per) {
    const int64_t nb = s.B - b0 < per ? s.B - b0 : per;
    DgradArgs<T> a{grad + b0 * s.T() * s.D, argmax + b0 * s.T() * s.D, wt, dx + b0 * dxs.b,
                   make_geo(s, nb, dxs, false), p.Kt / 128, p.Dk};
    const int64_t blocks = (nb * s.T() + 127) / 128 * (p.Kt / 128);
    if (const char* e = launch(&input_grad_kernel<Op<M>>, blocks, DgradLayout<Op<M>>::bytes, dev, stream, a))
      return e;
  }
  return nullptr;
}

// Run-time dispatch over the math and the tile the shape picks.
template <Math M>
const char* forward_m(const void* x, const XStrides& xs, const void* w, const void* b, void* out, uint8_t* argmax,
                      const PatchShape& s, unsigned char* scratch, const Device& dev, cudaStream_t stream) {
  using T = TypeOf<M>;
  auto args = [&](auto tile) {
    using Tl = decltype(tile);
    return forward_t<M, Tl>(static_cast<const T*>(x), xs, static_cast<const T*>(w), static_cast<const T*>(b),
                            static_cast<T*>(out), argmax, s, scratch, dev, stream);
  };
  if constexpr (M == Math::fma) {
    return args(TileF{});
  } else {
    switch (choose_tile(s.D, M)) {
      case TileKind::B: return args(TileB{});
      case TileKind::C: return args(TileC{});
      default: return args(TileA{});
    }
  }
}

template <Math M>
const char* weight_grad_m(const void* grad, const uint8_t* argmax, const void* x, const XStrides& xs, float* dw,
                          const PatchShape& s, unsigned char* scratch, const Device& dev, cudaStream_t stream) {
  using T = TypeOf<M>;
  auto args = [&](auto tile) {
    using Tl = decltype(tile);
    return weight_grad_t<M, Tl>(static_cast<const T*>(grad), argmax, static_cast<const T*>(x), xs, dw, s, scratch,
                                dev, stream);
  };
  if constexpr (M == Math::fma) {
    return args(TileF{});
  } else {
    switch (choose_tile(s.D, M)) {
      case TileKind::B: return args(TileB{});
      case TileKind::C: return args(TileC{});
      default: return args(TileA{});
    }
  }
}

inline const char* forward(Math m, const void* x, const XStrides& xs, const void* w, const void* b, void* out,
                           uint8_t* argmax, const PatchShape& s, unsigned char* scratch, const Device& dev,
                           cudaStream_t stream) {
  switch (m) {
    case Math::bf16: return forward_m<Math::bf16>(x, xs, w, b, out, argmax, s, scratch, dev, stream);
    case Math::f16: return forward_m<Math::f16>(x, xs, w, b, out, argmax, s, scratch, dev, stream);
    case Math::tf32: return forward_m<Math::tf32>(x, xs, w, b, out, argmax, s, scratch, dev, stream);
    default: return forward_m<Math::fma>(x, xs, w, b, out, argmax, s, scratch, dev, stream);
  }
}

inline const char* weight_grad(Math m, const void* grad, const uint8_t* argmax, const void* x, const XStrides& xs,
                               float* dw, const PatchShape& s, unsigned char* scratch, const Device& dev,
                               cudaStream_t stream) {
  switch (m) {
    case Math::bf16: return weight_grad_m<Math::bf16>(grad, argmax, x, xs, dw, s, scratch, dev, stream);
    case Math::f16: return weight_grad_m<Math::f16>(grad, argmax, x, xs, dw, s, scratch, dev, stream);
    case Math::tf32: return weight_grad_m<Math::tf32>(grad, argmax, x, xs, dw, s, scratch, dev, stream);
    default: return weight_grad_m<Math::fma>(grad, argmax, x, xs, dw, s, scratch, dev, stream);
  }
}

inline const char* input_grad(Math m, const void* grad, const uint8_t* argmax, const void* w, float* dx,
                              const XStrides& dxs, const PatchShape& s, unsigned char* scratch, const Device& dev,
                              cudaStream_t stream) {
  switch (m) {
    case Math::bf16:
      return input_grad_t<Math::bf16>(static_cast<const dev::bf16_t*>(grad), argmax,
                                      static_cast<const dev::bf16_t*>(w), dx, dxs, s, scratch, dev, stream);
    case Math::f16:
      return input_grad_t<Math::f16>(static_cast<const dev::half_t*>(grad), argmax,
                                     static_cast<const dev::half_t*>(w), dx, dxs, s, scratch, dev, stream);
    case Math::tf32:
      return input_grad_t<Math::tf32>(static_cast<const float*>(grad), argmax, static_cast<const float*>(w), dx,
                                      dxs, s, scratch, dev, stream);
    default:
      return input_grad_t<Math::fma>(static_cast<const float*>(grad), argmax, static_cast<const float*>(w), dx, dxs,
                                     s, scratch, dev, stream);
  }
}

inline int elem_size(Math m) { return m == Math::bf16 || m == Math::f16 ? 2 : 4; }

}  // namespace kernels
}  // namespace eit_fast
