// Augmentation: spatial transforms keep image and labels aligned; intensity transforms do what they
// claim, never touch labels and keep values finite.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "core/error.hpp"
#include "data/augment.hpp"
#include "data/loader.hpp"
#include "data/sampler.hpp"
#include "support/synthetic_case.hpp"

using namespace medseg;
using namespace medseg::data;
using medseg::test::in_box;
using medseg::test::make_case;

namespace {

AugmentConfig only_spatial(bool mirror, bool rotation, bool scaling) {
  AugmentConfig a;
  a.mirror = mirror;
  a.p_mirror_per_axis = 1.0;
  a.rotation = rotation;
  a.p_rotation = 1.0;
  a.scaling = scaling;
  a.p_scaling = 1.0;
  a.noise = a.blur = a.brightness = a.contrast = a.low_resolution = a.gamma = a.gamma_inverted =
      false;
  return a;
}

// A labelled box whose image intensity equals its label (1 inside, 0 outside).
test::OwnedCase box_case(std::array<int64_t, 3> shape, std::array<int64_t, 3> lo,
                         std::array<int64_t, 3> hi) {
  return make_case(
      "box", shape, 1,
      [=](int64_t z, int64_t y, int64_t x, int) { return in_box(z, y, x, lo, hi) ? 1.f : 0.f; },
      [=](int64_t z, int64_t y, int64_t x) {
        return in_box(z, y, x, lo, hi) ? uint16_t{1} : uint16_t{0};
      });
}

std::vector<float> random_image(int64_t n, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<float>(rng.normal());
  return v;
}

bool all_finite(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i])) return false;
  return true;
}

}  // namespace

TEST(SpatialAugment, ResamplingWithIdentityEqualsTheCopy) {
  // The two paths (copy and interpolation) must agree exactly where the transform is the identity,
  // including the zero padding beyond the border.
  auto c = make_case(
      "ramp", {9, 10, 11}, 2,
      [](int64_t z, int64_t y, int64_t x, int ch) {
        return static_cast<float>(z * 7 - y * 3 + x + ch);
      },
      [](int64_t z, int64_t y, int64_t x) {
        return static_cast<uint16_t>((z + 2 * y + 3 * x) % 4);
      });
  const CaseView v = c.view();
  const std::array<int64_t, 3> patch{8, 12, 6};
  SpatialDraw identity;
  identity.affine = true;
  for (const std::array<int64_t, 3> centre :
       {std::array<int64_t, 3>{0, 0, 0}, std::array<int64_t, 3>{4, 5, 5},
        std::array<int64_t, 3>{8, 9, 10}}) {
    std::vector<float> a(8 * 12 * 6 * 2), b(a.size(), -1.f);
    std::vector<uint16_t> la(8 * 12 * 6), lb(la.size(), 99);
    extract_patch(v, {centre[0] - 4, centre[1] - 6, centre[2] - 3}, patch, a.data(), la.data());
    resample_patch(v, centre, patch, identity, b.data(), lb.data());
    for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(a[i], b[i]) << "value " << i;
    for (size_t i = 0; i < la.size(); ++i) ASSERT_EQ(la[i], lb[i]) << "label " << i;
  }
}

