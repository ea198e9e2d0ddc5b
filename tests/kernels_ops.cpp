#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "kernels/cpu/ops.hpp"

using namespace medseg;
using namespace medseg::cpu;

namespace {
std::vector<float> randn(int64_t n, uint64_t seed, double scale = 1.0) {
  Rng r(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(r.normal() * scale);
  return v;
}
std::vector<uint16_t> random_labels(int64_t n, int k, uint64_t seed) {
  Rng r(seed);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = static_cast<uint16_t>(r.below(k));
  return v;
}
}  // namespace

TEST(LeakyRelu, ForwardAndBackwardFollowTheSignOfTheOutput) {
  std::vector<float> x = {-2.f, -0.5f, 0.f, 0.5f, 3.f}, y(5), dx(5);
  leaky_relu_forward(5, x.data(), 0.01f, y.data());
  EXPECT_FLOAT_EQ(y[0], -0.02f);
  EXPECT_FLOAT_EQ(y[4], 3.f);
  std::vector<float> dy = {1, 1, 1, 1, 1};
  leaky_relu_backward(5, dy.data(), y.data(), 0.01f, dx.data());
  EXPECT_FLOAT_EQ(dx[0], 0.01f);
  EXPECT_FLOAT_EQ(dx[2], 0.01f);  // x == 0 takes the negative branch consistently
  EXPECT_FLOAT_EQ(dx[3], 1.f);
}

TEST(Concat, BackwardSplitsWhatForwardJoined) {
  const int64_t rows = 7, ca = 3, cb = 2;
  auto a = randn(rows * ca, 1), b = randn(rows * cb, 2);
  std::vector<float> out(rows * (ca + cb));
  concat_channels_forward(rows, a.data(), ca, b.data(), cb, out.data());
  EXPECT_EQ(out[5 * 5 + 3], b[5 * 2 + 0]);
  std::vector<float> da(rows * ca, NAN), db(rows * cb, NAN);
  concat_channels_backward(rows, out.data(), ca, cb, da.data(), db.data());
  EXPECT_EQ(da, a);
  EXPECT_EQ(db, b);
}

TEST(DiceCeLoss, ReferenceGradientMatchesFiniteDifferences) {
  for (bool batch_dice : {true, false})
    for (bool bg : {false, true}) {
      Shape s{2, 2, 3, 2, 3};
      auto logits = randn(s.numel(), 3, 2.0);
      auto labels = random_labels(s.per_channel(), 3, 4);
      DiceCeOptions opt;
      opt.batch_dice = batch_dice;
      opt.include_background = bg;
      std::vector<float> grad(s.numel());
      dice_ce_loss_ref(s, logits.data(), labels.data(), opt, 1.f, grad.data());
      // Central differences in float logits; the loss is evaluated in double. h = 1e-2 keeps the
      // truncation error O(h^2) ~ 1e-4 relative and the float rounding of logits (~1e-7) negligible.
      const float h = 1e-2f;
      for (int64_t i = 0; i < s.numel(); i += 5) {
        auto lp = logits, lm = logits;
        lp[i] += h;
        lm[i] -= h;
        double fp = dice_ce_loss_ref(s, lp.data(), labels.data(), opt, 1.f, nullptr).loss;
        double fm = dice_ce_loss_ref(s, lm.data(), labels.data(), opt, 1.f, nullptr).loss;
        double num = (fp - fm) / (2.0 * ((lp[i] - logits[i])));
        EXPECT_NEAR(grad[i], num, 2e-4 + 2e-3 * std::abs(num))
            << "i=" << i << " batch_dice=" << batch_dice << " bg=" << bg;
      }
    }
}

TEST(DiceCeLoss, FastMatchesReferenceAndAssignsGradients) {
  for (Shape s : {Shape{1, 5, 7, 3, 2}, Shape{2, 9, 4, 5, 3}, Shape{2, 16, 16, 16, 4}}) {
    auto logits = randn(s.numel(), 5, 3.0);
    auto labels = random_labels(s.per_channel(), static_cast<int>(s.c), 6);
    DiceCeOptions opt;
    std::vector<float> gref(s.numel()), gfast(s.numel(), std::numeric_limits<float>::quiet_NaN());
    auto r = dice_ce_loss_ref(s, logits.data(), labels.data(), opt, 0.5f, gref.data());
    auto f = dice_ce_loss(s, logits.data(), labels.data(), opt, 0.5f, gfast.data(), nullptr);
    // float softmax vs double: relative error ~1e-6 per value, sums of up to 2e4 terms in double.
    EXPECT_NEAR(r.loss, f.loss, 1e-5 * std::max(1.0, std::abs(r.loss))) << s;
    EXPECT_NEAR(r.ce, f.ce, 1e-5) << s;
    for (int64_t k = 0; k < s.c; ++k) EXPECT_NEAR(r.dice_per_class[k], f.dice_per_class[k], 1e-5);
    double gmax = 0;
    for (float g : gref) gmax = std::max(gmax, static_cast<double>(std::abs(g)));
    for (int64_t i = 0; i < s.numel(); ++i)
      ASSERT_NEAR(gref[i], gfast[i], 1e-4 * gmax) << "index " << i << " shape " << s;
  }
}

TEST(DiceCeLoss, PerfectPredictionHasDiceOneAndSmallLoss) {
  Shape s{1, 4, 4, 4, 3};
  auto labels = random_labels(s.per_channel(), 3, 9);
  std::vector<float> logits(s.numel(), 0.f);
  for (int64_t r = 0; r < s.per_channel(); ++r) logits[r * 3 + labels[r]] = 30.f;
  auto res = dice_ce_loss(s, logits.data(), labels.data(), DiceCeOptions{}, 1.f, nullptr, nullptr);
  EXPECT_NEAR(res.soft_dice, 1.0, 1e-6);
  EXPECT_LT(res.ce, 1e-6);
}

TEST(DiceCeLoss, LabelOutOfRangeThrows) {
  Shape s{1, 1, 1, 2, 2};
  std::vector<float> logits(4, 0.f);
  std::vector<uint16_t> labels = {0, 5};
  EXPECT_THROW(dice_ce_loss(s, logits.data(), labels.data(), {}, 1.f, nullptr, nullptr),
               ArgumentError);
}
