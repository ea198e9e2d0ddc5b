#include <gtest/gtest.h>

#include <cmath>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "infer/sliding_window.hpp"

namespace medseg::infer {
namespace {

using Shape3 = std::array<int64_t, 3>;

// An analytic "model": logit k at patch position (z, y, x) is a fixed function of the voxel's
// channels and of the position inside the patch, so the exact output of the whole pipeline can be
// computed voxel by voxel without tiles or batches.
struct AnalyticModel {
  int channels = 2, classes = 3;
  bool use_position = true;
  bool symmetric = false;  // position enters only through |pos - centre|: mirror-symmetric model
  Shape3 patch{};

  double logit(int k, const float* in, int64_t z, int64_t y, int64_t x) const {
    double pz = static_cast<double>(z), py = static_cast<double>(y), px = static_cast<double>(x);
    if (symmetric) {
      pz = std::abs(pz - (patch[0] - 1) / 2.0);
      py = std::abs(py - (patch[1] - 1) / 2.0);
      px = std::abs(px - (patch[2] - 1) / 2.0);
    }
    const double pos = use_position ? (0.3 * pz - 0.2 * py + 0.15 * px) : 0.0;
    switch (k) {
      case 0:
        return 0.0;
      case 1:
        return 1.5 * in[0] - 0.5 * in[1] + pos;
      default:
        return -in[0] + 0.7 * in[1] - 0.5 * pos;
    }
  }

  void forward(const Tensor& batch, Tensor& logits) const {
    const Shape& s = batch.shape();
    for (int64_t b = 0; b < s.n; ++b)
      for (int64_t z = 0; z < s.d; ++z)
        for (int64_t y = 0; y < s.h; ++y)
          for (int64_t x = 0; x < s.w; ++x) {
            const float* in = batch.data() + (((b * s.d + z) * s.h + y) * s.w + x) * s.c;
            float* out = logits.data() + (((b * s.d + z) * s.h + y) * s.w + x) * classes;
            for (int k = 0; k < classes; ++k) out[k] = static_cast<float>(logit(k, in, z, y, x));
          }
  }
};

std::vector<float> random_image(Shape3 shape, int channels, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> img(static_cast<size_t>(shape[0] * shape[1] * shape[2] * channels));
  for (float& v : img) v = static_cast<float>(rng.uniform(-2, 2));
  return img;
}

// Independent reference: per voxel, the Gaussian-weighted mean over covering tiles of the mean over
// mirrors of softmax(model at the mirrored patch position), computed in double.
std::vector<double> reference(const AnalyticModel& model, const std::vector<float>& img,
                              Shape3 shape, const SlidingWindowOptions& opt) {
  const Shape3 P = opt.patch;
  Shape3 padded{}, before{};
  for (int a = 0; a < 3; ++a) {
    padded[a] = std::max(shape[a], P[a]);
    before[a] = (padded[a] - shape[a]) / 2;
  }
  const auto sz = tile_starts(padded[0], P[0], opt.step);
  const auto sy = tile_starts(padded[1], P[1], opt.step);
  const auto sx = tile_starts(padded[2], P[2], opt.step);
  const auto g = gaussian_importance_map(P);
  const int K = model.classes;
  std::vector<double> out(static_cast<size_t>(shape[0] * shape[1] * shape[2] * K));
  for (int64_t z = 0; z < shape[0]; ++z)
    for (int64_t y = 0; y < shape[1]; ++y)
      for (int64_t x = 0; x < shape[2]; ++x) {
        const float* in = img.data() + ((z * shape[1] + y) * shape[2] + x) * model.channels;
        std::vector<double> acc(static_cast<size_t>(K), 0.0);
        double wsum = 0;
        for (int64_t tz : sz)
          for (int64_t ty : sy)
            for (int64_t tx : sx) {
              const int64_t pz = z + before[0] - tz, py = y + before[1] - ty,
                            px = x + before[2] - tx;
              if (pz < 0 || pz >= P[0] || py < 0 || py >= P[1] || px < 0 || px >= P[2]) continue;
              const double w = g[static_cast<size_t>((pz * P[1] + py) * P[2] + px)];
              const int mirrors = opt.tta ? 8 : 1;
              for (int m = 0; m < mirrors; ++m) {
                const int64_t mz = (m & 4) ? P[0] - 1 - pz : pz;
                const int64_t my = (m & 2) ? P[1] - 1 - py : py;
                const int64_t mx = (m & 1) ? P[2] - 1 - px : px;
                double l[8], mxl = -1e300, s = 0;
                for (int k = 0; k < K; ++k)
                  mxl = std::max(mxl, l[k] = model.logit(k, in, mz, my, mx));
                for (int k = 0; k < K; ++k) s += (l[k] = std::exp(l[k] - mxl));
                for (int k = 0; k < K; ++k) acc[static_cast<size_t>(k)] += w * l[k] / s / mirrors;
              }
              wsum += w;
            }
        for (int k = 0; k < K; ++k)
          out[static_cast<size_t>(((z * shape[1] + y) * shape[2] + x) * K + k)] =
              acc[static_cast<size_t>(k)] / wsum;
      }
  return out;
}

void expect_matches_reference(Shape3 shape, Shape3 patch, bool tta, bool symmetric, int max_batch) {
  AnalyticModel model;
  model.patch = patch;
  model.symmetric = symmetric;
  const auto img = random_image(shape, model.channels, 7);
  SlidingWindowOptions opt;
  opt.patch = patch;
  opt.tta = tta;
  opt.max_batch = max_batch;
  int64_t calls = 0, last_done = 0, last_total = 0;
  opt.progress = [&](int64_t done, int64_t total) {
    EXPECT_EQ(done, last_done + 1) << "progress must count tiles one by one";
    last_done = done;
    last_total = total;
  };
  auto fwd = [&](const Tensor& b, Tensor& l) {
    ++calls;
    EXPECT_LE(b.shape().n, max_batch);
    model.forward(b, l);
  };
  const auto got =
      sliding_window_probabilities(img.data(), shape, model.channels, model.classes, fwd, opt);
  const auto want = reference(model, img, shape, opt);
  ASSERT_EQ(got.size(), want.size());
  // float32 accumulation of at most a few dozen weighted terms in [0, 1]: relative rounding ~1e-6.
  const double tol = 2e-6;
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], tol) << "voxel " << i / 3 << " class " << i % 3;
  for (size_t v = 0; v < got.size() / 3; ++v)
    ASSERT_NEAR(got[v * 3] + got[v * 3 + 1] + got[v * 3 + 2], 1.0, 3e-6) << "voxel " << v;
  int64_t tiles = 1;
  for (int a = 0; a < 3; ++a)
    tiles *= static_cast<int64_t>(tile_starts(std::max(shape[a], patch[a]), patch[a], 0.5).size());
  const int64_t items = tiles * (tta ? 8 : 1);
  EXPECT_EQ(calls, (items + max_batch - 1) / max_batch);
  EXPECT_EQ(last_done, tiles);
  EXPECT_EQ(last_total, tiles);
}

