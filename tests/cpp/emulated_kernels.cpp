// Runs the real CUDA kernels (csrc/cuda/patch_projection_kernels.cuh) on the CPU through the emulation
// header, every launch three times: threads (and blocks) in ascending, descending and seeded random order.
// The forward output, argmax and weight gradient must be bitwise equal across the orders (they are
// deterministic by design); the input gradient, which adds with atomics, must agree to rounding.
//
//   emulated_kernels                  self-check for ctest: helpers, and random cases of every math path
//                                     against direct loops in double; exit status 0 when all pass
//   emulated_kernels run MATH LAYOUT B C H W D k stride pad pool LIMIT IN_DIR OUT_DIR
//       MATH f32 (exact fp32 FMA) | tf32 | bf16 | f16; LAYOUT nchw | nhwc (x's memory order; dx is written
//       in the same order); LIMIT: elements per launch (2147483647, or less to make the launchers split
//       the batch). Reads x.bin w.bin b.bin grad.bin (raw values: fp32 for f32/tf32, 16-bit bits for
//       bf16/f16) and writes out.bin argmax.bin dw.bin dx.bin (dw, dx fp32). Exit 4 if the orders disagree.
//   emulated_kernels sites            runs a small case and lists every barrier and cp.async wait it passed
//   emulated_kernels convert bf16|f16 IN OUT   fp32 values -> the emulator's 16-bit types (raw bits)
//   emulated_kernels watchdog N       runs broken kernel N (the emulator must stop it with a message, exit 3)
//   emulated_kernels layouts          dynamic shared memory of every kernel at K = 768 and K = 27
#define EIT_FAST_EMULATE_CUDA 1
#include "../../csrc/cuda/patch_projection_kernels.cuh"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <vector>

using eit_fast::PatchShape;
namespace k = eit_fast::kernels;
namespace emu = eit_fast::emu;
using k::Math;

