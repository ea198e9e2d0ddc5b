// The CUDA backend against the CPU references (medseg::cpu::*_ref), op by op, forward and backward,
// on a grid of shapes with odd sizes, C = 1 and N = 1. Every device output lives between two guard
// zones filled with a bit pattern that must survive (out-of-bounds writes), and its interior is
// pre-filled with NaN so that an output which is accumulated into, or not written, cannot match.
// TF32 is off for every comparison except the one test that checks the TF32 convolution with a
// looser bound. Without a usable device every test skips with "no CUDA device".
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "core/tensor.hpp"
#include "kernels/cpu/conv.hpp"
#include "kernels/cpu/norm.hpp"
#include "kernels/cpu/ops.hpp"

#ifdef MEDSEG_HAVE_CUDA
#include "kernels/cuda/conv.hpp"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/norm.hpp"
#include "kernels/cuda/ops.hpp"
#endif

namespace medseg {
namespace {

#ifndef MEDSEG_HAVE_CUDA

TEST(CudaBackend, NotCompiledIn) {
  GTEST_SKIP() << "no CUDA device: this build has no CUDA backend (configure with -DMEDSEG_CUDA=ON "
                  "on a machine with nvcc and cuDNN)";
}

#else

using cuda::CudaContext;
using cuda::DeviceBuffer;

#define MEDSEG_REQUIRE_CUDA()                                                  \
  do {                                                                         \
    std::string why_;                                                          \
    if (!cuda::cuda_usable(&why_)) GTEST_SKIP() << "no CUDA device: " << why_; \
  } while (0)

std::vector<float> random_vector(Rng& rng, int64_t n, double mean = 0.0, double std = 1.0) {
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<float>(rng.normal(mean, std));
  return v;
}

// A device array of n floats with kGuard floats of guard pattern on each side. 64 floats = 256
// bytes keep the interior as aligned as cudaMalloc's base, so the vectorized kernel paths are
// exercised.
class Guarded {
 public:
  static constexpr int64_t kGuard = 64;
  static constexpr uint32_t kPattern =
      0x7FA5A5A5u;  // a signalling-NaN bit pattern no kernel produces

  // Interior = `init` (n = init.size()).
  explicit Guarded(const std::vector<float>& init) : n_(static_cast<int64_t>(init.size())) {
    std::vector<float> host = framed();
    std::copy(init.begin(), init.end(), host.begin() + kGuard);
    upload(host);
  }
  // Interior = NaN (for outputs).
  static Guarded output(int64_t n) {
    return Guarded(
        std::vector<float>(static_cast<size_t>(n), std::numeric_limits<float>::quiet_NaN()));
  }
  float* ptr() { return buf_.as<float>() + kGuard; }
  int64_t size() const { return n_; }

  // The interior; records a test failure naming `what` if a guard word changed.
  std::vector<float> download(const std::string& what) const {
    std::vector<float> host(static_cast<size_t>(n_ + 2 * kGuard));
    cuda_copy_d2h(host.data(), buf_.get(), host.size() * sizeof(float));
    int64_t bad = 0, first = -1;
    for (int64_t i = 0; i < static_cast<int64_t>(host.size()); ++i) {
      if (i >= kGuard && i < kGuard + n_) continue;
      uint32_t bits;
      std::memcpy(&bits, &host[static_cast<size_t>(i)], 4);
      if (bits != kPattern) {
        ++bad;
        if (first < 0) first = i;
      }
    }
    EXPECT_EQ(bad, 0) << what << ": " << bad << " guard words overwritten, first at offset "
                      << (first < kGuard ? first - kGuard : first - kGuard - n_)
                      << (first < kGuard ? " before the start" : " after the end");
    return std::vector<float>(host.begin() + kGuard, host.begin() + kGuard + n_);
  }