TEST(GaussianImportanceMap, PeaksAtCentreWithMaximumOneAndNoZeros) {
  const Shape3 P{5, 8, 9};
  const auto g = gaussian_importance_map(P);
  ASSERT_EQ(g.size(), 5u * 8 * 9);
  float mx = 0, mn = 2;
  for (float v : g) mx = std::max(mx, v), mn = std::min(mn, v);
  EXPECT_EQ(mx, 1.0f);
  EXPECT_GT(mn, 0.0f);
  auto at = [&](int64_t z, int64_t y, int64_t x) {
    return g[static_cast<size_t>((z * 8 + y) * 9 + x)];
  };
  // Centre (2, 3.5, 4): the two voxels y = 3, 4 straddle it and share the peak.
  EXPECT_EQ(at(2, 3, 4), 1.0f);
  EXPECT_EQ(at(2, 4, 4), 1.0f);
  EXPECT_LT(at(1, 3, 4), 1.0f);
  EXPECT_LT(at(2, 3, 3), at(2, 3, 4));
  // Mirror-symmetric on every axis.
  for (int64_t z = 0; z < 5; ++z)
    for (int64_t y = 0; y < 8; ++y)
      for (int64_t x = 0; x < 9; ++x)
        ASSERT_EQ(at(z, y, x), at(4 - z, 7 - y, 8 - x)) << z << y << x;
}

TEST(GaussianImportanceMap, UnderflowedCornersTakeTheSmallestNonZeroValue) {
  // sigma = 0.01 * 64 = 0.64 voxels: the far corners are exp(-1000s) = 0 in any floating type.
  const auto g = gaussian_importance_map({1, 1, 64}, 0.01);
  float smallest = 1;
  for (float v : g)
    if (v > 0) smallest = std::min(smallest, v);
  EXPECT_EQ(g.front(), smallest);
  EXPECT_EQ(g.back(), smallest);
  for (size_t i = 0; i < g.size(); ++i) ASSERT_GT(g[i], 0.0f) << "index " << i;
}