TEST(SpatialAugment, MatrixConventionReadsCentrePlusMatrixTimesOffset) {
  // Exact matrices: zoom out 2x, and 180 degrees about z (y and x negated).
  const std::array<int64_t, 3> shape{30, 30, 30};
  auto c = make_case(
      "index", shape, 1,
      [](int64_t z, int64_t y, int64_t x, int) { return static_cast<float>(z * 900 + y * 30 + x); },
      [](int64_t z, int64_t y, int64_t x) { return static_cast<uint16_t>(z * 900 + y * 30 + x); });
  const CaseView v = c.view();
  const std::array<int64_t, 3> patch{6, 8, 10}, centre{15, 14, 13};
  SpatialDraw zoom, turn;
  zoom.affine = turn.affine = true;
  zoom.matrix = {2, 0, 0, 0, 2, 0, 0, 0, 2};
  turn.matrix = {1, 0, 0, 0, -1, 0, 0, 0, -1};
  for (const SpatialDraw& d : {zoom, turn}) {
    std::vector<float> img(6 * 8 * 10);
    std::vector<uint16_t> lab(img.size());
    resample_patch(v, centre, patch, d, img.data(), lab.data());
    for (int64_t z = 0; z < 6; ++z)
      for (int64_t y = 0; y < 8; ++y)
        for (int64_t x = 0; x < 10; ++x) {
          const int64_t o[3] = {z - 3, y - 4, x - 5};
          int64_t s[3];
          for (int r = 0; r < 3; ++r)
            s[r] = centre[r] + static_cast<int64_t>(d.matrix[r * 3 + 0]) * o[0] +
                   static_cast<int64_t>(d.matrix[r * 3 + 1]) * o[1] +
                   static_cast<int64_t>(d.matrix[r * 3 + 2]) * o[2];
          const int64_t want = s[0] * 900 + s[1] * 30 + s[2];
          const size_t i = static_cast<size_t>((z * 8 + y) * 10 + x);
          ASSERT_EQ(img[i], static_cast<float>(want)) << "at " << z << "," << y << "," << x;
          ASSERT_EQ(lab[i], static_cast<uint16_t>(want)) << "at " << z << "," << y << "," << x;
        }
  }
}

TEST(SpatialAugment, MirroringIsAnExactFlip) {
  const std::array<int64_t, 3> patch{5, 6, 7};
  const int C = 3;
  const int64_t n = 5 * 6 * 7;
  const std::vector<float> img = random_image(n * C, 4);
  std::vector<uint16_t> lab(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) lab[static_cast<size_t>(i)] = static_cast<uint16_t>(i);
  for (int mask = 1; mask < 8; ++mask) {
    const std::array<bool, 3> axes{(mask & 4) != 0, (mask & 2) != 0, (mask & 1) != 0};
    std::vector<float> m = img;
    std::vector<uint16_t> ml = lab;
    mirror_patch(axes, patch, C, m.data(), ml.data());
    for (int64_t z = 0; z < 5; ++z)
      for (int64_t y = 0; y < 6; ++y)
        for (int64_t x = 0; x < 7; ++x) {
          const int64_t sz = axes[0] ? 4 - z : z, sy = axes[1] ? 5 - y : y,
                        sx = axes[2] ? 6 - x : x;
          const int64_t o = (z * 6 + y) * 7 + x, s = (sz * 6 + sy) * 7 + sx;
          ASSERT_EQ(ml[static_cast<size_t>(o)], lab[static_cast<size_t>(s)]) << "mask " << mask;
          for (int ch = 0; ch < C; ++ch)
            ASSERT_EQ(m[static_cast<size_t>(o * C + ch)], img[static_cast<size_t>(s * C + ch)])
                << "mask " << mask << " at " << z << "," << y << "," << x << " channel " << ch;
        }
  }
}

TEST(SpatialAugment, MirroredPatchesKeepImageAndLabelsIdentical) {
  // Image == label everywhere: mirroring (exact) must keep them equal voxel for voxel.
  const auto c = box_case({30, 30, 30}, {5, 8, 11}, {19, 17, 26});
  const CaseView v = c.view();
  SamplerConfig cfg;
  cfg.patch = {16, 20, 24};
  const AugmentConfig aug = only_spatial(true, false, false);
  Rng rng(8);
  std::vector<float> img(16 * 20 * 24);
  std::vector<uint16_t> lab(img.size());
  for (int i = 0; i < 40; ++i) {
    sample_augmented_patch(v, cfg, aug, i % 2 == 1, rng, img.data(), lab.data());
    for (size_t k = 0; k < img.size(); ++k)
      ASSERT_EQ(img[k], static_cast<float>(lab[k])) << "draw " << i << " voxel " << k;
  }
}