 private:
  std::vector<float> framed() const {
    std::vector<float> host(static_cast<size_t>(n_ + 2 * kGuard));
    float pattern;
    std::memcpy(&pattern, &kPattern, 4);
    std::fill(host.begin(), host.end(), pattern);
    return host;
  }
  void upload(const std::vector<float>& host) {
    buf_ = DeviceBuffer(host.size() * sizeof(float));
    MEDSEG_CUDA_CHECK(
        cudaMemcpy(buf_.get(), host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
  }
  static void cuda_copy_d2h(void* dst, const void* src, size_t bytes) {
    MEDSEG_CUDA_CHECK(cudaDeviceSynchronize());  // surfaces kernel execution errors here, checked
    MEDSEG_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
  }
  int64_t n_ = 0;
  DeviceBuffer buf_;
};

// |got - want| <= atol + rtol * |want| everywhere; prints the count and the first mismatches.
void expect_close(const std::vector<float>& got, const std::vector<float>& want, double rtol,
                  double atol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t bad = 0;
  std::ostringstream first;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], w = want[i];
    const bool ok = std::isfinite(g) == std::isfinite(w) &&
                    (!std::isfinite(w) ? (std::isnan(g) == std::isnan(w))
                                       : std::fabs(g - w) <= atol + rtol * std::fabs(w));
    if (!ok) {
      if (bad < 8) first << "\n  [" << i << "] cuda " << g << " cpu " << w << " diff " << g - w;
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " values differ (rtol "
                    << rtol << ", atol " << atol << "); first:" << first.str();
}

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, static_cast<double>(std::fabs(x)));
  return m;
}

std::string shape_str(const Shape& s) {
  return s.str();
}

// ====================================================================== device plumbing

TEST(CudaDevice, DescribesDevicesAndCudnn) {
  MEDSEG_REQUIRE_CUDA();
  EXPECT_GE(cuda::device_count(), 1);
  const std::string d = cuda::describe_devices();
  EXPECT_NE(d.find("cuda:0"), std::string::npos) << d;
  EXPECT_EQ(cuda::cudnn_version().rfind(std::to_string(CUDNN_MAJOR) + ".", 0), 0u)
      << cuda::cudnn_version();
  std::cout << d << "\n";
}

TEST(CudaDevice, ChecksThrowCudaErrorWithCallSite) {
  MEDSEG_REQUIRE_CUDA();
  try {
    MEDSEG_CUDA_CHECK(cudaSetDevice(cuda::device_count() + 7));
    FAIL() << "cudaSetDevice on a missing device did not throw";
  } catch (const CudaError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("cudaSetDevice"), std::string::npos) << m;
    EXPECT_NE(m.find("cuda_ops.cpp:"), std::string::npos) << m;
  }
  EXPECT_THROW(cuda::select_device(-1), CudaError);
  cudaGetLastError();
}

TEST(CudaAllocator, ReusesBlocksWithoutCudaMalloc) {
  MEDSEG_REQUIRE_CUDA();
  cuda::register_cuda_allocator();
  EXPECT_EQ(cuda::allocation_size_class(1), 512u);
  EXPECT_EQ(cuda::allocation_size_class(513), 1024u);
  EXPECT_EQ(cuda::allocation_size_class((size_t{1} << 20) + 1),
            (size_t{1} << 20) + (size_t{1} << 18));
  { Tensor warm(Shape{2, 3, 4, 5, 6}, Device::CUDA); }  // first use of this size class
  const auto before = cuda::allocator_stats();
  for (int i = 0; i < 10; ++i) {
    Tensor t(Shape{2, 3, 4, 5, 6}, Device::CUDA);
    EXPECT_EQ(t.device(), Device::CUDA);
  }
  const auto after = cuda::allocator_stats();
  EXPECT_EQ(after.cuda_malloc_count, before.cuda_malloc_count)
      << "steady state must not cudaMalloc";
  EXPECT_EQ(after.bytes_in_use, before.bytes_in_use);
  EXPECT_GE(after.peak_bytes_in_use, cuda::allocation_size_class(2 * 3 * 4 * 5 * 6 * 4));
  // Round trip through the Tensor hooks.
  Rng rng(5);
  Tensor h = Tensor::from(Shape{1, 2, 3, 4, 5}, random_vector(rng, 120));
  Tensor d = h.to(Device::CUDA);
  Tensor back = d.to(Device::CPU);
  EXPECT_EQ(back.to_vector(), h.to_vector());
  d.zero();
  EXPECT_EQ(d.to_vector(), std::vector<float>(120, 0.f));
}

TEST(CudaContext, IsMoveOnlyAndKeepsItsHandles) {
  MEDSEG_REQUIRE_CUDA();
  CudaContext a;
  EXPECT_FALSE(a.allow_tf32());
  cudaStream_t s = a.stream();
  CudaContext b(std::move(a));
  EXPECT_EQ(b.stream(), s);
  EXPECT_EQ(a.stream(), nullptr);
  void* w1 = b.workspace(1000);
  void* w2 = b.workspace(500);
  EXPECT_EQ(w1, w2) << "a smaller request must reuse the workspace";
  b.synchronize();
}

// ====================================================================== elementwise ops

TEST(CudaOps, LeakyReluForwardBackwardMatchCpuExactly) {
  MEDSEG_REQUIRE_CUDA();
  CudaContext ctx;
  Rng rng(11);
  for (int64_t n : {1, 7, 1000, 4099}) {
    auto x = random_vector(rng, n), dy = random_vector(rng, n);
    x[0] = 0.f;  // the boundary: y = 0 takes the slope branch in both
    std::vector<float> y_ref(n), dx_ref(n);
    cpu::leaky_relu_forward(n, x.data(), 0.01f, y_ref.data());
    cpu::leaky_relu_backward(n, dy.data(), y_ref.data(), 0.01f, dx_ref.data());
    Guarded gx(x), y = Guarded::output(n), ddy(dy), dx = Guarded::output(n);
    cuda::leaky_relu_forward(ctx, n, gx.ptr(), 0.01f, y.ptr());
    const auto y_got = y.download("leaky y");
    cuda::leaky_relu_backward(ctx, n, ddy.ptr(), y.ptr(), 0.01f, dx.ptr());
    // One multiplication per element, the same in both: bitwise equal.
    expect_close(y_got, y_ref, 0, 0, "leaky forward n=" + std::to_string(n));
    expect_close(dx.download("leaky dx"), dx_ref, 0, 0, "leaky backward n=" + std::to_string(n));
  }
}

TEST(CudaOps, ConcatForwardBackwardMatchCpuExactly) {
  MEDSEG_REQUIRE_CUDA();
  CudaContext ctx;
  Rng rng(12);
  const int64_t cases[][3] = {{1, 1, 1}, {17, 3, 5}, {64, 32, 32}, {5, 1, 7}};
  for (const auto& cs : cases) {
    const int64_t rows = cs[0], ca = cs[1], cb = cs[2];
    auto a = random_vector(rng, rows * ca), b = random_vector(rng, rows * cb);
    auto dout = random_vector(rng, rows * (ca + cb));
    std::vector<float> out_ref(rows * (ca + cb)), da_ref(rows * ca), db_ref(rows * cb);
    cpu::concat_channels_forward(rows, a.data(), ca, b.data(), cb, out_ref.data());
    cpu::concat_channels_backward(rows, dout.data(), ca, cb, da_ref.data(), db_ref.data());
    Guarded ga(a), gb(b), out = Guarded::output(rows * (ca + cb)), gd(dout);
    Guarded da = Guarded::output(rows * ca), db = Guarded::output(rows * cb);
    Guarded db_only = Guarded::output(rows * cb);
    cuda::concat_channels_forward(ctx, rows, ga.ptr(), ca, gb.ptr(), cb, out.ptr());
    cuda::concat_channels_backward(ctx, rows, gd.ptr(), ca, cb, da.ptr(), db.ptr());
    cuda::concat_channels_backward(ctx, rows, gd.ptr(), ca, cb, nullptr, db_only.ptr());
    const std::string tag =
        " rows " + std::to_string(rows) + " ca " + std::to_string(ca) + " cb " + std::to_string(cb);
    // Pure copies: bitwise equal.
    expect_close(out.download("concat out"), out_ref, 0, 0, "concat forward" + tag);
    expect_close(da.download("concat da"), da_ref, 0, 0, "concat backward da" + tag);
    expect_close(db.download("concat db"), db_ref, 0, 0, "concat backward db" + tag);
    expect_close(db_only.download("concat db only"), db_ref, 0, 0,
                 "concat backward db (da null)" + tag);
  }
}

TEST(CudaOps, SoftmaxMatchesCpu) {
  MEDSEG_REQUIRE_CUDA();
  CudaContext ctx;
  Rng rng(13);
  for (int64_t k : {1, 2, 3, 14}) {
    const int64_t rows = 211;
    auto z = random_vector(rng, rows * k, 0.0, 4.0);
    std::vector<float> p_ref(rows * k);
    cpu::softmax_channels(rows, k, z.data(), p_ref.data());
    Guarded gz(z), p = Guarded::output(rows * k);
    cuda::softmax_channels(ctx, rows, k, gz.ptr(), p.ptr());
    // expf differs from std::exp by at most 2 ulp, plus a float division: probabilities <= 1 agree
    // to a few 1e-7 absolute.
    expect_close(p.download("softmax"), p_ref, 1e-6, 1e-7, "softmax k=" + std::to_string(k));
  }
}

TEST(CudaOps, SgdNesterovMatchesDocumentedFormula) {
  MEDSEG_REQUIRE_CUDA();
  CudaContext ctx;
  Rng rng(14);
  const int64_t n = 1001;
  auto w = random_vector(rng, n), g = random_vector(rng, n), v = random_vector(rng, n, 0.0, 0.1);
  const float lr = 0.01f, mu = 0.99f, wd = 3e-5f;
  std::vector<float> w_ref = w, v_ref = v;
  for (int64_t i = 0; i < n; ++i) {  // the formula in kernels/cuda/ops.hpp, in double
    const double gi = static_cast<double>(g[i]) + wd * static_cast<double>(w_ref[i]);
    const double vi = mu * static_cast<double>(v_ref[i]) + gi;
    v_ref[i] = static_cast<float>(vi);
    w_ref[i] = static_cast<float>(w_ref[i] - lr * (gi + mu * vi));
  }
  Guarded gw(w), gg(g), gv(v);
  cuda::sgd_nesterov_update(ctx, n, gw.ptr(), gg.ptr(), gv.ptr(), lr, mu, wd);
  // fp32 evaluation of three fused multiply-adds: each result within an ulp or so of itself, plus
  // the rounding of the intermediate g' (0.5 ulp of |g'| < 4, i.e. <= 2.4e-7 absolute), which
  // survives into v and w even when those are small.
  expect_close(gv.download("sgd v"), v_ref, 1e-6, 5e-7, "sgd velocity");
  expect_close(gw.download("sgd w"), w_ref, 1e-6, 5e-7, "sgd weights");
  expect_close(gg.download("sgd g"), g, 0, 0, "sgd gradient is read only");
}

TEST(CudaOps, ChannelSumMatchesDoubleSum) {
  MEDSEG_REQUIRE_CUDA();
  CudaContext ctx;
  Rng rng(15);
  for (auto [rows, c] : std::vector<std::pair<int64_t, int64_t> >{{1, 1}, {1000, 3}, {4097, 33}}) {
    auto x = random_vector(rng, rows * c);
    std::vector<float> ref(c);
    for (int64_t j = 0; j < c; ++j) {
      double s = 0;
      for (int64_t r = 0; r < rows; ++r) s += x[r * c + j];
      ref[j] = static_cast<float>(s);
    }
    Guarded gx(x), out = Guarded::output(c);
    cuda::channel_sum(ctx, rows, c, gx.ptr(), out.ptr());
    // Both sum in double and round once: equal up to the rounding of the double sums (1 ulp of
    // float).
    expect_close(out.download("channel_sum"), ref, 2e-7, 1e-7 * std::sqrt(double(rows)),
                 "channel_sum");
  }
}

TEST(CudaOps, SgdGradScaleAndAdamWMatchDocumentedFormulas) {
  MEDSEG_REQUIRE_CUDA();
  CudaContext ctx;
  Rng rng(16);
  const int64_t n = 777;
  auto w = random_vector(rng, n), g = random_vector(rng, n, 0.0, 3.0), m = random_vector(rng, n, 0.0, 0.1);
  auto v = random_vector(rng, n, 0.0, 0.1);
  for (auto& x : v) x = std::fabs(x);  // second moments are >= 0
  {  // SGD with the clipping scale applied to g first
    const float lr = 0.02f, mu = 0.9f, wd = 1e-3f, scale = 0.37f;
    std::vector<float> w_ref = w, m_ref = m;
    for (int64_t i = 0; i < n; ++i) {
      const double gi = static_cast<double>(g[i]) * scale + wd * static_cast<double>(w_ref[i]);
      const double vi = mu * static_cast<double>(m_ref[i]) + gi;
      m_ref[i] = static_cast<float>(vi);
      w_ref[i] = static_cast<float>(w_ref[i] - lr * (gi + mu * vi));
    }
    Guarded gw(w), gg(g), gm(m);
    cuda::sgd_nesterov_update(ctx, n, gw.ptr(), gg.ptr(), gm.ptr(), lr, mu, wd, scale);
    // As the unscaled test, with the extra rounding of g * scale (|g| < 15: ~1e-6 absolute).
    expect_close(gm.download("sgd v"), m_ref, 1e-6, 2e-6, "sgd velocity, scaled gradient");
    expect_close(gw.download("sgd w"), w_ref, 1e-6, 2e-6, "sgd weights, scaled gradient");
  }
  {  // AdamW at step 3
    cuda::AdamWParams p{};
    p.lr = 1e-3f, p.beta1 = 0.9f, p.beta2 = 0.999f, p.eps = 1e-8f, p.wd = 0.01f, p.grad_scale = 0.5f;
    p.c1 = static_cast<float>(1.0 / (1.0 - std::pow(0.9, 3.0)));
    p.c2 = static_cast<float>(1.0 / (1.0 - std::pow(0.999, 3.0)));
    std::vector<float> w_ref = w, m_ref = m, v_ref = v;
    for (int64_t i = 0; i < n; ++i) {
      const double gi = static_cast<double>(g[i]) * p.grad_scale;
      const double mi = p.beta1 * static_cast<double>(m_ref[i]) + (1.0 - p.beta1) * gi;
      const double vi = p.beta2 * static_cast<double>(v_ref[i]) + (1.0 - p.beta2) * gi * gi;
      m_ref[i] = static_cast<float>(mi);
      v_ref[i] = static_cast<float>(vi);
      w_ref[i] = static_cast<float>(w_ref[i] - p.lr * (mi * p.c1 / (std::sqrt(vi * p.c2) + p.eps) +
                                                       p.wd * static_cast<double>(w_ref[i])));
    }
    Guarded gw(w), gg(g), gm(m), gv(v);
    cuda::adamw_update(ctx, n, gw.ptr(), gg.ptr(), gm.ptr(), gv.ptr(), p);
    // fp32 arithmetic against double: a few ulp of each moment; the step m/sqrt(v) is O(1), times
    // lr 1e-3, so the weights agree to ~1e-9 beyond their own rounding.
    expect_close(gm.download("adamw m"), m_ref, 1e-6, 1e-7, "adamw first moment");
    expect_close(gv.download("adamw v"), v_ref, 1e-6, 1e-9, "adamw second moment");
    expect_close(gw.download("adamw w"), w_ref, 1e-6, 1e-7, "adamw weights");
  }
}

TEST(CudaOps, AddInplaceExactAndSumSquaresMatchesDouble) {
  MEDSEG_REQUIRE_CUDA();
  CudaContext ctx;
  Rng rng(17);
  for (int64_t n : {int64_t{1}, int64_t{1000}, int64_t{1} << 20 | 3}) {
    auto a = random_vector(rng, n), b = random_vector(rng, n);
    std::vector<float> sum(static_cast<size_t>(n));
    double sq = 0;
    for (int64_t i = 0; i < n; ++i) {
      sum[i] = a[i] + b[i];
      sq += static_cast<double>(a[i]) * a[i];
    }
    Guarded ga(a), gb(b);
    DeviceBuffer out(sizeof(double));
    cuda::sum_squares(ctx, n, ga.ptr(), out.as<double>());
    double got = 0;
    ctx.synchronize();
    MEDSEG_CUDA_CHECK(cudaMemcpy(&got, out.get(), sizeof(double), cudaMemcpyDeviceToHost));
    // Both in double, different order: relative 1e-12 covers n = 1M terms.
    EXPECT_NEAR(got, sq, 1e-12 * sq) << "sum_squares n=" << n;
    cuda::add_inplace(ctx, n, ga.ptr(), gb.ptr());
    expect_close(ga.download("add_inplace"), sum, 0, 0, "add_inplace n=" + std::to_string(n));
  }
}

// ====================================================================== Dice + CE

TEST(CudaLoss, DiceCeMatchesReferenceLossAndGradient) {
  MEDSEG_REQUIRE_CUDA();
  CudaContext ctx;
  Rng rng(21);
  const Shape shapes[] = {{1, 3, 5, 7, 2}, {2, 4, 3, 5, 3}, {3, 2, 2, 3, 5}};
  for (const Shape& s : shapes) {
    for (bool batch_dice : {true, false}) {
      for (bool include_bg : {false, true}) {
        cpu::DiceCeOptions opt;
        opt.batch_dice = batch_dice;
        opt.include_background = include_bg;
        opt.ce_weight = 0.7;
        opt.dice_weight = 1.3;
        const int64_t rows = s.per_channel();
        auto logits = random_vector(rng, s.numel(), 0.0, 2.0);
        std::vector<uint16_t> labels(rows);
        for (auto& l : labels) l = static_cast<uint16_t>(rng.below(static_cast<uint64_t>(s.c)));
        const float scale = 2.5f;
        std::vector<float> dref(s.numel()), pref(s.numel());
        const auto ref =
            cpu::dice_ce_loss_ref(s, logits.data(), labels.data(), opt, scale, dref.data());
        cpu::softmax_channels(rows, s.c, logits.data(), pref.data());

        Guarded gl(logits), dlog = Guarded::output(s.numel()), probs = Guarded::output(s.numel());
        DeviceBuffer dlab(labels.size() * sizeof(uint16_t));
        MEDSEG_CUDA_CHECK(cudaMemcpy(dlab.get(), labels.data(), labels.size() * sizeof(uint16_t),
                                     cudaMemcpyHostToDevice));
        const auto got = cuda::dice_ce_loss(ctx, s, gl.ptr(), dlab.as<uint16_t>(), opt, scale,
                                            dlog.ptr(), probs.ptr());
        const std::string tag = shape_str(s) + (batch_dice ? " batch dice" : " per-sample dice") +
                                (include_bg ? " with background" : "");
        // Probabilities are float on the GPU (double in the reference): sums of rows of them in
        // double agree to ~1e-7 relative.
        EXPECT_NEAR(got.loss, ref.loss, 1e-6 * (1 + std::fabs(ref.loss))) << tag;
        EXPECT_NEAR(got.ce, ref.ce, 1e-6 * (1 + std::fabs(ref.ce))) << tag;
        EXPECT_NEAR(got.soft_dice, ref.soft_dice, 1e-6) << tag;
        ASSERT_EQ(got.dice_per_class.size(), ref.dice_per_class.size()) << tag;
        for (size_t k = 0; k < ref.dice_per_class.size(); ++k)
          EXPECT_NEAR(got.dice_per_class[k], ref.dice_per_class[k], 1e-6) << tag << " class " << k;
        expect_close(probs.download("loss probs"), pref, 1e-6, 1e-7, "loss probs " + tag);
        // The gradient combines float probabilities with double coefficients; terms are of size
        // max|grad|, so float rounding of p (1e-7 relative) bounds the error at ~1e-7 * max|grad|.
        const auto dgot = dlog.download("dlogits");
        expect_close(dgot, dref, 1e-5, 1e-5 * max_abs(dref), "dlogits " + tag);
      }
    }
  }
}

TEST(CudaLoss, RejectsOutOfRangeLabel) {
  MEDSEG_REQUIRE_CUDA();
  CudaContext ctx;
  const Shape s{1, 2, 2, 2, 3};
  std::vector<float> logits(s.numel(), 0.f);
  std::vector<uint16_t> labels(8, 1);
  labels[5] = 3;
  Guarded gl(logits);
  DeviceBuffer dlab(labels.size() * sizeof(uint16_t));
  MEDSEG_CUDA_CHECK(cudaMemcpy(dlab.get(), labels.data(), 16, cudaMemcpyHostToDevice));
  try {
    cuda::dice_ce_loss(ctx, s, gl.ptr(), dlab.as<uint16_t>(), cpu::DiceCeOptions{}, 1.f, nullptr,
                       nullptr);
    FAIL() << "label 3 with 3 classes was accepted";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("at voxel 5"), std::string::npos) << e.what();
  }
}

