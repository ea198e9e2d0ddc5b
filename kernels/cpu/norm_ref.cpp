// Naive reference of the normalization kernels (norm.hpp): written for readability, straight from
// ../shared/docs/batch-renorm.md, with every sum accumulated in double and two-pass (mean, then
// centred squares) statistics. It is the ground truth the fast kernels (norm.cpp) and the golden
// files from PyTorch are compared against; it shares no code with norm.cpp on purpose, so that a
// mistake in one is caught by the other.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.hpp"
#include "kernels/cpu/norm.hpp"

namespace medseg::cpu {
namespace {

// The values one statistic is taken over: `count` elements starting at x[first], `stride` apart.
// Batch kinds: one group per channel c over all N*D*H*W rows. Instance norm: one group per (n, c)
// over the D*H*W rows of sample n.
struct Group {
  int64_t first = 0, count = 0, stride = 0;
  int64_t channel = 0;
};

int64_t group_count(const NormConfig& cfg, const Shape& s) {
  return cfg.kind == NormKind::InstanceNorm ? s.n * s.c : s.c;
}

Group group_at(const NormConfig& cfg, const Shape& s, int64_t g) {
  Group grp;
  grp.stride = s.c;
  if (cfg.kind == NormKind::InstanceNorm) {
    int64_t n = g / s.c;
    grp.channel = g % s.c;
    grp.first = n * s.spatial() * s.c + grp.channel;
    grp.count = s.spatial();
  } else {
    grp.channel = g;
    grp.first = g;
    grp.count = s.per_channel();
  }
  return grp;
}

void check_args(const NormConfig& cfg, const Shape& s) {
  MEDSEG_CHECK(s.numel() > 0, "normalization of an empty tensor ", s);
  MEDSEG_CHECK(cfg.eps > 0.f, "eps must be positive, got ", cfg.eps);
  MEDSEG_CHECK(cfg.r_max >= 1.f && cfg.d_max >= 0.f,
               "clips need r_max >= 1 and d_max >= 0, got r_max ", cfg.r_max, " d_max ", cfg.d_max);
}

double leaky(const NormConfig& cfg, double z) {
  return (!cfg.leaky || z > 0.0) ? z : static_cast<double>(cfg.slope) * z;
}

}  // namespace

NormStepInfo norm_forward_train_ref(const NormConfig& cfg, const Shape& s, const float* x,
                                    const float* gamma, const float* beta, float* running_mean,
                                    float* running_std, float* y, NormCache cache) {
  check_args(cfg, s);
  const bool batch_kind = cfg.kind != NormKind::InstanceNorm;
  MEDSEG_CHECK(!batch_kind || (running_mean && running_std),
               "batch (re)norm training needs running statistics");
  const int64_t groups = group_count(cfg, s);
  const double eps = cfg.eps;
  const double sigma_floor = std::sqrt(eps);

  std::vector<double> mu_b(groups), sigma_b(groups);
  NormStepInfo info;
  bool all_finite = true;
  for (int64_t g = 0; g < groups; ++g) {
    const Group grp = group_at(cfg, s, g);
    double sum = 0.0;
    for (int64_t i = 0; i < grp.count; ++i) sum += x[grp.first + i * grp.stride];
    const double mean = sum / static_cast<double>(grp.count);
    double sq = 0.0;
    for (int64_t i = 0; i < grp.count; ++i) {
      const double v = x[grp.first + i * grp.stride] - mean;
      sq += v * v;
    }
    const double var = sq / static_cast<double>(grp.count);  // biased: never N-1
    mu_b[g] = mean;
    sigma_b[g] = std::sqrt(var + eps);
    if (!std::isfinite(mu_b[g]) || !std::isfinite(sigma_b[g])) all_finite = false;
  }

  for (int64_t g = 0; g < groups; ++g) {
    const Group grp = group_at(cfg, s, g);
    const int64_t c = grp.channel;
    double r = 1.0, d = 0.0;
    if (cfg.kind == NormKind::BatchRenorm) {
      // Pre-update running statistics; sigma floored so that a collapsed running std cannot blow
      // up.
      const double sigma = std::max(static_cast<double>(running_std[c]), sigma_floor);
      const double r_raw = sigma_b[g] / sigma;
      const double d_raw = (mu_b[g] - running_mean[c]) / sigma;
      const double r_lo = 1.0 / cfg.r_max, r_hi = cfg.r_max, d_hi = cfg.d_max;
      r = std::min(std::max(r_raw, r_lo), r_hi);
      d = std::min(std::max(d_raw, -d_hi), d_hi);
      if (r_raw < r_lo || r_raw > r_hi) ++info.r_clipped;
      if (d_raw < -d_hi || d_raw > d_hi) ++info.d_clipped;
    }
    cache.mean[g] = static_cast<float>(mu_b[g]);
    cache.inv_std[g] = static_cast<float>(1.0 / sigma_b[g]);
    cache.r[g] = static_cast<float>(r);
    cache.d[g] = static_cast<float>(d);
    if (cache.scale && cache.shift) {
      cache.scale[g] = static_cast<float>(static_cast<double>(gamma[c]) * r / sigma_b[g]);
      cache.shift[g] = static_cast<float>(static_cast<double>(gamma[c]) * d + beta[c]);
    }
    for (int64_t i = 0; i < grp.count; ++i) {
      const int64_t at = grp.first + i * grp.stride;
      const double x_hat = (x[at] - mu_b[g]) / sigma_b[g] * r + d;
      y[at] = static_cast<float>(leaky(cfg, static_cast<double>(gamma[c]) * x_hat + beta[c]));
    }
  }

  if (batch_kind) {
    if (!all_finite) {
      info.update_skipped = true;  // a poisoned running sigma would poison every later r and d
    } else {
      const double alpha = cfg.alpha;
      for (int64_t c = 0; c < s.c; ++c) {
        running_mean[c] = static_cast<float>(running_mean[c] + alpha * (mu_b[c] - running_mean[c]));
        running_std[c] = static_cast<float>(running_std[c] + alpha * (sigma_b[c] - running_std[c]));
      }
    }
  }
  return info;
}

void norm_backward_ref(const NormConfig& cfg, const Shape& s, const float* dy, const float* x,
                       const float* y, const float* gamma, NormCache cache, float* dx,
                       float* dgamma, float* dbeta) {
  check_args(cfg, s);
  MEDSEG_CHECK(!cfg.leaky || y || cache.shift,
               "the LeakyReLU mask needs the forward output y or the cached shift");
  const int64_t groups = group_count(cfg, s);
  std::vector<double> sum_dgamma(s.c, 0.0), sum_dbeta(s.c, 0.0);
  std::vector<double> dz;
  for (int64_t g = 0; g < groups; ++g) {
    const Group grp = group_at(cfg, s, g);
    const int64_t c = grp.channel;
    const double mean = cache.mean[g], inv_std = cache.inv_std[g];
    const double r = cache.r[g], d = cache.d[g];
    // Gradient through the LeakyReLU: y > 0 exactly when the pre-activation is > 0 (slope > 0);
    // without y, the pre-activation itself, recomputed in double from the cache (the cached shift
    // = gamma d + beta stands in for beta, which this function is not given).
    auto positive = [&](int64_t at) {
      if (y) return y[at] > 0.f;
      const double x_hat = (x[at] - mean) * inv_std;
      return static_cast<double>(gamma[c]) * r * x_hat + static_cast<double>(cache.shift[g]) > 0.0;
    };
    dz.assign(grp.count, 0.0);
    double sum_dz = 0.0, sum_dz_xbn = 0.0;
    for (int64_t i = 0; i < grp.count; ++i) {
      const int64_t at = grp.first + i * grp.stride;
      dz[i] = (!cfg.leaky || positive(at)) ? dy[at] : static_cast<double>(cfg.slope) * dy[at];
      sum_dz += dz[i];
      sum_dz_xbn += dz[i] * (x[at] - mean) * inv_std;
    }
    sum_dbeta[c] += sum_dz;
    sum_dgamma[c] += r * sum_dz_xbn + d * sum_dz;
    // Batch-norm backward with scale gamma * r (r and d are constants for the gradient).
    const double m = static_cast<double>(grp.count);
    const double k = static_cast<double>(gamma[c]) * r * inv_std;
    for (int64_t i = 0; i < grp.count; ++i) {
      const int64_t at = grp.first + i * grp.stride;
      const double x_bn = (x[at] - mean) * inv_std;
      dx[at] = static_cast<float>(k * (dz[i] - sum_dz / m - x_bn * sum_dz_xbn / m));
    }
  }
  for (int64_t c = 0; c < s.c; ++c) {
    dgamma[c] = static_cast<float>(sum_dgamma[c]);
    dbeta[c] = static_cast<float>(sum_dbeta[c]);
  }
}

void norm_forward_infer_ref(const NormConfig& cfg, const Shape& s, const float* x,
                            const float* gamma, const float* beta, const float* running_mean,
                            const float* running_std, float* y) {
  check_args(cfg, s);
  if (cfg.kind == NormKind::InstanceNorm) {
    // Per-sample statistics, as in training; nothing is cached or updated.
    const int64_t groups = group_count(cfg, s);
    std::vector<float> mean(groups), inv_std(groups), r(groups, 1.f), d(groups, 0.f);
    norm_forward_train_ref(cfg, s, x, gamma, beta, nullptr, nullptr, y,
                           NormCache{mean.data(), inv_std.data(), r.data(), d.data()});
    return;
  }
  MEDSEG_CHECK(running_mean && running_std, "batch (re)norm inference needs running statistics");
  const double sigma_floor = std::sqrt(static_cast<double>(cfg.eps));
  const int64_t rows = s.per_channel();
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t c = 0; c < s.c; ++c) {
      const int64_t at = row * s.c + c;
      const double sigma = std::max(static_cast<double>(running_std[c]), sigma_floor);
      const double z = static_cast<double>(gamma[c]) * (x[at] - running_mean[c]) / sigma + beta[c];
      y[at] = static_cast<float>(leaky(cfg, z));
    }
  }
}

}  // namespace medseg::cpu