namespace {

struct Problem {
  PatchShape s;
  Math math;
  bool nhwc;
  k::Device dev;
  k::XStrides strides() const {
    if (nhwc) return {s.H * s.W * s.C, 1, s.W * s.C, s.C};
    return {s.C * s.H * s.W, s.H * s.W, s.W, 1};
  }
  int esize() const { return k::elem_size(math); }
};

using Bytes = std::vector<unsigned char>;

struct Outputs {
  Bytes out, argmax;
  std::vector<float> dw, dx;
};

void check(const char* err, const char* what) {
  if (err != nullptr) {
    std::fprintf(stderr, "%s refused: %s\n", what, err);
    std::exit(5);
  }
}

Outputs run_all(const Problem& p, const Bytes& x, const Bytes& w, const Bytes& b, const Bytes& grad, emu::Order order,
                uint64_t seed) {
  emu::options.order = order;
  emu::options.seed = seed;
  const PatchShape& s = p.s;
  const k::XStrides xs = p.strides();
  Outputs o;
  o.out.assign(size_t(s.N() * s.D) * size_t(p.esize()), 0xff);  // poisoned: NaN in every float type
  o.argmax.assign(size_t(s.N() * s.D), 0xff);
  o.dw.assign(size_t(s.D * s.K()), NAN);
  o.dx.assign(size_t(s.B * s.C * s.H * s.W), 0.0f);
  const size_t scratch_bytes = std::max({k::forward_scratch(s, p.math, p.esize()),
                                         k::weight_grad_scratch(s, xs, p.math, p.esize(), p.dev),
                                         k::input_grad_scratch(s, p.math, p.esize())});
  Bytes scratch(scratch_bytes + 256, 0xff);
  unsigned char* sp = scratch.data() + (256 - reinterpret_cast<uintptr_t>(scratch.data()) % 256) % 256;
  check(k::forward(p.math, x.data(), xs, w.data(), b.data(), o.out.data(), o.argmax.data(), s, sp, p.dev, nullptr),
        "forward");
  std::fill(scratch.begin(), scratch.end(), 0xff);
  check(k::weight_grad(p.math, grad.data(), o.argmax.data(), x.data(), xs, o.dw.data(), s, sp, p.dev, nullptr),
        "weight gradient");
  std::fill(scratch.begin(), scratch.end(), 0xff);
  check(k::input_grad(p.math, grad.data(), o.argmax.data(), w.data(), o.dx.data(), xs, s, sp, p.dev, nullptr),
        "input gradient");
  return o;
}

double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) != std::isnan(b[i])) return INFINITY;
    if (std::isnan(a[i])) continue;
    num += double(a[i] - b[i]) * (a[i] - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

bool same_bits(const void* a, const void* b, size_t n) { return std::memcmp(a, b, n) == 0; }

// Runs the three orders; returns the ascending run, and whether the orders agreed.
Outputs run_orders(const Problem& p, const Bytes& x, const Bytes& w, const Bytes& b, const Bytes& grad, bool& agree,
                   std::string& report) {
  const Outputs asc = run_all(p, x, w, b, grad, emu::Order::ascending, 1);
  agree = true;
  report.clear();
  for (auto [order, seed] : {std::pair{emu::Order::descending, uint64_t(1)}, std::pair{emu::Order::random, uint64_t(12345)}}) {
    const Outputs o = run_all(p, x, w, b, grad, order, seed);
    const bool fwd = same_bits(o.out.data(), asc.out.data(), asc.out.size()) && o.argmax == asc.argmax;
    const bool wgt = same_bits(o.dw.data(), asc.dw.data(), asc.dw.size() * 4);
    const double dx = rel_diff(o.dx, asc.dx);
    char line[200];
    std::snprintf(line, sizeof(line), "%s: forward %s, weight gradient %s, input gradient within %.1e\n",
                  emu::order_name(order), fwd ? "bitwise equal" : "DIFFERS", wgt ? "bitwise equal" : "DIFFERS", dx);
    report += line;
    agree = agree && fwd && wgt && dx < 1e-5;
  }
  return asc;
}

Bytes read_file(const std::string& path, size_t n) {
  Bytes v(n);
  std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(v.data()), std::streamsize(n));
  if (!f) {
    std::fprintf(stderr, "cannot read %zu bytes from %s\n", n, path.c_str());
    std::exit(2);
  }
  return v;
}

void write_file(const std::string& path, const void* data, size_t n) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), std::streamsize(n));
  if (!f) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(2);
  }
}

bool parse_math(const std::string& name, Math& m) {
  if (name == "f32") m = Math::fma;
  else if (name == "tf32") m = Math::tf32;
  else if (name == "bf16") m = Math::bf16;
  else if (name == "f16") m = Math::f16;
  else return false;
  return true;
}

int run_mode(int argc, char** argv) {
  if (argc != 16) {
    std::fprintf(stderr, "usage: %s run MATH nchw|nhwc B C H W D k stride pad pool LIMIT IN_DIR OUT_DIR\n", argv[0]);
    return 2;
  }
  Problem p;
  if (!parse_math(argv[2], p.math)) {
    std::fprintf(stderr, "unknown math %s\n", argv[2]);
    return 2;
  }
  p.nhwc = std::string(argv[3]) == "nhwc";
  int64_t v[9];
  for (int i = 0; i < 9; ++i) v[i] = std::atoll(argv[4 + i]);
  p.s = eit_fast::make_patch_shape(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8]);
  p.dev.index_limit = std::atoll(argv[13]);
  const std::string in = argv[14], out = argv[15];
  const PatchShape& s = p.s;
  const size_t e = size_t(p.esize());
  const Bytes x = read_file(in + "/x.bin", size_t(s.B * s.C * s.H * s.W) * e);
  const Bytes w = read_file(in + "/w.bin", size_t(s.D * s.K()) * e);
  const Bytes b = read_file(in + "/b.bin", size_t(s.D) * e);
  const Bytes g = read_file(in + "/grad.bin", size_t(s.N() * s.D) * e);
  if (const char* why = k::refusal(s, p.strides(), p.dev)) {
    std::fprintf(stderr, "refused: %s\n", why);
    return 5;
  }
  bool agree;
  std::string report;
  const Outputs o = run_orders(p, x, w, b, g, agree, report);
  write_file(out + "/out.bin", o.out.data(), o.out.size());
  write_file(out + "/argmax.bin", o.argmax.data(), o.argmax.size());
  write_file(out + "/dw.bin", o.dw.data(), o.dw.size() * 4);
  write_file(out + "/dx.bin", o.dx.data(), o.dx.size() * 4);
  std::fputs(report.c_str(), stdout);
  return agree ? 0 : 4;
}