TEST(TileStarts, SpreadEvenlyFromZeroToTheBorder) {
  EXPECT_EQ(tile_starts(10, 10, 0.5), std::vector<int64_t>({0}));
  EXPECT_EQ(tile_starts(10, 4, 0.5), std::vector<int64_t>({0, 2, 4, 6}));
  // 7 / 4 = 1.75 per step: round(1.75) = 2, round(3.5) = 4, round(5.25) = 5.
  EXPECT_EQ(tile_starts(11, 4, 0.5), std::vector<int64_t>({0, 2, 4, 5, 7}));
  for (int64_t size = 5; size < 40; ++size)
    for (int64_t patch = 1; patch <= size; ++patch) {
      const auto s = tile_starts(size, patch, 0.5);
      ASSERT_EQ(s.front(), 0);
      ASSERT_EQ(s.back(), size - patch) << "size " << size << " patch " << patch;
      for (size_t i = 1; i < s.size(); ++i)
        ASSERT_LE(s[i] - s[i - 1], (patch + 1) / 2) << size << " " << patch;  // ceil(0.5 * P)
    }
}

TEST(SlidingWindow, VolumeSmallerThanPatchIsPaddedCentredAndCropped) {
  expect_matches_reference({3, 5, 4}, {4, 8, 7}, /*tta=*/false, false, 2);
}

TEST(SlidingWindow, VolumeEqualToPatchIsOneTile) {
  expect_matches_reference({5, 6, 7}, {5, 6, 7}, false, false, 1);
}

TEST(SlidingWindow, VolumeNotAMultipleOfTheStep) {
  expect_matches_reference({11, 9, 13}, {4, 4, 6}, false, false, 3);
}

TEST(SlidingWindow, MirroringAveragesAllEightFlips) {
  expect_matches_reference({7, 6, 9}, {4, 4, 6}, /*tta=*/true, false, 5);
}

TEST(SlidingWindow, MirroringLeavesAMirrorSymmetricModelUnchanged) {
  const Shape3 shape{7, 6, 9}, patch{4, 4, 6};
  AnalyticModel model;
  model.patch = patch;
  model.symmetric = true;
  const auto img = random_image(shape, 2, 3);
  auto fwd = [&](const Tensor& b, Tensor& l) { model.forward(b, l); };
  SlidingWindowOptions opt;
  opt.patch = patch;
  opt.tta = false;
  const auto plain = sliding_window_probabilities(img.data(), shape, 2, 3, fwd, opt);
  opt.tta = true;
  const auto mirrored = sliding_window_probabilities(img.data(), shape, 2, 3, fwd, opt);
  // Same values summed in a different order: float rounding only.
  for (size_t i = 0; i < plain.size(); ++i)
    ASSERT_NEAR(plain[i], mirrored[i], 1e-6) << "value " << i;
}

TEST(SlidingWindow, PointwiseModelGivesItsSoftmaxEverywhere) {
  // No position term: tiling, padding and weighting must not matter at all.
  const Shape3 shape{6, 10, 3}, patch{4, 4, 4};
  AnalyticModel model;
  model.patch = patch;
  model.use_position = false;
  const auto img = random_image(shape, 2, 11);
  SlidingWindowOptions opt;
  opt.patch = patch;
  const auto got = sliding_window_probabilities(
      img.data(), shape, 2, 3, [&](const Tensor& b, Tensor& l) { model.forward(b, l); }, opt);
  for (int64_t v = 0; v < shape[0] * shape[1] * shape[2]; ++v) {
    double l[3], s = 0;
    for (int k = 0; k < 3; ++k) s += (l[k] = std::exp(model.logit(k, img.data() + v * 2, 0, 0, 0)));
    for (int k = 0; k < 3; ++k)
      ASSERT_NEAR(got[static_cast<size_t>(v * 3 + k)], l[k] / s, 1e-6)
          << "voxel " << v << " k " << k;
  }
}

TEST(SlidingWindow, RejectsAForwardThatChangesTheLogitShape) {
  std::vector<float> img(4 * 4 * 4, 0.0f);
  SlidingWindowOptions opt;
  opt.patch = {4, 4, 4};
  auto bad = [](const Tensor&, Tensor& l) { l = Tensor(Shape{1, 4, 4, 4, 5}); };
  EXPECT_THROW(sliding_window_probabilities(img.data(), {4, 4, 4}, 1, 2, bad, opt), ArgumentError);
}

TEST(SlidingWindow, NonFiniteLogitsAreANumericError) {
  std::vector<float> img(4 * 4 * 4, 0.0f);
  SlidingWindowOptions opt;
  opt.patch = {4, 4, 4};
  auto nan_model = [](const Tensor&, Tensor& l) { l.fill(std::nanf("")); };
  EXPECT_THROW(sliding_window_probabilities(img.data(), {4, 4, 4}, 1, 2, nan_model, opt),
               NumericError);
}

}  // namespace
}  // namespace medseg::infer
