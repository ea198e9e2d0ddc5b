// 3-D convolutions: the reference against hand-derived semantics and central finite differences,
// the oneDNN path against the reference on awkward shapes, the assign-not-accumulate rule, and the
// errors for inconsistent geometry.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "core/tensor.hpp"
#include "core/threads.hpp"
#include "kernels/cpu/conv.hpp"
#include "kernels/cpu/ops.hpp"

using namespace medseg;
using namespace medseg::cpu;

namespace {

std::vector<float> random_values(int64_t count, Rng& rng) {
  std::vector<float> v(static_cast<size_t>(count));
  for (float& x : v) x = static_cast<float>(rng.uniform(-1.0, 1.0));
  return v;
}

// An output buffer pre-filled with NaN (so that an unwritten element fails every comparison) and
// followed by sentinel values that must survive the call (an out-of-bounds write changes them).
class Guarded {
 public:
  explicit Guarded(int64_t count)
      : count_(count),
        v_(static_cast<size_t>(count + kGuard), std::numeric_limits<float>::quiet_NaN()) {
    for (int64_t i = 0; i < kGuard; ++i) v_[static_cast<size_t>(count + i)] = kSentinel;
  }
  float* data() { return v_.data(); }
  const float* data() const { return v_.data(); }
  int64_t size() const { return count_; }
  float operator[](int64_t i) const { return v_[static_cast<size_t>(i)]; }
  // Resets the payload to NaN for the next call.
  void poison() {
    std::fill(v_.begin(), v_.begin() + count_, std::numeric_limits<float>::quiet_NaN());
  }
  bool guard_intact() const {
    for (int64_t i = 0; i < kGuard; ++i)
      if (v_[static_cast<size_t>(count_ + i)] != kSentinel) return false;
    return true;
  }

 private:
  static constexpr int64_t kGuard = 16;
  static constexpr float kSentinel = 12345.678f;
  int64_t count_;
  std::vector<float> v_;
};

// Tolerance for fast (fp32, blocked sums in an order of oneDNN's choosing) against the reference
// (double sums, one final rounding). A float sum of T products has a worst-case error of
// T*u*sum|a*b| (u = 2^-24), but the rounding errors of a sum of random-signed terms add like a
// random walk, which gives a few u*sqrt(T) times the scale of the outputs. Here T <= 27*Cin = 864
// (forward, backward-data) and T <= N*spatial ~ 1000 (backward-weights), so u*sqrt(T) <= 2e-6 of
// the largest output. We allow 2e-5 of max|ref| (a 10x margin for the summation order), which is
// still ~1000x below what a wrong tap, a flipped kernel or a lost term causes (one term of T is
// ~1/sqrt(T) ~ 3e-2 of the largest output).
constexpr double kRelTol = 2e-5;

// Compares fast against ref element-wise with |fast - ref| <= kRelTol * max|ref|; reports the first
// failures with their indices and values.
void expect_close(const Guarded& fast, const std::vector<float>& ref, const std::string& what) {
  ASSERT_EQ(fast.size(), static_cast<int64_t>(ref.size())) << what;
  double max_ref = 0.0;
  for (float r : ref) max_ref = std::max(max_ref, std::fabs(static_cast<double>(r)));
  const double tol = kRelTol * std::max(max_ref, 1e-30);
  int reported = 0;
  double worst = 0.0;
  for (int64_t i = 0; i < fast.size(); ++i) {
    const double err = std::fabs(static_cast<double>(fast[i]) - ref[static_cast<size_t>(i)]);
    if (!(err <= tol)) {  // also catches NaN left by an unwritten element
      if (reported++ < 5)
        ADD_FAILURE() << what << ": index " << i << " fast " << fast[i] << " ref "
                      << ref[static_cast<size_t>(i)] << " |diff| " << err << " > tol " << tol;
    } else {
      worst = std::max(worst, err);
    }
  }
  EXPECT_EQ(reported, 0) << what << ": " << reported << " of " << fast.size()
                         << " elements out of tolerance";
  EXPECT_TRUE(fast.guard_intact()) << what << ": write past the end of the output";
}

std::vector<float> run_ref_forward(const ConvGeometry& g, const std::vector<float>& x,
                                   const std::vector<float>& w, const float* b) {
  std::vector<float> y(static_cast<size_t>(g.out_shape().numel()));
  conv3d_forward_ref(g, x.data(), w.data(), b, y.data());
  return y;
}

struct Case {
  ConvGeometry g;
  const char* what;
};

std::vector<Case> awkward_cases() {
  return {
      {ConvGeometry::conv(Shape{1, 5, 7, 6, 3}, 4, 3, 1, 1), "odd sizes 5x7x6, N=1"},
      {ConvGeometry::conv(Shape{2, 4, 4, 4, 1}, 5, 3, 1, 1), "Cin=1"},
      {ConvGeometry::conv(Shape{2, 3, 5, 4, 6}, 1, 3, 1, 1), "Cout=1"},
      {ConvGeometry::conv(Shape{2, 5, 7, 6, 4}, 8, 3, 2, 1), "stride 2, odd input"},
      {ConvGeometry::conv(Shape{1, 8, 8, 8, 16}, 32, 3, 2, 1), "stride 2 down conv 16->32"},
      {ConvGeometry::conv(Shape{2, 6, 6, 6, 16}, 16, 3, 1, 1), "16->16"},
      {ConvGeometry::conv(Shape{1, 4, 5, 4, 32}, 32, 3, 1, 1), "32->32"},
      {ConvGeometry::conv(Shape{2, 5, 3, 7, 8}, 3, 1, 1, 0), "k=1 head"},
      {ConvGeometry::conv(Shape{1, 5, 5, 5, 3}, 2, 1, 2, 0), "k=1 stride 2"},
      {ConvGeometry::conv(Shape{1, 5, 6, 7, 2}, 3, 3, 1, 0), "k=3 unpadded"},
      {ConvGeometry::transpose2(Shape{1, 3, 5, 4, 8}, 4), "transposed, odd input"},
      {ConvGeometry::transpose2(Shape{2, 2, 3, 3, 1}, 3), "transposed Cin=1"},
      {ConvGeometry::transpose2(Shape{1, 4, 4, 4, 32}, 16), "transposed 32->16"},
      {ConvGeometry::transpose2(Shape{1, 3, 3, 2, 5}, 1), "transposed Cout=1"},
  };
}

// Runs all three fast passes on random data and compares them with the reference; outputs are
// pre-filled with NaN and guarded by sentinels.
void check_fast_against_reference(const ConvGeometry& g, const std::string& what, uint64_t seed) {
  Rng rng(seed);
  const auto x = random_values(g.in_shape().numel(), rng);
  const auto w = random_values(g.weight_shape().numel(), rng);
  const auto b = random_values(g.cout, rng);
  const auto dy = random_values(g.out_shape().numel(), rng);
  const std::string tag = what + " [" + g.str() + "]";

  for (bool with_bias : {true, false}) {
    const auto y_ref = run_ref_forward(g, x, w, with_bias ? b.data() : nullptr);
    Guarded y(g.out_shape().numel());
    conv3d_forward(g, x.data(), w.data(), with_bias ? b.data() : nullptr, y.data());
    expect_close(y, y_ref, tag + (with_bias ? " forward+bias" : " forward"));
  }

  if (!g.transposed) {  // fused LeakyReLU forward: reference conv, then the reference activation
    for (float slope : {0.01f, 0.2f}) {
      auto y_ref = run_ref_forward(g, x, w, b.data());
      leaky_relu_forward(static_cast<int64_t>(y_ref.size()), y_ref.data(), slope, y_ref.data());
      Guarded y(g.out_shape().numel());
      conv3d_forward_leaky(g, x.data(), w.data(), b.data(), y.data(), slope);
      expect_close(y, y_ref, tag + " forward+bias+leaky " + std::to_string(slope));
    }
  }

  std::vector<float> dx_ref(static_cast<size_t>(g.in_shape().numel()));
  conv3d_backward_data_ref(g, dy.data(), w.data(), dx_ref.data());
  Guarded dx(g.in_shape().numel());
  conv3d_backward_data(g, dy.data(), w.data(), dx.data());
  expect_close(dx, dx_ref, tag + " backward-data");

  std::vector<float> dw_ref(static_cast<size_t>(g.weight_shape().numel()));
  std::vector<float> db_ref(static_cast<size_t>(g.cout));
  conv3d_backward_weights_ref(g, dy.data(), x.data(), dw_ref.data(), db_ref.data());
  Guarded dw(g.weight_shape().numel()), db(g.cout);
  conv3d_backward_weights(g, dy.data(), x.data(), dw.data(), db.data());
  expect_close(dw, dw_ref, tag + " backward-weights dw");
  expect_close(db, db_ref, tag + " backward-weights db");
  dw.poison();
  conv3d_backward_weights(g, dy.data(), x.data(), dw.data(), nullptr);
  expect_close(dw, dw_ref, tag + " backward-weights without db");
}

}  // namespace

