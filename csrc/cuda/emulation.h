// Runs CUDA kernel source on the CPU, for tests on machines without a GPU (docs/design.md section 4).
//
// A launch runs its blocks one after another (in an order the test chooses); the threads of a block are
// fibers on one OS thread under a cooperative scheduler. A thread runs until it blocks: at __syncthreads, at
// a warp collective (ldmatrix, mma) or at its end. The scheduler then picks the next runnable thread in
// the chosen order (ascending, descending or seeded random thread index), so the threads' code between two
// barriers runs in different interleavings; a kernel whose result depends on the order (a missing barrier)
// gives different results, which the tests compare bitwise.
//
// What it checks and models:
//   - dynamic shared memory (EIT_DYNAMIC_SMEM), filled with 0xFF bytes (NaN in every float type) at block start;
//   - a watchdog: a thread that exits or waits elsewhere while the others wait at a barrier or collective
//     fails the run with a message naming the threads and their barrier counts (no hang);
//   - warp collectives with NVIDIA's documented per-lane layouts (PTX ISA, "Warp-level matrix instructions"):
//     ldmatrix .x1/.x2/.x4 (.trans), mma.sync m16n8k16 bf16/f16 and m16n8k8 tf32 with fp32 accumulation;
//   - cp.async as a copy deferred to the cp.async.wait_group that covers it (a missing wait reads stale data);
//   - mutation: EIT_EMU_SKIP=file:line[,file:line...] turns the barriers or waits at those source lines into
//     no-ops, and the sites a run passed are listed by eit_fast::emu::sites() (the mutation tests' input).
// Needs C++20 (std::source_location) and Linux; x86-64 switches fibers with a few instructions, other
// machines with ucontext.
#pragma once
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <source_location>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

