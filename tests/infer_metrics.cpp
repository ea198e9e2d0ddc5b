#include <gtest/gtest.h>

#include <cmath>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "infer/metrics.hpp"
#include "infer/postprocess.hpp"

namespace medseg::infer {
namespace {

LabelVolume blank(int64_t nx, int64_t ny, int64_t nz, std::array<double, 3> spacing) {
  LabelVolume m;
  m.geo.size = {nx, ny, nz};
  m.geo.spacing = spacing;
  m.data.assign(static_cast<size_t>(nx * ny * nz), 0);
  return m;
}

void fill_box(LabelVolume& m, std::array<int64_t, 3> lo, std::array<int64_t, 3> hi_excl,
              uint16_t v) {
  for (int64_t z = lo[2]; z < hi_excl[2]; ++z)
    for (int64_t y = lo[1]; y < hi_excl[1]; ++y)
      for (int64_t x = lo[0]; x < hi_excl[0]; ++x)
        m.data[static_cast<size_t>((z * m.geo.size[1] + y) * m.geo.size[0] + x)] = v;
}

TEST(Metrics, DiceAndIouOnOverlappingBoxes) {
  auto pred = blank(8, 8, 8, {1, 1, 1});
  auto ref = pred;
  fill_box(pred, {0, 0, 0}, {4, 4, 4}, 1);  // 64 voxels
  fill_box(ref, {2, 0, 0}, {6, 4, 2}, 1);   // 32 voxels, overlap x 2..3, z 0..1: 2*4*2 = 16
  const auto m = evaluate_case(pred, ref, {1});
  ASSERT_EQ(m.size(), 1u);
  EXPECT_EQ(m[0].pred_voxels, 64);
  EXPECT_EQ(m[0].ref_voxels, 32);
  EXPECT_DOUBLE_EQ(m[0].dice, 2.0 * 16 / 96);
  EXPECT_DOUBLE_EQ(m[0].iou, 16.0 / 80);
}

// A = the 4x4x4 cube [2,6)^3, B = A shifted by one slice along z; spacing 0.8 x 0.8 x 2.5 mm.
// Surfaces have 56 voxels each. A -> B: A's bottom slice z=2 (16 voxels) is one slice below B: 2.5
// mm; A's top slice z=5 has 4 voxels inside B's interior column whose nearest B surface is one
// voxel away in-plane: 0.8 mm; the other 36 are on B's surface: 0. B -> A mirrors this.
// HD95: sorted A->B = 36 x 0, 4 x 0.8, 16 x 2.5; position 0.95 * 55 = 52.25 lies among the 2.5s.
// MSD = (2 * (16 * 2.5 + 4 * 0.8)) / 112 = 86.4 / 112. Dice = 2 * 48 / 128, IoU = 48 / 80.
TEST(Metrics, ShiftedCubeWithAnisotropicSpacing) {
  auto pred = blank(9, 9, 9, {0.8, 0.8, 2.5});
  auto ref = pred;
  fill_box(pred, {2, 2, 2}, {6, 6, 6}, 3);
  fill_box(ref, {2, 2, 3}, {6, 6, 7}, 3);
  const auto m = evaluate_case(pred, ref, {3});
  EXPECT_DOUBLE_EQ(m[0].dice, 0.75);
  EXPECT_DOUBLE_EQ(m[0].iou, 0.6);
  // sqrt of exactly representable squares; the EDT adds squared spacings: a few ulps.
  EXPECT_NEAR(m[0].hd95, 2.5, 1e-12);
  EXPECT_NEAR(m[0].msd, 86.4 / 112, 1e-12);
}

// An outlier voxel 10 slices away: the Hausdorff distance would be 25 mm, HD95 ignores it.
// ref -> pred: 57 surface voxels (56 + the outlier); 0.95 * 56 = 53.2 lies among the zeros.
TEST(Metrics, Hd95IgnoresASingleOutlierButMsdCountsIt) {
  auto pred = blank(8, 8, 16, {0.8, 0.8, 2.5});
  auto ref = pred;
  fill_box(pred, {2, 2, 2}, {6, 6, 6}, 1);
  fill_box(ref, {2, 2, 2}, {6, 6, 6}, 1);
  fill_box(ref, {3, 3, 15}, {4, 4, 16}, 1);
  const auto m = evaluate_case(pred, ref, {1});
  EXPECT_DOUBLE_EQ(m[0].hd95, 0.0);
  // Nearest pred surface voxel to (3,3,15) is (3,3,5): 10 slices of 2.5 mm.
  EXPECT_NEAR(m[0].msd, 25.0 / 113, 1e-12);
  EXPECT_DOUBLE_EQ(m[0].dice, 128.0 / 129);
}

TEST(Metrics, EmptyCasesHaveDefinedValues) {
  auto pred = blank(5, 5, 5, {1, 1, 1});
  auto ref = pred;
  fill_box(ref, {1, 1, 1}, {3, 3, 3}, 2);
  const auto m = evaluate_case(pred, ref, {1, 2});
  // Label 1 absent from both: perfect.
  EXPECT_EQ(m[0].dice, 1.0);
  EXPECT_EQ(m[0].iou, 1.0);
  EXPECT_EQ(m[0].hd95, 0.0);
  EXPECT_EQ(m[0].msd, 0.0);
  // Label 2 missed entirely: overlap 0, distances undefined.
  EXPECT_EQ(m[1].dice, 0.0);
  EXPECT_EQ(m[1].iou, 0.0);
  EXPECT_TRUE(std::isnan(m[1].hd95));
  EXPECT_TRUE(std::isnan(m[1].msd));
  EXPECT_EQ(m[1].ref_voxels, 8);
  const auto swapped = evaluate_case(ref, pred, {2});
  EXPECT_EQ(swapped[0].dice, 0.0);
  EXPECT_TRUE(std::isnan(swapped[0].hd95));
}

TEST(Metrics, DifferentSizesAreRejected) {
  EXPECT_THROW(evaluate_case(blank(4, 4, 4, {1, 1, 1}), blank(4, 4, 5, {1, 1, 1}), {1}),
               ArgumentError);
}

TEST(DistanceTransform, MatchesBruteForceWithAnisotropicSpacing) {
  const std::array<int64_t, 3> n{9, 7, 6};
  const std::array<double, 3> sp{0.7, 1.3, 2.9};
  Rng rng(5);
  std::vector<uint8_t> f(static_cast<size_t>(n[0] * n[1] * n[2]));
  for (auto& v : f) v = rng.bernoulli(0.04);
  f[17] = 1;  // at least one feature
  const auto d = squared_distance_transform(f, n, sp);
  for (int64_t z = 0; z < n[2]; ++z)
    for (int64_t y = 0; y < n[1]; ++y)
      for (int64_t x = 0; x < n[0]; ++x) {
        double best = INFINITY;
        for (int64_t fz = 0; fz < n[2]; ++fz)
          for (int64_t fy = 0; fy < n[1]; ++fy)
            for (int64_t fx = 0; fx < n[0]; ++fx)
              if (f[static_cast<size_t>((fz * n[1] + fy) * n[0] + fx)]) {
                const double dx = (x - fx) * sp[0], dy = (y - fy) * sp[1], dz = (z - fz) * sp[2];
                best = std::min(best, dx * dx + dy * dy + dz * dz);
              }
        // Same sums of the same squares, grouped differently: relative rounding ~1e-15.
        ASSERT_NEAR(d[static_cast<size_t>((z * n[1] + y) * n[0] + x)], best, 1e-9 * (1 + best))
            << "voxel (" << x << "," << y << "," << z << ")";
      }
}

TEST(DistanceTransform, NoFeaturesIsInfinite) {
  const auto d = squared_distance_transform(std::vector<uint8_t>(8, 0), {2, 2, 2}, {1, 1, 1});
  for (double v : d) EXPECT_TRUE(std::isinf(v));
}

TEST(Percentile, InterpolatesLinearlyLikeNumpy) {
  EXPECT_DOUBLE_EQ(percentile({1, 2, 3, 4}, 50), 2.5);
  EXPECT_DOUBLE_EQ(percentile({4, 1, 3, 2}, 95), 3.85);  // 0.95 * 3 = 2.85 -> 3 + 0.85
  EXPECT_DOUBLE_EQ(percentile({7}, 95), 7);
  EXPECT_TRUE(std::isnan(percentile({}, 95)));
}

TEST(Postprocess, KeepLargestComponentUsesFaceConnectivity) {
  auto m = blank(6, 6, 6, {1, 1, 1});
  fill_box(m, {0, 0, 0}, {3, 3, 3}, 1);  // 27 voxels
  fill_box(m, {3, 3, 3}, {5, 5, 5}, 1);  // 8 voxels touching the first only at a corner
  fill_box(m, {5, 0, 0}, {6, 1, 1}, 2);  // another label: untouched
  const int64_t removed = keep_largest_component(m, 1);
  EXPECT_EQ(removed, 8);
  int64_t ones = 0, twos = 0;
  for (auto v : m.data) ones += v == 1, twos += v == 2;
  EXPECT_EQ(ones, 27);
  EXPECT_EQ(twos, 1);
  EXPECT_EQ(m.at(4, 4, 4), 0);
}

TEST(Postprocess, ArgmaxPicksTheMostProbableClassAndTiesGoLow) {
  const std::vector<float> p = {0.2f, 0.5f, 0.3f, 0.4f, 0.4f, 0.2f, 0.1f, 0.1f, 0.8f};
  EXPECT_EQ(argmax_labels(p, 3, 3), std::vector<uint16_t>({1, 0, 2}));
  EXPECT_THROW(argmax_labels(p, 2, 3), ArgumentError);
}

}  // namespace
}  // namespace medseg::infer