// ------------------------------------------------------------------------------------ geometry

TEST(ConvGeometry, OutputSizesFollowTheDocumentedFormula) {
  const ConvGeometry g = ConvGeometry::conv(Shape{2, 5, 7, 6, 4}, 8, 3, 2, 1);
  // o = (i + 2*pad - k) / stride + 1
  EXPECT_EQ(g.out_shape(), (Shape{2, 3, 4, 3, 8}));
  EXPECT_EQ(g.weight_shape(), (Shape{8, 3, 3, 3, 4}));
  EXPECT_DOUBLE_EQ(g.flops(), 2.0 * 2 * 3 * 4 * 3 * 8 * 27 * 4);

  const ConvGeometry same = ConvGeometry::conv(Shape{1, 5, 7, 6, 3}, 4, 3, 1, 1);
  EXPECT_EQ(same.out_shape(), (Shape{1, 5, 7, 6, 4}));
  const ConvGeometry head = ConvGeometry::conv(Shape{1, 5, 7, 6, 3}, 2, 1, 1, 0);
  EXPECT_EQ(head.out_shape(), (Shape{1, 5, 7, 6, 2}));
  EXPECT_EQ(head.weight_shape(), (Shape{2, 1, 1, 1, 3}));

  const ConvGeometry up = ConvGeometry::transpose2(Shape{2, 3, 5, 4, 32}, 16);
  EXPECT_TRUE(up.transposed);
  EXPECT_EQ(up.out_shape(), (Shape{2, 6, 10, 8, 16}));
  EXPECT_EQ(up.weight_shape(), (Shape{32, 2, 2, 2, 16}));
  // Each output voxel gets one tap per axis: Cin multiply-adds per output value.
  EXPECT_DOUBLE_EQ(up.flops(), 2.0 * 2 * 6 * 10 * 8 * 16 * 32);
}