// ====================================================================== normalization

struct NormCase {
  Shape s;
  cpu::NormKind kind;
  bool leaky;
  float r_max, d_max;
};

std::string norm_tag(const NormCase& c) {
  const char* k = c.kind == cpu::NormKind::BatchRenorm ? "renorm"
                  : c.kind == cpu::NormKind::BatchNorm ? "batchnorm"
                                                       : "instancenorm";
  std::ostringstream os;
  os << k << " " << c.s << (c.leaky ? " leaky" : "") << " r_max " << c.r_max << " d_max "
     << c.d_max;
  return os.str();
}

std::vector<NormCase> norm_cases() {
  std::vector<NormCase> out;
  const Shape shapes[] = {{1, 3, 5, 7, 1}, {2, 4, 4, 4, 3},  {2, 5, 3, 7, 33},
                          {1, 2, 3, 4, 4}, {3, 2, 2, 2, 64}, {1, 1, 1, 1, 5}};
  for (const Shape& s : shapes)
    for (auto kind :
         {cpu::NormKind::BatchRenorm, cpu::NormKind::BatchNorm, cpu::NormKind::InstanceNorm})
      for (bool leaky : {true, false}) {
        out.push_back({s, kind, leaky, 3.f, 5.f});
        // Tight clips: many channels clip, exercising the clip counters and the clipped branches.
        if (kind == cpu::NormKind::BatchRenorm) out.push_back({s, kind, leaky, 1.05f, 0.05f});
      }
  return out;
}