TEST(SpatialAugment, RotationAndScalingKeepLabelsWhereTheImageIsHigh) {
  // Box of 16 x 18 x 14 voxels with image == label. The image is interpolated trilinearly, the
  // labels by nearest neighbour. Along one axis trilinear > 0.5 exactly when the nearest voxel is
  // inside, so they can only disagree where the source point is within half a voxel of two faces at
  // once and the product of the two partial coverages drops to 0.5: a band of cross-section 0.5 ln
  // 2 - 0.25 = 0.097 voxel^2 along the 12 edges (192 voxels long): about 19 voxels, against ~3000
  // voxels on the label boundary (0.6%). Allowed: every disagreeing voxel touches
  // (26-neighbourhood) a voxel of the other label, and at most 3% of the boundary voxels disagree
  // (5x margin for zoomed-in, partial views; measured worst 1.2% over 2000 draws with rotation and
  // scaling both drawn).
  const auto c = box_case({48, 48, 48}, {16, 15, 17}, {32, 33, 31});
  const CaseView v = c.view();
  SamplerConfig cfg;
  cfg.patch = {28, 28, 28};
  const int64_t D = 28, H = 28, W = 28;
  int changed = 0;
  for (const AugmentConfig& aug :
       {only_spatial(false, true, false), only_spatial(false, false, true),
        only_spatial(true, true, true)}) {
    Rng rng(31);
    std::vector<float> img(static_cast<size_t>(D * H * W));
    std::vector<uint16_t> lab(img.size());
    std::vector<float> plain_img(img.size());
    std::vector<uint16_t> plain_lab(img.size());
    for (int i = 0; i < 12; ++i) {
      // The centre is drawn before the transform: a copy of the generator reproduces it
      // untransformed.
      Rng same_centre = rng;
      sample_augmented_patch(v, cfg, aug, true, rng, img.data(), lab.data());
      sample_augmented_patch(v, cfg, AugmentConfig::none(), true, same_centre, plain_img.data(),
                             plain_lab.data());
      changed += lab != plain_lab;
      auto at = [&](int64_t z, int64_t y, int64_t x) {
        return lab[static_cast<size_t>((z * H + y) * W + x)];
      };
      int64_t labelled = 0, disagree = 0, boundary = 0;
      for (int64_t z = 0; z < D; ++z)
        for (int64_t y = 0; y < H; ++y)
          for (int64_t x = 0; x < W; ++x) {
            const size_t k = static_cast<size_t>((z * H + y) * W + x);
            ASSERT_TRUE(std::isfinite(img[k]));
            ASSERT_GE(img[k], -1e-6f);       // trilinear weights are convex: values stay in [0, 1]
            ASSERT_LE(img[k], 1.f + 1e-6f);  // (1e-6: float rounding of the 8 weights)
            labelled += lab[k];
            bool touches_other = false;
            for (int dz = -1; dz <= 1; ++dz)
              for (int dy = -1; dy <= 1; ++dy)
                for (int dx = -1; dx <= 1; ++dx) {
                  const int64_t nz = z + dz, ny = y + dy, nx = x + dx;
                  if (!in_box(nz, ny, nx, {0, 0, 0}, {D, H, W})) continue;
                  touches_other |= at(nz, ny, nx) != lab[k];
                }
            boundary += touches_other;
            if ((img[k] > 0.5f) == (lab[k] == 1)) continue;
            ++disagree;
            ASSERT_TRUE(touches_other)
                << "draw " << i << ": image " << img[k] << " label " << lab[k] << " at " << z << ","
                << y << "," << x << " away from the label boundary";
          }
      ASSERT_GT(labelled, 0) << "draw " << i;
      EXPECT_LE(static_cast<double>(disagree), 0.03 * static_cast<double>(boundary))
          << "draw " << i << ": " << disagree << " of " << boundary << " boundary voxels disagree";
    }
  }
  EXPECT_GT(changed, 20) << "the spatial transforms hardly changed any patch";
}