namespace eit_fast {
namespace emu {

// ---- small float types of our own (storage only; arithmetic in float) -----------------------------------

struct bf16 { uint16_t bits; };
struct half { uint16_t bits; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(bf16 v) { return bits_to_float(uint32_t(v.bits) << 16); }
inline bf16 bf16_from_float(float f) {  // round to nearest even; NaN stays a quiet NaN
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40)};
  return bf16{uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

inline float to_float(half v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16, exp = (v.bits >> 10) & 0x1fu, man = v.bits & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));         // inf, NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));    // normal
  return (sign ? -1.0f : 1.0f) * std::ldexp(float(man), -24);                      // subnormal, zero
}
inline half half_from_float(float f) {  // round to nearest even, overflow to inf, NaN stays NaN
  const uint32_t u = float_to_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return half{uint16_t(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return half{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (a >= 0x38800000u) {                                        // normal half
    const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
    return half{uint16_t(sign | (((r >> 13) - (112u << 10)) & 0x7fffu))};
  }
  // subnormal half: value = m * 2^-24, m = round(|f| * 2^24) with ties to even
  const float scaled = bits_to_float(a) * 16777216.0f;  // exact (power of two)
  const float fl = std::floor(scaled), rem = scaled - fl;
  uint32_t m = uint32_t(fl);
  if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
  return half{uint16_t(sign | m)};
}

// tf32: 10 mantissa bits. cvt.rna rounds to nearest, ties away from zero; the tensor cores read only the
// top 19 bits of an operand register.
inline uint32_t tf32_round(uint32_t u) {
  if ((u & 0x7f800000u) == 0x7f800000u) return u;  // inf, NaN unchanged
  return (u + 0x1000u) & 0xffffe000u;
}
inline float tf32_operand(uint32_t u) { return bits_to_float(u & 0xffffe000u); }

// ---- run options (set by the test driver) ----------------------------------------------------------------

enum class Order { ascending, descending, random };

inline const char* order_name(Order o) {
  return o == Order::ascending ? "ascending" : o == Order::descending ? "descending" : "random";
}

struct Options {
  Order order = Order::ascending;
  uint64_t seed = 1;
};
inline Options options;

[[noreturn]] inline void fail(const std::string& msg) {
  std::fprintf(stderr, "emulation error: %s\n", msg.c_str());
  std::fflush(stderr);
  std::_Exit(3);
}

inline std::string site_name(const std::source_location& loc) {
  std::string f = loc.file_name();
  const size_t slash = f.find_last_of('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(loc.line());
}

// Sites (barriers, cp.async waits) a run passed, and the ones EIT_EMU_SKIP removes.
inline std::map<std::string, std::string>& site_registry() {  // site -> kind
  static std::map<std::string, std::string> sites;
  return sites;
}
inline const std::map<std::string, std::string>& sites() { return site_registry(); }

inline bool skipped(const std::source_location& loc, const char* kind) {
  static const std::set<std::string> skip = [] {
    std::set<std::string> s;
    if (const char* env = std::getenv("EIT_EMU_SKIP")) {
      std::string v = env;
      size_t start = 0;
      while (start <= v.size()) {
        const size_t comma = v.find(',', start);
        const std::string item = v.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        if (!item.empty()) s.insert(item);
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
    }
    return s;
  }();
  const std::string name = site_name(loc);
  site_registry().emplace(name, kind);
  return skip.count(name) > 0;
}

// ---- fibers ----------------------------------------------------------------------------------------------

#if defined(__x86_64__)
// switch(&save_sp, load_sp): pushes the callee-saved registers and the FP control words, saves rsp, loads
// the other fiber's rsp and pops its state. A new fiber's stack starts with a frame that returns into
// eit_emu_fiber_entry with r12 = argument, r13 = function.
extern "C" void eit_emu_switch(void** save_sp, void* load_sp);
extern "C" void eit_emu_fiber_entry();
asm(R"(
  .text
  .weak eit_emu_switch
  .type eit_emu_switch, @function
eit_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size eit_emu_switch, .-eit_emu_switch
  .weak eit_emu_fiber_entry
  .type eit_emu_fiber_entry, @function
eit_emu_fiber_entry:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size eit_emu_fiber_entry, .-eit_emu_fiber_entry
)");
#endif

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
};

// ---- the emulated block ----------------------------------------------------------------------------------

enum class State { runnable, barrier, collective, done };

struct CpAsyncCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;
};

struct Thread {
  dim3 idx;
  int linear = 0, warp = 0, lane = 0;
  State state = State::runnable;
  int barriers = 0;           // __syncthreads passed
  std::string waiting_at;     // the site of the barrier or collective it waits at
  Fiber fiber;
  std::vector<CpAsyncCopy> open_group;
  std::vector<std::vector<CpAsyncCopy>> committed;
};

enum class Collective { none, ldmatrix, mma_bf16, mma_f16, mma_tf32 };

struct WarpOp {  // what each lane brought to the collective
  Collective kind = Collective::none;
  int arrived = 0, nmat = 0;
  bool trans = false;
  std::string site;
  const void* addr[32];
  uint32_t* out[32];
  const uint32_t* a[32];
  const uint32_t* b[32];
  float* d[32];
};

struct Launch {
  dim3 grid, block;
  size_t smem_bytes = 0;
  std::function<void()> body;
  std::vector<Thread> threads;
  std::vector<WarpOp> warps;
  std::vector<unsigned char> smem;
  std::vector<uint64_t> runnable;  // bitset over threads
  Thread* current = nullptr;
  Fiber scheduler;
  dim3 block_idx;
  unsigned char* stacks = nullptr;
  size_t stack_bytes = 0, stack_stride = 0;
  std::mt19937_64 rng;
};

inline Launch*& active() {
  static Launch* l = nullptr;
  return l;
}
inline Launch& launch_state() {
  if (active() == nullptr) fail("a CUDA device function ran outside an emulated launch");
  return *active();
}
inline Thread& self() { return *launch_state().current; }

inline void set_runnable(Launch& L, int t, bool on) {
  if (on) L.runnable[t >> 6] |= uint64_t(1) << (t & 63);
  else L.runnable[t >> 6] &= ~(uint64_t(1) << (t & 63));
}

inline void switch_to(Fiber& from, Fiber& to) {
#if defined(__x86_64__)
  eit_emu_switch(&from.sp, to.sp);
#else
  swapcontext(&from.ctx, &to.ctx);
#endif
}

// The calling emulated thread gives the CPU back to the scheduler.
inline void yield() {
  Launch& L = launch_state();
  switch_to(L.current->fiber, L.scheduler);
}

inline void apply_copies(std::vector<CpAsyncCopy>& copies) {
  for (const CpAsyncCopy& c : copies) {
    if (c.src_bytes > 0) std::memcpy(c.dst, c.src, size_t(c.src_bytes));
    if (c.src_bytes < c.bytes) std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, size_t(c.bytes - c.src_bytes));
  }
  copies.clear();
}

inline void fiber_main(Launch* L) {
  L->body();
  Thread& t = *L->current;
  for (auto& g : t.committed) apply_copies(g);  // a kernel may end with copies in flight: they still land
  t.committed.clear();
  apply_copies(t.open_group);
  t.state = State::done;
  set_runnable(*L, t.linear, false);
  switch_to(t.fiber, L->scheduler);
  fail("a finished emulated thread was resumed");
}

#if !defined(__x86_64__)
inline void fiber_trampoline(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<Launch*>((uintptr_t(hi) << 32) | uintptr_t(lo)));
}
#endif

inline void start_fiber(Launch& L, Thread& t) {
  unsigned char* base = L.stacks + size_t(t.linear) * L.stack_stride + 4096;  // above its guard page
#if defined(__x86_64__)
  uintptr_t top = (reinterpret_cast<uintptr_t>(base) + L.stack_bytes) & ~uintptr_t(15);
  auto* frame = reinterpret_cast<uint64_t*>(top - 128);  // 16-aligned; eit_emu_switch pops 8 words
  std::memset(frame, 0, 128);
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::memcpy(&frame[0], &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(&frame[0]) + 4, &fpucw, 2);
  // frame[1..6] = r15, r14, r13, r12, rbx, rbp; frame[7] = return address
  frame[3] = reinterpret_cast<uint64_t>(&fiber_main);  // r13: function
  frame[4] = reinterpret_cast<uint64_t>(&L);           // r12: argument
  frame[7] = reinterpret_cast<uint64_t>(&eit_emu_fiber_entry);
  t.fiber.sp = frame;
#else
  getcontext(&t.fiber.ctx);
  t.fiber.ctx.uc_stack.ss_sp = base;
  t.fiber.ctx.uc_stack.ss_size = L.stack_bytes;
  t.fiber.ctx.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(&L);
  makecontext(&t.fiber.ctx, reinterpret_cast<void (*)()>(&fiber_trampoline), 2, unsigned(p >> 32), unsigned(p));
#endif
}

inline std::string describe(const Thread& t) {
  char buf[96];
  std::snprintf(buf, sizeof(buf), "thread %d (warp %d lane %d, %d barriers passed", t.linear, t.warp, t.lane,
                t.barriers);
  std::string s = buf;
  if (t.state == State::done) s += ", exited)";
  else if (t.state == State::barrier) s += ", waiting at __syncthreads " + t.waiting_at + ")";
  else if (t.state == State::collective) s += ", waiting at warp collective " + t.waiting_at + ")";
  else s += ", runnable)";
  return s;
}

[[noreturn]] inline void fail_block(Launch& L, const std::string& what) {
  std::string msg = what + " in block (" + std::to_string(L.block_idx.x) + "," + std::to_string(L.block_idx.y) +
                    "," + std::to_string(L.block_idx.z) + "):";
  // Name the odd ones out: group threads by state and barrier count, list the smallest groups in full.
  std::map<std::string, std::vector<int>> groups;
  for (const Thread& t : L.threads) {
    std::string key = t.state == State::done ? "exited" : t.state == State::barrier ? "at barrier " + t.waiting_at
                      : t.state == State::collective ? "at collective " + t.waiting_at : "runnable";
    groups[key + " after " + std::to_string(t.barriers) + " barriers"].push_back(t.linear);
  }
  for (const auto& [key, ids] : groups) {
    msg += "\n  " + std::to_string(ids.size()) + " threads " + key;
    if (ids.size() <= 8) {
      msg += ":";
      for (int id : ids) msg += " " + describe(L.threads[size_t(id)]);
    }
  }
  fail(msg);
}

inline int pick(Launch& L) {
  const int words = int(L.runnable.size());
  if (options.order == Order::ascending) {
    for (int w = 0; w < words; ++w)
      if (L.runnable[size_t(w)]) return w * 64 + __builtin_ctzll(L.runnable[size_t(w)]);
  } else if (options.order == Order::descending) {
    for (int w = words - 1; w >= 0; --w)
      if (L.runnable[size_t(w)]) return w * 64 + 63 - __builtin_clzll(L.runnable[size_t(w)]);
  } else {
    int count = 0;
    for (uint64_t v : L.runnable) count += __builtin_popcountll(v);
    if (count == 0) return -1;
    int k = int(L.rng() % uint64_t(count));
    for (int w = 0; w < words; ++w) {
      uint64_t v = L.runnable[size_t(w)];
      const int c = __builtin_popcountll(v);
      if (k >= c) { k -= c; continue; }
      while (k-- > 0) v &= v - 1;
      return w * 64 + __builtin_ctzll(v);
    }
  }
  return -1;
}

inline void run_block(Launch& L) {
  const int n = int(L.threads.size());
  std::fill(L.smem.begin(), L.smem.end(), static_cast<unsigned char>(0xff));  // poison: NaN in every float type
  std::fill(L.runnable.begin(), L.runnable.end(), 0);
  for (auto& w : L.warps) w = WarpOp{};
  for (int i = 0; i < n; ++i) {
    Thread& t = L.threads[size_t(i)];
    t.state = State::runnable;
    t.barriers = 0;
    t.waiting_at.clear();
    t.open_group.clear();
    t.committed.clear();
    start_fiber(L, t);
    set_runnable(L, i, true);
  }
  for (;;) {
    const int next = pick(L);
    if (next >= 0) {
      L.current = &L.threads[size_t(next)];
      switch_to(L.scheduler, L.current->fiber);
      L.current = nullptr;
      continue;
    }
    int done = 0, at_barrier = 0;
    for (const Thread& t : L.threads) {
      done += t.state == State::done;
      at_barrier += t.state == State::barrier;
    }
    if (done == n) {
      for (const Thread& t : L.threads)
        if (t.barriers != L.threads[0].barriers) fail_block(L, "threads passed different numbers of barriers");
      return;
    }
    if (at_barrier == n) {
      const int count = L.threads[0].barriers;
      for (const Thread& t : L.threads)
        if (t.barriers != count) fail_block(L, "threads met at __syncthreads with different barrier counts");
      for (Thread& t : L.threads) {
        t.state = State::runnable;
        t.barriers++;
        set_runnable(L, t.linear, true);
      }
      continue;
    }
    if (at_barrier + done == n) fail_block(L, "a thread exited while others wait at __syncthreads");
    fail_block(L, "deadlock: a barrier or warp collective that not all its threads reach");
  }
}

inline unsigned char* map_stacks(size_t count, size_t stride) {
  void* p = mmap(nullptr, count * stride, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) fail("cannot map fiber stacks");
  auto* base = static_cast<unsigned char*>(p);
  for (size_t i = 0; i < count; ++i) mprotect(base + i * stride, 4096, PROT_NONE);  // guard page below each stack
  return base;
}

// Runs kernel(args...) over the grid. Blocks run one at a time, in the order options.order names.
template <typename... KArgs, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem_bytes, void (*kernel)(KArgs...), Args... args) {
  if (active() != nullptr) fail("nested emulated launch");
  Launch L;
  L.grid = grid;
  L.block = block;
  L.smem_bytes = smem_bytes;
  L.smem.assign(smem_bytes + 16, 0);
  const int n = int(block.x * block.y * block.z);
  if (n <= 0 || n > 1024) fail("block of " + std::to_string(n) + " threads");
  L.threads.resize(size_t(n));
  L.warps.resize(size_t((n + 31) / 32));
  L.runnable.assign(size_t((n + 63) / 64), 0);
  for (int i = 0; i < n; ++i) {
    Thread& t = L.threads[size_t(i)];
    t.linear = i;
    t.warp = i / 32;
    t.lane = i % 32;
    t.idx = dim3(unsigned(i) % block.x, (unsigned(i) / block.x) % block.y, unsigned(i) / (block.x * block.y));
  }
  L.stack_bytes = 256 * 1024;
  L.stack_stride = L.stack_bytes + 4096;
  L.stacks = map_stacks(size_t(n), L.stack_stride);
  L.rng.seed(options.seed);
  L.body = [kernel, args...]() { kernel(args...); };
  std::vector<dim3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.emplace_back(x, y, z);
  if (options.order == Order::descending) std::reverse(order.begin(), order.end());
  if (options.order == Order::random) std::shuffle(order.begin(), order.end(), L.rng);
  active() = &L;
  for (const dim3& b : order) {
    L.block_idx = b;
    run_block(L);
  }
  active() = nullptr;
  munmap(L.stacks, size_t(n) * L.stack_stride);
}

// ---- what device code calls ----------------------------------------------------------------------------

inline void syncthreads(const std::source_location& loc) {
  if (skipped(loc, "barrier")) return;
  Launch& L = launch_state();
  Thread& t = *L.current;
  t.state = State::barrier;
  t.waiting_at = site_name(loc);
  set_runnable(L, t.linear, false);
  yield();
}

inline void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  self().open_group.push_back(CpAsyncCopy{dst, src, bytes, src_bytes});
}
inline void cp_async_commit() {
  Thread& t = self();
  t.committed.push_back(std::move(t.open_group));
  t.open_group.clear();
}
// Lands every committed group but the newest `pending` ones.
inline void cp_async_wait(int pending, const std::source_location& loc) {
  if (skipped(loc, "cp.async wait")) return;
  Thread& t = self();
  while (int(t.committed.size()) > pending) {
    apply_copies(t.committed.front());
    t.committed.erase(t.committed.begin());
  }
}

