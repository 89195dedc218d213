// The few device instructions the patch projection kernels use beyond plain C++: 16-bit float types,
// ldmatrix, mma.sync, cp.async, tf32 rounding and a multiply-high. With nvcc they are inline PTX; with g++
// and EIT_FAST_EMULATE_CUDA they go to emulation.h, which implements the same per-lane semantics on the CPU.
#pragma once
#include <cstdint>

#ifdef EIT_FAST_EMULATE_CUDA
#include "emulation.h"
#define EIT_UNROLL
#define EIT_SITE , const std::source_location loc = std::source_location::current()
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define EIT_UNROLL _Pragma("unroll")
#define EIT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define EIT_SITE
#endif

namespace eit_fast {
namespace dev {

#ifdef EIT_FAST_EMULATE_CUDA
using bf16_t = emu::bf16;
using half_t = emu::half;
inline float to_float(float v) { return v; }
inline float to_float(bf16_t v) { return emu::to_float(v); }
inline float to_float(half_t v) { return emu::to_float(v); }
template <typename T> T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline bf16_t from_float<bf16_t>(float v) { return emu::bf16_from_float(v); }
template <> inline half_t from_float<half_t>(float v) { return emu::half_from_float(v); }
inline uint32_t umulhi(uint32_t a, uint32_t b) { return uint32_t((uint64_t(a) * b) >> 32); }
inline uint32_t float_bits(float f) { return emu::float_to_bits(f); }
inline float bits_float(uint32_t u) { return emu::bits_to_float(u); }
inline uint32_t tf32_round(uint32_t u) { return emu::tf32_round(u); }

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row EIT_SITE) { emu::ldmatrix(4, false, r, row, loc); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row EIT_SITE) { emu::ldmatrix(2, false, r, row, loc); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row EIT_SITE) { emu::ldmatrix(4, true, r, row, loc); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row EIT_SITE) { emu::ldmatrix(2, true, r, row, loc); }
inline void mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2] EIT_SITE) {
  emu::mma(emu::Collective::mma_bf16, d, a, b, loc);
}
inline void mma_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2] EIT_SITE) {
  emu::mma(emu::Collective::mma_f16, d, a, b, loc);
}
inline void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2] EIT_SITE) {
  emu::mma(emu::Collective::mma_tf32, d, a, b, loc);
}
// cp.async of Bytes (4, 8 or 16) from global to shared; copies zeros instead when !pred (src is not read).
template <int Bytes> inline void cp_async_ca(void* smem, const void* gmem, bool pred) {
  emu::cp_async(smem, gmem, Bytes, pred ? Bytes : 0);
}
template <int Bytes> inline void cp_async_cg(void* smem, const void* gmem, bool pred) {
  emu::cp_async(smem, gmem, Bytes, pred ? Bytes : 0);
}
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int Pending> inline void cp_async_wait(const std::source_location loc = std::source_location::current()) {
  emu::cp_async_wait(Pending, loc);
}
#else
using bf16_t = __nv_bfloat16;
using half_t = __half;
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16_t v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(half_t v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ half_t from_float<half_t>(float v) { return __float2half_rn(v); }
__host__ __device__ __forceinline__ uint32_t umulhi(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * b) >> 32);
#endif
}
__device__ __forceinline__ uint32_t float_bits(float f) { return __float_as_uint(f); }
__device__ __forceinline__ float bits_float(uint32_t u) { return __uint_as_float(u); }
__device__ __forceinline__ uint32_t tf32_round(uint32_t u) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(__uint_as_float(u)));
  return r;
}
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <int Bytes> __device__ __forceinline__ void cp_async_ca(void* smem, const void* gmem, bool pred) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;"
               :: "r"(smem_addr(smem)), "l"(gmem), "n"(Bytes), "r"(pred ? Bytes : 0) : "memory");
}
template <int Bytes> __device__ __forceinline__ void cp_async_cg(void* smem, const void* gmem, bool pred) {
  static_assert(Bytes == 16, "cp.async.cg copies 16 bytes");
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
               :: "r"(smem_addr(smem)), "l"(gmem), "r"(pred ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int Pending> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" :: "n"(Pending) : "memory");
}
#endif

}  // namespace dev
}  // namespace eit_fast