TEST(ConvGeometry, InconsistentGeometryThrowsArgumentErrorNamingTheShapes) {
  ConvGeometry g = ConvGeometry::conv(Shape{1, 5, 7, 6, 2}, 3, 3, 1, 1);
  g.oh = 6;  // should be 7
  std::vector<float> buf(4096, 0.f);
  auto expect_named_error = [&](auto&& call, const char* what) {
    try {
      call();
      ADD_FAILURE() << what << ": no exception";
    } catch (const ArgumentError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("(1, 5, 7, 6, 2)"), std::string::npos) << what << ": " << m;
      EXPECT_NE(m.find("(1, 5, 6, 6, 3)"), std::string::npos) << what << ": " << m;
    }
  };
  float* p = buf.data();
  expect_named_error([&] { conv3d_forward_ref(g, p, p, nullptr, p); }, "forward_ref");
  expect_named_error([&] { conv3d_forward(g, p, p, nullptr, p); }, "forward");
  expect_named_error([&] { conv3d_backward_data_ref(g, p, p, p); }, "backward_data_ref");
  expect_named_error([&] { conv3d_backward_data(g, p, p, p); }, "backward_data");
  expect_named_error([&] { conv3d_backward_weights_ref(g, p, p, p, p); }, "backward_weights_ref");
  expect_named_error([&] { conv3d_backward_weights(g, p, p, p, p); }, "backward_weights");

  // A transposed geometry with a regular kernel size, and unsupported kernels.
  ConvGeometry t = ConvGeometry::transpose2(Shape{1, 2, 2, 2, 4}, 4);
  t.k = 3;
  EXPECT_THROW(validate(t), ArgumentError);
  EXPECT_THROW(ConvGeometry::conv(Shape{1, 5, 5, 5, 2}, 3, 5, 1, 2), ArgumentError);
  EXPECT_THROW(ConvGeometry::conv(Shape{1, 5, 5, 5, 2}, 3, 3, 3, 1), ArgumentError);
  EXPECT_THROW(ConvGeometry::conv(Shape{1, 5, 0, 5, 2}, 3, 3, 1, 1), ArgumentError);

  // Tensor shapes that disagree with a valid geometry: the message names found and expected.
  const ConvGeometry ok = ConvGeometry::conv(Shape{1, 5, 7, 6, 2}, 3, 3, 2, 1);
  try {
    check_conv_shapes(ok, Shape{1, 5, 7, 6, 2}, Shape{3, 3, 3, 3, 2}, Shape{1, 5, 7, 6, 3});
    ADD_FAILURE() << "check_conv_shapes accepted a wrong output shape";
  } catch (const ArgumentError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("(1, 5, 7, 6, 3)"), std::string::npos) << m;
    EXPECT_NE(m.find("(1, 3, 4, 3, 3)"), std::string::npos) << m;
  }
  EXPECT_THROW(check_conv_shapes(ok, Shape{1, 5, 7, 6, 2}, Shape{3, 3, 3, 3, 3}, ok.out_shape()),
               ArgumentError);
  EXPECT_NO_THROW(check_conv_shapes(ok, ok.in_shape(), ok.weight_shape(), ok.out_shape()));
}

// ------------------------------------------------------------------------------------ reference

TEST(Conv3dReference, IsCrossCorrelationWithKrscWeights) {
  // One input channel, two output channels. Output channel 0 has a single tap at (kd,kh,kw) =
  // (0,1,2): with pad 1 it reads x[d-1, h, w+1] (no kernel flip, as in cuDNN and PyTorch). Output
  // channel 1 is 2*x at the centre tap plus the bias 0.5. Expected values are the exact result
  // rounded once to float, which is what double accumulation yields.
  const ConvGeometry g = ConvGeometry::conv(Shape{1, 3, 4, 5, 1}, 2, 3, 1, 1);
  Rng rng(1);
  const auto x = random_values(g.in_shape().numel(), rng);
  std::vector<float> w(static_cast<size_t>(g.weight_shape().numel()), 0.f);
  w[((0 * 3 + 0) * 3 + 1) * 3 + 2] = 1.f;  // (co=0, kd=0, kh=1, kw=2, ci=0)
  w[27 + 13] = 2.f;                        // (co=1, centre)
  const std::vector<float> b = {0.f, 0.5f};
  const auto y = run_ref_forward(g, x, w, b.data());
  auto X = [&](int64_t d, int64_t h, int64_t ww) -> float {
    if (d < 0 || d >= 3 || h < 0 || h >= 4 || ww < 0 || ww >= 5) return 0.f;
    return x[static_cast<size_t>((d * 4 + h) * 5 + ww)];
  };
  for (int64_t d = 0; d < 3; ++d)
    for (int64_t h = 0; h < 4; ++h)
      for (int64_t ww = 0; ww < 5; ++ww) {
        const size_t o = static_cast<size_t>(((d * 4 + h) * 5 + ww) * 2);
        EXPECT_EQ(y[o], X(d - 1, h, ww + 1)) << "channel 0 at " << d << "," << h << "," << ww;
        EXPECT_EQ(y[o + 1], static_cast<float>(2.0 * X(d, h, ww) + 0.5))
            << "channel 1 at " << d << "," << h << "," << ww;
      }
}

TEST(Conv3dReference, TransposedWritesEachInputToTwoByTwoByTwoBlock) {
  // y[2i+k, co] = sum_ci x[i, ci] * w[ci, k, co]: with one input channel and w[0, k, 0] = k+1 (k
  // the flattened tap index), each input voxel is spread over its 2x2x2 output block scaled by
  // tap+1.
  const ConvGeometry g = ConvGeometry::transpose2(Shape{1, 2, 3, 2, 1}, 1);
  Rng rng(2);
  const auto x = random_values(g.in_shape().numel(), rng);
  std::vector<float> w(8);
  for (int t = 0; t < 8; ++t) w[static_cast<size_t>(t)] = static_cast<float>(t + 1);
  const std::vector<float> b = {0.25f};
  const auto y = run_ref_forward(g, x, w, b.data());
  for (int64_t d = 0; d < 4; ++d)
    for (int64_t h = 0; h < 6; ++h)
      for (int64_t ww = 0; ww < 4; ++ww) {
        const float xi = x[static_cast<size_t>(((d / 2) * 3 + h / 2) * 2 + ww / 2)];
        const int tap = static_cast<int>(((d % 2) * 2 + h % 2) * 2 + ww % 2);
        EXPECT_EQ(y[static_cast<size_t>((d * 6 + h) * 4 + ww)],
                  static_cast<float>(static_cast<double>(xi) * (tap + 1) + 0.25))
            << "at " << d << "," << h << "," << ww;
      }
}

