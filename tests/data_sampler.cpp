// Patch sampling: where patches land, border padding, forced foreground and its share in batches.
#include <gtest/gtest.h>

#include <cmath>

#include "core/error.hpp"
#include "data/loader.hpp"
#include "data/sampler.hpp"
#include "support/synthetic_case.hpp"

using namespace medseg;
using namespace medseg::data;
using medseg::test::in_box;
using medseg::test::make_case;

namespace {

test::OwnedCase plain_case(std::array<int64_t, 3> shape, int channels = 1) {
  return make_case(
      "plain", shape, channels,
      [&](int64_t z, int64_t y, int64_t x, int c) {
        return static_cast<float>(((z * shape[1] + y) * shape[2] + x) * channels + c + 1);
      },
      [](int64_t, int64_t, int64_t) { return uint16_t{0}; });
}

bool contains_label(const std::vector<uint16_t>& labels, uint16_t value) {
  for (uint16_t l : labels)
    if (l == value) return true;
  return false;
}

}  // namespace

TEST(Sampler, RandomCentresCoverTheWholeCaseByDefault) {
  const auto c = plain_case({20, 30, 40});
  const CaseView v = c.view();
  SamplerConfig cfg;
  cfg.patch = {16, 16, 16};
  Rng rng(11);
  std::array<int64_t, 3> lo{1 << 20, 1 << 20, 1 << 20}, hi{-1, -1, -1};
  for (int i = 0; i < 4000; ++i) {
    const auto centre = choose_patch_centre(v, cfg, false, rng);
    for (int a = 0; a < 3; ++a) {
      ASSERT_GE(centre[a], 0) << "draw " << i << " axis " << a;
      ASSERT_LT(centre[a], v.shape[a]) << "draw " << i << " axis " << a;
      lo[a] = std::min(lo[a], centre[a]);
      hi[a] = std::max(hi[a], centre[a]);
    }
  }
  // 4000 uniform draws over at most 40 values miss an end with probability < 40 * (39/40)^4000.
  for (int a = 0; a < 3; ++a) {
    EXPECT_EQ(lo[a], 0) << "axis " << a;
    EXPECT_EQ(hi[a], v.shape[a] - 1) << "axis " << a;
  }
}

TEST(Sampler, NoOverhangKeepsPatchesInsideOrCentred) {
  // Axis z (10) is smaller than the patch (16): centred, origin floor((10 - 16) / 2) = -3. Axes y,
  // x are larger: the patch stays inside.
  const auto c = plain_case({10, 30, 17});
  const CaseView v = c.view();
  SamplerConfig cfg;
  cfg.patch = {16, 16, 16};
  cfg.max_overhang = 0.0;
  Rng rng(5);
  std::array<int64_t, 3> lo{1 << 20, 1 << 20, 1 << 20}, hi{-(1 << 20), -(1 << 20), -(1 << 20)};
  for (int i = 0; i < 2000; ++i) {
    const auto centre = choose_patch_centre(v, cfg, false, rng);
    for (int a = 0; a < 3; ++a) {
      const int64_t origin = centre[a] - cfg.patch[a] / 2;
      lo[a] = std::min(lo[a], origin);
      hi[a] = std::max(hi[a], origin);
    }
  }
  EXPECT_EQ(lo[0], -3);
  EXPECT_EQ(hi[0], -3);
  EXPECT_EQ(lo[1], 0);
  EXPECT_EQ(hi[1], 30 - 16);
  EXPECT_EQ(lo[2], 0);
  EXPECT_EQ(hi[2], 17 - 16);
}

