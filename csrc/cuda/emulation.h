// Runs CUDA kernel source on the CPU, for tests on machines without a GPU (DESIGN.md section 3).
//
// Covers what this project's kernels use: threadIdx/blockIdx/blockDim/gridDim, __shared__, __syncthreads,
// atomicAdd, <<<>>> through EIT_LAUNCH. A launch starts one std::thread per CUDA thread; together they walk
// the grid one block at a time, so a function-static array is exactly one block's shared memory, and
// __syncthreads is a std::barrier over the block's threads. Needs C++20 (std::barrier, std::atomic_ref).
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

namespace eit_fast {
namespace emu {

inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::mutex launch_mutex;  // one emulated launch at a time (the barrier and dims are global)

template <typename... KArgs, typename... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(KArgs...), Args... args) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  const unsigned threads = block.x * block.y * block.z;
  std::barrier<> barrier(threads);
  block_barrier = &barrier;
  block_dim = block;
  grid_dim = grid;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            block_idx = dim3(bx, by, bz);
            kernel(args...);
            barrier.arrive_and_wait();  // the block's shared memory is reused by the next block
          }
    });
  }
  for (auto& th : pool) th.join();
  block_barrier = nullptr;
}

}  // namespace emu
}  // namespace eit_fast

#define threadIdx (::eit_fast::emu::thread_idx)
#define blockIdx (::eit_fast::emu::block_idx)
#define blockDim (::eit_fast::emu::block_dim)
#define gridDim (::eit_fast::emu::grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

inline void __syncthreads() { ::eit_fast::emu::block_barrier->arrive_and_wait(); }

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
