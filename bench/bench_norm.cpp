// Benchmark of the fast normalization kernels (kernels/cpu/norm.cpp): batch renorm with LeakyReLU
// fused, forward (training) and backward, on 2 x 64^3 x C channels-last activations.
// Validates fast against the reference first (exit code 1 on mismatch), then times: median of
// --reps runs after a warm-up, bandwidth from a byte model, next to a parallel memcpy's bandwidth
// measured in the same run with the same thread count, and the naive reference's time.
//
// Byte model (compulsory traffic per value, float32, 4 bytes each):
//   forward : stats pass reads x; normalize pass reads x and writes y          -> 3 x 4 bytes
//   backward: reduction reads dy, x, y; dx pass reads dy, x, y and writes dx   -> 7 x 4 bytes
//   memcpy  : reads src, writes dst                                            -> 2 x 4 bytes
// Write-allocate traffic (reading a line before writing it) is not counted for any of them.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/rng.hpp"
#include "core/tensor.hpp"
#include "core/threads.hpp"
#include "kernels/cpu/norm.hpp"

using namespace medseg;
using Clock = std::chrono::steady_clock;

namespace {

struct Options {
  int threads = 2;
  int reps = 15;
  bool json = false;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error("option " + a + " needs a value");
      return argv[++i];
    };
    if (a == "--threads") o.threads = std::stoi(value());
    else if (a == "--reps") o.reps = std::max(1, std::stoi(value()));
    else if (a == "--json") o.json = true;
    else if (a == "--help" || a == "-h") {
      std::cout << "bench_norm [--threads N (2)] [--reps R (15)] [--json]\n";
      std::exit(0);
    } else {
      throw std::runtime_error("unknown option " + a + " (try --help)");
    }
  }
  return o;
}

template <typename F>
double median_seconds(int reps, F&& f) {
  f();  // warm-up: page faults, caches, OpenMP thread start
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = Clock::now();
    f();
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// The peer: memcpy split into one contiguous chunk per thread, as the kernels split their rows.
double copy_bandwidth(int reps, size_t bytes) {
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  const double s = median_seconds(reps, [&] {
#pragma omp parallel
    {
      const size_t t = omp_get_thread_num(), nt = omp_get_num_threads();
      const size_t b0 = bytes * t / nt, b1 = bytes * (t + 1) / nt;
      std::memcpy(dst.data() + b0, src.data() + b0, b1 - b0);
    }
  });
  return 2.0 * double(bytes) / s / 1e9;
}

double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double scale = 0, worst = 0;
  for (float v : b) scale = std::max(scale, double(std::abs(v)));
  for (size_t i = 0; i < a.size(); ++i) {
    const double e = std::abs(double(a[i]) - b[i]);
    if (!std::isfinite(e)) return INFINITY;
    worst = std::max(worst, e);
  }
  return worst / std::max(scale, 1e-30);
}

struct Buffers {
  std::vector<float> x, dy, y, dx, gamma, beta, rm, rs, mean, inv_std, r, d, dgamma, dbeta;
  cpu::NormCache cache() { return {mean.data(), inv_std.data(), r.data(), d.data()}; }
};

