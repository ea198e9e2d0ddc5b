// Tests of the normalization kernels (kernels/cpu/norm.hpp): every identity of
// ../shared/docs/batch-renorm.md, finite-difference gradients, the running-statistics update, the
// pitfalls (N = 1, constant channel, non-finite batch), a statistical property of small batches,
// and the fast kernels against the reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "kernels/cpu/norm.hpp"

using namespace medseg;
using medseg::cpu::NormCache;
using medseg::cpu::NormConfig;
using medseg::cpu::NormKind;
using medseg::cpu::NormStepInfo;

namespace {

const char* kind_name(NormKind k) {
  switch (k) {
    case NormKind::BatchRenorm:
      return "batchrenorm";
    case NormKind::BatchNorm:
      return "batchnorm";
    case NormKind::InstanceNorm:
      return "instancenorm";
  }
  return "?";
}

std::string describe(const NormConfig& cfg, const Shape& s, bool fast) {
  return std::string(kind_name(cfg.kind)) + (cfg.leaky ? "+leaky" : "") + " shape " + s.str() +
         (fast ? " fast" : " ref");
}

// Inputs of one training step.
struct Problem {
  NormConfig cfg;
  Shape s;
  std::vector<float> x, gamma, beta, rmean, rstd;
};

int64_t slots_of(const NormConfig& cfg, const Shape& s) {
  return cfg.kind == NormKind::InstanceNorm ? s.n * s.c : s.c;
}

// x: per-channel mean and std differ from channel to channel (so every index matters); gamma, beta
// and the running statistics random around their usual values.
Problem make_problem(NormConfig cfg, Shape s, uint64_t seed) {
  Rng rng(seed);
  Problem p{cfg, s, {}, {}, {}, {}, {}};
  std::vector<double> ch_mean(s.c), ch_std(s.c);
  for (int64_t c = 0; c < s.c; ++c) {
    ch_mean[c] = rng.uniform(-2.0, 2.0);
    ch_std[c] = rng.uniform(0.3, 3.0);
    p.gamma.push_back(static_cast<float>(rng.uniform(0.5, 1.5)));
    p.beta.push_back(static_cast<float>(rng.uniform(-0.5, 0.5)));
    p.rmean.push_back(static_cast<float>(rng.uniform(-1.0, 1.0)));
    p.rstd.push_back(static_cast<float>(rng.uniform(0.5, 2.0)));
  }
  p.x.resize(static_cast<size_t>(s.numel()));
  for (int64_t i = 0; i < s.numel(); ++i) {
    const int64_t c = i % s.c;
    p.x[i] = static_cast<float>(rng.normal(ch_mean[c], ch_std[c]));
  }
  return p;
}

struct Forward {
  std::vector<float> y, rmean, rstd, mean, inv_std, r, d, scale, shift;
  NormStepInfo info;
  NormCache cache() {
    NormCache c{mean.data(), inv_std.data(), r.data(), d.data()};
    c.scale = scale.data();
    c.shift = shift.data();
    return c;
  }
};

Forward forward_train(const Problem& p, bool fast) {
  Forward f;
  const size_t slots = static_cast<size_t>(slots_of(p.cfg, p.s));
  const float garbage = std::numeric_limits<float>::quiet_NaN();  // proves outputs are assigned
  f.y.assign(p.x.size(), garbage);
  f.mean.assign(slots, garbage);
  f.inv_std.assign(slots, garbage);
  f.r.assign(slots, garbage);
  f.d.assign(slots, garbage);
  f.scale.assign(slots, garbage);
  f.shift.assign(slots, garbage);
  f.rmean = p.rmean;
  f.rstd = p.rstd;
  const bool batch_kind = p.cfg.kind != NormKind::InstanceNorm;
  float* rm = batch_kind ? f.rmean.data() : nullptr;
  float* rs = batch_kind ? f.rstd.data() : nullptr;
  auto fn = fast ? cpu::norm_forward_train : cpu::norm_forward_train_ref;
  f.info = fn(p.cfg, p.s, p.x.data(), p.gamma.data(), p.beta.data(), rm, rs, f.y.data(), f.cache());
  return f;
}

std::vector<float> forward_infer(const Problem& p, bool fast) {
  std::vector<float> y(p.x.size(), std::numeric_limits<float>::quiet_NaN());
  auto fn = fast ? cpu::norm_forward_infer : cpu::norm_forward_infer_ref;
  fn(p.cfg, p.s, p.x.data(), p.gamma.data(), p.beta.data(), p.rmean.data(), p.rstd.data(),
     y.data());
  return y;
}

struct Backward {
  std::vector<float> dx, dgamma, dbeta;
};

// with_y = false: the LeakyReLU mask from x and the cache instead of the forward output.
Backward backward(const Problem& p, Forward& f, const std::vector<float>& dy, bool fast,
                  bool with_y = true) {
  Backward b;
  // Garbage (not zeros) in every gradient buffer: the kernels must assign, never accumulate.
  b.dx.assign(p.x.size(), 1e30f);
  b.dgamma.assign(static_cast<size_t>(p.s.c), std::numeric_limits<float>::quiet_NaN());
  b.dbeta.assign(static_cast<size_t>(p.s.c), -7.5e29f);
  auto fn = fast ? cpu::norm_backward : cpu::norm_backward_ref;
  fn(p.cfg, p.s, dy.data(), p.x.data(), with_y ? f.y.data() : nullptr, p.gamma.data(), f.cache(),
     b.dx.data(), b.dgamma.data(), b.dbeta.data());
  return b;
}

std::vector<float> random_vector(size_t n, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (auto& e : v) e = static_cast<float>(rng.normal());
  return v;
}

double max_abs(const std::vector<float>& v) {
  double m = 0.0;
  for (float e : v) m = std::max(m, std::abs(static_cast<double>(e)));
  return m;
}

// Element-wise |got - want| <= atol + rtol |want|; prints the first failures with index and values.
template <typename A, typename B>
void expect_close(const std::string& what, const std::vector<A>& got, const std::vector<B>& want,
                  double atol, double rtol) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int reported = 0;
  int64_t bad = 0;
  double worst = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], w = want[i];
    const double err = std::abs(g - w);
    const bool ok = std::isfinite(g) && err <= atol + rtol * std::abs(w);
    if (std::isfinite(err)) worst = std::max(worst, err);
    if (!ok) {
      ++bad;
      if (reported++ < 5)
        ADD_FAILURE() << what << ": index " << i << " got " << g << " want " << w << " |diff| "
                      << err << " > " << atol + rtol * std::abs(w);
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " elements out of tolerance";
}