// ---- self-check ------------------------------------------------------------------------------------------

int failures = 0;
void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  failures += !ok;
}

uint16_t to16(float f, Math m) { return m == Math::bf16 ? emu::bf16_from_float(f).bits : emu::half_from_float(f).bits; }
float from16(uint16_t u, Math m) { return m == Math::bf16 ? emu::to_float(emu::bf16{u}) : emu::to_float(emu::half{u}); }

// Values as the kernels receive them: encoded in the math's storage type.
Bytes encode(const std::vector<float>& v, Math m, std::vector<double>& decoded) {
  Bytes out(v.size() * size_t(k::elem_size(m)));
  decoded.resize(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if (k::elem_size(m) == 4) {
      std::memcpy(&out[i * 4], &v[i], 4);
      decoded[i] = v[i];
    } else {
      const uint16_t u = to16(v[i], m);
      std::memcpy(&out[i * 2], &u, 2);
      decoded[i] = from16(u, m);
    }
  }
  return out;
}
double decode(const Bytes& b, size_t i, Math m) {
  if (k::elem_size(m) == 4) { float f; std::memcpy(&f, &b[i * 4], 4); return f; }
  uint16_t u;
  std::memcpy(&u, &b[i * 2], 2);
  return from16(u, m);
}

struct Reference {
  std::vector<double> out, dw, dx;
  std::vector<int> argmax;
};

// Direct loops: conv at every window position, PyTorch's max-pool rule, routed gradients.
Reference reference(const Problem& p, const std::vector<double>& x, const std::vector<double>& w,
                    const std::vector<double>& b, const std::vector<double>& grad) {
  const PatchShape& s = p.s;
  const k::XStrides xs = p.strides();
  Reference r;
  r.out.assign(size_t(s.N() * s.D), 0);
  r.argmax.assign(size_t(s.N() * s.D), 0);
  r.dw.assign(size_t(s.D * s.K()), 0);
  r.dx.assign(size_t(s.B * s.C * s.H * s.W), 0);
  auto conv = [&](int64_t bi, int64_t d, int64_t oy, int64_t ox, double gr) {
    double acc = b[size_t(d)];
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t kh = 0; kh < s.k; ++kh)
        for (int64_t kw = 0; kw < s.k; ++kw) {
          const int64_t iy = oy * s.stride - s.pad + kh, ix = ox * s.stride - s.pad + kw;
          if (iy < 0 || iy >= s.H || ix < 0 || ix >= s.W) continue;
          const size_t xi = size_t(bi * xs.b + c * xs.c + iy * xs.h + ix * xs.w);
          const size_t wi = size_t(((d * s.C + c) * s.k + kh) * s.k + kw);
          acc += x[xi] * w[wi];
          if (gr != 0) { r.dw[wi] += gr * x[xi]; r.dx[xi] += gr * w[wi]; }
        }
    return acc;
  };
  for (int64_t bi = 0; bi < s.B; ++bi)
    for (int64_t t = 0; t < s.T(); ++t)
      for (int64_t d = 0; d < s.D; ++d) {
        const int64_t ph = t / s.Wp, pw = t % s.Wp, n = bi * s.T() + t;
        double best = -INFINITY;
        int best_w = 0;
        for (int64_t wi = 0; wi < s.window(); ++wi) {
          const double v = conv(bi, d, ph * s.pool + wi / s.pool, pw * s.pool + wi % s.pool, 0);
          if (v > best || std::isnan(v)) { best = v; best_w = int(wi); }
        }
        r.out[size_t(n * s.D + d)] = best;
        r.argmax[size_t(n * s.D + d)] = best_w;
        conv(bi, d, ph * s.pool + best_w / s.pool, pw * s.pool + best_w % s.pool, grad[size_t(n * s.D + d)]);
      }
  return r;
}