Buffers make_buffers(const Shape& s) {
  Buffers b;
  Rng rng(1);
  const size_t n = size_t(s.numel()), c = size_t(s.c);
  b.x.resize(n);
  b.dy.resize(n);
  for (size_t i = 0; i < n; ++i) {
    b.x[i] = float(rng.normal(0.3 * double(i % c), 1.0 + 0.1 * double(i % c)));
    b.dy[i] = float(rng.normal());
  }
  b.y.assign(n, 0.f);
  b.dx.assign(n, 0.f);
  b.gamma.assign(c, 1.2f);
  b.beta.assign(c, 0.1f);
  b.rm.assign(c, 0.f);
  b.rs.assign(c, 1.f);
  for (auto* v : {&b.mean, &b.inv_std, &b.r, &b.d, &b.dgamma, &b.dbeta}) v->assign(c, 0.f);
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  try {
    opt = parse(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "bench_norm: " << e.what() << "\n";
    return 2;
  }
  set_num_threads(opt.threads);
  cpu::NormConfig cfg;
  cfg.kind = cpu::NormKind::BatchRenorm;
  cfg.leaky = true;
  cfg.r_max = 3.f;  // renorm active (the fully relaxed schedule)
  cfg.d_max = 5.f;

  nlohmann::json out;
  out["threads"] = opt.threads;
  out["reps"] = opt.reps;
  out["kernel"] = "batchrenorm+leaky";
  const Shape first{2, 64, 64, 64, 16};
  const double copy_gbs = copy_bandwidth(opt.reps, size_t(first.numel()) * 4 * 2);
  out["memcpy_GBps"] = copy_gbs;
  bool valid = true;

  if (!opt.json) {
    std::printf("bench_norm: batch renorm + LeakyReLU, %d threads, median of %d; memcpy %.1f GB/s "
                "(read+write, same threads)\n",
                opt.threads, opt.reps, copy_gbs);
    std::printf("%-22s %-8s %10s %9s %8s %11s %8s %7s\n", "shape", "pass", "fast ms", "GB/s", "%copy",
                "ref ms", "speedup", "check");
  }
  for (int64_t channels : {16, 32}) {
    const Shape s{2, 64, 64, 64, channels};
    Buffers b = make_buffers(s);
    // ---- validate: one step of each, fast vs reference, from the same running statistics ----
    Buffers ref = make_buffers(s);
    cpu::norm_forward_train(cfg, s, b.x.data(), b.gamma.data(), b.beta.data(), b.rm.data(), b.rs.data(),
                            b.y.data(), b.cache());
    const double ref_fwd_s = median_seconds(1, [&] {
      ref.rm.assign(size_t(s.c), 0.f);
      ref.rs.assign(size_t(s.c), 1.f);
      cpu::norm_forward_train_ref(cfg, s, ref.x.data(), ref.gamma.data(), ref.beta.data(), ref.rm.data(),
                                  ref.rs.data(), ref.y.data(), ref.cache());
    });
    cpu::norm_backward(cfg, s, b.dy.data(), b.x.data(), b.y.data(), b.gamma.data(), b.cache(),
                       b.dx.data(), b.dgamma.data(), b.dbeta.data());
    const double ref_bwd_s = median_seconds(1, [&] {
      cpu::norm_backward_ref(cfg, s, ref.dy.data(), ref.x.data(), ref.y.data(), ref.gamma.data(),
                             ref.cache(), ref.dx.data(), ref.dgamma.data(), ref.dbeta.data());
    });
    // Tolerances of tests/kernels_norm.cpp (fast vs reference): 1e-5 of the tensor's scale.
    const double err_y = max_rel_diff(b.y, ref.y), err_dx = max_rel_diff(b.dx, ref.dx);
    const double err_dg = max_rel_diff(b.dgamma, ref.dgamma), err_rs = max_rel_diff(b.rs, ref.rs);
    const bool ok = err_y <= 1e-5 && err_dx <= 1e-5 && err_dg <= 1e-5 && err_rs <= 1e-6;
    valid = valid && ok;

    // ---- time ----
    const double fwd_s = median_seconds(opt.reps, [&] {
      cpu::norm_forward_train(cfg, s, b.x.data(), b.gamma.data(), b.beta.data(), b.rm.data(),
                              b.rs.data(), b.y.data(), b.cache());
    });
    const double bwd_s = median_seconds(opt.reps, [&] {
      cpu::norm_backward(cfg, s, b.dy.data(), b.x.data(), b.y.data(), b.gamma.data(), b.cache(),
                         b.dx.data(), b.dgamma.data(), b.dbeta.data());
    });
    const double values = double(s.numel());
    const double fwd_gbs = 3 * 4 * values / fwd_s / 1e9, bwd_gbs = 7 * 4 * values / bwd_s / 1e9;
    for (int pass = 0; pass < 2; ++pass) {
      const bool fwd = pass == 0;
      const double t = fwd ? fwd_s : bwd_s, gbs = fwd ? fwd_gbs : bwd_gbs;
      const double tr = fwd ? ref_fwd_s : ref_bwd_s;
      nlohmann::json row{{"shape", s.str()},
                         {"pass", fwd ? "forward" : "backward"},
                         {"median_ms", t * 1e3},
                         {"GBps", gbs},
                         {"fraction_of_copy", gbs / copy_gbs},
                         {"bytes_per_value", fwd ? 12 : 28},
                         {"reference_ms", tr * 1e3},
                         {"valid", ok},
                         {"max_rel_err", fwd ? err_y : err_dx}};
      out["results"].push_back(row);
      if (!opt.json)
        std::printf("%-22s %-8s %10.2f %9.1f %7.0f%% %11.1f %7.1fx %7s\n", s.str().c_str(),
                    fwd ? "forward" : "backward", t * 1e3, gbs, 100 * gbs / copy_gbs, tr * 1e3, tr / t,
                    ok ? "ok" : "FAIL");
    }
    if (!ok)
      std::fprintf(stderr, "bench_norm: fast differs from reference on %s: y %.3g dx %.3g dgamma %.3g "
                   "running std %.3g (relative to scale)\n", s.str().c_str(), err_y, err_dx, err_dg,
                   err_rs);
  }
  out["valid"] = valid;
  if (opt.json) std::cout << out.dump(2) << "\n";
  return valid ? 0 : 1;
}