// ---- an independent double-precision forward with r and d given (the stop-gradient constants)
// ----
struct DoubleForward {
  std::vector<double> y, z;  // output and pre-activation
};

DoubleForward forward_double(const NormConfig& cfg, const Shape& s, const std::vector<double>& x,
                             const std::vector<double>& gamma, const std::vector<double>& beta,
                             const std::vector<float>& r, const std::vector<float>& d) {
  const bool instance = cfg.kind == NormKind::InstanceNorm;
  const int64_t rows = s.per_channel(), rows_per_group = instance ? s.spatial() : rows;
  const int64_t slots = slots_of(cfg, s);
  std::vector<double> sum(slots, 0.0), sq(slots, 0.0);
  auto slot = [&](int64_t row, int64_t c) {
    return (instance ? row / rows_per_group : 0) * s.c + c;
  };
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t c = 0; c < s.c; ++c) sum[slot(row, c)] += x[row * s.c + c];
  for (auto& v : sum) v /= static_cast<double>(rows_per_group);
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t c = 0; c < s.c; ++c) {
      const double v = x[row * s.c + c] - sum[slot(row, c)];
      sq[slot(row, c)] += v * v;
    }
  DoubleForward out;
  out.y.resize(x.size());
  out.z.resize(x.size());
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t c = 0; c < s.c; ++c) {
      const int64_t i = row * s.c + c, g = slot(row, c);
      const double sigma = std::sqrt(sq[g] / static_cast<double>(rows_per_group) + cfg.eps);
      const double z = gamma[c] * ((x[i] - sum[g]) / sigma * r[g] + d[g]) + beta[c];
      out.z[i] = z;
      out.y[i] = (!cfg.leaky || z > 0) ? z : cfg.slope * z;
    }
  return out;
}

std::vector<double> to_double(const std::vector<float>& v) {
  return {v.begin(), v.end()};
}

const NormKind kAllKinds[] = {NormKind::BatchRenorm, NormKind::BatchNorm, NormKind::InstanceNorm};

}  // namespace

// ---------------------------------------------------------------- identities

TEST(BatchRenorm, UnitClipsEqualBatchNormTraining) {
  for (bool fast : {false, true}) {
    for (bool leaky : {false, true}) {
      NormConfig renorm;
      renorm.kind = NormKind::BatchRenorm;
      renorm.r_max = 1.f;
      renorm.d_max = 0.f;
      renorm.leaky = leaky;
      NormConfig bn = renorm;
      bn.kind = NormKind::BatchNorm;
      const Shape s{2, 3, 4, 5, 6};
      Problem pr = make_problem(renorm, s, 11), pb = make_problem(bn, s, 11);
      Forward fr = forward_train(pr, fast), fb = forward_train(pb, fast);
      const std::string what = describe(renorm, s, fast);
      // r = 1 and d = 0 exactly, so the same float operations run: equal to float rounding.
      expect_close(what + " y", fr.y, fb.y, 1e-6, 1e-6);
      expect_close(what + " running mean", fr.rmean, fb.rmean, 1e-7, 1e-7);
      expect_close(what + " running std", fr.rstd, fb.rstd, 1e-7, 1e-7);
      for (int64_t c = 0; c < s.c; ++c) {
        EXPECT_EQ(fr.r[c], 1.f) << what << " channel " << c;
        EXPECT_EQ(fr.d[c], 0.f) << what << " channel " << c;
      }
      const std::vector<float> dy = random_vector(pr.x.size(), 12);
      Backward br = backward(pr, fr, dy, fast), bb = backward(pb, fb, dy, fast);
      expect_close(what + " dx", br.dx, bb.dx, 1e-6 * max_abs(bb.dx), 1e-6);
      expect_close(what + " dgamma", br.dgamma, bb.dgamma, 1e-6 * max_abs(bb.dgamma), 1e-6);
      expect_close(what + " dbeta", br.dbeta, bb.dbeta, 1e-6 * max_abs(bb.dbeta), 1e-6);
      // And both are batch normalization as written in the test in double: float outputs of
      // O(1) values after a handful of float operations agree to ~1e-6; 1e-5 leaves margin.
      std::vector<float> ones(static_cast<size_t>(s.c), 1.f), zeros(static_cast<size_t>(s.c), 0.f);
      DoubleForward want = forward_double(renorm, s, to_double(pr.x), to_double(pr.gamma),
                                          to_double(pr.beta), ones, zeros);
      expect_close(what + " y vs double batch norm", fr.y, want.y, 1e-5, 1e-5);
    }
  }
}