cpu::NormConfig config_of(const NormCase& nc) {
  cpu::NormConfig cfg;
  cfg.kind = nc.kind;
  cfg.leaky = nc.leaky;
  cfg.r_max = nc.r_max;
  cfg.d_max = nc.d_max;
  return cfg;
}

TEST(CudaNorm, TrainForwardAndBackwardMatchReference) {
  MEDSEG_REQUIRE_CUDA();
  CudaContext ctx;
  Rng rng(31);
  for (const NormCase& nc : norm_cases()) {
    const Shape& s = nc.s;
    const std::string tag = norm_tag(nc);
    cpu::NormConfig cfg = config_of(nc);
    cfg.alpha = 0.1f;
    const int64_t C = s.c, gcs = nc.kind == cpu::NormKind::InstanceNorm ? s.n * C : C;
    // Per-channel offsets and scales so that statistics differ between channels.
    std::vector<float> x(s.numel());
    std::vector<double> ch_mean(C), ch_std(C);
    for (int64_t c = 0; c < C; ++c)
      ch_mean[c] = rng.uniform(-1, 1), ch_std[c] = rng.uniform(0.5, 3);
    for (int64_t i = 0; i < s.numel(); ++i)
      x[i] = static_cast<float>(rng.normal(ch_mean[i % C], ch_std[i % C]));
    auto gamma = random_vector(rng, C, 1.0, 0.3), beta = random_vector(rng, C, 0.0, 0.3);
    auto rmean = random_vector(rng, C, 0.0, 0.5);
    std::vector<float> rstd(C);
    for (auto& v : rstd) v = static_cast<float>(rng.uniform(0.5, 3));
    auto dy = random_vector(rng, s.numel());

    // CPU reference.
    std::vector<float> y_ref(s.numel()), m_ref(gcs), i_ref(gcs), r_ref(gcs), d_ref(gcs);
    std::vector<float> rm_ref = rmean, rs_ref = rstd;
    const bool batch = nc.kind != cpu::NormKind::InstanceNorm;
    const auto info = cpu::norm_forward_train_ref(
        cfg, s, x.data(), gamma.data(), beta.data(), batch ? rm_ref.data() : nullptr,
        batch ? rs_ref.data() : nullptr, y_ref.data(),
        cpu::NormCache{m_ref.data(), i_ref.data(), r_ref.data(), d_ref.data()});
    std::vector<float> dx_ref(s.numel()), dg_ref(C), db_ref(C);
    cpu::norm_backward_ref(cfg, s, dy.data(), x.data(), y_ref.data(), gamma.data(),
                           cpu::NormCache{m_ref.data(), i_ref.data(), r_ref.data(), d_ref.data()},
                           dx_ref.data(), dg_ref.data(), db_ref.data());

    // GPU.
    Guarded gx(x), gg(gamma), gb(beta), grm(rmean), grs(rstd), gdy(dy);
    Guarded y = Guarded::output(s.numel()), cm = Guarded::output(gcs), ci = Guarded::output(gcs),
            cr = Guarded::output(gcs), cd = Guarded::output(gcs);
    Guarded dx = Guarded::output(s.numel()), dg = Guarded::output(C), db = Guarded::output(C);
    cuda::NormDeviceCounters counters(ctx);
    const cpu::NormCache cache{cm.ptr(), ci.ptr(), cr.ptr(), cd.ptr()};
    cuda::norm_forward_train(ctx, cfg, s, gx.ptr(), gg.ptr(), gb.ptr(), batch ? grm.ptr() : nullptr,
                             batch ? grs.ptr() : nullptr, y.ptr(), cache, &counters);
    cuda::norm_backward(ctx, cfg, s, gdy.ptr(), gx.ptr(), y.ptr(), gg.ptr(), cache, dx.ptr(),
                        dg.ptr(), db.ptr());

    // Saved statistics: double sums on both sides, rounded once to float (a few ulp).
    expect_close(cm.download("mean"), m_ref, 1e-6, 1e-7, "saved mean " + tag);
    expect_close(ci.download("inv_std"), i_ref, 1e-6, 0, "saved inv_std " + tag);
    expect_close(cr.download("r"), r_ref, 1e-6, 0, "saved r " + tag);
    expect_close(cd.download("d"), d_ref, 1e-6, 1e-7, "saved d " + tag);
    // Output: fp32 evaluation of (x - mu) * scale + shift on O(1) values, a few ulp of O(1).
    expect_close(y.download("y"), y_ref, 1e-5, 1e-5, "y " + tag);
    if (batch) {
      // Running statistics: double update rounded to float.
      expect_close(grm.download("running mean"), rm_ref, 1e-6, 1e-7, "running mean " + tag);
      expect_close(grs.download("running std"), rs_ref, 1e-6, 1e-7, "running std " + tag);
    } else {
      expect_close(grm.download("running mean"), rmean, 0, 0,
                   "instance norm leaves running mean " + tag);
      expect_close(grs.download("running std"), rstd, 0, 0,
                   "instance norm leaves running std " + tag);
    }
    const auto cnt = counters.read(ctx);
    EXPECT_EQ(cnt.steps, 1) << tag;
    EXPECT_EQ(cnt.last_update_skipped, info.update_skipped) << tag;
    EXPECT_EQ(cnt.last_r_clipped, info.r_clipped) << tag;
    EXPECT_EQ(cnt.last_d_clipped, info.d_clipped) << tag;
    // dx: k * (dz - mean dz - x_bn mean(dz x_bn)) in fp32 with float coefficients; the three terms
    // are of size max|dx| / k-ish, so the error is a few ulp of max|dx|.
    expect_close(dx.download("dx"), dx_ref, 1e-4, 1e-5 * max_abs(dx_ref), "dx " + tag);
    // dgamma, dbeta: double sums of m float-rounded O(1) terms: error ~ sqrt(m) * 1e-7.
    const double m = static_cast<double>(s.per_channel());
    expect_close(dg.download("dgamma"), dg_ref, 1e-6, 1e-6 * std::sqrt(m), "dgamma " + tag);
    expect_close(db.download("dbeta"), db_ref, 1e-6, 1e-6 * std::sqrt(m), "dbeta " + tag);
  }
}