TEST(Sampler, CornerPatchOfSmallCaseIsZeroBeyondTheBorder) {
  const std::array<int64_t, 3> shape{5, 6, 7};
  auto c = make_case(
      "small", shape, 2,
      [&](int64_t z, int64_t y, int64_t x, int ch) {
        return static_cast<float>(100 * z + 10 * y + x + 1000 * ch + 1);
      },
      [](int64_t z, int64_t y, int64_t x) { return static_cast<uint16_t>(1 + (z + y + x) % 3); });
  const CaseView v = c.view();
  const std::array<int64_t, 3> patch{8, 8, 8};
  for (const std::array<int64_t, 3> origin :
       {std::array<int64_t, 3>{-3, -2, -4}, std::array<int64_t, 3>{2, 3, 4},
        std::array<int64_t, 3>{-9, 0, 0}}) {
    std::vector<float> img(8 * 8 * 8 * 2, -7.f);  // garbage: everything must be assigned
    std::vector<uint16_t> lab(8 * 8 * 8, 77);
    extract_patch(v, origin, patch, img.data(), lab.data());
    for (int64_t z = 0; z < 8; ++z)
      for (int64_t y = 0; y < 8; ++y)
        for (int64_t x = 0; x < 8; ++x) {
          const int64_t sz = origin[0] + z, sy = origin[1] + y, sx = origin[2] + x;
          const bool inside = in_box(sz, sy, sx, {0, 0, 0}, shape);
          const int64_t o = (z * 8 + y) * 8 + x;
          const uint16_t want_label =
              inside ? c.labels[static_cast<size_t>((sz * 6 + sy) * 7 + sx)] : uint16_t{0};
          ASSERT_EQ(lab[static_cast<size_t>(o)], want_label) << "at " << z << "," << y << "," << x;
          for (int ch = 0; ch < 2; ++ch) {
            const float want =
                inside ? static_cast<float>(100 * sz + 10 * sy + sx + 1000 * ch + 1) : 0.f;
            ASSERT_EQ(img[static_cast<size_t>(o * 2 + ch)], want)
                << "origin " << origin[0] << "," << origin[1] << "," << origin[2] << " at " << z
                << "," << y << "," << x << " channel " << ch;
          }
        }
  }
}

TEST(Sampler, ForcedDrawsContainForeground) {
  // One 3x3x3 blob of class 2 near a corner of a 40^3 case, so random draws often miss it. With
  // rotation and scaling always drawn, the blob still must be in the patch: its centre stays within
  // |jitter| / 0.7 of the patch centre, and a 3-voxel cube always holds a point of the sampling
  // grid (grid spacing <= 1.4 voxels, so its cells' diagonal 2.42 < 3).
  const std::array<int64_t, 3> blob_lo{3, 30, 5}, blob_hi{6, 33, 8};
  auto c = make_case(
      "blob", {40, 40, 40}, 1,
      [&](int64_t z, int64_t y, int64_t x, int) {
        return in_box(z, y, x, blob_lo, blob_hi) ? 2.f : 0.f;
      },
      [&](int64_t z, int64_t y, int64_t x) {
        return in_box(z, y, x, blob_lo, blob_hi) ? uint16_t{2} : uint16_t{0};
      });
  const CaseView v = c.view();
  SamplerConfig cfg;
  cfg.patch = {24, 24, 24};
  AugmentConfig spatial_always;
  spatial_always.p_rotation = 1.0;
  spatial_always.p_scaling = 1.0;
  int random_hits = 0;
  for (const AugmentConfig& aug : {AugmentConfig::none(), AugmentConfig(), spatial_always}) {
    Rng rng(21);
    std::vector<float> img(24 * 24 * 24);
    std::vector<uint16_t> lab(24 * 24 * 24);
    for (int i = 0; i < 300; ++i) {
      sample_augmented_patch(v, cfg, aug, true, rng, img.data(), lab.data());
      ASSERT_TRUE(contains_label(lab, 2)) << "forced draw " << i << " has no foreground";
      sample_augmented_patch(v, cfg, aug, false, rng, img.data(), lab.data());
      random_hits += contains_label(lab, 2);
    }
  }
  // The blob is small and off-centre: random draws must miss it often, else the test proves
  // nothing.
  EXPECT_LT(random_hits, 3 * 300 / 2) << "random draws hit the blob too often to test forcing";
}

TEST(Sampler, ForcedDrawWithoutForegroundFallsBackToRandom) {
  const auto c = plain_case({12, 12, 12});
  CaseView v = c.view();
  SamplerConfig cfg;
  cfg.patch = {8, 8, 8};
  Rng a(3), b(3);
  // No class present: a forced draw must consume exactly what a random draw does.
  for (int i = 0; i < 50; ++i)
    EXPECT_EQ(choose_patch_centre(v, cfg, true, a), choose_patch_centre(v, cfg, false, b));
  v.class_locations = nullptr;
  EXPECT_NO_THROW(choose_patch_centre(v, cfg, true, a));
}

TEST(Sampler, LocationOutsideTheCaseThrowsNamingTheCase) {
  auto c = plain_case({12, 12, 12});
  c.id = "case_with_bad_locations";
  c.locations = {{}, {{3, 40, 2}}};
  SamplerConfig cfg;
  cfg.patch = {8, 8, 8};
  Rng rng(1);
  try {
    choose_patch_centre(c.view(), cfg, true, rng);
    FAIL() << "no throw";
  } catch (const ArgumentError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("case_with_bad_locations"), std::string::npos) << m;
    EXPECT_NE(m.find("(3, 40, 2)"), std::string::npos) << m;
  }
}