namespace {

// L(x, w, b) = sum_o y(x, w, b)[o] * r[o] in double, from the float forward output.
struct FdLoss {
  const ConvGeometry& g;
  const std::vector<float>& r;
  double operator()(const std::vector<float>& x, const std::vector<float>& w,
                    const std::vector<float>& b, double* abs_sum) const {
    const auto y = run_ref_forward(g, x, w, b.data());
    double l = 0.0, a = 0.0;
    for (size_t i = 0; i < y.size(); ++i) {
      l += static_cast<double>(y[i]) * r[i];
      a += std::fabs(static_cast<double>(y[i]) * r[i]);
    }
    *abs_sum = a;
    return l;
  }
};

// Checks analytic[i] against the central difference of `loss` when values[i] moves by +-h. The conv
// is linear in each argument, so the difference quotient has no truncation error and h can be
// large; the only error is the float rounding of each y (<= u/2 |y|, u = 2^-24) inside both losses,
// which bounds the quotient error by u/2 * (sum|y+ r| + sum|y- r|) / (x+ - x-), plus the float
// rounding of the analytic gradient itself (u/2 |g|). We allow 4x that bound.
template <class Loss>
void check_central_differences(std::vector<float>& values, const std::vector<float>& analytic,
                               const Loss& loss, const std::string& what) {
  constexpr double u = 0x1.0p-24;
  const double h = 0.5;
  int failures = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    const float saved = values[i];
    values[i] = static_cast<float>(saved + h);
    const double xp = values[i];
    double ap = 0.0, am = 0.0;
    const double lp = loss(&ap);
    values[i] = static_cast<float>(saved - h);
    const double xm = values[i];
    const double lm = loss(&am);
    values[i] = saved;
    const double fd = (lp - lm) / (xp - xm);
    const double bound = 4.0 * (0.5 * u * (ap + am) / (xp - xm) + 0.5 * u * std::fabs(analytic[i]));
    const double err = std::fabs(fd - analytic[i]);
    if (!(err <= bound) && failures++ < 5)
      ADD_FAILURE() << what << ": index " << i << " analytic " << analytic[i]
                    << " central difference " << fd << " |diff| " << err << " > bound " << bound;
  }
  EXPECT_EQ(failures, 0) << what;
}

void check_reference_gradients(const ConvGeometry& g, uint64_t seed) {
  Rng rng(seed);
  auto x = random_values(g.in_shape().numel(), rng);
  auto w = random_values(g.weight_shape().numel(), rng);
  auto b = random_values(g.cout, rng);
  const auto r = random_values(g.out_shape().numel(), rng);  // dL/dy
  const FdLoss loss{g, r};

  std::vector<float> dx(x.size(), std::numeric_limits<float>::quiet_NaN());
  std::vector<float> dw(w.size(), 1e30f), db(b.size(), 1e30f);
  conv3d_backward_data_ref(g, r.data(), w.data(), dx.data());
  conv3d_backward_weights_ref(g, r.data(), x.data(), dw.data(), db.data());

  check_central_differences(
      x, dx, [&](double* a) { return loss(x, w, b, a); }, g.str() + " dx");
  check_central_differences(
      w, dw, [&](double* a) { return loss(x, w, b, a); }, g.str() + " dw");
  check_central_differences(
      b, db, [&](double* a) { return loss(x, w, b, a); }, g.str() + " db");
}

}  // namespace

TEST(Conv3dReference, BackwardMatchesCentralDifferencesForRegularConv) {
  check_reference_gradients(ConvGeometry::conv(Shape{1, 3, 4, 2, 2}, 3, 3, 1, 1), 10);
  check_reference_gradients(ConvGeometry::conv(Shape{2, 5, 3, 4, 2}, 2, 3, 2, 1), 11);
  check_reference_gradients(ConvGeometry::conv(Shape{1, 3, 2, 3, 3}, 2, 1, 1, 0), 12);
}

TEST(Conv3dReference, BackwardMatchesCentralDifferencesForTransposedConv) {
  check_reference_gradients(ConvGeometry::transpose2(Shape{1, 2, 3, 1, 3}, 2), 20);
  check_reference_gradients(ConvGeometry::transpose2(Shape{2, 1, 2, 2, 1}, 3), 21);
}

// ------------------------------------------------------------------------------------ fast
// (oneDNN)

TEST(Conv3d, FastMatchesReferenceOnOddShapes) {
  uint64_t seed = 100;
  for (const Case& c : awkward_cases()) check_fast_against_reference(c.g, c.what, seed++);
}