double rel(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i])) return INFINITY;
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

void self_check_case(Math m, bool nhwc, const int64_t c[8], int64_t limit, double tol, std::mt19937& rng) {
  Problem p;
  p.math = m;
  p.nhwc = nhwc;
  p.s = eit_fast::make_patch_shape(c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[5] / 2, c[7]);
  p.dev.index_limit = limit;
  const PatchShape& s = p.s;
  std::normal_distribution<float> normal;
  auto randn = [&](int64_t n, float scale) {
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& e : v) e = normal(rng) * scale;
    return v;
  };
  std::vector<double> xd, wd, bd, gd;
  const Bytes x = encode(randn(s.B * s.C * s.H * s.W, 1.0f), m, xd);
  const Bytes w = encode(randn(s.D * s.K(), 1.0f / std::sqrt(float(s.K()))), m, wd);
  const Bytes b = encode(randn(s.D, 1.0f), m, bd);
  const Bytes g = encode(randn(s.N() * s.D, 1.0f), m, gd);
  const Reference ref = reference(p, xd, wd, bd, gd);
  bool agree;
  std::string report;
  const Outputs o = run_orders(p, x, w, b, g, agree, report);
  std::vector<double> out(ref.out.size()), dw(o.dw.begin(), o.dw.end()), dx(o.dx.begin(), o.dx.end());
  size_t argmax_diff = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    out[i] = decode(o.out, i, m);
    argmax_diff += int(o.argmax[i]) != ref.argmax[i];
  }
  // Low precision may route a near-tie to another window; count only clear disagreements via the values.
  const double e_out = rel(out, ref.out), e_dw = rel(dw, ref.dw), e_dx = rel(dx, ref.dx);
  const bool exact = m == Math::fma;
  const bool ok = agree && e_out < tol && (exact ? argmax_diff == 0 && e_dw < tol && e_dx < tol
                                                 : argmax_diff * 50 <= out.size());
  char name[240];
  static const char* names[] = {"bf16", "f16", "tf32", "f32"};
  std::snprintf(name, sizeof(name), "%-4s %s B=%lld %lldx%lld D=%lld k=%lld s=%lld p=%lld limit=%lld: out %.1e dw %.1e "
                "dx %.1e argmax diffs %zu, orders %s", names[int(m)], nhwc ? "nhwc" : "nchw", (long long)s.B,
                (long long)s.H, (long long)s.W, (long long)s.D, (long long)s.k, (long long)s.stride, (long long)s.pool,
                (long long)limit, e_out, e_dw, e_dx, argmax_diff, agree ? "agree" : "DISAGREE");
  expect(ok, name);
  if (!agree) std::fputs(report.c_str(), stdout);
}