inline float unpack_lo(uint32_t r, Collective k) {
  return k == Collective::mma_bf16 ? to_float(bf16{uint16_t(r)}) : to_float(half{uint16_t(r)});
}
inline float unpack_hi(uint32_t r, Collective k) { return unpack_lo(r >> 16, k); }

// The last lane to arrive performs the collective for the whole warp.
inline void perform(WarpOp& op) {
  if (op.kind == Collective::ldmatrix) {
    for (int lane = 0; lane < 32; ++lane)
      for (int m = 0; m < op.nmat; ++m) {
        const int g = lane / 4, t = lane % 4;
        uint32_t word;
        if (!op.trans) {  // row g of matrix m, elements 2t and 2t+1
          std::memcpy(&word, static_cast<const char*>(op.addr[m * 8 + g]) + 4 * t, 4);
        } else {          // column g: elements (row 2t, col g) and (row 2t+1, col g)
          uint16_t lo, hi;
          std::memcpy(&lo, static_cast<const char*>(op.addr[m * 8 + 2 * t]) + 2 * g, 2);
          std::memcpy(&hi, static_cast<const char*>(op.addr[m * 8 + 2 * t + 1]) + 2 * g, 2);
          word = uint32_t(lo) | (uint32_t(hi) << 16);
        }
        op.out[lane][m] = word;
      }
    return;
  }
  float A[16][16] = {}, B[16][8] = {}, C[16][8];
  const bool tf32 = op.kind == Collective::mma_tf32;
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    const uint32_t* a = op.a[lane];
    const uint32_t* b = op.b[lane];
    if (tf32) {  // m16n8k8: a0 (g,t) a1 (g+8,t) a2 (g,t+4) a3 (g+8,t+4); b0 (k=t,n=g) b1 (k=t+4,n=g)
      A[g][t] = tf32_operand(a[0]);
      A[g + 8][t] = tf32_operand(a[1]);
      A[g][t + 4] = tf32_operand(a[2]);
      A[g + 8][t + 4] = tf32_operand(a[3]);
      B[t][g] = tf32_operand(b[0]);
      B[t + 4][g] = tf32_operand(b[1]);
    } else {     // m16n8k16: a0a1 (g, 2t..) a2a3 (g+8, 2t..) a4a5 (g, 2t+8..) a6a7 (g+8, 2t+8..)
      for (int h = 0; h < 2; ++h) {
        A[g][2 * t + h] = h ? unpack_hi(a[0], op.kind) : unpack_lo(a[0], op.kind);
        A[g + 8][2 * t + h] = h ? unpack_hi(a[1], op.kind) : unpack_lo(a[1], op.kind);
        A[g][2 * t + 8 + h] = h ? unpack_hi(a[2], op.kind) : unpack_lo(a[2], op.kind);
        A[g + 8][2 * t + 8 + h] = h ? unpack_hi(a[3], op.kind) : unpack_lo(a[3], op.kind);
        B[2 * t + h][g] = h ? unpack_hi(b[0], op.kind) : unpack_lo(b[0], op.kind);   // b0b1: k 2t.., n g
        B[2 * t + 8 + h][g] = h ? unpack_hi(b[1], op.kind) : unpack_lo(b[1], op.kind);
      }
    }
    const float* d = op.d[lane];  // c0 (g,2t) c1 (g,2t+1) c2 (g+8,2t) c3 (g+8,2t+1)
    C[g][2 * t] = d[0];
    C[g][2 * t + 1] = d[1];
    C[g + 8][2 * t] = d[2];
    C[g + 8][2 * t + 1] = d[3];
  }
  const int kdim = tf32 ? 8 : 16;
  float D[16][8];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      float acc = C[i][j];
      for (int k = 0; k < kdim; ++k) acc += A[i][k] * B[k][j];  // products are exact in float
      D[i][j] = acc;
    }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    float* d = op.d[lane];
    d[0] = D[g][2 * t];
    d[1] = D[g][2 * t + 1];
    d[2] = D[g + 8][2 * t];
    d[3] = D[g + 8][2 * t + 1];
  }
}

