// Element-wise ops and the Dice + cross-entropy loss on the CPU.
// The fast loss makes two passes over the logits: (1) softmax, cross-entropy and the per-class Dice sums,
// (2) the gradient, which needs the sums of pass 1. Reductions are in double.
#include "kernels/cpu/ops.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.hpp"

namespace medseg::cpu {

void leaky_relu_forward(int64_t count, const float* x, float slope, float* y) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < count; ++i) y[i] = x[i] > 0.f ? x[i] : slope * x[i];
}

void leaky_relu_backward(int64_t count, const float* dy, const float* y, float slope, float* dx) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < count; ++i) dx[i] = y[i] > 0.f ? dy[i] : slope * dy[i];
}

void concat_channels_forward(int64_t rows, const float* a, int64_t ca, const float* b, int64_t cb,
                             float* out) {
  const int64_t c = ca + cb;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(out + r * c, a + r * ca, sizeof(float) * ca);
    std::memcpy(out + r * c + ca, b + r * cb, sizeof(float) * cb);
  }
}

void concat_channels_backward(int64_t rows, const float* dout, int64_t ca, int64_t cb, float* da,
                              float* db) {
  const int64_t c = ca + cb;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    if (da) std::memcpy(da + r * ca, dout + r * c, sizeof(float) * ca);
    if (db) std::memcpy(db + r * cb, dout + r * c + ca, sizeof(float) * cb);
  }
}

void softmax_channels(int64_t rows, int64_t k, const float* logits, float* probs) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* z = logits + r * k;
    float* p = probs + r * k;
    float m = z[0];
    for (int64_t j = 1; j < k; ++j) m = std::max(m, z[j]);
    float s = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      p[j] = std::exp(z[j] - m);
      s += p[j];
    }
    const float inv = 1.f / s;
    for (int64_t j = 0; j < k; ++j) p[j] *= inv;
  }
}

namespace {

void check_loss_args(const Shape& s, const uint16_t* labels, const float* logits) {
  MEDSEG_CHECK(s.c >= 2, "dice_ce_loss needs at least 2 classes, logits shape ", s);
  MEDSEG_CHECK(s.numel() > 0, "dice_ce_loss on an empty tensor ", s);
  MEDSEG_CHECK(labels != nullptr && logits != nullptr, "dice_ce_loss: null input");
}

// The Dice groups: one per sample (per-sample Dice) or one for the whole batch.
int64_t dice_groups(const Shape& s, const DiceCeOptions& opt) { return opt.batch_dice ? 1 : s.n; }

struct DiceSums {
  std::vector<double> inter, psum, gsum;  // [group * K + k]
};

// Loss and d(loss)/d(prob) coefficients from the Dice sums.
// d(-mean dice)/dp_k(v) = -(1/nk) * (2 g (P+G+s) - (2I+s)) / (P+G+s)^2 with g = [label == k].
// We return per (group, k): a = -(1/nk) * 2 / (P+G+s), b = (1/nk) * (2I+s)/(P+G+s)^2, so that the
// derivative is a * g + b.
void dice_terms(const DiceSums& ds, int64_t groups, int64_t K, const DiceCeOptions& opt,
                DiceCeResult& res, std::vector<double>& a, std::vector<double>& b) {
  const int64_t k0 = opt.include_background ? 0 : 1;
  const double nk = static_cast<double>((K - k0) * groups);
  a.assign(groups * K, 0.0);
  b.assign(groups * K, 0.0);
  res.dice_per_class.assign(K, 0.0);
  double mean = 0;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = g * K + k;
      const double den = ds.psum[i] + ds.gsum[i] + opt.smooth;
      const double dice = (2.0 * ds.inter[i] + opt.smooth) / den;
      res.dice_per_class[k] += dice / static_cast<double>(groups);
      if (k < k0) continue;
      mean += dice / nk;
      a[i] = -(1.0 / nk) * 2.0 / den;
      b[i] = (1.0 / nk) * (2.0 * ds.inter[i] + opt.smooth) / (den * den);
    }
  res.soft_dice = mean;
}

}  // namespace