int self_check() {
  bool div_ok = true;
  std::mt19937 rng(1234);
  for (uint32_t d : {1u, 2u, 3u, 7u, 19u, 64u, 361u, 1000u, 65535u, 1u << 20, (1u << 31) - 1}) {
    const k::FastDiv f = k::FastDiv::of(d);
    for (int i = 0; i < 20000; ++i) {
      const uint32_t n = i < 10000 ? uint32_t(i) : uint32_t(rng() & 0x7fffffffu);
      div_ok = div_ok && f.div(n) == n / d;
    }
    div_ok = div_ok && f.div(0x7fffffffu) == 0x7fffffffu / d;
  }
  expect(div_ok, "FastDiv matches integer division");
  expect(k::check_grid(dim3(1u << 31)) != nullptr && k::check_grid(dim3(1, 65536)) != nullptr &&
             k::check_grid(dim3(1, 1, 65536)) != nullptr && k::check_grid(dim3(2147483647u, 65535, 65535)) == nullptr,
         "launch dimensions are checked (x < 2^31, y and z <= 65535)");
  const PatchShape big = eit_fast::make_patch_shape(16384, 3, 224, 224, 464, 16, 4, 8, 3);
  const k::XStrides bs{3 * 224 * 224, 224 * 224, 224, 1};
  const int64_t per = k::images_per_launch(big, bs, k::kIndexLimit);
  expect(per > 0 && per < 16384 && per * 361 * 464 <= k::kIndexLimit && (per - 1) * bs.b + bs.b <= k::kIndexLimit,
         "a batch past 2^31 elements is split into 32-bit launches (" + std::to_string(per) + " images each)");
  const PatchShape huge = eit_fast::make_patch_shape(1, 3, 8192, 8192, 64, 1, 1, 0, 1);  // 67M tokens x 64
  const char* why = k::refusal(huge, k::XStrides{3 * 8192 * 8192, 8192 * 8192, 8192, 1}, k::Device{});
  const PatchShape wide = eit_fast::make_patch_shape(1, 3, 9000, 64, 8, 3, 1, 1, 4);
  expect(why != nullptr && std::string(why).find("exceed 2^31") != std::string::npos &&
             k::refusal(wide, k::XStrides{3 * 9000 * 64, 9000 * 64, 64, 1}, k::Device{}) != nullptr,
         "an image whose own tensors pass 2^31 elements, or past 8192 px a side, is refused with a reason");
  expect(k::choose_tile(250, Math::bf16) == k::TileKind::A && k::choose_tile(330, Math::bf16) == k::TileKind::B &&
             k::choose_tile(400, Math::bf16) == k::TileKind::C && k::choose_tile(464, Math::bf16) == k::TileKind::C,
         "tiles for D = 250, 330, 400, 464: 128, 112, 80, 80 columns");
  // (B, C, H, W, D, k, stride, pool)
  const int64_t mini[8] = {1, 3, 44, 40, 21, 16, 4, 3}, cifar[8] = {2, 3, 13, 11, 70, 3, 1, 4}, odd[8] = {1, 2, 9, 7, 5, 1, 1, 2};
  for (Math m : {Math::fma, Math::tf32, Math::bf16, Math::f16}) {
    const double tol = m == Math::fma ? 1e-5 : m == Math::tf32 ? 3e-3 : m == Math::f16 ? 3e-3 : 2e-2;
    self_check_case(m, false, mini, k::kIndexLimit, tol, rng);
    self_check_case(m, m == Math::bf16, cifar, k::kIndexLimit, tol, rng);
  }
  self_check_case(Math::fma, false, odd, k::kIndexLimit, 1e-5, rng);
  self_check_case(Math::fma, true, cifar, 800, 1e-5, rng);  // a limit that splits the batch: 2 launches
  return failures ? 1 : 0;
}

int sites_mode() {
  Problem p;
  p.math = Math::bf16;
  p.nhwc = false;
  p.s = eit_fast::make_patch_shape(1, 3, 40, 40, 12, 16, 4, 8, 3);
  std::vector<float> v(size_t(3 * 40 * 40), 0.5f);
  std::vector<double> dd;
  const Bytes x = encode(v, p.math, dd);
  const Bytes w = encode(std::vector<float>(size_t(12 * 768), 0.01f), p.math, dd);
  const Bytes b = encode(std::vector<float>(12, 0.0f), p.math, dd);
  const Bytes g = encode(std::vector<float>(size_t(p.s.N() * 12), 1.0f), p.math, dd);
  run_all(p, x, w, b, g, emu::Order::ascending, 1);
  for (const auto& [site, kind] : emu::sites()) std::printf("%s %s\n", site.c_str(), kind.c_str());
  return 0;
}

int convert_mode(int argc, char** argv) {
  if (argc != 5) return 2;
  Math m;
  if (!parse_math(argv[2], m) || k::elem_size(m) != 2) return 2;
  std::ifstream f(argv[3], std::ios::binary | std::ios::ate);
  const size_t n = size_t(f.tellg()) / 4;
  const Bytes raw = read_file(argv[3], n * 4);
  std::vector<uint16_t> out(n);
  for (size_t i = 0; i < n; ++i) {
    float v;
    std::memcpy(&v, &raw[i * 4], 4);
    out[i] = to16(v, m);
  }
  write_file(argv[4], out.data(), n * 2);
  return 0;
}