// The network's memory saving on the GPU: the output rebuilt from the cache, and the backward with
// the LeakyReLU mask from the input (and in place), give the training forward's and the ordinary
// backward's bits exactly.
TEST(CudaNorm, RebuiltOutputAndBackwardWithoutOutputAreBitIdentical) {
  MEDSEG_REQUIRE_CUDA();
  CudaContext ctx;
  Rng rng(35);
  for (const NormCase& nc : norm_cases()) {
    const Shape& s = nc.s;
    const std::string tag = norm_tag(nc);
    cpu::NormConfig cfg = config_of(nc);
    const int64_t C = s.c, gcs = nc.kind == cpu::NormKind::InstanceNorm ? s.n * C : C;
    const bool batch = nc.kind != cpu::NormKind::InstanceNorm;
    auto x = random_vector(rng, s.numel(), 0.3, 1.5);
    auto gamma = random_vector(rng, C, 1.0, 0.3), beta = random_vector(rng, C, 0.0, 0.3);
    auto rmean = random_vector(rng, C, 0.0, 0.5);
    std::vector<float> rstd(C, 1.2f);
    auto dy = random_vector(rng, s.numel());
    Guarded gx(x), gg(gamma), gb(beta), grm(rmean), grs(rstd), gdy(dy), gdy2(dy);
    Guarded y = Guarded::output(s.numel()), y2 = Guarded::output(s.numel());
    Guarded cm = Guarded::output(gcs), ci = Guarded::output(gcs), cr = Guarded::output(gcs),
            cd = Guarded::output(gcs), cs = Guarded::output(gcs), ch = Guarded::output(gcs);
    cpu::NormCache cache{cm.ptr(), ci.ptr(), cr.ptr(), cd.ptr()};
    cache.scale = cs.ptr();
    cache.shift = ch.ptr();
    cuda::norm_forward_train(ctx, cfg, s, gx.ptr(), gg.ptr(), gb.ptr(), batch ? grm.ptr() : nullptr,
                             batch ? grs.ptr() : nullptr, y.ptr(), cache, nullptr);
    cuda::norm_forward_apply(ctx, cfg, s, gx.ptr(), cache, y2.ptr());
    const auto yv = y.download("y"), y2v = y2.download("rebuilt y");
    ASSERT_EQ(std::memcmp(yv.data(), y2v.data(), yv.size() * sizeof(float)), 0) << "rebuilt y " << tag;
    // Backward three ways: with y, without y, without y in place over dy.
    Guarded dx = Guarded::output(s.numel()), dx2 = Guarded::output(s.numel());
    Guarded dg = Guarded::output(C), db = Guarded::output(C), dg2 = Guarded::output(C),
            db2 = Guarded::output(C), dg3 = Guarded::output(C), db3 = Guarded::output(C);
    cuda::norm_backward(ctx, cfg, s, gdy.ptr(), gx.ptr(), y.ptr(), gg.ptr(), cache, dx.ptr(),
                        dg.ptr(), db.ptr());
    cuda::norm_backward(ctx, cfg, s, gdy.ptr(), gx.ptr(), nullptr, gg.ptr(), cache, dx2.ptr(),
                        dg2.ptr(), db2.ptr());
    cuda::norm_backward(ctx, cfg, s, gdy2.ptr(), gx.ptr(), nullptr, gg.ptr(), cache, gdy2.ptr(),
                        dg3.ptr(), db3.ptr());
    const auto a = dx.download("dx"), b = dx2.download("dx without y"), c = gdy2.download("dx in place");
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << "dx without y " << tag;
    EXPECT_EQ(std::memcmp(a.data(), c.data(), a.size() * 4), 0) << "dx in place " << tag;
    const auto g1 = dg.download("dgamma"), g2 = dg2.download("dgamma 2"), g3 = dg3.download("dgamma 3");
    EXPECT_EQ(g1, g2) << "dgamma without y " << tag;
    EXPECT_EQ(g1, g3) << "dgamma in place " << tag;
    EXPECT_EQ(db.download("dbeta"), db2.download("dbeta 2")) << tag;
    db3.download("dbeta 3");
  }
}