TEST(BatchRenorm, LooseClipsTrainingEqualsInferenceWithPreUpdateStats) {
  for (bool fast : {false, true}) {
    for (bool leaky : {false, true}) {
      NormConfig cfg;
      cfg.kind = NormKind::BatchRenorm;
      cfg.r_max = 1000.f;  // clips never bind: r, d are the exact corrections
      cfg.d_max = 1000.f;
      cfg.leaky = leaky;
      const Shape s{2, 4, 3, 5, 7};
      Problem p = make_problem(cfg, s, 21);
      const std::vector<float> y_infer = forward_infer(p, fast);  // pre-update running statistics
      Forward f = forward_train(p, fast);
      EXPECT_EQ(f.info.r_clipped, 0);
      EXPECT_EQ(f.info.d_clipped, 0);
      // (x - mu)/sigma == r (x - mu_B)/sigma_B + d holds exactly in exact arithmetic; in float the
      // two paths round differently: outputs of magnitude <= ~10 agree to a few 1e-6.
      expect_close(describe(cfg, s, fast) + " train vs infer", f.y, y_infer, 2e-5, 2e-5);
      // The running statistics did move (so the comparison above really used the pre-update ones).
      double moved = 0.0;
      for (int64_t c = 0; c < s.c; ++c)
        moved = std::max(moved, std::abs(double(f.rmean[c]) - p.rmean[c]));
      EXPECT_GT(moved, 1e-4);
    }
  }
}

TEST(BatchRenorm, TightClipsTrainingDiffersFromInference) {
  for (bool fast : {false, true}) {
    NormConfig cfg;
    cfg.kind = NormKind::BatchRenorm;
    cfg.r_max = 1.01f;
    cfg.d_max = 0.01f;
    cfg.leaky = false;
    const Shape s{2, 4, 3, 5, 7};
    Problem p = make_problem(cfg, s, 21);
    const std::vector<float> y_infer = forward_infer(p, fast);
    Forward f = forward_train(p, fast);
    EXPECT_GT(f.info.r_clipped + f.info.d_clipped, 0);
    double worst = 0.0;
    for (size_t i = 0; i < f.y.size(); ++i)
      worst = std::max(worst, std::abs(double(f.y[i]) - y_infer[i]));
    // Batch statistics are far (means up to 2 apart, stds a factor of up to 6) from the running
    // ones, and the clips cannot correct that: the outputs differ by O(1), not by rounding.
    EXPECT_GT(worst, 0.5) << (fast ? "fast" : "ref");
  }
}

TEST(BatchRenorm, ScaleInvarianceAsBatchNorm) {
  for (bool fast : {false, true}) {
    NormConfig cfg;
    cfg.kind = NormKind::BatchRenorm;
    cfg.r_max = 1.f;
    cfg.d_max = 0.f;
    cfg.leaky = true;
    const Shape s{2, 3, 3, 4, 5};
    Problem p = make_problem(cfg, s, 31);
    Problem q = p;
    const double k = 3.5;  // scaling the incoming conv weights and bias by k scales x by k
    for (auto& v : q.x) v = static_cast<float>(v * k);
    Forward fp = forward_train(p, fast), fq = forward_train(q, fast);
    // Up to the eps term: sigma_B(kx) = sqrt(k^2 var + eps) vs k sqrt(var + eps) changes the output
    // by a relative ~eps / (2 var) <= 1e-5 / (2 * 0.09) ~ 6e-5 for the smallest channel std (0.3);
    // tolerance 2e-4 (relative to outputs of magnitude ~1..10).
    expect_close(describe(cfg, s, fast) + " scaled input", fq.y, fp.y, 2e-4, 2e-4);
  }
}

TEST(BatchRenorm, ScaleInvarianceWithRenormNeedsScaledRunningStats) {
  for (bool fast : {false, true}) {
    NormConfig cfg;
    cfg.kind = NormKind::BatchRenorm;
    cfg.r_max = 1.5f;  // clips bind on some channels: the identity must hold through the clipping
    cfg.d_max = 0.5f;
    cfg.leaky = true;
    const Shape s{2, 3, 3, 4, 5};
    Problem p = make_problem(cfg, s, 32);
    const double k = 3.5;
    Problem q = p;
    for (auto& v : q.x) v = static_cast<float>(v * k);
    Problem q_stale = q;  // x scaled, running statistics not
    for (auto& v : q.rmean) v = static_cast<float>(v * k);
    for (auto& v : q.rstd) v = static_cast<float>(v * k);
    Forward fp = forward_train(p, fast), fq = forward_train(q, fast),
            fs = forward_train(q_stale, fast);
    EXPECT_GT(fp.info.r_clipped + fp.info.d_clipped, 0) << "the case should exercise the clipping";
    const std::string what = describe(cfg, s, fast);
    // Same eps argument as for batch norm (r also contains sigma_B): 2e-4.
    expect_close(what + " y", fq.y, fp.y, 2e-4, 2e-4);
    expect_close(what + " r", fq.r, fp.r, 2e-4, 2e-4);
    expect_close(what + " d", fq.d, fp.d, 2e-4, 2e-4);
    // The running update is linear in the statistics: the new running values scale by k too.
    std::vector<double> rmean_k, rstd_k;
    for (int64_t c = 0; c < s.c; ++c) {
      rmean_k.push_back(fp.rmean[c] * k);
      rstd_k.push_back(fp.rstd[c] * k);
    }
    expect_close(what + " running mean", fq.rmean, rmean_k, 1e-5, 1e-5);
    expect_close(what + " running std", fq.rstd, rstd_k, 1e-5, 2e-4);
    // Without scaling the running statistics r and d change, and so does the output.
    double worst = 0.0;
    for (size_t i = 0; i < fs.y.size(); ++i)
      worst = std::max(worst, std::abs(double(fs.y[i]) - fp.y[i]));
    EXPECT_GT(worst, 0.1) << what;
  }
}