// Kernels with synchronisation bugs, for the watchdog's own test.
__global__ void exits_before_barrier(int* out) {
  if (threadIdx.x == 17) return;  // thread 17 skips the barrier the others wait at
  __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void barrier_in_one_warp(int* out) {
  if (threadIdx.x < 32) __syncthreads();  // only warp 0 arrives
  out[threadIdx.x] = 2;
}
__global__ void lane_exits_before_ldmatrix(int* out) {
  EIT_DYNAMIC_SMEM(smem);
  if (threadIdx.x % 32 == 5) return;
  uint32_t r[4];
  eit_fast::dev::ldmatrix_x4(r, smem + (threadIdx.x % 32) * 16);
  out[threadIdx.x] = int(r[0]);
}

int watchdog_mode(int argc, char** argv) {
  if (argc != 3) return 2;
  std::vector<int> out(256, 0);
  switch (std::atoi(argv[2])) {
    case 0: emu::launch(dim3(1), dim3(256), 0, &exits_before_barrier, out.data()); break;
    case 1: emu::launch(dim3(1), dim3(256), 0, &barrier_in_one_warp, out.data()); break;
    case 2: emu::launch(dim3(1), dim3(64), 1024, &lane_exits_before_ldmatrix, out.data()); break;
    default: return 2;
  }
  std::printf("no error detected\n");
  return 0;
}

template <class O, class Tl>
void print_layout(const char* math, const char* tile) {
  std::printf("forward_kernel %s %s %zu %zu\n", math, tile, k::FwdLayout<O, Tl>::bytes(768), k::FwdLayout<O, Tl>::bytes(32));
  std::printf("weight_grad_kernel %s %s %zu %zu\n", math, tile, k::WgradLayout<O, Tl>::bytes, k::WgradLayout<O, Tl>::bytes);
}
int layouts_mode() {
  print_layout<k::Op<Math::bf16>, k::TileA>("bf16", "A");
  print_layout<k::Op<Math::bf16>, k::TileB>("bf16", "B");
  print_layout<k::Op<Math::bf16>, k::TileC>("bf16", "C");
  print_layout<k::Op<Math::f16>, k::TileA>("f16", "A");
  print_layout<k::Op<Math::f16>, k::TileB>("f16", "B");
  print_layout<k::Op<Math::f16>, k::TileC>("f16", "C");
  print_layout<k::Op<Math::tf32>, k::TileA>("tf32", "A");
  print_layout<k::Op<Math::tf32>, k::TileB>("tf32", "B");
  print_layout<k::Op<Math::tf32>, k::TileC>("tf32", "C");
  print_layout<k::Op<Math::fma>, k::TileF>("fma", "F");
  for (const char* m : {"bf16", "f16"})
    std::printf("input_grad_kernel %s A %zu %zu\n", m, k::DgradLayout<k::Op<Math::bf16>>::bytes, k::DgradLayout<k::Op<Math::bf16>>::bytes);
  std::printf("input_grad_kernel tf32 A %zu %zu\n", k::DgradLayout<k::Op<Math::tf32>>::bytes, k::DgradLayout<k::Op<Math::tf32>>::bytes);
  std::printf("input_grad_kernel fma A %zu %zu\n", k::DgradLayout<k::Op<Math::fma>>::bytes, k::DgradLayout<k::Op<Math::fma>>::bytes);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 1) return self_check();
  const std::string mode = argv[1];
  if (mode == "run") return run_mode(argc, argv);
  if (mode == "sites") return sites_mode();
  if (mode == "convert") return convert_mode(argc, argv);
  if (mode == "watchdog") return watchdog_mode(argc, argv);
  if (mode == "layouts") return layouts_mode();
  std::fprintf(stderr, "unknown mode %s\n", argv[1]);
  return 2;
}
