// Benchmark of the fast normalization kernels (kernels/cpu/norm.cpp): batch renorm with LeakyReLU
// fused, forward (training) and backward, on 2 x 64^3 x C channels-last activations.
// Validates fast against the reference first (exit code 1 on mismatch), then times: median of
// --reps runs after a warm-up, bandwidth from a byte model, next to a parallel memcpy's bandwidth
// measured in the same run with the same thread count (interleaved with the kernels), and the naive
// reference's time.
//
// Byte model (compulsory traffic per value, float32, 4 bytes each):
//   forward : stats pass reads x; normalize pass reads x and writes y          -> 3 x 4 bytes
//   backward: reduction reads dy, x, y; dx pass reads dy, x, y and writes dx   -> 7 x 4 bytes
//   memcpy  : reads src, writes dst                                            -> 2 x 4 bytes
// Write-allocate traffic (reading a line before writing it) is not counted for any of them.
// Two rates per row: from the wall-clock median (the target: >= 50% of the copy's), and from the
// process CPU time divided by the thread count (meaningful when the machine is shared: see below).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>
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
    if (a == "--threads")
      o.threads = std::stoi(value());
    else if (a == "--reps")
      o.reps = std::max(1, std::stoi(value()));
    else if (a == "--json")
      o.json = true;
    else if (a == "--help" || a == "-h") {
      std::cout << "bench_norm [--threads N (2)] [--reps R (15)] [--json]\n";
      std::exit(0);
    } else {
      throw std::runtime_error("unknown option " + a + " (try --help)");
    }
  }
  return o;
}