// Both dispatch modes on every machine: Fixed (ours wherever covered: the default) and Measure
// (per geometry and pass the faster of ours and oneDNN, timed), the latter
// twice (the first call of a geometry times both, later calls use the kept choice). Every result
// must match the reference, and Measure must have recorded one choice per (geometry, pass,
// variant) it met.
TEST(Conv3d, DispatchModesMatchReference) {
  struct Restore {
    ~Restore() { set_conv_choice_mode(ConvChoiceMode::Auto); }
  } restore;
  std::vector<Case> cases = awkward_cases();
  cases.push_back({ConvGeometry::conv(Shape{1, 16, 17, 16, 16}, 16, 3, 1, 1), "16->16, F(4) tiles"});
  uint64_t seed = 900;
  set_conv_choice_mode(ConvChoiceMode::Fixed);
  for (const Case& c : cases) check_fast_against_reference(c.g, std::string(c.what) + " fixed", seed++);
  set_conv_choice_mode(ConvChoiceMode::Measure);
  EXPECT_EQ(conv_choices_measured(), 0);
  for (int round = 0; round < 2; ++round) {
    for (const Case& c : cases)
      check_fast_against_reference(c.g, std::string(c.what) + " measured, round " +
                                            std::to_string(round), seed++);
    // Per regular geometry: forward with and without bias, two LeakyReLU slopes, backward-data,
    // backward-weights with and without db; per transposed one the same without LeakyReLU.
    int64_t expected = 0;
    for (const Case& c : cases) expected += c.g.transposed ? 5 : 7;
    bool any_ours = false;
    EXPECT_EQ(conv_choices_measured(&any_ours), expected) << "round " << round;
    // Ours beat oneDNN by 1.5-3x on the F(4) case's seven passes alone, on AVX2 and on AVX-512.
    EXPECT_TRUE(any_ours) << "our kernels never won a measurement";
  }
}

// ---- our own AVX2 kernels, called explicitly (so that they are tested on AVX-512 machines too,
// where the dispatch leaves some passes to oneDNN): against the reference, and the same bits for
// 1 and 2 threads.

// Random inputs of one geometry and the reference result of every pass.
struct RefProblem {
  ConvGeometry g;
  std::string tag;
  std::vector<float> x, w, b, dy;
  std::vector<float> y_bias, y_plain, y_leaky, dx, dw, db;  // references; y_leaky: bias, slope 0.01
  RefProblem(const Case& c, uint64_t seed)
      : g(c.g), tag(std::string(c.what) + " [" + g.str() + "]") {
    Rng rng(seed);
    x = random_values(g.in_shape().numel(), rng);
    w = random_values(g.weight_shape().numel(), rng);
    b = random_values(g.cout, rng);
    dy = random_values(g.out_shape().numel(), rng);
    y_bias = run_ref_forward(g, x, w, b.data());
    y_plain = run_ref_forward(g, x, w, nullptr);
    y_leaky = y_bias;
    leaky_relu_forward(static_cast<int64_t>(y_leaky.size()), y_leaky.data(), 0.01f, y_leaky.data());
    dx.resize(x.size());
    dw.resize(w.size());
    db.resize(b.size());
    conv3d_backward_data_ref(g, dy.data(), w.data(), dx.data());
    conv3d_backward_weights_ref(g, dy.data(), x.data(), dw.data(), db.data());
  }
};

// Runs `pass` with 1 and then 2 OpenMP threads (restoring the count); `pass` checks its outputs
// and returns them, and both thread counts must give the same bits.
template <class Pass>
void expect_thread_invariant(const std::string& tag, Pass pass) {
  std::vector<float> first;
  for (int threads : {1, 2}) {
    const int saved = num_threads();
    set_num_threads(threads);
    std::vector<float> got = pass(tag + ", " + std::to_string(threads) + " thread(s)");
    set_num_threads(saved);
    if (threads == 1)
      first = std::move(got);
    else
      EXPECT_EQ(got, first) << tag << ": 1 and 2 threads give different bits";
  }
}

// A kernel's output (NaN-filled and guarded beforehand) against `ref`; returns the values.
template <class Call>
std::vector<float> checked(const std::vector<float>& ref, const std::string& what, Call call) {
  Guarded out(static_cast<int64_t>(ref.size()));
  if (!call(out.data())) {
    ADD_FAILURE() << what << ": the kernel declined a geometry it covers";
    return {};
  }
  expect_close(out, ref, what);
  return std::vector<float>(out.data(), out.data() + out.size());
}

void append(std::vector<float>& to, const std::vector<float>& more) {
  to.insert(to.end(), more.begin(), more.end());
}

// For a geometry a kernel does not cover: every call returns false and writes nothing.
using DeclinedCall = std::function<bool(const ConvGeometry&, const float*, float*)>;
void expect_declined(const ConvGeometry& g, const std::vector<DeclinedCall>& calls) {
  const auto n = static_cast<size_t>(
      std::max({g.in_shape().numel(), g.out_shape().numel(), g.weight_shape().numel()}));
  std::vector<float> in(n, 7.f), out(n, 7.f);
  for (const DeclinedCall& call : calls) EXPECT_FALSE(call(g, in.data(), out.data())) << g.str();
  for (float v : out) ASSERT_EQ(v, 7.f) << g.str();
}