TEST(Sampler, ForcedPlanFollowsNnUNetAndIsProbabilisticForBatchOne) {
  Rng rng(1);
  EXPECT_EQ(forced_foreground_plan(2, 0.33, rng), (std::vector<bool>{false, true}));
  EXPECT_EQ(forced_foreground_plan(3, 0.33, rng), (std::vector<bool>{false, false, true}));
  EXPECT_EQ(forced_foreground_plan(4, 0.33, rng), (std::vector<bool>{false, false, false, true}));
  EXPECT_EQ(forced_foreground_plan(2, 0.0, rng), (std::vector<bool>{false, false}));
  EXPECT_EQ(forced_foreground_plan(2, 1.0, rng), (std::vector<bool>{true, true}));
  // Batch 1 at 0.33: forced with probability 0.33. Binomial(20000, 0.33): sd = 0.0033; 5 sd =
  // 0.017.
  int forced = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) forced += forced_foreground_plan(1, 0.33, rng)[0];
  EXPECT_NEAR(static_cast<double>(forced) / n, 0.33, 0.017);
  EXPECT_THROW(forced_foreground_plan(0, 0.33, rng), ArgumentError);
  EXPECT_THROW(forced_foreground_plan(2, 1.5, rng), ArgumentError);
}

TEST(Sampler, ForegroundShareOfBatchesMatchesTheRule) {
  // One foreground voxel at v. Without augmentation a random patch (centre uniform over the case)
  // contains v iff its centre lies in (v - P + h, v + h] on every axis, so the chance p0 is exact.
  const std::array<int64_t, 3> shape{30, 36, 40}, fg{4, 20, 33};
  auto c = make_case(
      "one_voxel", shape, 1, [](int64_t, int64_t, int64_t, int) { return 0.f; },
      [&](int64_t z, int64_t y, int64_t x) {
        return (z == fg[0] && y == fg[1] && x == fg[2]) ? uint16_t{1} : uint16_t{0};
      });
  SamplerConfig cfg;
  cfg.patch = {12, 16, 16};
  double p0 = 1.0;
  for (int a = 0; a < 3; ++a) {
    const int64_t h = cfg.patch[a] / 2;
    const int64_t lo = std::max<int64_t>(0, fg[a] - cfg.patch[a] + h + 1);
    const int64_t hi = std::min<int64_t>(shape[a] - 1, fg[a] + h);
    p0 *= static_cast<double>(hi - lo + 1) / static_cast<double>(shape[a]);
  }
  const std::vector<CaseView> cases{c.view()};
  const int batches = 3000;
  // Batch 1: forced with probability f, else random: share f + (1 - f) p0.
  // Batch 2: sample 1 forced always, sample 0 random: shares p0 and 1.
  int hits1 = 0, hits2_first = 0, hits2_second = 0;
  const int64_t voxels = cfg.patch[0] * cfg.patch[1] * cfg.patch[2];
  for (int k = 0; k < batches; ++k) {
    const Batch b1 = make_batch(cases, cfg, AugmentConfig::none(), 1, 99, static_cast<uint64_t>(k));
    hits1 += contains_label(b1.labels, 1);
    const Batch b2 = make_batch(cases, cfg, AugmentConfig::none(), 2, 99, static_cast<uint64_t>(k));
    const std::vector<uint16_t> first(b2.labels.begin(), b2.labels.begin() + voxels);
    const std::vector<uint16_t> second(b2.labels.begin() + voxels, b2.labels.end());
    hits2_first += contains_label(first, 1);
    hits2_second += contains_label(second, 1);
  }
  const double f = cfg.foreground_fraction;
  const double want1 = f + (1 - f) * p0;
  // 5 binomial standard deviations: a false failure has probability < 1e-6 per check.
  const double tol1 = 5 * std::sqrt(want1 * (1 - want1) / batches);
  const double tol0 = 5 * std::sqrt(p0 * (1 - p0) / batches);
  EXPECT_NEAR(static_cast<double>(hits1) / batches, want1, tol1) << "p0 " << p0;
  EXPECT_NEAR(static_cast<double>(hits2_first) / batches, p0, tol0);
  EXPECT_EQ(hits2_second, batches);
}