TEST(SpatialAugment, DrawFollowsSwitchesAndAnisotropy) {
  AugmentConfig a = only_spatial(false, true, false);
  Rng rng(2);
  for (int i = 0; i < 100; ++i) {
    const SpatialDraw d = draw_spatial(a, {12, 160, 160}, rng);  // anisotropic: about z only
    ASSERT_TRUE(d.affine);
    EXPECT_EQ(d.angles_rad[1], 0.0);
    EXPECT_EQ(d.angles_rad[2], 0.0);
    EXPECT_LE(std::abs(d.angles_rad[0]), 30.0 * M_PI / 180.0);
    EXPECT_EQ(d.scale, 1.0);
    // The matrix must be a rotation: orthonormal rows.
    for (int r = 0; r < 3; ++r)
      for (int s = 0; s < 3; ++s) {
        double dot = 0;
        for (int k = 0; k < 3; ++k) dot += d.matrix[r * 3 + k] * d.matrix[s * 3 + k];
        EXPECT_NEAR(dot, r == s ? 1.0 : 0.0, 1e-12);  // double rounding of sin/cos products
      }
  }
  int nonzero_y = 0;
  for (int i = 0; i < 100; ++i) nonzero_y += draw_spatial(a, {64, 64, 64}, rng).angles_rad[1] != 0;
  EXPECT_EQ(nonzero_y, 100);
  // Nothing drawn when disabled; mirroring respects its axes.
  EXPECT_FALSE(draw_spatial(AugmentConfig::none(), {8, 8, 8}, rng).affine);
  AugmentConfig m = only_spatial(true, false, false);
  m.mirror_axes = {false, true, false};
  const SpatialDraw dm = draw_spatial(m, {8, 8, 8}, rng);
  EXPECT_FALSE(dm.affine);
  EXPECT_EQ(dm.mirror, (std::array<bool, 3>{false, true, false}));
  // Default probabilities: rotation 0.2, scaling 0.2 -> affine in 1 - 0.8^2 = 36% of draws.
  // Binomial(20000, 0.36): sd 0.0034, 5 sd = 0.017.
  int affine = 0;
  for (int i = 0; i < 20000; ++i) affine += draw_spatial(AugmentConfig(), {64, 64, 64}, rng).affine;
  EXPECT_NEAR(affine / 20000.0, 0.36, 0.017);
}

TEST(IntensityAugment, LeavesLabelsUntouchedAndValuesFinite) {
  // Every intensity transform forced on (p = 1), spatial ones off: the labels must be exactly those
  // of the unaugmented batch (the same centres are drawn), the image finite and changed.
  auto c = make_case(
      "mr", {24, 26, 28}, 2,
      [](int64_t z, int64_t y, int64_t x, int ch) {
        return static_cast<float>(std::sin(0.3 * z + ch) * 3 + 0.1 * y - 0.05 * x);
      },
      [](int64_t z, int64_t y, int64_t x) {
        return static_cast<uint16_t>((z / 6 + y / 7 + x / 9) % 3);
      });
  const std::vector<CaseView> cases{c.view()};
  SamplerConfig cfg;
  cfg.patch = {16, 16, 16};
  AugmentConfig all = only_spatial(false, false, false);
  all.noise = all.blur = all.brightness = all.contrast = all.low_resolution = all.gamma =
      all.gamma_inverted = true;
  all.p_noise = all.p_blur = all.p_blur_per_channel = all.p_brightness = all.p_contrast =
      all.p_low_resolution = all.p_low_resolution_per_channel = all.p_gamma = all.p_gamma_inverted =
          1.0;
  AugmentConfig spatial_off_only = only_spatial(false, false, false);
  for (uint64_t k = 0; k < 20; ++k) {
    const Batch plain = make_batch(cases, cfg, spatial_off_only, 2, 5, k);
    const Batch aug = make_batch(cases, cfg, all, 2, 5, k);
    ASSERT_EQ(plain.labels, aug.labels) << "batch " << k;
    ASSERT_TRUE(all_finite(aug.image.data(), aug.image.numel())) << "batch " << k;
    int64_t differ = 0;
    for (int64_t i = 0; i < aug.image.numel(); ++i)
      differ += aug.image.data()[i] != plain.image.data()[i];
    EXPECT_GT(differ, aug.image.numel() / 2) << "batch " << k;
  }
}