TEST(CudaNorm, InferenceMatchesReference) {
  MEDSEG_REQUIRE_CUDA();
  CudaContext ctx;
  Rng rng(32);
  for (const NormCase& nc : norm_cases()) {
    const Shape& s = nc.s;
    cpu::NormConfig cfg;
    cfg.kind = nc.kind;
    cfg.leaky = nc.leaky;
    auto x = random_vector(rng, s.numel(), 0.3, 2.0);
    auto gamma = random_vector(rng, s.c, 1.0, 0.3), beta = random_vector(rng, s.c, 0.0, 0.3);
    auto rmean = random_vector(rng, s.c, 0.0, 0.5);
    std::vector<float> rstd(s.c);
    for (auto& v : rstd) v = static_cast<float>(rng.uniform(0.5, 3));
    rstd[0] = 0.f;  // a collapsed running std: floored at sqrt(eps) on both sides
    std::vector<float> y_ref(s.numel());
    cpu::norm_forward_infer_ref(cfg, s, x.data(), gamma.data(), beta.data(), rmean.data(),
                                rstd.data(), y_ref.data());
    Guarded gx(x), gg(gamma), gb(beta), grm(rmean), grs(rstd), y = Guarded::output(s.numel());
    cuda::norm_forward_infer(ctx, cfg, s, gx.ptr(), gg.ptr(), gb.ptr(), grm.ptr(), grs.ptr(),
                             y.ptr());
    // fp32 (x - mu) * scale + shift; the floored channel divides by sqrt(eps) ~ 3e-3, so values
    // reach ~1e3 and the relative bound is what applies there.
    expect_close(y.download("y infer"), y_ref, 1e-5, 1e-5, "inference " + norm_tag(nc));
  }
}