// The direct backward-weights kernel: strides 1 and 2, k 1 and 3, padded and unpadded, odd sizes,
// N = 1 and 2, Cin 8 (one vector per tile) and 16 / 48 (two), Cout 8 and 24, and the
// few-input-channel path (Cin 1, 3, 4).
TEST(Conv3d, DirectBackwardWeightsMatchesReference) {
  uint64_t seed = 300;
  for (const Case& c : std::vector<Case>{
           {ConvGeometry::conv(Shape{2, 5, 7, 6, 16}, 8, 3, 1, 1), "16->8, odd sizes"},
           {ConvGeometry::conv(Shape{1, 6, 6, 6, 8}, 16, 3, 1, 1), "Cin 8 -> 16, N=1"},
           {ConvGeometry::conv(Shape{2, 7, 5, 9, 16}, 24, 3, 2, 1), "stride 2, odd input"},
           {ConvGeometry::conv(Shape{1, 4, 4, 4, 48}, 8, 3, 2, 1), "stride 2, Cin 48"},
           {ConvGeometry::conv(Shape{2, 5, 3, 7, 16}, 8, 1, 1, 0), "k=1"},
           {ConvGeometry::conv(Shape{1, 5, 6, 7, 8}, 8, 3, 1, 0), "k=3 unpadded"},
           {ConvGeometry::conv(Shape{1, 3, 40, 2, 16}, 8, 3, 1, 1), "tall: several row blocks"},
           {ConvGeometry::conv(Shape{2, 5, 7, 6, 1}, 16, 3, 1, 1), "Cin 1 (first layer)"},
           {ConvGeometry::conv(Shape{1, 4, 9, 5, 4}, 24, 3, 1, 1), "Cin 4 (4 modalities) -> 24"},
           {ConvGeometry::conv(Shape{1, 9, 9, 9, 3}, 8, 3, 1, 1), "Cin 3, more rows than chunks"},
       }) {
    if (!conv3d_backward_weights_direct_covers(c.g)) GTEST_SKIP() << "this CPU has no AVX2/FMA";
    const RefProblem p(c, seed++);
    expect_thread_invariant(p.tag, [&](const std::string& tt) {
      Guarded db(p.g.cout);
      auto dw = checked(p.dw, tt + " dw", [&](float* out) {
        return conv3d_backward_weights_direct(p.g, p.dy.data(), p.x.data(), out, db.data());
      });
      expect_close(db, p.db, tt + " db");
      return dw;
    });
  }
  // Not covered: Cout not a multiple of 8, Cin not a multiple of 8 outside k 3 / stride 1 / pad 1,
  // transposed.
  for (const ConvGeometry& g : {ConvGeometry::conv(Shape{1, 4, 4, 4, 4}, 8, 3, 2, 1),
                                ConvGeometry::conv(Shape{1, 4, 4, 4, 16}, 3, 1, 1, 0),
                                ConvGeometry::transpose2(Shape{1, 2, 2, 2, 16}, 8)})
    expect_declined(g, {[](const ConvGeometry& gg, const float* in, float* out) {
                      return conv3d_backward_weights_direct(gg, in, in, out, nullptr);
                    }});
}

// The Winograd kernels: forward with and without bias, with the fused LeakyReLU, backward-data and
// backward-weights (with db), each with both tile sizes F(2x2x2, 3x3x3) and F(4x4x4, 3x3x3), on
// sizes with partial tiles of both sizes, a volume smaller than one tile, Cin != Cout, a tail of 8
// output channels, volumes with interior tiles, several blocks of tiles and a partial last group,
// and 128 -> 128 channels (the widest covered, the largest rounding error of F(4)).
TEST(Conv3d, WinogradMatchesReference) {
  uint64_t seed = 500;
  for (const Case& c : std::vector<Case>{
           {ConvGeometry::conv(Shape{2, 5, 7, 6, 16}, 16, 3, 1, 1), "16->16, odd sizes"},
           {ConvGeometry::conv(Shape{1, 1, 2, 3, 8}, 24, 3, 1, 1), "smaller than a tile, 8->24"},
           {ConvGeometry::conv(Shape{1, 9, 10, 11, 32}, 16, 3, 1, 1), "32->16, several blocks"},
           {ConvGeometry::conv(Shape{2, 4, 4, 4, 64}, 128, 3, 1, 1), "64->128, deep level"},
           {ConvGeometry::conv(Shape{1, 3, 3, 3, 24}, 40, 3, 1, 1), "24->40: a tail of 8"},
           {ConvGeometry::conv(Shape{1, 8, 7, 9, 128}, 128, 3, 1, 1), "128->128"},
           {ConvGeometry::conv(Shape{1, 14, 13, 12, 16}, 8, 3, 1, 1), "16->8, interior 4^3 tiles"},
       }) {
    if (!conv3d_winograd_covers(c.g)) GTEST_SKIP() << "this CPU has no AVX2/FMA";
    const RefProblem p(c, seed++);
    const ConvGeometry& g = p.g;
    expect_thread_invariant(p.tag, [&](const std::string& tt) {
      std::vector<float> all;
      for (const auto& [tile, name] : {std::pair{WinogradTile::F2, " F(2)"},
                                       std::pair{WinogradTile::F4, " F(4)"}}) {
        const std::string t = tt + name;
        append(all, checked(p.y_bias, t + " forward+bias", [&](float* out) {
                 return conv3d_forward_winograd(g, p.x.data(), p.w.data(), p.b.data(), out,
                                                std::nullopt, tile);
               }));
        checked(p.y_plain, t + " forward", [&](float* out) {
          return conv3d_forward_winograd(g, p.x.data(), p.w.data(), nullptr, out, std::nullopt,
                                         tile);
        });
        checked(p.y_leaky, t + " forward+bias+leaky", [&](float* out) {
          return conv3d_forward_winograd(g, p.x.data(), p.w.data(), p.b.data(), out, 0.01f, tile);
        });
        append(all, checked(p.dx, t + " backward-data", [&](float* out) {
                 return conv3d_backward_data_winograd(g, p.dy.data(), p.w.data(), out, tile);
               }));
        Guarded db(g.cout);
        append(all, checked(p.dw, t + " backward-weights dw", [&](float* out) {
                 return conv3d_backward_weights_winograd(g, p.dy.data(), p.x.data(), out,
                                                         db.data(), tile);
               }));
        expect_close(db, p.db, t + " backward-weights db");
      }
      return all;
    });
  }
  // Not covered: stride 2, k 1, unpadded, transposed, channels not a multiple of 8, Cin x Cout
  // beyond 128 x 128.
  for (const ConvGeometry& g : {ConvGeometry::conv(Shape{1, 2, 2, 2, 256}, 256, 3, 1, 1),
                                ConvGeometry::conv(Shape{1, 4, 4, 4, 16}, 16, 3, 2, 1),
                                ConvGeometry::conv(Shape{1, 4, 4, 4, 16}, 16, 1, 1, 0),
                                ConvGeometry::conv(Shape{1, 4, 4, 4, 16}, 16, 3, 1, 0),
                                ConvGeometry::conv(Shape{1, 4, 4, 4, 12}, 16, 3, 1, 1),
                                ConvGeometry::conv(Shape{1, 4, 4, 4, 16}, 3, 3, 1, 1),
                                ConvGeometry::transpose2(Shape{1, 2, 2, 2, 16}, 8)})
    expect_declined(g, {[](const ConvGeometry& gg, const float* in, float* out) {
                          return conv3d_forward_winograd(gg, in, in, nullptr, out);
                        },
                        [](const ConvGeometry& gg, const float* in, float* out) {
                          return conv3d_backward_data_winograd(gg, in, in, out);
                        },
                        [](const ConvGeometry& gg, const float* in, float* out) {
                          return conv3d_backward_weights_winograd(gg, in, in, out, nullptr);
                        }});
}

