// Geometry of the fused conv + max-pool patch projection; shared by the CPU op, the CUDA kernels and the
// tests. Plain C++ (no torch, no CUDA headers) so the .cu files and the emulation build can include it.
#pragma once
#include <cstdint>

namespace eit_fast {

struct PatchShape {
  int64_t B, C, H, W;      // input (B, C, H, W)
  int64_t D, k;            // weight (D, C, k, k), bias (D)
  int64_t stride, pad, pool;
  int64_t Hc, Wc;          // conv output
  int64_t Hp, Wp;          // pooled output: tokens (B, Hp*Wp, D)

  int64_t K() const { return C * k * k; }        // reduction length of the implicit GEMM
  int64_t T() const { return Hp * Wp; }          // tokens per image
  int64_t N() const { return B * Hp * Wp; }      // pooled outputs (rows of the token matrix)
  int64_t window() const { return pool * pool; } // conv outputs per pooled output (argmax range)
};

// Conv output size as nn.Conv2d computes it (floor), then MaxPool2d(pool, pool) without padding (floor).
inline PatchShape make_patch_shape(int64_t B, int64_t C, int64_t H, int64_t W, int64_t D, int64_t k,
                                   int64_t stride, int64_t pad, int64_t pool) {
  PatchShape s{B, C, H, W, D, k, stride, pad, pool, 0, 0, 0, 0};
  s.Hc = (H + 2 * pad - k) / stride + 1;
  s.Wc = (W + 2 * pad - k) / stride + 1;
  s.Hp = s.Hc / pool;
  s.Wp = s.Wc / pool;
  return s;
}

}  // namespace eit_fast
