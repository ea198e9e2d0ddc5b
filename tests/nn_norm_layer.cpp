// Tests of lib/nn/norm_layer: the renorm clip schedule, the layer (parameters, cache,
// reference/fast switch, NaN accounting, diagnostics) and folding an inference-mode norm into the
// preceding conv.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "kernels/cpu/conv.hpp"
#include "nn/norm_layer.hpp"

using namespace medseg;
using medseg::cpu::NormConfig;
using medseg::cpu::NormKind;
using medseg::nn::NormLayer;
using medseg::nn::RenormSchedule;

namespace {

void fill_normal(Tensor& t, Rng& rng, double mean = 0.0, double std = 1.0) {
  for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = static_cast<float>(rng.normal(mean, std));
}

// Element-wise |got - want| <= atol + rtol |want|; prints the first failures with index and values.
void expect_close(const std::string& what, const Tensor& got, const Tensor& want, double atol,
                  double rtol) {
  ASSERT_EQ(got.shape(), want.shape()) << what;
  int64_t bad = 0;
  for (int64_t i = 0; i < got.numel(); ++i) {
    const double g = got.data()[i], w = want.data()[i];
    if (!(std::abs(g - w) <= atol + rtol * std::abs(w))) {
      if (bad++ < 5)
        ADD_FAILURE() << what << ": index " << i << " got " << g << " want " << w << " |diff| "
                      << std::abs(g - w);
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.numel() << " out of tolerance";
}

void expect_clips(const RenormSchedule& s, int64_t step, int64_t planned, float r, float d) {
  const auto [r_max, d_max] = s.clips_at(step, planned);
  // Linear interpolation evaluated in double and rounded to float once.
  EXPECT_NEAR(r_max, r, 1e-6) << "step " << step << " of " << planned;
  EXPECT_NEAR(d_max, d, 1e-6) << "step " << step << " of " << planned;
}

}  // namespace

// ---------------------------------------------------------------- schedule

TEST(RenormSchedule, FractionsOfThePlannedSteps) {
  RenormSchedule s;              // warm-up 5%, d ramp ends at 15%, r ramp at 25%; finals r 3, d 5
  const int64_t planned = 1000;  // warm-up ends at step 50, d ramp at 150, r ramp at 250
  expect_clips(s, 0, planned, 1.f, 0.f);      // warm-up start: plain batch norm
  expect_clips(s, 49, planned, 1.f, 0.f);     // last warm-up step
  expect_clips(s, 50, planned, 1.f, 0.f);     // ramps start from the batch-norm values
  expect_clips(s, 100, planned, 1.5f, 2.5f);  // mid d ramp: 50/100 of 5; r: 1 + 2 * 50/200
  expect_clips(s, 150, planned, 2.f, 5.f);    // d ramp end; r half way
  expect_clips(s, 250, planned, 3.f, 5.f);    // r ramp end
  expect_clips(s, 999, planned, 3.f, 5.f);    // constant after
  expect_clips(s, 5000, planned, 3.f, 5.f);   // also past the plan (a resumed, extended run)
}

TEST(RenormSchedule, AbsoluteOverridesReproduceThePaper) {
  RenormSchedule s;
  s.warmup_steps = 5000;  // the paper: batch norm for 5k steps, r_max 3 at 40k, d_max 5 at 25k
  s.r_ramp_end_step = 40000;
  s.d_ramp_end_step = 25000;
  const int64_t planned = 160000;
  expect_clips(s, 4999, planned, 1.f, 0.f);
  expect_clips(s, 15000, planned, 1.f + 2.f * 10000.f / 35000.f, 2.5f);
  expect_clips(s, 25000, planned, 1.f + 2.f * 20000.f / 35000.f, 5.f);
  expect_clips(s, 40000, planned, 3.f, 5.f);
  // Overrides do not depend on the planned length; fractions do.
  expect_clips(s, 15000, 20000, 1.f + 2.f * 10000.f / 35000.f, 2.5f);
  // A single override mixes with the other fractions.
  RenormSchedule mixed;
  mixed.warmup_steps = 0;
  expect_clips(mixed, 0, 100, 1.f, 0.f);
  expect_clips(mixed, 5, 100, 1.f + 2.f * 5.f / 25.f, 5.f * 5.f / 15.f);
}

TEST(RenormSchedule, RejectsInconsistentSchedules) {
  RenormSchedule s;
  EXPECT_THROW(s.clips_at(0, 0), ArgumentError);  // fractions of nothing
  EXPECT_THROW(s.clips_at(-1, 100), ArgumentError);
  RenormSchedule early;
  early.r_ramp_end_step = 10;
  early.warmup_steps = 20;
  EXPECT_THROW(early.clips_at(0, 100), ArgumentError);
  RenormSchedule bad_fraction;
  bad_fraction.warmup_fraction = 1.5;
  EXPECT_THROW(bad_fraction.clips_at(0, 100), ArgumentError);
  RenormSchedule bad_final;
  bad_final.r_max_final = 0.5f;
  EXPECT_THROW(bad_final.clips_at(0, 100), ArgumentError);
  RenormSchedule all_absolute;  // no fraction used: the planned length may be unknown
  all_absolute.warmup_steps = 1;
  all_absolute.r_ramp_end_step = 3;
  all_absolute.d_ramp_end_step = 2;
  expect_clips(all_absolute, 2, 0, 2.f, 5.f);
}

// ---------------------------------------------------------------- layer

TEST(NormLayer, StartsAsIdentityStatistics) {
  NormLayer layer(6, NormConfig{});
  const Shape vec{1, 1, 1, 1, 6};
  for (const Tensor* t : {&layer.gamma, &layer.beta, &layer.running_mean, &layer.running_std,
                          &layer.dgamma, &layer.dbeta})
    EXPECT_EQ(t->shape(), vec);
  for (int64_t c = 0; c < 6; ++c) {
    EXPECT_EQ(layer.gamma.data()[c], 1.f);
    EXPECT_EQ(layer.beta.data()[c], 0.f);
    EXPECT_EQ(layer.running_mean.data()[c], 0.f);
    EXPECT_EQ(layer.running_std.data()[c], 1.f);
  }
  layer.set_clips(2.5f, 1.5f);
  EXPECT_EQ(layer.config().r_max, 2.5f);
  EXPECT_EQ(layer.config().d_max, 1.5f);
  EXPECT_THROW(layer.set_clips(0.9f, 1.f), ArgumentError);
  EXPECT_THROW(NormLayer(0, NormConfig{}), ArgumentError);
}

TEST(NormLayer, ReferenceAndFastKernelsAgreeThroughTheLayer) {
  for (NormKind kind : {NormKind::BatchRenorm, NormKind::BatchNorm, NormKind::InstanceNorm}) {
    NormConfig cfg;
    cfg.kind = kind;
    NormLayer fast(5, cfg), ref(5, cfg);
    ref.use_reference = true;
    fast.set_clips(2.f, 1.f);
    ref.set_clips(2.f, 1.f);
    Rng rng(7);
    const Shape s{2, 3, 4, 5, 5};
    Tensor x(s), dy(s), yf(s), yr(s), dxf(s), dxr(s);
    fill_normal(x, rng, 0.5, 2.0);
    fill_normal(dy, rng);
    for (int step = 0; step < 3; ++step) {  // running statistics evolve identically
      fast.forward_train(x, yf);
      ref.forward_train(x, yr);
    }
    const std::string what = std::string("kind ") + std::to_string(static_cast<int>(kind));
    // Tolerances as in kernels_norm (fast vs reference): 1e-5 of the output scale.
    expect_close(what + " y", yf, yr, 1e-5, 1e-5);
    expect_close(what + " running mean", fast.running_mean, ref.running_mean, 1e-6, 1e-6);
    expect_close(what + " running std", fast.running_std, ref.running_std, 1e-6, 1e-6);
    fast.dgamma.fill(std::numeric_limits<float>::quiet_NaN());  // assigned, not accumulated
    fast.backward(dy, x, yf, dxf);
    ref.backward(dy, x, yr, dxr);
    expect_close(what + " dx", dxf, dxr, 1e-5, 1e-5);
    expect_close(what + " dgamma", fast.dgamma, ref.dgamma, 1e-4, 1e-5);  // sums of 120 terms
    expect_close(what + " dbeta", fast.dbeta, ref.dbeta, 1e-4, 1e-5);
    Tensor inf_f(s), inf_r(s);
    fast.forward_infer(x, inf_f);
    ref.forward_infer(x, inf_r);
    expect_close(what + " infer", inf_f, inf_r, 1e-5, 1e-5);
  }
}

TEST(NormLayer, BackwardNeedsAMatchingTrainingForward) {
  NormLayer layer(3, NormConfig{});
  Tensor x = Tensor::zeros(Shape{1, 2, 2, 2, 3}), y = Tensor::zeros(x.shape());
  Tensor dx = Tensor::zeros(x.shape());
  EXPECT_THROW(layer.backward(y, x, y, dx), ArgumentError);  // no forward yet
  layer.forward_train(x, y);
  Tensor other = Tensor::zeros(Shape{2, 2, 2, 2, 3});
  Tensor other_dx = Tensor::zeros(other.shape());
  EXPECT_THROW(layer.backward(other, other, other, other_dx), ArgumentError);  // another shape
  Tensor wrong_c = Tensor::zeros(Shape{1, 2, 2, 2, 4}), wrong_y = Tensor::zeros(wrong_c.shape());
  EXPECT_THROW(layer.forward_train(wrong_c, wrong_y), ArgumentError);
  EXPECT_THROW(layer.forward_train(x, x), ArgumentError);  // y may not alias x
}

TEST(NormLayer, NonFiniteBatchIsSkippedAndCounted) {
  for (bool reference : {false, true}) {
    NormConfig cfg;
    cfg.r_max = 3.f;
    cfg.d_max = 5.f;
    NormLayer layer(4, cfg);
    layer.use_reference = reference;
    Rng rng(3);
    Tensor x(Shape{2, 2, 3, 3, 4}), y(x.shape());
    fill_normal(x, rng, 1.0, 2.0);
    const std::vector<float> mean0 = layer.running_mean.to_vector(),
                             std0 = layer.running_std.to_vector();
    Tensor poisoned = x.clone();
    poisoned.data()[13] = std::numeric_limits<float>::quiet_NaN();
    layer.forward_train(poisoned, y);
    EXPECT_EQ(layer.running_mean.to_vector(), mean0);
    EXPECT_EQ(layer.running_std.to_vector(), std0);
    EXPECT_EQ(layer.skipped_updates(), 1);
    EXPECT_EQ(layer.diagnostics().skipped_updates, 1);
    poisoned.data()[13] = std::numeric_limits<float>::infinity();
    layer.forward_train(poisoned, y);
    EXPECT_EQ(layer.skipped_updates(), 2);
    layer.forward_train(x, y);  // a healthy batch updates and is not counted
    EXPECT_EQ(layer.skipped_updates(), 2);
    EXPECT_NE(layer.running_mean.to_vector(), mean0);
    layer.set_skipped_updates(7);  // restored from a checkpoint
    EXPECT_EQ(layer.diagnostics().skipped_updates, 7);
  }
}

// Four channels built so that each hits a different clip: values mean +- s alternately have biased
// mean `mean` and biased std exactly `s`. Running stats (0, 1); r_max 2, d_max 1.
TEST(NormLayer, DiagnosticsOnAConstructedCase) {
  for (bool reference : {false, true}) {
    NormConfig cfg;
    cfg.kind = NormKind::BatchRenorm;
    NormLayer layer(4, cfg);
    layer.use_reference = reference;
    layer.set_clips(2.f, 1.f);
    const float means[4] = {0.f, 0.f, 3.f, 0.5f};
    const float stds[4] = {1.f, 4.f, 1.f, 0.25f};
    Tensor x(Shape{1, 2, 2, 2, 4}), y(x.shape());
    for (int64_t row = 0; row < 8; ++row)
      for (int64_t c = 0; c < 4; ++c)
        x.data()[row * 4 + c] = means[c] + (row % 2 == 0 ? stds[c] : -stds[c]);
    layer.forward_train(x, y);
    const nn::NormDiagnostics diag = layer.diagnostics();
    // channel 0: r = sqrt(1 + eps), d = 0, nothing clipped
    // channel 1: r 4 -> clipped to 2;   channel 2: d 3 -> clipped to 1
    // channel 3: r 0.25 -> clipped to 1/2, d = 0.5 free
    EXPECT_DOUBLE_EQ(diag.r_clipped_fraction, 0.5);
    EXPECT_DOUBLE_EQ(diag.d_clipped_fraction, 0.25);
    const double eps = cfg.eps;
    const double log_r0 = 0.5 * std::log1p(eps);  // |log sqrt(1 + eps)|, channel 2 alike
    const double want_log_r = (log_r0 + std::log(2.0) + log_r0 + std::log(2.0)) / 4;
    // r and d are stored as floats: 1e-7 relative each.
    EXPECT_NEAR(diag.mean_abs_log_r, want_log_r, 1e-6);
    EXPECT_NEAR(diag.mean_abs_d, (0.0 + 0.0 + 1.0 + 0.5) / 4, 1e-6);
    EXPECT_EQ(diag.skipped_updates, 0);
  }
  // Instance norm has no r and d.
  NormConfig inst;
  inst.kind = NormKind::InstanceNorm;
  NormLayer layer(2, inst);
  Tensor x = Tensor::from(Shape{1, 1, 1, 2, 2}, {1, 2, 3, 5}), y(x.shape());
  layer.forward_train(x, y);
  EXPECT_EQ(layer.diagnostics().r_clipped_fraction, 0.0);
  EXPECT_EQ(layer.diagnostics().mean_abs_d, 0.0);
}

// ---------------------------------------------------------------- folding

TEST(FoldNormIntoConv, GivesTheSameOutputAsConvThenNorm) {
  for (NormKind kind : {NormKind::BatchRenorm, NormKind::BatchNorm}) {
    Rng rng(17);
    const Shape in{2, 4, 5, 6, 3};
    const int64_t cout = 5;
    const cpu::ConvGeometry g = cpu::ConvGeometry::conv(in, cout, 3, 1, 1);
    Tensor x(in), w(g.weight_shape()), b = Tensor::vector(cout);
    fill_normal(x, rng);
    fill_normal(w, rng, 0.0, 0.3);
    fill_normal(b, rng);
    NormConfig cfg;
    cfg.kind = kind;
    cfg.leaky = true;  // not folded: applied after the folded conv
    NormLayer norm(cout, cfg);
    fill_normal(norm.gamma, rng, 1.0, 0.3);
    fill_normal(norm.beta, rng, 0.0, 0.5);
    fill_normal(norm.running_mean, rng, 0.0, 0.5);
    for (int64_t c = 0; c < cout; ++c)
      norm.running_std.data()[c] = static_cast<float>(rng.uniform(0.5, 2));
    norm.running_std.data()[2] = 0.f;  // collapsed: both paths floor it at sqrt(eps)

    Tensor conv_out(g.out_shape()), want(g.out_shape());
    cpu::conv3d_forward_ref(g, x.data(), w.data(), b.data(), conv_out.data());
    norm.forward_infer(conv_out, want);

    Tensor wf = w.clone(), bf = b.clone(), got(g.out_shape());
    nn::fold_norm_into_conv(norm, wf, bf);
    cpu::conv3d_forward_ref(g, x.data(), wf.data(), bf.data(), got.data());
    for (int64_t i = 0; i < got.numel(); ++i) {
      float& v = got.data()[i];
      v = v > 0.f ? v : cfg.slope * v;
    }
    // Folded weights are rounded to float once, the conv sums 81 terms in double: a relative error
    // ~1e-7 per term of outputs of magnitude up to ~1e3 (channel 2, sigma = sqrt(eps)). 1e-5
    // relative to the output plus 1e-4 absolute covers it; a wrong formula is off by O(1).
    double scale = 0;
    for (int64_t i = 0; i < want.numel(); ++i)
      scale = std::max(scale, double(std::abs(want.data()[i])));
    expect_close("folded conv", got, want, 1e-6 * scale + 1e-4, 1e-5);
  }
}

TEST(FoldNormIntoConv, RejectsInstanceNormAndMismatchedSizes) {
  NormConfig inst;
  inst.kind = NormKind::InstanceNorm;
  Tensor w = Tensor::zeros(Shape{4, 1, 1, 1, 2}), b = Tensor::vector(4);
  EXPECT_THROW(nn::fold_norm_into_conv(NormLayer(4, inst), w, b), ArgumentError);
  EXPECT_THROW(nn::fold_norm_into_conv(NormLayer(3, NormConfig{}), w, b), ArgumentError);
  Tensor short_bias = Tensor::vector(3);
  EXPECT_THROW(nn::fold_norm_into_conv(NormLayer(4, NormConfig{}), w, short_bias), ArgumentError);
}
