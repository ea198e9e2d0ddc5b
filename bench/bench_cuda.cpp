// GPU benchmarks of the CUDA backend. Each benchmark validates first (a small case against the CPU
// reference), then warms up, repeats, and reports the median, with its peer measured in the same
// run:
//   norm: batch renorm forward + backward (LeakyReLU fused) on (2, 128, 128, 128, 32), as
//         effective bandwidth (bytes our kernels must move at minimum) and as a ratio to
//         cudaMemcpy D2D bandwidth measured on the same buffers;
//   conv: cuDNN conv3d forward / backward-data / backward-weights TFLOP/s on the 3-D U-Net shapes
//         (batch 2, 128^3 patch, 32 base filters doubling to 320), with TF32 off and on.
// Output: human-readable lines plus one JSON object per measurement, prefixed "RESULT ".
// Usage: bench_cuda [--quick] [--reps N]    (--quick: the norm benchmark and the 128^3 convs only)
#include <cstdio>

#ifndef MEDSEG_HAVE_CUDA

int main() {
  std::printf(
      "bench_cuda: CUDA backend not compiled in (configure with -DMEDSEG_CUDA=ON on a machine "
      "with nvcc and cuDNN)\n");
  return 0;
}

#else

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "kernels/cpu/conv.hpp"
#include "kernels/cpu/norm.hpp"
#include "kernels/cuda/conv.hpp"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/norm.hpp"

namespace {
using namespace medseg;
using cuda::CudaContext;
using cuda::DeviceBuffer;

int g_reps = 7;

// Uniform values in [lo, hi), reproducible: chunk i uses Rng(seed).split(i).
std::vector<float> host_random(int64_t n, uint64_t seed, float lo = -1.f, float hi = 1.f) {
  std::vector<float> v(static_cast<size_t>(n));
  const int64_t chunk = 1 << 20;
  const int64_t chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    Rng rng = Rng(seed).split(static_cast<uint64_t>(c));
    const int64_t end = std::min(n, (c + 1) * chunk);
    for (int64_t i = c * chunk; i < end; ++i) v[i] = static_cast<float>(rng.uniform(lo, hi));
  }
  return v;
}

DeviceBuffer upload(const std::vector<float>& v) {
  DeviceBuffer b(v.size() * sizeof(float));
  MEDSEG_CUDA_CHECK(
      cudaMemcpy(b.get(), v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice));
  return b;
}

std::vector<float> download(const DeviceBuffer& b, int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  MEDSEG_CUDA_CHECK(cudaDeviceSynchronize());
  MEDSEG_CUDA_CHECK(
      cudaMemcpy(v.data(), b.get(), v.size() * sizeof(float), cudaMemcpyDeviceToHost));
  return v;
}

// Median milliseconds of `reps` runs of fn on ctx's stream, after one warm-up run.
double median_ms(CudaContext& ctx, const std::function<void()>& fn, int reps = g_reps) {
  cudaEvent_t start, stop;
  MEDSEG_CUDA_CHECK(cudaEventCreate(&start));
  MEDSEG_CUDA_CHECK(cudaEventCreate(&stop));
  fn();
  ctx.synchronize();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    MEDSEG_CUDA_CHECK(cudaEventRecord(start, ctx.stream()));
    fn();
    MEDSEG_CUDA_CHECK(cudaEventRecord(stop, ctx.stream()));
    MEDSEG_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.f;
    MEDSEG_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    t.push_back(ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// max |a - b| / max |b|
double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::fabs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::fabs(static_cast<double>(b[i])));
  }
  return den > 0 ? num / den : num;
}