// ---------------------------------------------------------------- gradients

// Central differences in double of L = sum(w * y) with r and d held at the cached values (they are
// stop-gradient constants), against the kernels' backward with dy = w.
TEST(NormGradients, MatchFiniteDifferencesWithRAndDConstant) {
  for (NormKind kind : kAllKinds) {
    for (bool leaky : {false, true}) {
      for (bool fast : {false, true}) {
        NormConfig cfg;
        cfg.kind = kind;
        cfg.leaky = leaky;
        cfg.slope = 0.1f;  // larger than the default so that the negative side matters
        cfg.r_max = 1.5f;  // binding on some channels (running stats are off): r, d != 1, 0
        cfg.d_max = 0.5f;
        const Shape s{2, 2, 3, 2, 3};
        Problem p = make_problem(cfg, s, 41 + static_cast<int>(kind));
        Forward f = forward_train(p, fast);
        const std::vector<float> w = random_vector(p.x.size(), 42);
        Backward b = backward(p, f, w, fast);
        const std::string what = describe(cfg, s, fast);

        std::vector<double> x = to_double(p.x), gamma = to_double(p.gamma),
                            beta = to_double(p.beta);
        auto loss = [&]() {
          DoubleForward out = forward_double(cfg, s, x, gamma, beta, f.r, f.d);
          double l = 0.0;
          for (size_t i = 0; i < out.y.size(); ++i) l += w[i] * out.y[i];
          return l;
        };
        // A pre-activation within a few h of 0 would put the kink of the LeakyReLU inside the
        // difference stencil; the seed is chosen so that none is (checked, not assumed).
        const double h = 1e-6;
        const DoubleForward base = forward_double(cfg, s, x, gamma, beta, f.r, f.d);
        double min_abs_z = 1e300;
        for (double z : base.z) min_abs_z = std::min(min_abs_z, std::abs(z));
        ASSERT_GT(min_abs_z, 1e-3) << what << ": a pre-activation sits at the LeakyReLU kink";

        auto central = [&](std::vector<double>& v) {
          std::vector<double> g(v.size());
          for (size_t i = 0; i < v.size(); ++i) {
            const double keep = v[i];
            v[i] = keep + h;
            const double lp = loss();
            v[i] = keep - h;
            const double lm = loss();
            v[i] = keep;
            g[i] = (lp - lm) / (2 * h);
          }
          return g;
        };
        const std::vector<double> gx = central(x), gg = central(gamma), gb = central(beta);
        // The double differences are accurate to ~1e-9 (h^2 truncation, 1e-16/h rounding). The
        // kernel gradients are floats computed from float caches: relative errors ~1e-6 of the
        // largest term. 1e-4 of the largest gradient leaves 100x margin; a wrong formula (missing
        // r, a wrong mean term, the mask on the wrong side) is off by O(1).
        auto max_abs_d = [](const std::vector<double>& v) {
          double m = 0;
          for (double e : v) m = std::max(m, std::abs(e));
          return m;
        };
        expect_close(what + " dx", b.dx, gx, 1e-4 * max_abs_d(gx), 1e-4);
        expect_close(what + " dgamma", b.dgamma, gg, 1e-4 * max_abs_d(gg), 1e-4);
        expect_close(what + " dbeta", b.dbeta, gb, 1e-4 * max_abs_d(gb), 1e-4);
      }
    }
  }
}

// ---------------------------------------------------------------- running statistics