TEST(CudaNorm, NonFiniteBatchSkipsRunningUpdateAndCounts) {
  MEDSEG_REQUIRE_CUDA();
  CudaContext ctx;
  Rng rng(33);
  const Shape s{2, 3, 3, 3, 5};
  cpu::NormConfig cfg;  // batch renorm
  auto x = random_vector(rng, s.numel());
  x[17] = std::numeric_limits<float>::quiet_NaN();  // poisons channel 2 only
  std::vector<float> gamma(s.c, 1.f), beta(s.c, 0.f), rmean(s.c, 0.1f), rstd(s.c, 1.2f);
  Guarded gx(x), gg(gamma), gb(beta), grm(rmean), grs(rstd), y = Guarded::output(s.numel());
  Guarded cm = Guarded::output(s.c), ci = Guarded::output(s.c), cr = Guarded::output(s.c),
          cd = Guarded::output(s.c);
  cuda::NormDeviceCounters counters(ctx);
  for (int step = 0; step < 3; ++step)
    cuda::norm_forward_train(ctx, cfg, s, gx.ptr(), gg.ptr(), gb.ptr(), grm.ptr(), grs.ptr(),
                             y.ptr(), {cm.ptr(), ci.ptr(), cr.ptr(), cd.ptr()}, &counters);
  // All channels untouched, also the finite ones: bitwise.
  expect_close(grm.download("running mean"), rmean, 0, 0, "running mean after NaN batches");
  expect_close(grs.download("running std"), rstd, 0, 0, "running std after NaN batches");
  const auto cnt = counters.read(ctx);
  EXPECT_EQ(cnt.steps, 3);
  EXPECT_EQ(cnt.skipped_updates, 3);
  EXPECT_TRUE(cnt.last_update_skipped);
  counters.reset(ctx);
  EXPECT_EQ(counters.read(ctx).steps, 0);
  y.download("y");
  cm.download("mean");
}

TEST(CudaNorm, ConstantChannelGivesFiniteOutputAndGradients) {
  MEDSEG_REQUIRE_CUDA();
  CudaContext ctx;
  Rng rng(34);
  const Shape s{1, 4, 4, 4, 2};
  cpu::NormConfig cfg;
  auto x = random_vector(rng, s.numel());
  for (int64_t i = 0; i < s.per_channel(); ++i) x[i * 2 + 1] = 3.f;  // channel 1 constant
  auto dy = random_vector(rng, s.numel());
  std::vector<float> gamma(2, 1.f), beta(2, 0.f), rmean(2, 0.f), rstd(2, 1.f);
  Guarded gx(x), gg(gamma), gb(beta), grm(rmean), grs(rstd), gdy(dy);
  Guarded y = Guarded::output(s.numel()), dx = Guarded::output(s.numel()), dg = Guarded::output(2),
          db = Guarded::output(2);
  Guarded cm = Guarded::output(2), ci = Guarded::output(2), cr = Guarded::output(2),
          cd = Guarded::output(2);
  const cpu::NormCache cache{cm.ptr(), ci.ptr(), cr.ptr(), cd.ptr()};
  cuda::norm_forward_train(ctx, cfg, s, gx.ptr(), gg.ptr(), gb.ptr(), grm.ptr(), grs.ptr(), y.ptr(),
                           cache, nullptr);
  cuda::norm_backward(ctx, cfg, s, gdy.ptr(), gx.ptr(), y.ptr(), gg.ptr(), cache, dx.ptr(),
                      dg.ptr(), db.ptr());
  const std::vector<std::pair<std::string, std::vector<float> > > outputs = {
      {"y", y.download("y")},
      {"dx", dx.download("dx")},
      {"dgamma", dg.download("dgamma")},
      {"dbeta", db.download("dbeta")}};
  for (const auto& [name, v] : outputs)
    for (size_t i = 0; i < v.size(); ++i)
      ASSERT_TRUE(std::isfinite(v[i])) << name << "[" << i << "] = " << v[i];
}

// ====================================================================== convolutions

