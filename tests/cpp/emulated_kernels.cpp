// Runs the real CUDA kernels (csrc/cuda/patch_projection_kernels.cuh) on the CPU through the emulation
// header. Two modes:
//   emulated_kernels f32|f64 B C H W D k stride pad pool IN_DIR OUT_DIR
//       reads x.bin w.bin b.bin grad.bin (raw, the chosen dtype) from IN_DIR and writes out.bin argmax.bin
//       dw.bin dx.bin to OUT_DIR; tests/test_patch_projection_emulated.py compares them with PyTorch.
//   emulated_kernels            (no arguments, for ctest)
//       random cases checked against a direct C++ loop reference; exit status 0 when all match.
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

template <typename T>
struct Result {
  std::vector<T> out;
  std::vector<uint8_t> argmax;
  std::vector<T> dw, dx;
};

template <typename T>
Result<T> run_kernels(const PatchShape& s, const std::vector<T>& x, const std::vector<T>& w,
                      const std::vector<T>& b, const std::vector<T>& grad) {
  Result<T> r;
  r.out.assign(s.N() * s.D, T(NAN));  // poisoned: an unwritten element fails the comparison
  r.argmax.assign(s.N() * s.D, 255);
  r.dw.assign(s.D * s.K(), T(0));
  r.dx.assign(s.B * s.C * s.H * s.W, T(0));
  k::launch_forward<T>(x.data(), w.data(), b.data(), r.out.data(), r.argmax.data(), s, nullptr);
  k::launch_weight_grad<T>(grad.data(), r.argmax.data(), x.data(), r.dw.data(), s, nullptr);
  k::launch_input_grad<T>(grad.data(), r.argmax.data(), w.data(), r.dx.data(), s, nullptr);
  return r;
}

// Direct loops: conv at every position, then max-pool (larger-or-NaN replaces), then the routed gradients.
Result<double> reference(const PatchShape& s, const std::vector<double>& x, const std::vector<double>& w,
                         const std::vector<double>& b, const std::vector<double>& grad) {
  Result<double> r;
  r.out.assign(s.N() * s.D, 0);
  r.argmax.assign(s.N() * s.D, 0);
  r.dw.assign(s.D * s.K(), 0);
  r.dx.assign(s.B * s.C * s.H * s.W, 0);
  auto conv = [&](int64_t bi, int64_t d, int64_t oy, int64_t ox, bool backward, double g) {
    double acc = b[d];
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t kh = 0; kh < s.k; ++kh)
        for (int64_t kw = 0; kw < s.k; ++kw) {
          const int64_t iy = oy * s.stride - s.pad + kh, ix = ox * s.stride - s.pad + kw;
          if (iy < 0 || iy >= s.H || ix < 0 || ix >= s.W) continue;
          const int64_t xi = ((bi * s.C + c) * s.H + iy) * s.W + ix, wi = (d * s.C + c) * s.k * s.k + kh * s.k + kw;
          acc += x[xi] * w[wi];
          if (backward) { r.dw[wi] += g * x[xi]; r.dx[xi] += g * w[wi]; }
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
          const double v = conv(bi, d, ph * s.pool + wi / s.pool, pw * s.pool + wi % s.pool, false, 0);
          if (v > best || std::isnan(v)) { best = v; best_w = int(wi); }
        }
        r.out[n * s.D + d] = best;
        r.argmax[n * s.D + d] = uint8_t(best_w);
        conv(bi, d, ph * s.pool + best_w / s.pool, pw * s.pool + best_w % s.pool, true, grad[n * s.D + d]);
      }
  return r;
}

template <typename T>
std::vector<T> read_file(const std::string& path, size_t n) {
  std::vector<T> v(n);
  std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(v.data()), std::streamsize(n * sizeof(T)));
  if (!f) { std::fprintf(stderr, "cannot read %zu values from %s\n", n, path.c_str()); std::exit(2); }
  return v;
}

template <typename T>
void write_file(const std::string& path, const std::vector<T>& v) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size() * sizeof(T)));
}

template <typename T>
int file_mode(const PatchShape& s, const std::string& in, const std::string& out) {
  auto x = read_file<T>(in + "/x.bin", s.B * s.C * s.H * s.W);
  auto w = read_file<T>(in + "/w.bin", s.D * s.K());
  auto b = read_file<T>(in + "/b.bin", s.D);
  auto g = read_file<T>(in + "/grad.bin", s.N() * s.D);
  auto r = run_kernels<T>(s, x, w, b, g);
  write_file(out + "/out.bin", r.out);
  write_file(out + "/argmax.bin", r.argmax);
  write_file(out + "/dw.bin", r.dw);
  write_file(out + "/dx.bin", r.dx);
  return 0;
}

double rel_err(const std::vector<double>& a, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) != std::isnan(ref[i])) return INFINITY;
    if (std::isnan(a[i])) continue;
    num += (a[i] - ref[i]) * (a[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

int self_check() {
  // (B, C, H, W, D, k, stride, pool): the 3/1/4 and 16/4/3 stems at odd sizes, D off the tile multiple.
  const int64_t cases[][8] = {{2, 3, 13, 11, 70, 3, 1, 4}, {1, 3, 37, 29, 33, 16, 4, 3}, {3, 2, 9, 9, 5, 1, 1, 2}};
  std::mt19937 rng(1234);
  std::normal_distribution<double> normal;
  int failures = 0;
  for (const auto& c : cases) {
    const PatchShape s = eit_fast::make_patch_shape(c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[5] / 2, c[7]);
    auto randn = [&](int64_t n) { std::vector<double> v(n); for (auto& e : v) e = normal(rng); return v; };
    auto x = randn(s.B * s.C * s.H * s.W), w = randn(s.D * s.K()), b = randn(s.D), g = randn(s.N() * s.D);
    auto ref = reference(s, x, w, b, g);
    auto got = run_kernels<double>(s, x, w, b, g);
    size_t argmax_diff = 0;
    for (size_t i = 0; i < got.argmax.size(); ++i) argmax_diff += got.argmax[i] != ref.argmax[i];
    const double e_out = rel_err(got.out, ref.out), e_dw = rel_err(got.dw, ref.dw), e_dx = rel_err(got.dx, ref.dx);
    const bool ok = argmax_diff == 0 && e_out < 1e-12 && e_dw < 1e-12 && e_dx < 1e-12;
    std::printf("%s B=%lld H=%lld W=%lld D=%lld k=%lld s=%lld p=%lld: out %.2e dw %.2e dx %.2e argmax diffs %zu\n",
                ok ? "ok  " : "FAIL", (long long)s.B, (long long)s.H, (long long)s.W, (long long)s.D, (long long)s.k,
                (long long)s.stride, (long long)s.pool, e_out, e_dw, e_dx, argmax_diff);
    failures += !ok;
  }
  return failures ? 1 : 0;
}

int main(int argc, char** argv) {
  if (argc == 1) return self_check();
  if (argc != 13) {
    std::fprintf(stderr, "usage: %s f32|f64 B C H W D k stride pad pool IN_DIR OUT_DIR\n", argv[0]);
    return 2;
  }
  int64_t v[9];
  for (int i = 0; i < 9; ++i) v[i] = std::atoll(argv[2 + i]);
  const PatchShape s = eit_fast::make_patch_shape(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8]);
  const std::string dtype = argv[1];
  if (dtype == "f32") return file_mode<float>(s, argv[11], argv[12]);
  if (dtype == "f64") return file_mode<double>(s, argv[11], argv[12]);
  std::fprintf(stderr, "unknown dtype %s\n", argv[1]);
  return 2;
}