TEST(IntensityAugment, ConstantPatchSurvivesEveryTransformFinite) {
  // A constant patch is the degenerate case for contrast, gamma and noise normalisation.
  AugmentConfig all;
  all.p_noise = all.p_blur = all.p_blur_per_channel = all.p_brightness = all.p_contrast =
      all.p_low_resolution = all.p_low_resolution_per_channel = all.p_gamma = all.p_gamma_inverted =
          1.0;
  all.noise = false;  // keeps the patch constant through the other transforms
  Rng rng(9);
  std::vector<float> img(10 * 12 * 14, 2.5f);
  augment_intensity(all, rng, img.data(), {10, 12, 14}, 1);
  ASSERT_TRUE(all_finite(img.data(), static_cast<int64_t>(img.size())));
  const auto [mn, mx] = std::minmax_element(img.begin(), img.end());
  // Every transform maps a constant patch to a constant one; blur and resampling average equal
  // values with weights summing to 1 up to float rounding (1e-5 relative).
  EXPECT_NEAR(*mn, *mx, 1e-5f * std::abs(*mx));
}

TEST(IntensityAugment, BlurMatchesTheSampledGaussianSpread) {
  const std::array<int64_t, 3> shape{21, 21, 21};
  const std::array<double, 3> sigma{0.5, 0.75, 1.0};
  std::vector<float> img(21 * 21 * 21 * 2, 0.f);
  const int64_t centre = (10 * 21 + 10) * 21 + 10;
  img[static_cast<size_t>(centre * 2 + 1)] = 1.f;  // impulse in channel 1 only
  gaussian_blur_channel(img.data(), shape, 2, 1, sigma);
  double sum = 0, m2[3] = {0, 0, 0};
  for (int64_t z = 0; z < 21; ++z)
    for (int64_t y = 0; y < 21; ++y)
      for (int64_t x = 0; x < 21; ++x) {
        const size_t i = static_cast<size_t>((z * 21 + y) * 21 + x);
        ASSERT_EQ(img[i * 2], 0.f) << "channel 0 was blurred";
        const double v = img[i * 2 + 1];
        sum += v;
        m2[0] += v * (z - 10) * (z - 10);
        m2[1] += v * (y - 10) * (y - 10);
        m2[2] += v * (x - 10) * (x - 10);
      }
  EXPECT_NEAR(sum, 1.0, 1e-5);  // float sums of ~7^3 products
  for (int a = 0; a < 3; ++a) {
    // The variance of the Gaussian sampled at integers within 3 sigma, computed independently.
    const int r = static_cast<int>(std::ceil(3 * sigma[a]));
    double n = 0, d = 0;
    for (int i = -r; i <= r; ++i) {
      const double w = std::exp(-0.5 * i * i / (sigma[a] * sigma[a]));
      n += w * i * i;
      d += w;
    }
    EXPECT_NEAR(m2[a] / sum, n / d, 1e-4) << "axis " << a;  // float weights, 1e-6 relative each
  }
}