// The direct transposed-conv kernels: forward (with and without bias) and backward-weights (with
// db) on odd sizes, N = 2, Cin not a multiple of the 6-row register tile, Cout with a tail of 8,
// and enough voxels for several chunks.
TEST(Conv3d, DirectTransposedMatchesReference) {
  uint64_t seed = 700;
  for (const Case& c : std::vector<Case>{
           {ConvGeometry::transpose2(Shape{2, 3, 5, 4, 32}, 16), "32->16, odd input, N=2"},
           {ConvGeometry::transpose2(Shape{1, 2, 3, 3, 5}, 24), "Cin 5 -> 24"},
           {ConvGeometry::transpose2(Shape{1, 9, 10, 11, 16}, 8), "16->8, several chunks"},
       }) {
    if (!conv_transpose2_direct_covers(c.g)) GTEST_SKIP() << "this CPU has no AVX2/FMA";
    const RefProblem p(c, seed++);
    const ConvGeometry& g = p.g;
    expect_thread_invariant(p.tag, [&](const std::string& tt) {
      auto all = checked(p.y_bias, tt + " forward+bias", [&](float* out) {
        return conv_transpose2_forward_direct(g, p.x.data(), p.w.data(), p.b.data(), out);
      });
      checked(p.y_plain, tt + " forward", [&](float* out) {
        return conv_transpose2_forward_direct(g, p.x.data(), p.w.data(), nullptr, out);
      });
      Guarded db(g.cout);
      append(all, checked(p.dw, tt + " backward-weights dw", [&](float* out) {
               return conv_transpose2_backward_weights_direct(g, p.dy.data(), p.x.data(), out,
                                                              db.data());
             }));
      expect_close(db, p.db, tt + " backward-weights db");
      return all;
    });
  }
  // Not covered: a regular conv; Cout not a multiple of 8; Cin x Cout beyond 2048.
  for (const ConvGeometry& g : {ConvGeometry::transpose2(Shape{1, 2, 2, 2, 128}, 64),
                                ConvGeometry::conv(Shape{1, 4, 4, 4, 16}, 16, 3, 1, 1),
                                ConvGeometry::transpose2(Shape{1, 2, 2, 2, 16}, 4)})
    expect_declined(g, {[](const ConvGeometry& gg, const float* in, float* out) {
                          return conv_transpose2_forward_direct(gg, in, in, nullptr, out);
                        },
                        [](const ConvGeometry& gg, const float* in, float* out) {
                          return conv_transpose2_backward_weights_direct(gg, in, in, out, nullptr);
                        }});
}

// The direct stride-2 backward-data kernel: even and odd sizes (odd: the last dx plane, row and
// column receive one tap fewer), N = 2, Cout not a multiple of 8, Cin with a tail of 8.
TEST(Conv3d, DirectStride2BackwardDataMatchesReference) {
  uint64_t seed = 900;
  for (const Case& c : std::vector<Case>{
           {ConvGeometry::conv(Shape{2, 8, 8, 8, 16}, 32, 3, 2, 1), "16->32, even sizes, N=2"},
           {ConvGeometry::conv(Shape{1, 7, 9, 13, 24}, 12, 3, 2, 1), "24->12, odd sizes"},
           {ConvGeometry::conv(Shape{1, 5, 4, 3, 8}, 16, 3, 2, 1), "8->16, short rows"},
       }) {
    const RefProblem p(c, seed++);
    std::vector<float> probe(p.dx.size());
    if (!conv3d_stride2_backward_data_direct(p.g, p.dy.data(), p.w.data(), probe.data()))
      GTEST_SKIP() << "this CPU has no AVX2/FMA";
    expect_thread_invariant(p.tag, [&](const std::string& tt) {
      return checked(p.dx, tt + " backward-data", [&](float* out) {
        return conv3d_stride2_backward_data_direct(p.g, p.dy.data(), p.w.data(), out);
      });
    });
  }
  // Not covered: stride 1, k 1, transposed, Cin not a multiple of 8, Cin x Cout beyond 2048.
  for (const ConvGeometry& g : {ConvGeometry::conv(Shape{1, 4, 4, 4, 64}, 128, 3, 2, 1),
                                ConvGeometry::conv(Shape{1, 4, 4, 4, 16}, 16, 3, 1, 1),
                                ConvGeometry::conv(Shape{1, 4, 4, 4, 16}, 16, 1, 2, 0),
                                ConvGeometry::transpose2(Shape{1, 2, 2, 2, 16}, 8),
                                ConvGeometry::conv(Shape{1, 4, 4, 4, 12}, 16, 3, 2, 1)})
    expect_declined(g, {[](const ConvGeometry& gg, const float* in, float* out) {
                      return conv3d_stride2_backward_data_direct(gg, in, in, out);
                    }});
}