TEST(BatchRenorm, RunningStatsFollowTheFormulaAndRdUsePreUpdateValues) {
  for (bool fast : {false, true}) {
    NormConfig cfg;
    cfg.kind = NormKind::BatchRenorm;
    cfg.alpha = 0.25f;  // large, so that pre- and post-update values differ clearly
    cfg.r_max = 100.f;
    cfg.d_max = 100.f;
    const Shape s{2, 3, 2, 4, 4};
    Problem p = make_problem(cfg, s, 51);
    std::vector<double> mu = to_double(p.rmean), sigma = to_double(p.rstd);  // expected, in double
    for (int step = 0; step < 4; ++step) {
      Problem q = make_problem(cfg, s, 100 + step);  // a new batch each step
      q.rmean = p.rmean;
      q.rstd = p.rstd;
      Forward f = forward_train(q, fast);
      const std::string what = describe(cfg, s, fast) + " step " + std::to_string(step);
      for (int64_t c = 0; c < s.c; ++c) {
        double sum = 0, sq = 0;
        const int64_t m = s.per_channel();
        for (int64_t i = 0; i < m; ++i) sum += q.x[i * s.c + c];
        const double mu_b = sum / m;
        for (int64_t i = 0; i < m; ++i) sq += (q.x[i * s.c + c] - mu_b) * (q.x[i * s.c + c] - mu_b);
        const double sigma_b = std::sqrt(sq / m + cfg.eps);
        // r and d from the PRE-update running statistics (as passed in, floats).
        const double r_pre = sigma_b / q.rstd[c], d_pre = (mu_b - q.rmean[c]) / q.rstd[c];
        EXPECT_NEAR(f.r[c], r_pre, 1e-6 * r_pre) << what << " channel " << c;
        EXPECT_NEAR(f.d[c], d_pre, 1e-6 * (1 + std::abs(d_pre))) << what << " channel " << c;
        // The post-update values would give a clearly different r (so the check above can fail).
        const double r_post = sigma_b / f.rstd[c];
        EXPECT_GT(std::abs(r_post - r_pre), 1e-3 * r_pre) << what << " channel " << c;
        mu[c] += cfg.alpha * (mu_b - mu[c]);
        sigma[c] += cfg.alpha * (sigma_b - sigma[c]);
      }
      // The kernel rounds to float after each step; 4 steps of float rounding: 1e-6 relative.
      expect_close(what + " running mean", f.rmean, mu, 1e-6, 1e-6);
      expect_close(what + " running std", f.rstd, sigma, 1e-6, 1e-6);
      p.rmean = f.rmean;
      p.rstd = f.rstd;
    }
  }
}

TEST(NormKernel, InstanceNormLeavesRunningStatsAloneAndUsesPerSampleStatistics) {
  for (bool fast : {false, true}) {
    NormConfig cfg;
    cfg.kind = NormKind::InstanceNorm;
    cfg.leaky = false;
    const Shape s{3, 2, 3, 4, 3};
    Problem p = make_problem(cfg, s, 55);
    Forward f = forward_train(p, fast);
    EXPECT_EQ(f.rmean, p.rmean);
    EXPECT_EQ(f.rstd, p.rstd);
    // Each (n, c) output has mean beta and std gamma * sqrt(var / (var + eps)) ~ gamma.
    const int64_t sp = s.spatial();
    for (int64_t n = 0; n < s.n; ++n)
      for (int64_t c = 0; c < s.c; ++c) {
        double sum = 0, sq = 0;
        for (int64_t i = 0; i < sp; ++i) sum += f.y[(n * sp + i) * s.c + c];
        const double mean = sum / sp;
        for (int64_t i = 0; i < sp; ++i) sq += std::pow(f.y[(n * sp + i) * s.c + c] - mean, 2);
        // eps / var <= 1e-5 / 0.09 ~ 1e-4 relative on the std, float rounding 1e-6.
        EXPECT_NEAR(mean, p.beta[c], 1e-5) << "n " << n << " c " << c;
        EXPECT_NEAR(std::sqrt(sq / sp), p.gamma[c], 2e-4) << "n " << n << " c " << c;
      }
    // Inference is the same computation (per-sample statistics).
    expect_close(describe(cfg, s, fast) + " infer vs train", forward_infer(p, fast), f.y, 1e-6,
                 1e-6);
  }
}

// ---------------------------------------------------------------- pitfalls

TEST(NormKernel, BatchOfOneSampleUsesThePatchStatistics) {
  for (NormKind kind : kAllKinds) {
    for (bool fast : {false, true}) {
      NormConfig cfg;
      cfg.kind = kind;
      cfg.r_max = 2.f;
      cfg.d_max = 1.f;
      const Shape s{1, 3, 4, 5, 4};
      Problem p = make_problem(cfg, s, 61);
      Forward f = forward_train(p, fast);
      const std::string what = describe(cfg, s, fast);
      const int64_t m = s.spatial();  // D*H*W values per channel at N = 1
      for (int64_t c = 0; c < s.c; ++c) {
        double sum = 0, sq = 0;
        for (int64_t i = 0; i < m; ++i) sum += p.x[i * s.c + c];
        for (int64_t i = 0; i < m; ++i) sq += std::pow(p.x[i * s.c + c] - sum / m, 2);
        EXPECT_NEAR(f.mean[c], sum / m, 1e-6 * (1 + std::abs(sum / m))) << what << " c " << c;
        EXPECT_NEAR(f.inv_std[c], 1 / std::sqrt(sq / m + cfg.eps), 1e-6 / std::sqrt(sq / m))
            << what << " c " << c;  // biased: m, never m - 1
      }
      for (float v : f.y) ASSERT_TRUE(std::isfinite(v)) << what;
      Backward b = backward(p, f, random_vector(p.x.size(), 62), fast);
      for (float v : b.dx) ASSERT_TRUE(std::isfinite(v)) << what;
    }
  }
}