std::vector<cpu::ConvGeometry> conv_cases() {
  return {
      cpu::ConvGeometry::conv(Shape{1, 5, 6, 7, 3}, 4, 3, 1, 1),
      cpu::ConvGeometry::conv(Shape{2, 7, 5, 6, 2}, 5, 3, 2, 1),
      cpu::ConvGeometry::conv(Shape{1, 3, 4, 5, 1}, 1, 1, 1, 0),
      cpu::ConvGeometry::conv(Shape{1, 4, 4, 4, 1}, 3, 3, 1, 1),
      cpu::ConvGeometry::conv(Shape{2, 4, 4, 4, 16}, 16, 3, 1, 1),
      cpu::ConvGeometry::conv(Shape{1, 6, 6, 6, 8}, 32, 1, 1, 0),
      cpu::ConvGeometry::transpose2(Shape{1, 3, 2, 4, 3}, 2),
      cpu::ConvGeometry::transpose2(Shape{2, 2, 3, 3, 5}, 1),
      cpu::ConvGeometry::transpose2(Shape{1, 2, 2, 2, 32}, 16),
  };
}

// Runs forward, backward-data and backward-weights on the GPU and compares with the references.
// tol_rel: bound on |diff| relative to the largest reference magnitude of that tensor.
void check_conv(CudaContext& ctx, const cpu::ConvGeometry& g, double tol_rel, uint64_t seed) {
  Rng rng(seed);
  const Shape in = g.in_shape(), out = g.out_shape(), ws = g.weight_shape();
  auto x = random_vector(rng, in.numel()), w = random_vector(rng, ws.numel(), 0.0, 0.3);
  auto b = random_vector(rng, g.cout), dy = random_vector(rng, out.numel());
  std::vector<float> y_ref(out.numel()), dx_ref(in.numel()), dw_ref(ws.numel()), db_ref(g.cout);
  cpu::conv3d_forward_ref(g, x.data(), w.data(), b.data(), y_ref.data());
  cpu::conv3d_backward_data_ref(g, dy.data(), w.data(), dx_ref.data());
  cpu::conv3d_backward_weights_ref(g, dy.data(), x.data(), dw_ref.data(), db_ref.data());

  Guarded gx(x), gw(w), gb(b), gdy(dy);
  Guarded y = Guarded::output(out.numel()), dx = Guarded::output(in.numel()),
          dw = Guarded::output(ws.numel()), db = Guarded::output(g.cout);
  cuda::conv3d_forward(ctx, g, gx.ptr(), gw.ptr(), gb.ptr(), y.ptr());
  cuda::conv3d_backward_data(ctx, g, gdy.ptr(), gw.ptr(), dx.ptr());
  cuda::conv3d_backward_weights(ctx, g, gdy.ptr(), gx.ptr(), dw.ptr(), db.ptr());
  const std::string tag = g.str() + (ctx.allow_tf32() ? " [tf32]" : " [fp32]") +
                          " plans: " + cuda::conv_plan_description(ctx, g);
  expect_close(y.download("conv y"), y_ref, 0, tol_rel * max_abs(y_ref), "conv forward " + tag);
  expect_close(dx.download("conv dx"), dx_ref, 0, tol_rel * max_abs(dx_ref),
               "conv backward data " + tag);
  expect_close(dw.download("conv dw"), dw_ref, 0, tol_rel * max_abs(dw_ref),
               "conv backward weights " + tag);
  // The bias gradient is our own double reduction, algorithm-independent: ~1 ulp.
  expect_close(db.download("conv db"), db_ref, 1e-6, 1e-7 * std::sqrt(double(out.numel())),
               "conv bias grad " + tag);
}

TEST(CudaConv, Fp32MatchesReferenceForwardAndBackward) {
  MEDSEG_REQUIRE_CUDA();
  CudaContext ctx(/*allow_tf32=*/false);
  uint64_t seed = 41;
  // fp32 FMA arithmetic (TF32 off) over at most 27 * 32 products per output, in whatever order the
  // algorithm picks: the error is a few 1e-7 of the tensor's largest magnitude (sum of |terms| is
  // of that order); 1e-5 leaves a wide margin, while a wrong tap, stride or layout gives O(1)
  // errors.
  for (const auto& g : conv_cases()) check_conv(ctx, g, 1e-5, seed++);
}

TEST(CudaConv, Tf32MatchesReferenceLoosely) {
  MEDSEG_REQUIRE_CUDA();
  CudaContext ctx(/*allow_tf32=*/true);
  uint64_t seed = 51;
  // TF32 rounds both operands to 10 mantissa bits (relative 2^-11 ~ 5e-4 each); over hundreds of
  // products of random sign the error stays below ~1e-3 of the largest output: bound 5e-3.
  for (const auto& g : conv_cases()) check_conv(ctx, g, 5e-3, seed++);
}

TEST(CudaConv, PlansAreCachedPerGeometry) {
  MEDSEG_REQUIRE_CUDA();
  CudaContext ctx;
  const auto g = cpu::ConvGeometry::conv(Shape{1, 4, 4, 4, 2}, 3, 3, 1, 1);
  EXPECT_EQ(cuda::conv_plan_description(ctx, g), "");
  check_conv(ctx, g, 1e-5, 61);
  const std::string first = cuda::conv_plan_description(ctx, g);
  EXPECT_NE(first.find("fwd"), std::string::npos) << first;
  EXPECT_NE(first.find("math fma"), std::string::npos) << "TF32 off must plan FMA math: " << first;
  const auto before = cuda::allocator_stats();
  check_conv(ctx, g, 1e-5, 62);
  EXPECT_EQ(cuda::conv_plan_description(ctx, g), first);
  // Steady state: the same buffers come from the allocator's cache and the workspace is already
  // large enough, so the second run performs no cudaMalloc at all.
  EXPECT_EQ(cuda::allocator_stats().cuda_malloc_count, before.cuda_malloc_count);
}

TEST(CudaConv, RejectsInconsistentGeometry) {
  MEDSEG_REQUIRE_CUDA();
  CudaContext ctx;
  auto g = cpu::ConvGeometry::conv(Shape{1, 4, 4, 4, 2}, 3, 3, 1, 1);
  g.od = 5;
  DeviceBuffer buf(4096);
  EXPECT_THROW(
      cuda::conv3d_forward(ctx, g, buf.as<float>(), buf.as<float>(), nullptr, buf.as<float>()),
      ArgumentError);
}

#endif  // MEDSEG_HAVE_CUDA

}  // namespace
}  // namespace medseg