TEST(IntensityAugment, GammaKeepsOrderMeanAndStd) {
  const int64_t n = 4000;
  for (const bool invert : {false, true}) {
    for (const double g : {0.7, 1.0, 1.5}) {
      std::vector<float> img = random_image(n, 17);
      const std::vector<float> before = img;
      gamma_channel(img.data(), n, 1, 0, g, invert);
      double m0 = 0, m1 = 0, s0 = 0, s1 = 0;
      for (int64_t i = 0; i < n; ++i) {
        m0 += before[static_cast<size_t>(i)];
        m1 += img[static_cast<size_t>(i)];
      }
      m0 /= n;
      m1 /= n;
      for (int64_t i = 0; i < n; ++i) {
        s0 += (before[static_cast<size_t>(i)] - m0) * (before[static_cast<size_t>(i)] - m0);
        s1 += (img[static_cast<size_t>(i)] - m1) * (img[static_cast<size_t>(i)] - m1);
      }
      // float outputs of O(1) values: mean and std reproduce to float rounding (1e-5).
      EXPECT_NEAR(m1, m0, 1e-5) << "gamma " << g << " invert " << invert;
      EXPECT_NEAR(std::sqrt(s1 / n), std::sqrt(s0 / n), 1e-5) << "gamma " << g;
      // Monotone increasing map (inverted too: -(f(-x)) with f increasing).
      for (int64_t i = 1; i < n; ++i) {
        const float a = before[static_cast<size_t>(i - 1)], b = before[static_cast<size_t>(i)];
        if (a < b) {
          ASSERT_LE(img[static_cast<size_t>(i - 1)], img[static_cast<size_t>(i)] + 1e-5f)
              << "order broken at " << i << " gamma " << g;
        }
      }
      if (g == 1.0) {
        // Identity up to the 1e-7 range epsilon and float rounding.
        for (int64_t i = 0; i < n; ++i)
          ASSERT_NEAR(img[static_cast<size_t>(i)], before[static_cast<size_t>(i)], 1e-5);
      }
    }
  }
}

TEST(IntensityAugment, ContrastKeepsTheRangeAndMean) {
  const int64_t n = 3000;
  std::vector<float> img = random_image(n * 2, 23);
  const std::vector<float> before = img;
  contrast_channel(img.data(), n, 2, 0, 1.25);
  contrast_channel(img.data(), n, 2, 1, 0.75);
  for (int ch = 0; ch < 2; ++ch) {
    float lo = before[static_cast<size_t>(ch)], hi = lo;
    double m0 = 0, m1 = 0;
    for (int64_t i = 0; i < n; ++i) {
      lo = std::min(lo, before[static_cast<size_t>(i * 2 + ch)]);
      hi = std::max(hi, before[static_cast<size_t>(i * 2 + ch)]);
      m0 += before[static_cast<size_t>(i * 2 + ch)];
      m1 += img[static_cast<size_t>(i * 2 + ch)];
    }
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_GE(img[static_cast<size_t>(i * 2 + ch)], lo);
      ASSERT_LE(img[static_cast<size_t>(i * 2 + ch)], hi);
    }
    if (ch == 1) {
      // Shrinking about the mean never clips: the mean is kept (float rounding).
      EXPECT_NEAR(m1 / n, m0 / n, 1e-5);
      for (int64_t i = 0; i < n; ++i) {
        const double want = (before[static_cast<size_t>(i * 2 + 1)] - m0 / n) * 0.75 + m0 / n;
        ASSERT_NEAR(img[static_cast<size_t>(i * 2 + 1)], want, 1e-5) << "voxel " << i;
      }
    }
  }
}