TEST(NormKernel, ConstantChannelGivesFiniteOutputsAndGradients) {
  for (NormKind kind : kAllKinds) {
    for (bool fast : {false, true}) {
      NormConfig cfg;
      cfg.kind = kind;
      cfg.r_max = 3.f;
      cfg.d_max = 5.f;
      const Shape s{2, 2, 3, 3, 3};
      Problem p = make_problem(cfg, s, 71);
      for (int64_t i = 0; i < s.per_channel(); ++i) p.x[i * s.c + 1] = 0.75f;  // channel 1 constant
      p.rstd[1] = 0.f;  // a collapsed running std: the sqrt(eps) floor must keep r, d finite
      Forward f = forward_train(p, fast);
      const std::string what = describe(cfg, s, fast);
      for (size_t i = 0; i < f.y.size(); ++i)
        ASSERT_TRUE(std::isfinite(f.y[i])) << what << " y " << i;
      for (size_t i = 0; i < f.r.size(); ++i) {
        ASSERT_TRUE(std::isfinite(f.r[i]) && std::isfinite(f.d[i])) << what << " slot " << i;
      }
      // sigma_B = sqrt(eps): x - mu_B is exactly 0, so the channel outputs gamma * d + beta.
      EXPECT_NEAR(f.inv_std[1], 1 / std::sqrt(cfg.eps), 1e-3) << what;
      for (float v : f.rmean) EXPECT_TRUE(std::isfinite(v)) << what;
      for (float v : f.rstd) EXPECT_TRUE(std::isfinite(v)) << what;
      Backward b = backward(p, f, random_vector(p.x.size(), 72), fast);
      for (size_t i = 0; i < b.dx.size(); ++i)
        ASSERT_TRUE(std::isfinite(b.dx[i])) << what << " dx " << i;
      for (int64_t c = 0; c < s.c; ++c)
        ASSERT_TRUE(std::isfinite(b.dgamma[c]) && std::isfinite(b.dbeta[c])) << what << " c " << c;
    }
  }
}

TEST(NormKernel, NonFiniteBatchLeavesRunningStatsUntouchedAndIsReported) {
  for (float poison :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    for (NormKind kind : {NormKind::BatchRenorm, NormKind::BatchNorm}) {
      for (bool fast : {false, true}) {
        NormConfig cfg;
        cfg.kind = kind;
        cfg.r_max = 3.f;
        cfg.d_max = 5.f;
        const Shape s{2, 2, 2, 3, 3};
        Problem p = make_problem(cfg, s, 81);
        p.x[7 * s.c + 2] = poison;  // one value of channel 2: all channels must stay untouched
        Forward f = forward_train(p, fast);
        const std::string what = describe(cfg, s, fast) + " poison " + std::to_string(poison);
        EXPECT_TRUE(f.info.update_skipped) << what;
        EXPECT_EQ(f.rmean, p.rmean) << what;
        EXPECT_EQ(f.rstd, p.rstd) << what;
        // The healthy channels still normalise to finite outputs.
        for (int64_t i = 0; i < s.per_channel(); ++i)
          ASSERT_TRUE(std::isfinite(f.y[i * s.c + 0])) << what << " row " << i;
      }
    }
  }
  // A healthy batch is not reported.
  NormConfig cfg;
  Problem p = make_problem(cfg, Shape{2, 2, 2, 3, 3}, 82);
  EXPECT_FALSE(forward_train(p, true).info.update_skipped);
  EXPECT_FALSE(forward_train(p, false).info.update_skipped);
}

TEST(NormKernel, FastStatisticsSurviveALargeMean) {
  // |mean| / std = 1e4: the naive E[x^2] - E[x]^2 in float would lose every digit; the fast
  // kernel's shifted double sums must match the two-pass reference.
  NormConfig cfg;
  cfg.kind = NormKind::BatchNorm;
  cfg.leaky = false;
  const Shape s{2, 8, 8, 8, 3};
  Problem p = make_problem(cfg, s, 91);
  for (auto& v : p.x) v += 1e4f;
  Forward fr = forward_train(p, false), ff = forward_train(p, true);
  // Float x near 1e4 has a spacing of 1e-3; both see the same floats, the statistics are exact to
  // double rounding, so inv_std agrees to float rounding (1e-6 relative) and y to 1e-3 * a (~1e-3).
  expect_close("inv_std", ff.inv_std, fr.inv_std, 0.0, 1e-6);
  expect_close("mean", ff.mean, fr.mean, 0.0, 1e-7);
  expect_close("y", ff.y, fr.y, 5e-3, 0.0);
}

// ---------------------------------------------------------------- statistics of small batches

// For Gaussian data the squared relative error of the unbiased variance estimate has expectation
// 2/(m-1) (s^2 / sigma^2 ~ chi2_k / k, k = m - 1, Var = 2/k). The kernel's biased sigma_B gives
// s^2 = (sigma_B^2 - eps) m / (m - 1). Every channel of a (1,1,1,m,C) tensor is one independent
// batch.
TEST(NormStatistics, UnbiasedVarianceRelativeErrorHasExpectationTwoOverMMinusOne) {
  Rng rng(2024);
  for (int64_t m : {4, 8, 16}) {
    const int64_t channels = 5000, calls = 20;  // 100000 draws per m
    NormConfig cfg;
    cfg.kind = NormKind::BatchNorm;
    cfg.leaky = false;
    const Shape s{1, 1, 1, m, channels};
    std::vector<float> x(static_cast<size_t>(s.numel())), y(x.size());
    std::vector<float> gamma(channels, 1.f), beta(channels, 0.f), rm(channels, 0.f),
        rs(channels, 1.f);
    std::vector<float> mean(channels), inv_std(channels), r(channels), d(channels);
    double sum_u = 0.0;
    int64_t draws = 0;
    for (int64_t call = 0; call < calls; ++call) {
      for (auto& v : x) v = static_cast<float>(rng.normal());
      cpu::norm_forward_train(cfg, s, x.data(), gamma.data(), beta.data(), rm.data(), rs.data(),
                              y.data(), NormCache{mean.data(), inv_std.data(), r.data(), d.data()});
      for (int64_t c = 0; c < channels; ++c) {
        const double biased = 1.0 / (double(inv_std[c]) * inv_std[c]) - cfg.eps;
        const double unbiased = biased * m / (m - 1.0);
        sum_u += (unbiased - 1.0) * (unbiased - 1.0);
        ++draws;
      }
    }
    const double k = m - 1.0;
    const double expected = 2.0 / k;
    // u = (X - 1)^2 with X = chi2_k / k: E[(X-1)^4] = (12 k^2 + 48 k) / k^4, so
    // Var[u] = 8/k^2 + 48/k^3 exactly, and the mean of `draws` independent u has standard error
    // sqrt(Var[u] / draws) (~0.5% of the mean at m = 8). Bound: 5 standard errors, a false failure
    // probability < 1e-6 for an unlucky seed; a biased (m instead of m - 1) estimate or N-1 in the
    // kernel shifts the mean by 15..50%, dozens of standard errors.
    const double se = std::sqrt((8.0 / (k * k) + 48.0 / (k * k * k)) / draws);
    const double mean_u = sum_u / draws;
    EXPECT_NEAR(mean_u, expected, 5 * se) << "m " << m << " draws " << draws << " se " << se;
  }
}