DiceCeResult dice_ce_loss_ref(const Shape& s, const float* logits, const uint16_t* labels,
                              const DiceCeOptions& opt, float scale, float* dlogits) {
  check_loss_args(s, labels, logits);
  const int64_t K = s.c, per = s.spatial(), rows = s.per_channel();
  const int64_t groups = dice_groups(s, opt);
  std::vector<double> p(static_cast<size_t>(rows * K));
  DiceSums ds{std::vector<double>(groups * K), std::vector<double>(groups * K),
              std::vector<double>(groups * K)};
  double ce = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = opt.batch_dice ? 0 : r / per;
    MEDSEG_CHECK(labels[r] < K, "label ", labels[r], " at voxel ", r, " is >= the class count ", K);
    double m = logits[r * K];
    for (int64_t k = 1; k < K; ++k) m = std::max(m, static_cast<double>(logits[r * K + k]));
    double z = 0;
    for (int64_t k = 0; k < K; ++k) z += std::exp(logits[r * K + k] - m);
    for (int64_t k = 0; k < K; ++k) {
      const double pk = std::exp(logits[r * K + k] - m) / z;
      p[r * K + k] = pk;
      const double gk = labels[r] == k ? 1.0 : 0.0;
      ds.inter[g * K + k] += pk * gk;
      ds.psum[g * K + k] += pk;
      ds.gsum[g * K + k] += gk;
    }
    ce -= std::log(std::max(p[r * K + labels[r]], 1e-300));
  }
  DiceCeResult res;
  res.ce = ce / static_cast<double>(rows);
  std::vector<double> a, b;
  dice_terms(ds, groups, K, opt, res, a, b);
  res.loss = opt.ce_weight * res.ce - opt.dice_weight * res.soft_dice;
  if (!dlogits) return res;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = opt.batch_dice ? 0 : r / per;
    std::vector<double> dp(K);
    for (int64_t k = 0; k < K; ++k) {
      const double gk = labels[r] == k ? 1.0 : 0.0;
      dp[k] = opt.dice_weight * (a[g * K + k] * gk + b[g * K + k]);
    }
    double dot = 0;
    for (int64_t k = 0; k < K; ++k) dot += p[r * K + k] * dp[k];
    for (int64_t k = 0; k < K; ++k) {
      const double gk = labels[r] == k ? 1.0 : 0.0;
      const double dce = opt.ce_weight * (p[r * K + k] - gk) / static_cast<double>(rows);
      const double dd = p[r * K + k] * (dp[k] - dot);
      dlogits[r * K + k] = static_cast<float>(scale * (dce + dd));
    }
  }
  return res;
}

DiceCeResult dice_ce_loss(const Shape& s, const float* logits, const uint16_t* labels,
                          const DiceCeOptions& opt, float scale, float* dlogits, float* probs) {
  check_loss_args(s, labels, logits);
  const int64_t K = s.c, per = s.spatial(), rows = s.per_channel();
  const int64_t groups = dice_groups(s, opt);
  std::vector<float> own;
  if (!probs) {
    own.resize(static_cast<size_t>(rows * K));
    probs = own.data();
  }
  softmax_channels(rows, K, logits, probs);

  DiceSums ds{std::vector<double>(groups * K), std::vector<double>(groups * K),
              std::vector<double>(groups * K)};
  double ce = 0;
  int64_t bad_label = -1;
  const int nthreads = omp_get_max_threads();
  std::vector<double> partial(static_cast<size_t>(nthreads) * groups * K * 3, 0.0);
#pragma omp parallel reduction(+ : ce)
  {
    double* mine = partial.data() + static_cast<size_t>(omp_get_thread_num()) * groups * K * 3;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const uint16_t lab = labels[r];
      if (lab >= K) {
#pragma omp critical
        bad_label = r;
        continue;
      }
      const int64_t g = opt.batch_dice ? 0 : r / per;
      const float* p = probs + r * K;
      double* acc = mine + g * K * 3;
      for (int64_t k = 0; k < K; ++k) acc[k * 3 + 1] += p[k];
      acc[lab * 3 + 0] += p[lab];
      acc[lab * 3 + 2] += 1.0;
      ce -= std::log(std::max(static_cast<double>(p[lab]), 1e-30));
    }
  }
  MEDSEG_CHECK(bad_label < 0, "label ", labels[std::max<int64_t>(bad_label, 0)], " at voxel ",
               bad_label, " is >= the class count ", K);
  for (int t = 0; t < nthreads; ++t)
    for (int64_t i = 0; i < groups * K; ++i) {
      const double* acc = partial.data() + (static_cast<size_t>(t) * groups * K + i) * 3;
      ds.inter[i] += acc[0];
      ds.psum[i] += acc[1];
      ds.gsum[i] += acc[2];
    }
  DiceCeResult res;
  res.ce = ce / static_cast<double>(rows);
  std::vector<double> a, b;
  dice_terms(ds, groups, K, opt, res, a, b);
  res.loss = opt.ce_weight * res.ce - opt.dice_weight * res.soft_dice;
  if (!dlogits) return res;

  const float ce_scale = static_cast<float>(scale * opt.ce_weight / static_cast<double>(rows));
  std::vector<float> af(groups * K), bf(groups * K);
  for (int64_t i = 0; i < groups * K; ++i) {
    af[i] = static_cast<float>(opt.dice_weight * a[i]);
    bf[i] = static_cast<float>(opt.dice_weight * b[i]);
  }
#pragma omp parallel
  {
    std::vector<float> dp(K);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t g = opt.batch_dice ? 0 : r / per;
      const float* p = probs + r * K;
      const uint16_t lab = labels[r];
      float dot = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        dp[k] = bf[g * K + k] + (k == lab ? af[g * K + k] : 0.f);
        dot += p[k] * dp[k];
      }
      float* d = dlogits + r * K;
      for (int64_t k = 0; k < K; ++k)
        d[k] = ce_scale * (p[k] - (k == lab ? 1.f : 0.f)) + scale * p[k] * (dp[k] - dot);
    }
  }
  return res;
}

}  // namespace medseg::cpu