TEST(IntensityAugment, LowResolutionIsIdentityAtZoomOneAndStaysInRange) {
  const std::array<int64_t, 3> shape{16, 18, 20};
  const int64_t n = 16 * 18 * 20;
  std::vector<float> img = random_image(n, 3);
  const std::vector<float> before = img;
  simulate_low_resolution_channel(img.data(), shape, 1, 0, {1.0, 1.0, 1.0});
  EXPECT_EQ(img, before);
  simulate_low_resolution_channel(img.data(), shape, 1, 0, {0.5, 0.5, 0.5});
  const auto [lo, hi] = std::minmax_element(before.begin(), before.end());
  int64_t changed = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = img[static_cast<size_t>(i)];
    ASSERT_GE(v, *lo);  // nearest picks and convex interpolation stay within the old range
    ASSERT_LE(v, *hi);
    changed += v != before[static_cast<size_t>(i)];
  }
  EXPECT_GT(changed, n / 2);
  // A piecewise constant image on 2x2x2 blocks is what a 2x lower resolution can represent: the
  // nearest downsample recovers each block, and upsampling a constant region keeps it.
  std::vector<float> blocks(static_cast<size_t>(n));
  for (int64_t z = 0; z < 16; ++z)
    for (int64_t y = 0; y < 18; ++y)
      for (int64_t x = 0; x < 20; ++x)
        blocks[static_cast<size_t>((z * 18 + y) * 20 + x)] = (z / 8) * 1.f;  // two halves in z
  std::vector<float> b = blocks;
  simulate_low_resolution_channel(b.data(), shape, 1, 0, {0.5, 0.5, 0.5});
  for (int64_t z : {0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 13, 14, 15})  // away from the z = 8 step
    for (int64_t y = 0; y < 18; ++y)
      for (int64_t x = 0; x < 20; ++x)
        ASSERT_EQ(b[static_cast<size_t>((z * 18 + y) * 20 + x)],
                  blocks[static_cast<size_t>((z * 18 + y) * 20 + x)])
            << "at " << z << "," << y << "," << x;
}

TEST(IntensityAugment, NoiseHasTheDrawnVariance) {
  const int64_t n = 200000;
  std::vector<float> img(static_cast<size_t>(n), 1.f);
  Rng rng(12);
  add_gaussian_noise(img.data(), n, 0.3, rng);
  double m = 0, s = 0;
  for (float v : img) m += v;
  m /= n;
  for (float v : img) s += (v - m) * (v - m);
  // Standard errors: mean 0.3 / sqrt(n) = 6.7e-4, variance 0.09 * sqrt(2 / n) = 2.8e-4; 5 of each.
  EXPECT_NEAR(m, 1.0, 3.4e-3);
  EXPECT_NEAR(s / n, 0.09, 1.5e-3);
}

// The training presets: "mirror" only flips (never an affine draw, intensities untouched), "full" is
// the default set, "none" draws nothing, anything else is an ArgumentError naming the choices.
TEST(AugmentPresets, MirrorOnlyFlipsAndUnknownNamesAreRefused) {
  const AugmentConfig m = AugmentConfig::preset("mirror");
  Rng rng(4);
  int mirrored = 0;
  for (int i = 0; i < 200; ++i) {
    const SpatialDraw d = draw_spatial(m, {32, 32, 32}, rng);
    EXPECT_FALSE(d.affine);
    mirrored += d.mirror[0] || d.mirror[1] || d.mirror[2];
  }
  EXPECT_GT(mirrored, 150);  // 1 - 0.5^3 = 87.5% of draws flip at least one axis
  std::vector<float> img(4 * 4 * 4);
  for (size_t i = 0; i < img.size(); ++i) img[i] = static_cast<float>(i) * 0.1f - 2.f;
  const auto before = img;
  for (int i = 0; i < 50; ++i) augment_intensity(m, rng, img.data(), {4, 4, 4}, 1);
  EXPECT_EQ(img, before);
  EXPECT_TRUE(AugmentConfig::preset("full").rotation);
  EXPECT_FALSE(AugmentConfig::preset("none").enabled);
  try {
    AugmentConfig::preset("heavy");
    FAIL() << "no exception";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("full, mirror or none"), std::string::npos) << e.what();
  }
}