// ---------------------------------------------------------------- fast vs reference

TEST(NormKernel, FastMatchesReferenceOnOddShapes) {
  const Shape shapes[] = {{1, 1, 1, 1, 1},    {1, 3, 5, 7, 1},  {2, 3, 5, 7, 1},
                          {1, 5, 3, 7, 13},   {3, 7, 5, 3, 17}, {2, 9, 11, 13, 33},
                          {2, 16, 16, 16, 8}, {1, 1, 1, 1, 9}};
  int seed = 0;
  for (const Shape& s : shapes) {
    for (NormKind kind : kAllKinds) {
      for (bool leaky : {false, true}) {
        NormConfig cfg;
        cfg.kind = kind;
        cfg.leaky = leaky;
        cfg.r_max = 1.5f;
        cfg.d_max = 0.5f;
        Problem p = make_problem(cfg, s, 1000 + seed++);
        Forward fr = forward_train(p, false), ff = forward_train(p, true);
        const std::string what = describe(cfg, s, true);
        // Statistics: two-pass vs shifted sums, both in double, rounded to float once: within a
        // few float ulps (1e-6 relative).
        expect_close(what + " mean", ff.mean, fr.mean, 1e-6, 1e-6);
        expect_close(what + " inv_std", ff.inv_std, fr.inv_std, 0.0, 1e-6);
        expect_close(what + " r", ff.r, fr.r, 0.0, 1e-6);
        expect_close(what + " d", ff.d, fr.d, 1e-6, 1e-6);
        EXPECT_EQ(ff.info.r_clipped, fr.info.r_clipped) << what;
        EXPECT_EQ(ff.info.d_clipped, fr.info.d_clipped) << what;
        expect_close(what + " running mean", ff.rmean, fr.rmean, 1e-6, 1e-6);
        expect_close(what + " running std", ff.rstd, fr.rstd, 1e-6, 1e-6);
        // y: the fast kernel evaluates (x - mu) * a + b in float (3 roundings of values of
        // magnitude
        // <= |y| + |b|): 1e-5 of the largest output covers it with a margin of ~10.
        expect_close(what + " y", ff.y, fr.y, 1e-5 * max_abs(fr.y), 1e-5);
        expect_close(what + " infer", forward_infer(p, true), forward_infer(p, false),
                     1e-5 * max_abs(fr.y), 1e-5);

        const std::vector<float> dy = random_vector(p.x.size(), 2000 + seed);
        Backward br = backward(p, fr, dy, false), bf = backward(p, ff, dy, true);
        // dx = k dz - k mean(dz) - k inv_std mean(dz x_bn) (x - mu) in float: terms of the size of
        // the largest dx, a few roundings each. dgamma/dbeta: the same double sums, float inputs.
        expect_close(what + " dx", bf.dx, br.dx, 1e-5 * max_abs(br.dx), 1e-5);
        const double m = double(s.per_channel());
        expect_close(what + " dgamma", bf.dgamma, br.dgamma, 1e-6 * m, 1e-5);
        expect_close(what + " dbeta", bf.dbeta, br.dbeta, 1e-6 * m, 1e-5);
      }
    }
  }
}

TEST(NormKernel, RejectsBadArguments) {
  NormConfig cfg;
  Problem p = make_problem(cfg, Shape{1, 1, 2, 2, 2}, 5);
  cfg.r_max = 0.5f;
  p.cfg = cfg;
  EXPECT_THROW(forward_train(p, true), ArgumentError);
  EXPECT_THROW(forward_train(p, false), ArgumentError);
  p.cfg = NormConfig{};
  std::vector<float> y(p.x.size()), m(2), v(2), r(2), d(2);
  EXPECT_THROW(
      cpu::norm_forward_train(p.cfg, p.s, p.x.data(), p.gamma.data(), p.beta.data(), nullptr,
                              nullptr, y.data(), NormCache{m.data(), v.data(), r.data(), d.data()}),
      ArgumentError);
}

// ---- rebuilding the output, and the backward without it (the network's memory saving) ----