double seconds(const std::function<void()>& f) {
  const auto t0 = Clock::now();
  f();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double process_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

struct Timing {
  double wall = 0, cpu = 0;  // medians, seconds; cpu: process CPU time (all threads) of one call
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Medians of `reps` timed runs of each function after one warm-up run (page faults, caches, OpenMP
// thread start). The functions run interleaved, rep by rep, so that a change in the load of a
// shared machine affects the kernels and their memcpy peer alike.
std::vector<Timing> interleaved_medians(int reps, const std::vector<std::function<void()>>& fs) {
  std::vector<std::vector<double>> wall(fs.size()), cpu(fs.size());
  for (const auto& f : fs) f();
  for (int r = 0; r < reps; ++r)
    for (size_t i = 0; i < fs.size(); ++i) {
      const double c0 = process_cpu_seconds();
      wall[i].push_back(seconds(fs[i]));
      cpu[i].push_back(process_cpu_seconds() - c0);
    }
  std::vector<Timing> out;
  for (size_t i = 0; i < fs.size(); ++i) out.push_back({median(wall[i]), median(cpu[i])});
  return out;
}

// The peer: memcpy split into one contiguous chunk per thread, as the kernels split their rows.
void parallel_copy(const float* src, float* dst, size_t count) {
#pragma omp parallel
  {
    const size_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const size_t b0 = count * t / nt, b1 = count * (t + 1) / nt;
    std::memcpy(dst + b0, src + b0, (b1 - b0) * sizeof(float));
  }
}

std::string load_average() {
  std::ifstream in("/proc/loadavg");
  std::string one;
  in >> one;
  return one.empty() ? "?" : one;
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
  out["load_average_before"] = load_average();
  bool valid = true;

  if (!opt.json) {
    std::printf("bench_norm: batch renorm + LeakyReLU, %d threads, median of %d, load average %s\n",
                opt.threads, opt.reps, load_average().c_str());
    std::printf("%-20s %-8s %8s %6s %6s %6s | %6s %6s %6s | %8s %7s %5s\n", "shape", "pass",
                "fast ms", "GB/s", "copy", "%copy", "cpuGB", "copy", "%copy", "ref ms", "speedup",
                "check");
  }
  for (int64_t channels : {16, 32}) {
    const Shape s{2, 64, 64, 64, channels};
    Buffers b = make_buffers(s);
    // ---- validate: one step of each, fast vs reference, from the same running statistics ----
    Buffers ref = make_buffers(s);
    cpu::norm_forward_train(cfg, s, b.x.data(), b.gamma.data(), b.beta.data(), b.rm.data(),
                            b.rs.data(), b.y.data(), b.cache());
    const double ref_fwd_s = seconds([&] {
      ref.rm.assign(size_t(s.c), 0.f);
      ref.rs.assign(size_t(s.c), 1.f);
      cpu::norm_forward_train_ref(cfg, s, ref.x.data(), ref.gamma.data(), ref.beta.data(),
                                  ref.rm.data(), ref.rs.data(), ref.y.data(), ref.cache());
    });
    cpu::norm_backward(cfg, s, b.dy.data(), b.x.data(), b.y.data(), b.gamma.data(), b.cache(),
                       b.dx.data(), b.dgamma.data(), b.dbeta.data());
    const double ref_bwd_s = seconds([&] {
      cpu::norm_backward_ref(cfg, s, ref.dy.data(), ref.x.data(), ref.y.data(), ref.gamma.data(),
                             ref.cache(), ref.dx.data(), ref.dgamma.data(), ref.dbeta.data());
    });
    // Tolerances of tests/kernels_norm.cpp (fast vs reference): 1e-5 of the tensor's scale.
    const double err_y = max_rel_diff(b.y, ref.y), err_dx = max_rel_diff(b.dx, ref.dx);
    const double err_dg = max_rel_diff(b.dgamma, ref.dgamma), err_rs = max_rel_diff(b.rs, ref.rs);
    const bool ok = err_y <= 1e-5 && err_dx <= 1e-5 && err_dg <= 1e-5 && err_rs <= 1e-6;
    valid = valid && ok;

    // ---- time ----
    std::vector<float> copy_dst(b.x.size());
    const std::vector<Timing> med = interleaved_medians(
        opt.reps, {[&] {
                     cpu::norm_forward_train(cfg, s, b.x.data(), b.gamma.data(), b.beta.data(),
                                             b.rm.data(), b.rs.data(), b.y.data(), b.cache());
                   },
                   [&] {
                     cpu::norm_backward(cfg, s, b.dy.data(), b.x.data(), b.y.data(), b.gamma.data(),
                                        b.cache(), b.dx.data(), b.dgamma.data(), b.dbeta.data());
                   },
                   [&] { parallel_copy(b.x.data(), copy_dst.data(), b.x.size()); }});
    const double fwd_s = med[0].wall, bwd_s = med[1].wall;
    const double copy_gbs = 2.0 * 4 * double(b.x.size()) / med[2].wall / 1e9;
    // The same rates from CPU time per thread: on a shared, oversubscribed machine a long kernel is
    // preempted more often than a short copy, and wall-clock ratios then measure the scheduler.
    const double per_thread = 1.0 / opt.threads;
    const double copy_cpu_gbs = 2.0 * 4 * double(b.x.size()) / (med[2].cpu * per_thread) / 1e9;
    const double values = double(s.numel());
    const double fwd_gbs = 3 * 4 * values / fwd_s / 1e9, bwd_gbs = 7 * 4 * values / bwd_s / 1e9;
    const double fwd_cpu_gbs = 3 * 4 * values / (med[0].cpu * per_thread) / 1e9;
    const double bwd_cpu_gbs = 7 * 4 * values / (med[1].cpu * per_thread) / 1e9;
    for (int pass = 0; pass < 2; ++pass) {
      const bool fwd = pass == 0;
      const double t = fwd ? fwd_s : bwd_s, gbs = fwd ? fwd_gbs : bwd_gbs;
      const double tr = fwd ? ref_fwd_s : ref_bwd_s;
      const double cpu_gbs = fwd ? fwd_cpu_gbs : bwd_cpu_gbs;
      nlohmann::json row{{"shape", s.str()},
                         {"pass", fwd ? "forward" : "backward"},
                         {"median_ms", t * 1e3},
                         {"GBps", gbs},
                         {"memcpy_GBps", copy_gbs},
                         {"cpu_time_GBps", cpu_gbs},
                         {"memcpy_cpu_time_GBps", copy_cpu_gbs},
                         {"cpu_time_fraction_of_copy", cpu_gbs / copy_cpu_gbs},
                         {"fraction_of_copy", gbs / copy_gbs},
                         {"bytes_per_value", fwd ? 12 : 28},
                         {"reference_ms", tr * 1e3},
                         {"valid", ok},
                         {"max_rel_err", fwd ? err_y : err_dx}};
      out["results"].push_back(row);
      if (!opt.json)
        std::printf(
            "%-20s %-8s %8.2f %6.2f %6.2f %5.0f%% | %6.2f %6.2f %5.0f%% | %8.1f %6.1fx %5s\n",
            s.str().c_str(), fwd ? "forward" : "backward", t * 1e3, gbs, copy_gbs,
            100 * gbs / copy_gbs, cpu_gbs, copy_cpu_gbs, 100 * cpu_gbs / copy_cpu_gbs, tr * 1e3,
            tr / t, ok ? "ok" : "FAIL");
    }
    if (!ok)
      std::fprintf(stderr,
                   "bench_norm: fast differs from reference on %s: y %.3g dx %.3g dgamma %.3g "
                   "running std %.3g (relative to scale)\n",
                   s.str().c_str(), err_y, err_dx, err_dg, err_rs);
  }
  out["valid"] = valid;
  out["load_average_after"] = load_average();
  if (opt.json) std::cout << out.dump(2) << "\n";
  return valid ? 0 : 1;
}