bool all_finite(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

// ---------------------------------------------------------------- batch renorm vs memcpy

bool validate_norm(CudaContext& ctx) {
  const Shape s{2, 16, 16, 16, 32};
  cpu::NormConfig cfg;
  cfg.r_max = 3.f;
  cfg.d_max = 5.f;
  auto x = host_random(s.numel(), 1), dy = host_random(s.numel(), 2);
  std::vector<float> gamma(s.c, 1.1f), beta(s.c, 0.1f), rm(s.c, 0.05f), rs(s.c, 0.7f);
  std::vector<float> y(s.numel()), m(s.c), inv(s.c), r(s.c), d(s.c), dx(s.numel()), dg(s.c),
      db(s.c);
  std::vector<float> rm_ref = rm, rs_ref = rs;
  cpu::norm_forward_train_ref(cfg, s, x.data(), gamma.data(), beta.data(), rm_ref.data(),
                              rs_ref.data(), y.data(), {m.data(), inv.data(), r.data(), d.data()});
  cpu::norm_backward_ref(cfg, s, dy.data(), x.data(), y.data(), gamma.data(),
                         {m.data(), inv.data(), r.data(), d.data()}, dx.data(), dg.data(),
                         db.data());
  auto gx = upload(x), gdy = upload(dy), gg = upload(gamma), gb = upload(beta), grm = upload(rm),
       grs = upload(rs);
  DeviceBuffer gy(s.numel() * 4), gdx(s.numel() * 4), cm(s.c * 4), ci(s.c * 4), cr(s.c * 4),
      cd(s.c * 4), gdg(s.c * 4), gdb(s.c * 4);
  const cpu::NormCache cache{cm.as<float>(), ci.as<float>(), cr.as<float>(), cd.as<float>()};
  cuda::norm_forward_train(ctx, cfg, s, gx.as<float>(), gg.as<float>(), gb.as<float>(),
                           grm.as<float>(), grs.as<float>(), gy.as<float>(), cache, nullptr);
  cuda::norm_backward(ctx, cfg, s, gdy.as<float>(), gx.as<float>(), gy.as<float>(), gg.as<float>(),
                      cache, gdx.as<float>(), gdg.as<float>(), gdb.as<float>());
  const double ey = rel_error(download(gy, s.numel()), y),
               edx = rel_error(download(gdx, s.numel()), dx);
  const double edg = rel_error(download(gdg, s.c), dg), erm = rel_error(download(grm, s.c), rm_ref);
  std::printf("norm validation %s: rel err y %.2e dx %.2e dgamma %.2e running mean %.2e\n",
              s.str().c_str(), ey, edx, edg, erm);
  // The same fp32-vs-double bounds as tests/cuda_ops.cpp (a few ulp of the largest value).
  return ey < 1e-5 && edx < 1e-4 && edg < 1e-5 && erm < 1e-6;
}

void bench_norm(CudaContext& ctx) {
  const Shape s{2, 128, 128, 128, 32};
  if (!validate_norm(ctx)) {
    std::printf("norm: VALIDATION FAILED, not timing\n");
    std::printf("RESULT {\"bench\":\"norm_validation\",\"ok\":false}\n");
    return;
  }
  const int64_t n = s.numel();
  const double bytes = static_cast<double>(n) * sizeof(float);
  cpu::NormConfig cfg;
  cfg.r_max = 3.f;
  cfg.d_max = 5.f;
  auto gx = upload(host_random(n, 3)), gdy = upload(host_random(n, 4));
  DeviceBuffer gy(n * 4), gdx(n * 4), gg(s.c * 4), gb(s.c * 4), grm(s.c * 4), grs(s.c * 4);
  std::vector<float> ones(s.c, 1.f), zeros(s.c, 0.f);
  MEDSEG_CUDA_CHECK(cudaMemcpy(gg.get(), ones.data(), s.c * 4, cudaMemcpyHostToDevice));
  MEDSEG_CUDA_CHECK(cudaMemcpy(grs.get(), ones.data(), s.c * 4, cudaMemcpyHostToDevice));
  MEDSEG_CUDA_CHECK(cudaMemcpy(gb.get(), zeros.data(), s.c * 4, cudaMemcpyHostToDevice));
  MEDSEG_CUDA_CHECK(cudaMemcpy(grm.get(), zeros.data(), s.c * 4, cudaMemcpyHostToDevice));
  DeviceBuffer cm(s.c * 4), ci(s.c * 4), cr(s.c * 4), cd(s.c * 4), dg(s.c * 4), db(s.c * 4);
  const cpu::NormCache cache{cm.as<float>(), ci.as<float>(), cr.as<float>(), cd.as<float>()};
  cuda::NormDeviceCounters counters(ctx);

  auto fwd = [&] {
    cuda::norm_forward_train(ctx, cfg, s, gx.as<float>(), gg.as<float>(), gb.as<float>(),
                             grm.as<float>(), grs.as<float>(), gy.as<float>(), cache, &counters);
  };
  auto bwd = [&] {
    cuda::norm_backward(ctx, cfg, s, gdy.as<float>(), gx.as<float>(), gy.as<float>(),
                        gg.as<float>(), cache, gdx.as<float>(), dg.as<float>(), db.as<float>());
  };
  const double t_fwd = median_ms(ctx, fwd);
  const double t_bwd = median_ms(ctx, bwd);
  const double t_both = median_ms(ctx, [&] {
    fwd();
    bwd();
  });
  const double t_copy = median_ms(ctx, [&] {
    MEDSEG_CUDA_CHECK(
        cudaMemcpyAsync(gdx.get(), gx.get(), n * 4, cudaMemcpyDeviceToDevice, ctx.stream()));
  });
  if (!all_finite(download(gdx, std::min<int64_t>(n, 1 << 20))))
    std::printf("norm: WARNING non-finite values in dx\n");
  // Minimum traffic: forward reads x twice (statistics, normalize) and writes y; backward reads dy,
  // x, y twice (sums, dx) and writes dx: 3 + 7 = 10 tensor passes.
  const double copy_gbs = 2 * bytes / (t_copy * 1e6);
  const double fwd_gbs = 3 * bytes / (t_fwd * 1e6), bwd_gbs = 7 * bytes / (t_bwd * 1e6);
  const double both_gbs = 10 * bytes / (t_both * 1e6);
  std::printf(
      "norm %s: fwd %.3f ms (%.0f GB/s), bwd %.3f ms (%.0f GB/s), fwd+bwd %.3f ms (%.0f GB/s); "
      "D2D memcpy %.3f ms (%.0f GB/s); fwd+bwd bandwidth / memcpy bandwidth = %.2f; "
      "fwd+bwd time / one memcpy = %.2f\n",
      s.str().c_str(), t_fwd, fwd_gbs, t_bwd, bwd_gbs, t_both, both_gbs, t_copy, copy_gbs,
      both_gbs / copy_gbs, t_both / t_copy);
  std::printf(
      "RESULT {\"bench\":\"batch_renorm\",\"shape\":\"%s\",\"fwd_ms\":%.4f,\"bwd_ms\":%.4f,"
      "\"fwd_bwd_ms\":%.4f,\"fwd_bwd_gbs\":%.1f,\"memcpy_d2d_ms\":%.4f,\"memcpy_d2d_gbs\":%.1f,"
      "\"bandwidth_ratio\":%.3f}\n",
      s.str().c_str(), t_fwd, t_bwd, t_both, both_gbs, t_copy, copy_gbs, both_gbs / copy_gbs);
  const auto cnt = counters.read(ctx);
  std::printf("norm counters: %lld steps, %lld skipped updates\n",
              static_cast<long long>(cnt.steps), static_cast<long long>(cnt.skipped_updates));
}

// ---------------------------------------------------------------- conv3d

struct ConvCase {
  const char* name;
  cpu::ConvGeometry g;
};

std::vector<ConvCase> unet_convs(bool quick) {
  using G = cpu::ConvGeometry;
  const int64_t N = 2;
  std::vector<ConvCase> c = {
      {"enc0 in", G::conv(Shape{N, 128, 128, 128, 1}, 32, 3, 1, 1)},
      {"enc0", G::conv(Shape{N, 128, 128, 128, 32}, 32, 3, 1, 1)},
      {"dec0", G::conv(Shape{N, 128, 128, 128, 64}, 32, 3, 1, 1)},
      {"up0", G::transpose2(Shape{N, 64, 64, 64, 64}, 32)},
      {"down1", G::conv(Shape{N, 128, 128, 128, 32}, 64, 3, 2, 1)},
      {"head", G::conv(Shape{N, 128, 128, 128, 32}, 2, 1, 1, 0)},
  };
  if (quick) return c;
  const std::vector<ConvCase> more = {
      {"enc1", G::conv(Shape{N, 64, 64, 64, 64}, 64, 3, 1, 1)},
      {"dec1", G::conv(Shape{N, 64, 64, 64, 128}, 64, 3, 1, 1)},
      {"up1", G::transpose2(Shape{N, 32, 32, 32, 128}, 64)},
      {"down2", G::conv(Shape{N, 64, 64, 64, 64}, 128, 3, 2, 1)},
      {"enc2", G::conv(Shape{N, 32, 32, 32, 128}, 128, 3, 1, 1)},
      {"down3", G::conv(Shape{N, 32, 32, 32, 128}, 256, 3, 2, 1)},
      {"enc3", G::conv(Shape{N, 16, 16, 16, 256}, 256, 3, 1, 1)},
      {"down4", G::conv(Shape{N, 16, 16, 16, 256}, 320, 3, 2, 1)},
      {"enc4", G::conv(Shape{N, 8, 8, 8, 320}, 320, 3, 1, 1)},
      {"up3", G::transpose2(Shape{N, 8, 8, 8, 320}, 256)},
  };
  c.insert(c.end(), more.begin(), more.end());
  return c;
}

// The same geometry type (k, stride, channels) on a small input, against the reference.
bool validate_conv(CudaContext& ctx, const cpu::ConvGeometry& big, double tol) {
  const Shape small{1, 6, 5, 4, big.cin};
  const auto g = big.transposed
                     ? cpu::ConvGeometry::transpose2(small, big.cout)
                     : cpu::ConvGeometry::conv(small, big.cout, big.k, big.stride, big.pad);
  const auto x = host_random(g.in_shape().numel(), 7),
             w = host_random(g.weight_shape().numel(), 8, -0.2f, 0.2f);
  const auto dy = host_random(g.out_shape().numel(), 9);
  std::vector<float> y(g.out_shape().numel()), dx(g.in_shape().numel()),
      dw(g.weight_shape().numel());
  cpu::conv3d_forward_ref(g, x.data(), w.data(), nullptr, y.data());
  cpu::conv3d_backward_data_ref(g, dy.data(), w.data(), dx.data());
  cpu::conv3d_backward_weights_ref(g, dy.data(), x.data(), dw.data(), nullptr);
  auto gx = upload(x), gw = upload(w), gdy = upload(dy);
  DeviceBuffer gy(y.size() * 4), gdx(dx.size() * 4), gdw(dw.size() * 4);
  cuda::conv3d_forward(ctx, g, gx.as<float>(), gw.as<float>(), nullptr, gy.as<float>());
  cuda::conv3d_backward_data(ctx, g, gdy.as<float>(), gw.as<float>(), gdx.as<float>());
  cuda::conv3d_backward_weights(ctx, g, gdy.as<float>(), gx.as<float>(), gdw.as<float>(), nullptr);
  const double e =
      std::max({rel_error(download(gy, y.size()), y), rel_error(download(gdx, dx.size()), dx),
                rel_error(download(gdw, dw.size()), dw)});
  if (e > tol) std::printf("conv validation %s: rel err %.2e > %.1e\n", g.str().c_str(), e, tol);
  return e <= tol;
}

void bench_conv(CudaContext& ctx, bool quick) {
  for (bool tf32 : {false, true}) {
    ctx.set_allow_tf32(tf32);
    // The bounds of tests/cuda_ops.cpp: fp32 errors are a few 1e-7 of the largest value (bound
    // 1e-5), TF32 ones below 1e-3 (bound 5e-3).
    const double tol = tf32 ? 5e-3 : 1e-5;
    for (const auto& cc : unet_convs(quick)) {
      const auto& g = cc.g;
      if (!validate_conv(ctx, g, tol)) {
        std::printf("RESULT {\"bench\":\"conv3d\",\"case\":\"%s\",\"tf32\":%s,\"ok\":false}\n",
                    cc.name, tf32 ? "true" : "false");
        continue;
      }
      const int64_t nx = g.in_shape().numel(), ny = g.out_shape().numel(),
                    nw = g.weight_shape().numel();
      auto gx = upload(host_random(nx, 10)), gdy = upload(host_random(ny, 11));
      auto gw = upload(host_random(nw, 12, -0.05f, 0.05f)), gb = upload(host_random(g.cout, 13));
      DeviceBuffer gy(ny * 4), gdx(nx * 4), gdw(nw * 4), gdb(g.cout * 4);
      const double t_fwd = median_ms(ctx, [&] {
        cuda::conv3d_forward(ctx, g, gx.as<float>(), gw.as<float>(), gb.as<float>(),
                             gy.as<float>());
      });
      const double t_bd = median_ms(ctx, [&] {
        cuda::conv3d_backward_data(ctx, g, gdy.as<float>(), gw.as<float>(), gdx.as<float>());
      });
      const double t_bw = median_ms(ctx, [&] {
        cuda::conv3d_backward_weights(ctx, g, gdy.as<float>(), gx.as<float>(), gdw.as<float>(),
                                      gdb.as<float>());
      });
      const double f = g.flops();
      auto tflops = [&](double ms) { return f / (ms * 1e9); };
      const std::string plan = cuda::conv_plan_description(ctx, g);
      std::printf(
          "conv %-8s %s %s: fwd %.3f ms %.1f TFLOP/s, bwd data %.3f ms %.1f, bwd weights %.3f ms "
          "%.1f  [%s]\n",
          cc.name, tf32 ? "tf32" : "fp32", g.str().c_str(), t_fwd, tflops(t_fwd), t_bd,
          tflops(t_bd), t_bw, tflops(t_bw), plan.c_str());
      std::printf(
          "RESULT {\"bench\":\"conv3d\",\"case\":\"%s\",\"geometry\":\"%s\",\"tf32\":%s,"
          "\"fwd_ms\":%.4f,\"fwd_tflops\":%.2f,\"bwd_data_ms\":%.4f,\"bwd_data_tflops\":%.2f,"
          "\"bwd_weights_ms\":%.4f,\"bwd_weights_tflops\":%.2f,\"plan\":\"%s\"}\n",
          cc.name, g.str().c_str(), tf32 ? "true" : "false", t_fwd, tflops(t_fwd), t_bd,
          tflops(t_bd), t_bw, tflops(t_bw), plan.c_str());
      std::fflush(stdout);
    }
    cuda::clear_conv_plans(ctx);
    cuda::release_cached_blocks();
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
      g_reps = std::max(1, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: bench_cuda [--quick] [--reps N]\n");
      return 2;
    }
  }
  std::string why;
  if (!cuda::cuda_usable(&why)) {
    std::printf("bench_cuda: no usable CUDA device: %s\n", why.c_str());
    return 3;
  }
  try {
    cuda::register_cuda_allocator();
    std::printf("%s\n", cuda::describe_devices().c_str());
    std::printf("reps %d (median reported, after one warm-up)\n", g_reps);
    CudaContext ctx;
    bench_norm(ctx);
    bench_conv(ctx, quick);
    const auto st = cuda::allocator_stats();
    std::printf("allocator: peak %.2f GiB in use, %lld cudaMalloc calls\n",
                static_cast<double>(st.peak_bytes_in_use) / (1 << 30),
                static_cast<long long>(st.cuda_malloc_count));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda: %s\n", e.what());
    return 1;
  }
  return 0;
}

#endif  // MEDSEG_HAVE_CUDA