namespace {
bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}
// The first index where two float vectors differ in bits, for the failure message.
std::string first_difference(const std::vector<float>& a, const std::vector<float>& b) {
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0)
      return "[" + std::to_string(i) + "] " + std::to_string(a[i]) + " vs " + std::to_string(b[i]);
  return a.size() == b.size() ? "none" : "sizes differ";
}
// Shapes for the bit-identity tests: C = 1, N = 1, odd C, and one large enough for two threads.
const Shape kApplyShapes[] = {Shape{2, 3, 4, 5, 1}, Shape{1, 5, 6, 7, 3}, Shape{2, 4, 5, 3, 7},
                              Shape{2, 16, 16, 16, 9}};
}  // namespace

TEST(NormApply, RebuildsTheTrainingForwardOutputBitForBit) {
  for (NormKind kind : {NormKind::BatchRenorm, NormKind::BatchNorm, NormKind::InstanceNorm})
    for (bool leaky : {true, false})
      for (const Shape& s : kApplyShapes) {
        NormConfig cfg;
        cfg.kind = kind;
        cfg.leaky = leaky;
        cfg.r_max = 1.5f;
        cfg.d_max = 0.5f;
        const Problem p = make_problem(cfg, s, 41);
        Forward f = forward_train(p, true);
        std::vector<float> y(p.x.size(), std::numeric_limits<float>::quiet_NaN());
        cpu::norm_forward_apply(cfg, s, p.x.data(), f.cache(), y.data());
        EXPECT_TRUE(same_bits(y, f.y)) << describe(cfg, s, true) << ": " << first_difference(y, f.y);
        // The reference fills the coefficients too (with its own rounding of gamma r / sigma_B).
        Forward fr = forward_train(p, false);
        for (size_t i = 0; i < fr.scale.size(); ++i) {
          EXPECT_NEAR(fr.scale[i], f.scale[i], 1e-6 * std::abs(f.scale[i])) << describe(cfg, s, false);
          EXPECT_NEAR(fr.shift[i], f.shift[i], 1e-6 * (1 + std::abs(f.shift[i]))) << describe(cfg, s, false);
        }
      }
}

TEST(NormBackward, MaskFromTheInputEqualsMaskFromTheOutputAndMayRunInPlace) {
  for (NormKind kind : {NormKind::BatchRenorm, NormKind::BatchNorm, NormKind::InstanceNorm})
    for (const Shape& s : kApplyShapes) {
      NormConfig cfg;
      cfg.kind = kind;
      cfg.r_max = 1.5f;
      cfg.d_max = 0.5f;
      const Problem p = make_problem(cfg, s, 43);
      Forward f = forward_train(p, true);
      const std::vector<float> dy = random_vector(p.x.size(), 44);
      const Backward with_y = backward(p, f, dy, true);
      // Without y: the mask from x and the cached scale and shift.
      const Backward no_y = backward(p, f, dy, true, false);
      const std::string what = describe(cfg, s, true);
      EXPECT_TRUE(same_bits(no_y.dx, with_y.dx)) << what << ": " << first_difference(no_y.dx, with_y.dx);
      EXPECT_TRUE(same_bits(no_y.dgamma, with_y.dgamma)) << what;
      EXPECT_TRUE(same_bits(no_y.dbeta, with_y.dbeta)) << what;
      // In place: dx written over dy.
      std::vector<float> g = dy, dgamma(static_cast<size_t>(s.c)), dbeta(static_cast<size_t>(s.c));
      cpu::norm_backward(cfg, s, g.data(), p.x.data(), nullptr, p.gamma.data(), f.cache(), g.data(),
                         dgamma.data(), dbeta.data());
      EXPECT_TRUE(same_bits(g, with_y.dx)) << what << " in place: " << first_difference(g, with_y.dx);
      EXPECT_TRUE(same_bits(dgamma, with_y.dgamma)) << what << " in place";
      // The reference without y recomputes the pre-activation in double from the cache.
      Forward fr = forward_train(p, false);
      const Backward ref_y = backward(p, fr, dy, false), ref_no_y = backward(p, fr, dy, false, false);
      expect_close(what + " ref dx without y", ref_no_y.dx, ref_y.dx, 1e-6, 1e-6);
      expect_close(what + " ref dgamma without y", ref_no_y.dgamma, ref_y.dgamma, 1e-5, 1e-6);
    }
}

TEST(NormBackward, WithoutOutputOrCoefficientsIsRefused) {
  NormConfig cfg;
  const Shape s{1, 2, 2, 2, 3};
  const Problem p = make_problem(cfg, s, 45);
  Forward f = forward_train(p, true);
  NormCache bare = f.cache();
  bare.scale = bare.shift = nullptr;
  std::vector<float> dy(p.x.size(), 1.f), dx(p.x.size()), dg(3), db(3);
  EXPECT_THROW(cpu::norm_backward(cfg, s, dy.data(), p.x.data(), nullptr, p.gamma.data(), bare,
                                  dx.data(), dg.data(), db.data()),
               Error);
  EXPECT_THROW(cpu::norm_backward_ref(cfg, s, dy.data(), p.x.data(), nullptr, p.gamma.data(), bare,
                                      dx.data(), dg.data(), db.data()),
               Error);
  EXPECT_THROW(cpu::norm_forward_apply(cfg, s, p.x.data(), bare, dx.data()), Error);
  // dx may alias dy, not x.
  EXPECT_THROW(cpu::norm_backward(cfg, s, dy.data(), p.x.data(), nullptr, p.gamma.data(), f.cache(),
                                  const_cast<float*>(p.x.data()), dg.data(), db.data()),
               Error);
}