TEST(Conv3d, BackwardAssignsRatherThanAccumulates) {
  // Calling each backward twice into the same buffers must give the same values: the second call
  // overwrites. Buffers start as 1e30 so that any accumulation into the initial content is visible
  // too.
  for (const ConvGeometry& g : {ConvGeometry::conv(Shape{1, 4, 5, 3, 8}, 8, 3, 1, 1),
                                ConvGeometry::transpose2(Shape{1, 2, 3, 2, 8}, 4)}) {
    Rng rng(7);
    const auto x = random_values(g.in_shape().numel(), rng);
    const auto w = random_values(g.weight_shape().numel(), rng);
    const auto dy = random_values(g.out_shape().numel(), rng);
    std::vector<float> dx(x.size(), 1e30f), dw(w.size(), 1e30f),
        db(static_cast<size_t>(g.cout), 1e30f);
    conv3d_backward_data(g, dy.data(), w.data(), dx.data());
    conv3d_backward_weights(g, dy.data(), x.data(), dw.data(), db.data());
    const auto dx1 = dx, dw1 = dw, db1 = db;
    for (float v : dx1) ASSERT_LT(std::fabs(v), 1e3f) << g.str() << " dx kept the 1e30 fill";
    for (float v : dw1) ASSERT_LT(std::fabs(v), 1e3f) << g.str() << " dw kept the 1e30 fill";
    for (float v : db1) ASSERT_LT(std::fabs(v), 1e3f) << g.str() << " db kept the 1e30 fill";
    conv3d_backward_data(g, dy.data(), w.data(), dx.data());
    conv3d_backward_weights(g, dy.data(), x.data(), dw.data(), db.data());
    EXPECT_EQ(dx, dx1) << g.str() << " second backward-data call differs";
    EXPECT_EQ(dw, dw1) << g.str() << " second backward-weights call differs";
    EXPECT_EQ(db, db1) << g.str() << " second bias-gradient call differs";
  }
}

TEST(Conv3d, CachedPrimitivesFollowThreadCountAndCacheClears) {
  const ConvGeometry g = ConvGeometry::conv(Shape{2, 6, 5, 7, 16}, 16, 3, 1, 1);
  const int saved = num_threads();
  for (int threads : {1, 2, 1}) {
    set_num_threads(threads);
    check_fast_against_reference(g, "threads=" + std::to_string(threads), 300);
  }
  clear_conv_cache();
  check_fast_against_reference(g, "after clear_conv_cache", 301);
  set_num_threads(saved);
}

TEST(Conv3d, ConcurrentCallersGetCorrectResults) {
  // Two application threads share one cached primitive (same geometry): each entry's mutex keeps
  // one caller's pointers from leaking into the other's call.
  const ConvGeometry g = ConvGeometry::conv(Shape{1, 6, 6, 6, 8}, 8, 3, 1, 1);
  Rng rng(9);
  const auto w = random_values(g.weight_shape().numel(), rng);
  std::vector<std::vector<float>> xs, refs;
  for (int t = 0; t < 2; ++t) {
    xs.push_back(random_values(g.in_shape().numel(), rng));
    refs.push_back(run_ref_forward(g, xs.back(), w, nullptr));
  }
  std::vector<float> tol(2);  // kRelTol of the largest output, as in expect_close
  for (int t = 0; t < 2; ++t) {
    double m = 0.0;
    for (float v : refs[static_cast<size_t>(t)]) m = std::max(m, std::fabs(static_cast<double>(v)));
    tol[static_cast<size_t>(t)] = static_cast<float>(kRelTol * m);
  }
  std::vector<int> bad(2, 0);
  std::vector<std::thread> workers;
  for (int t = 0; t < 2; ++t)
    workers.emplace_back([&, t] {
      std::vector<float> y(refs[static_cast<size_t>(t)].size());
      for (int rep = 0; rep < 20; ++rep) {
        conv3d_forward(g, xs[static_cast<size_t>(t)].data(), w.data(), nullptr, y.data());
        for (size_t i = 0; i < y.size(); ++i)
          if (!(std::fabs(y[i] - refs[static_cast<size_t>(t)][i]) <= tol[static_cast<size_t>(t)])) {
            ++bad[static_cast<size_t>(t)];
            break;
          }
      }
    });
  for (auto& th : workers) th.join();
  // A caller whose pointers leaked into the other's call sees O(1) differences.
  EXPECT_EQ(bad[0], 0) << "thread 0 saw wrong outputs";
  EXPECT_EQ(bad[1], 0) << "thread 1 saw wrong outputs";
}

TEST(Conv3d, ReportsOneDnnIsaAndVersion) {
  const std::string isa = onednn_isa();
  const std::string version = onednn_version();
  EXPECT_FALSE(isa.empty());
  EXPECT_NE(isa, "unknown");
  EXPECT_EQ(version.rfind("2.", 0), 0u)
      << "built against the oneDNN 2.x API, runtime says " << version;
}