inline WarpOp& arrive(Collective kind, const std::source_location& loc) {
  Launch& L = launch_state();
  Thread& t = *L.current;
  WarpOp& op = L.warps[size_t(t.warp)];
  const std::string site = site_name(loc);
  if (op.arrived == 0) {
    op.kind = kind;
    op.site = site;
  } else if (op.kind != kind || op.site != site) {
    t.state = State::collective;
    t.waiting_at = site;
    fail_block(L, "lanes of warp " + std::to_string(t.warp) + " meet at different warp collectives (" + op.site +
                      " and " + site + ")");
  }
  return op;
}

inline void finish_arrival(WarpOp& op, const std::source_location& loc) {
  Launch& L = launch_state();
  Thread& t = *L.current;
  const int warp_size = std::min(32, int(L.threads.size()) - t.warp * 32);
  if (warp_size != 32) fail("warp collectives need whole warps");
  if (++op.arrived == warp_size) {
    perform(op);
    op = WarpOp{};
    for (int i = 0; i < warp_size; ++i) {
      Thread& lane = L.threads[size_t(t.warp * 32 + i)];
      lane.state = State::runnable;
      set_runnable(L, lane.linear, true);
    }
  } else {
    t.state = State::collective;
    t.waiting_at = site_name(loc);
    set_runnable(L, t.linear, false);
  }
  yield();
}

inline void ldmatrix(int nmat, bool trans, uint32_t* out, const void* row, const std::source_location& loc) {
  WarpOp& op = arrive(Collective::ldmatrix, loc);
  if (op.arrived > 0 && (op.nmat != nmat || op.trans != trans)) fail("ldmatrix lanes disagree on the shape");
  op.nmat = nmat;
  op.trans = trans;
  const int lane = self().lane;
  op.addr[lane] = row;
  op.out[lane] = out;
  finish_arrival(op, loc);
}

inline void mma(Collective kind, float* d, const uint32_t* a, const uint32_t* b, const std::source_location& loc) {
  WarpOp& op = arrive(kind, loc);
  const int lane = self().lane;
  op.a[lane] = a;
  op.b[lane] = b;
  op.d[lane] = d;
  finish_arrival(op, loc);
}

}  // namespace emu
}  // namespace eit_fast

#define threadIdx (::eit_fast::emu::self().idx)
#define blockIdx (::eit_fast::emu::launch_state().block_idx)
#define blockDim (::eit_fast::emu::launch_state().block)
#define gridDim (::eit_fast::emu::launch_state().grid)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define EIT_DYNAMIC_SMEM(name) unsigned char* name = ::eit_fast::emu::launch_state().smem.data()

inline void __syncthreads(const std::source_location loc = std::source_location::current()) {
  ::eit_fast::emu::syncthreads(loc);
}

template <typename T>
T atomicAdd(T* address, T value) {  // one OS thread runs the launch: a plain add is atomic here
  const T old = *address;
  *address = old + value;
  return old;
}
