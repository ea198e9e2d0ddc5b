#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "data/preprocess.hpp"
#include "io/image_io.hpp"
#include "support/shared_data.hpp"

using namespace medseg;
using namespace medseg::data;
namespace fs = std::filesystem;

namespace {

Plan test_plan(std::array<double, 3> spacing, int classes = 3, int channels = 1) {
  Plan p;
  p.dataset_name = "test";
  p.in_channels = channels;
  for (int c = 0; c < channels; ++c) {
    p.channel_names.push_back("MRI");
    p.normalization.push_back(ChannelNorm{});
  }
  for (int v = 0; v < classes; ++v) {
    std::string name = "class";  // (not "c" + to_string: g++ 12 warns falsely, -Wrestrict)
    name += std::to_string(v);
    p.labels.push_back({v, name, {0, 0, 0}});
  }
  p.target_spacing = spacing;
  p.patch = {16, 16, 16};
  p.levels = 3;
  return p;
}

// Direction matrices (row-major, column j = axis j).
constexpr std::array<double, 9> kIdentity{1, 0, 0, 0, 1, 0, 0, 0, 1};
constexpr std::array<double, 9> kFlipX{-1, 0, 0, 0, 1, 0, 0, 0, 1};
// Axis x along physical -z, axis y along physical +x, axis z along physical -y.
constexpr std::array<double, 9> kPermutedFlipped{0, 1, 0, 0, 0, -1, -1, 0, 0};

std::array<double, 9> rotated_about_z(const std::array<double, 9>& d, double deg) {
  const double c = std::cos(deg * M_PI / 180), s = std::sin(deg * M_PI / 180);
  const double r[9] = {c, -s, 0, s, c, 0, 0, 0, 1};
  std::array<double, 9> out{};
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 3; ++k) out[i * 3 + j] += r[i * 3 + k] * d[k * 3 + j];
  return out;
}

Geometry make_geo(std::array<int64_t, 3> size, std::array<double, 3> spacing,
                  std::array<double, 9> dir, std::array<double, 3> origin = {10, -5, 3}) {
  Geometry g;
  g.size = size;
  g.spacing = spacing;
  g.direction = dir;
  g.origin = origin;
  return g;
}

// Image and labels from functions of the physical point.
void fill(const Geometry& g, Volume& img, LabelVolume& lab,
          const std::function<float(const std::array<double, 3>&)>& fi,
          const std::function<uint16_t(const std::array<double, 3>&)>& fl) {
  img.geo = lab.geo = g;
  img.channels = 1;
  img.data.resize(static_cast<size_t>(g.voxels()));
  lab.data.resize(static_cast<size_t>(g.voxels()));
  for (int64_t z = 0; z < g.size[2]; ++z)
    for (int64_t y = 0; y < g.size[1]; ++y)
      for (int64_t x = 0; x < g.size[0]; ++x) {
        const auto p = g.index_to_physical(static_cast<double>(x), static_cast<double>(y),
                                           static_cast<double>(z));
        const size_t i = static_cast<size_t>((z * g.size[1] + y) * g.size[0] + x);
        img.data[i] = fi(p);
        lab.data[i] = fl(p);
      }
}

double dice(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b, uint16_t cls) {
  int64_t inter = 0, na = 0, nb = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    inter += a[i] == cls && b[i] == cls;
    na += a[i] == cls;
    nb += b[i] == cls;
  }
  return na + nb ? 2.0 * static_cast<double>(inter) / static_cast<double>(na + nb) : 1.0;
}

std::vector<float> one_hot(const std::vector<uint16_t>& labels, int k) {
  std::vector<float> p(labels.size() * static_cast<size_t>(k), 0.0f);
  for (size_t i = 0; i < labels.size(); ++i) p[i * k + labels[i]] = 1.0f;
  return p;
}

bool inside_box(const std::array<double, 3>& p, const std::array<double, 3>& lo,
                const std::array<double, 3>& hi) {
  for (int a = 0; a < 3; ++a)
    if (p[a] < lo[a] || p[a] > hi[a]) return false;
  return true;
}

}  // namespace

TEST(Orientation, CanonicalDirectionIsClosestToIdentity) {
  EXPECT_TRUE(canonical_orientation(make_geo({4, 4, 4}, {1, 1, 1}, kIdentity)).identity());
  const Orientation fx = canonical_orientation(make_geo({4, 4, 4}, {1, 1, 1}, kFlipX));
  EXPECT_EQ(fx.perm, (std::array<int, 3>{0, 1, 2}));
  EXPECT_EQ(fx.flip, (std::array<bool, 3>{true, false, false}));
  const Orientation pf = canonical_orientation(make_geo({4, 4, 4}, {1, 1, 1}, kPermutedFlipped));
  // Physical x is source y (+), physical y is source z (-), physical z is source x (-).
  EXPECT_EQ(pf.perm, (std::array<int, 3>{1, 2, 0}));
  EXPECT_EQ(pf.flip, (std::array<bool, 3>{false, true, true}));
  const Geometry g = reoriented_geometry(
      make_geo({4, 4, 4}, {1, 1, 1}, rotated_about_z(kPermutedFlipped, 20)), pf);
  for (int a = 0; a < 3; ++a)
    for (int r = 0; r < 3; ++r)
      if (r != a) {
        EXPECT_GT(g.direction[a * 3 + a], std::abs(g.direction[r * 3 + a])) << r << a;
      }
}

TEST(Orientation, ReorientKeepsEveryVoxelAtItsPhysicalPoint) {
  for (const auto& dir :
       {kIdentity, kFlipX, kPermutedFlipped, rotated_about_z(kPermutedFlipped, 25)}) {
    Volume v;
    v.geo = make_geo({5, 6, 7}, {0.5, 1.0, 2.0}, dir);
    for (int64_t i = 0; i < v.geo.voxels(); ++i) v.data.push_back(static_cast<float>(i));
    const Orientation o = canonical_orientation(v.geo);
    const Volume r = reorient(v, o);
    ASSERT_EQ(r.data.size(), v.data.size());
    for (int64_t z = 0; z < r.geo.size[2]; ++z)
      for (int64_t y = 0; y < r.geo.size[1]; ++y)
        for (int64_t x = 0; x < r.geo.size[0]; ++x) {
          const int64_t src = static_cast<int64_t>(r.at(x, y, z));
          const int64_t sx = src % 5, sy = (src / 5) % 6, sz = src / 30;
          const auto pr = r.geo.index_to_physical(static_cast<double>(x), static_cast<double>(y),
                                                  static_cast<double>(z));
          const auto ps = v.geo.index_to_physical(static_cast<double>(sx), static_cast<double>(sy),
                                                  static_cast<double>(sz));
          for (int a = 0; a < 3; ++a)
            // Exact arithmetic up to double rounding of a few products of values <= 20.
            ASSERT_NEAR(pr[a], ps[a], 1e-9) << "canonical (" << x << "," << y << "," << z
                                            << ") from source " << src << " axis " << a;
        }
  }
}

TEST(Resample, LinearReproducesALinearFieldAtThePhysicalPoints) {
  Volume v;
  v.geo = make_geo({20, 9, 14}, {0.5, 2.0, 1.2}, kIdentity, {1, 2, 3});
  auto f = [](const std::array<double, 3>& p) { return 2 * p[0] + 3 * p[1] - p[2]; };
  LabelVolume unused;
  fill(
      v.geo, v, unused, [&](const auto& p) { return static_cast<float>(f(p)); },
      [](const auto&) { return uint16_t{0}; });
  const auto size = resampled_size(v.geo.size, v.geo.spacing, {1, 1, 1});
  EXPECT_EQ(size, (std::array<int64_t, 3>{10, 18, 17}));
  const Volume r = resample_linear(v, size);
  EXPECT_NEAR(r.geo.spacing[0], 1.0, 1e-12);
  EXPECT_NEAR(r.geo.spacing[2], 1.2 * 14 / 17, 1e-12);
  int checked = 0;
  // Interior voxels only: at the edges the coordinate is clamped and the field is extrapolated
  // flat.
  for (int64_t z = 1; z + 1 < size[2]; ++z)
    for (int64_t y = 1; y + 1 < size[1]; ++y)
      for (int64_t x = 1; x + 1 < size[0]; ++x) {
        const double expect = f(r.geo.index_to_physical(
            static_cast<double>(x), static_cast<double>(y), static_cast<double>(z)));
        // float32 values up to ~100: a few ulps of 1e-5 relative.
        ASSERT_NEAR(r.at(x, y, z), expect, 1e-3) << "(" << x << "," << y << "," << z << ")";
        ++checked;
      }
  EXPECT_GT(checked, 1000);
}

TEST(Preprocess, LabelledCubeStaysAlignedAfterReorientationAndResampling) {
  // Anisotropic source (0.5 x 2 x 1 mm) with permuted, flipped, slightly rotated axes.
  const Geometry g =
      make_geo({60, 20, 40}, {0.5, 2.0, 1.0}, rotated_about_z(kPermutedFlipped, 10), {0, 0, 0});
  // An off-centre physical box (flips would move it), within the scanned volume.
  std::array<double, 3> centre{0, 0, 0};
  for (int a = 0; a < 3; ++a) centre[a] = g.index_to_physical(30, 10, 20)[a];
  centre[0] += 4;
  centre[1] -= 3;
  const std::array<double, 3> lo{centre[0] - 8, centre[1] - 8, centre[2] - 8};
  const std::array<double, 3> hi{centre[0] + 8, centre[1] + 8, centre[2] + 8};
  Volume img;
  LabelVolume lab;
  fill(
      g, img, lab, [&](const auto& p) { return inside_box(p, lo, hi) ? 100.0f : 10.0f; },
      [&](const auto& p) { return uint16_t{inside_box(p, lo, hi)}; });
  const Plan plan = test_plan({1, 1, 1});
  const PreprocessedCase pc = preprocess_case(plan, "cube", img, &lab, 7);
  EXPECT_TRUE(pc.map.resampled);
  const Geometry pg = pc.map.preprocessed_geometry();
  ASSERT_EQ(pg.size, (std::array<int64_t, 3>{pc.shape[2], pc.shape[1], pc.shape[0]}));
  for (int a = 0; a < 3; ++a) EXPECT_NEAR(pg.spacing[a], 1.0, 0.05) << "axis " << a;

  // Labels against the physical truth, and image against labels.
  std::vector<uint16_t> truth(pc.labels.size()), bright(pc.labels.size());
  std::array<double, 3> centroid{0, 0, 0};
  int64_t n = 0;
  for (int64_t z = 0; z < pc.shape[0]; ++z)
    for (int64_t y = 0; y < pc.shape[1]; ++y)
      for (int64_t x = 0; x < pc.shape[2]; ++x) {
        const size_t i = static_cast<size_t>((z * pc.shape[1] + y) * pc.shape[2] + x);
        const auto p = pg.index_to_physical(static_cast<double>(x), static_cast<double>(y),
                                            static_cast<double>(z));
        truth[i] = inside_box(p, lo, hi);
        // The image has two levels; after z-scoring, the cube is the positive side.
        bright[i] = pc.image[i] > 0.0f;
        if (pc.labels[i] == 1) {
          for (int a = 0; a < 3; ++a) centroid[a] += p[a];
          ++n;
        }
      }
  ASSERT_GT(n, 0);
  for (int a = 0; a < 3; ++a)
    // Nearest-neighbour labels move a boundary by at most half a source voxel (1 mm on the 2 mm
    // axis); on a symmetric box the centroid moves less than that.
    EXPECT_NEAR(centroid[a] / static_cast<double>(n), centre[a], 1.0) << "axis " << a;
  // A 16 mm cube at 1 mm: boundary voxels within 1 mm of a face may disagree, at most about
  // 2 faces x 16 x 16 voxels of 4096, i.e. Dice >= ~0.87; a misalignment (flip, transposition,
  // shift of several mm) drops far below.
  EXPECT_GT(dice(pc.labels, truth, 1), 0.87);
  EXPECT_GT(dice(pc.labels, bright, 1), 0.87);
}

TEST(Preprocess, CropsToTheNonZeroBoxAndCropsLabelsIdentically) {
  const Geometry g = make_geo({20, 18, 16}, {1, 1, 1}, kIdentity);
  Volume img;
  LabelVolume lab;
  img.geo = lab.geo = g;
  img.data.assign(static_cast<size_t>(g.voxels()), 0.0f);
  lab.data.assign(static_cast<size_t>(g.voxels()), 0);
  // Non-zero box x 3..14, y 2..9, z 5..12 (inclusive); label 2 at a marked voxel.
  for (int64_t z = 5; z <= 12; ++z)
    for (int64_t y = 2; y <= 9; ++y)
      for (int64_t x = 3; x <= 14; ++x) img.data[(z * 18 + y) * 20 + x] = 1.0f + x;
  lab.data[(7 * 18 + 4) * 20 + 6] = 2;
  const PreprocessedCase pc = preprocess_case(test_plan({1, 1, 1}), "crop", img, &lab, 1);
  EXPECT_FALSE(pc.map.resampled);
  EXPECT_EQ(pc.map.crop.begin, (std::array<int64_t, 3>{5, 2, 3}));
  EXPECT_EQ(pc.map.crop.end, (std::array<int64_t, 3>{13, 10, 15}));
  EXPECT_EQ(pc.shape, (std::array<int64_t, 3>{8, 8, 12}));
  ASSERT_EQ(pc.labels.size(), 8u * 8 * 12);
  const size_t marked = static_cast<size_t>(((7 - 5) * 8 + (4 - 2)) * 12 + (6 - 3));
  for (size_t i = 0; i < pc.labels.size(); ++i)
    ASSERT_EQ(pc.labels[i], i == marked ? 2 : 0) << "voxel " << i;
  ASSERT_EQ(pc.class_locations.size(), 3u);
  ASSERT_EQ(pc.class_locations[2].size(), 1u);
  EXPECT_EQ(pc.class_locations[2][0], (Index3{2, 2, 3}));
  EXPECT_TRUE(pc.class_locations[1].empty());
  const CaseView v = pc.view();
  EXPECT_EQ(v.image, pc.image.data());
  EXPECT_EQ(v.labels, pc.labels.data());
  EXPECT_EQ(v.voxels(), 8 * 8 * 12);
}

TEST(Preprocess, ZScoreGivesMeanZeroStdOne) {
  const Geometry g = make_geo({17, 13, 11}, {1, 1, 1}, kFlipX);
  Volume img;
  img.geo = g;
  img.channels = 2;
  Rng rng(3);
  for (int64_t i = 0; i < g.voxels(); ++i) {
    img.data.push_back(static_cast<float>(rng.normal(500, 80)));
    img.data.push_back(static_cast<float>(rng.uniform(1, 3)));
  }
  const PreprocessedCase pc = preprocess_case(test_plan({1, 1, 1}, 3, 2), "z", img, nullptr, 1);
  EXPECT_TRUE(pc.labels.empty());
  EXPECT_EQ(pc.view().labels, nullptr);
  for (int c = 0; c < 2; ++c) {
    double s = 0, s2 = 0;
    const int64_t n = pc.shape[0] * pc.shape[1] * pc.shape[2];
    for (int64_t v = 0; v < n; ++v) s += pc.image[v * 2 + c];
    const double mean = s / n;
    for (int64_t v = 0; v < n; ++v)
      s2 += (pc.image[v * 2 + c] - mean) * (pc.image[v * 2 + c] - mean);
    // float32 values with ~7 significant digits over 2431 voxels.
    EXPECT_NEAR(mean, 0.0, 1e-5) << "channel " << c;
    EXPECT_NEAR(std::sqrt(s2 / n), 1.0, 1e-5) << "channel " << c;
  }
}

TEST(Preprocess, CtClipsThenUsesDatasetStatistics) {
  Plan plan = test_plan({1, 1, 1});
  plan.normalization[0] = ChannelNorm{"ct", -100, 200, 50, 25};
  Volume img;
  img.geo = make_geo({8, 4, 2}, {1, 1, 1}, kIdentity);
  for (int64_t i = 0; i < 64; ++i) img.data.push_back(-1000.0f + 31.0f * static_cast<float>(i));
  const PreprocessedCase pc = preprocess_case(plan, "ct", img, nullptr, 1);
  ASSERT_EQ(pc.image.size(), 64u);
  for (int64_t i = 0; i < 64; ++i) {
    const double v = std::clamp(-1000.0 + 31.0 * static_cast<double>(i), -100.0, 200.0);
    // One float32 rounding of values <= 6.
    EXPECT_NEAR(pc.image[i], (v - 50.0) / 25.0, 1e-6) << "voxel " << i;
  }
  EXPECT_FLOAT_EQ(*std::min_element(pc.image.begin(), pc.image.end()), -6.0f);
  EXPECT_FLOAT_EQ(*std::max_element(pc.image.begin(), pc.image.end()), 6.0f);
}

TEST(Preprocess, RejectsMismatchedChannelsAndUnknownLabels) {
  Volume img;
  img.geo = make_geo({4, 4, 4}, {1, 1, 1}, kIdentity);
  img.data.assign(64, 1.0f);
  LabelVolume lab;
  lab.geo = img.geo;
  lab.data.assign(64, 0);
  lab.data[21] = 3;
  try {
    preprocess_case(test_plan({1, 1, 1}, 3), "badlabel", img, &lab, 1);
    FAIL() << "no throw";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("badlabel"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("label value 3"), std::string::npos) << e.what();
  }
  EXPECT_THROW(preprocess_case(test_plan({1, 1, 1}, 3, 2), "chan", img, nullptr, 1), ArgumentError);
}

TEST(Preprocess, SpacingWithinToleranceIsNotResampled) {
  Volume img;
  img.geo = make_geo({6, 6, 6}, {1.0005, 0.9995, 1.0}, kIdentity);
  img.data.assign(216, 2.0f);
  img.data[0] = 1.0f;
  const PreprocessedCase pc = preprocess_case(test_plan({1, 1, 1}), "tol", img, nullptr, 1);
  EXPECT_FALSE(pc.map.resampled);
  EXPECT_EQ(pc.shape, (std::array<int64_t, 3>{6, 6, 6}));
}

TEST(ClassLocations, UniformCappedSeededSamples) {
  const std::array<int64_t, 3> shape{30, 40, 50};
  std::vector<uint16_t> lab(60000, 0);
  Rng rng(5);
  for (auto& v : lab)
    v = static_cast<uint16_t>(rng.below(10) == 0 ? 1 : (rng.below(3) == 0 ? 2 : 0));
  int64_t count1 = 0;
  for (auto v : lab) count1 += v == 1;
  const auto a = sample_class_locations(lab.data(), shape, 4, 1000, 11);
  const auto b = sample_class_locations(lab.data(), shape, 4, 1000, 11);
  const auto c = sample_class_locations(lab.data(), shape, 4, 1000, 12);
  ASSERT_EQ(a.size(), 4u);
  EXPECT_TRUE(a[0].empty());
  EXPECT_EQ(a[1].size(), std::min<size_t>(1000, static_cast<size_t>(count1)));
  EXPECT_EQ(a[2].size(), 1000u);
  EXPECT_TRUE(a[3].empty());  // class absent
  EXPECT_EQ(a, b);
  EXPECT_NE(a[1], c[1]);
  for (int cls = 1; cls <= 2; ++cls)
    for (size_t i = 0; i < a[cls].size(); ++i) {
      const Index3& p = a[cls][i];
      ASSERT_EQ(lab[static_cast<size_t>((p[0] * shape[1] + p[1]) * shape[2] + p[2])], cls);
      if (i) {
        ASSERT_LT(a[cls][i - 1], p) << "memory order, no repeats";
      }
    }
  // Uniform: the sample's mean z is near the middle (30 slices; the sd of the mean of 1000 uniform
  // draws on 0..29 is ~0.27, so 1.5 is > 5 sd).
  double mz = 0;
  for (const auto& p : a[1]) mz += p[0];
  EXPECT_NEAR(mz / static_cast<double>(a[1].size()), 14.5, 1.5);
}

TEST(GeometryMap, JsonRoundTripAndMalformedInput) {
  Volume img;
  LabelVolume lab;
  const Geometry g = make_geo({30, 10, 20}, {0.5, 2.0, 1.0}, kPermutedFlipped);
  fill(
      g, img, lab, [](const auto& p) { return static_cast<float>(p[0] > 12 ? 1 : 0); },
      [](const auto&) { return uint16_t{0}; });
  const PreprocessedCase pc = preprocess_case(test_plan({1, 1, 1}), "m", img, &lab, 1);
  const CaseGeometryMap m =
      CaseGeometryMap::from_json(nlohmann::json::parse(pc.map.to_json().dump()));
  EXPECT_EQ(m.to_json(), pc.map.to_json());
  EXPECT_TRUE(m.source.same_grid(g));
  nlohmann::json bad = pc.map.to_json();
  bad["crop_end"][0] = 1000;
  EXPECT_THROW(CaseGeometryMap::from_json(bad), ArgumentError);
  bad = pc.map.to_json();
  bad["perm"] = {0, 0, 1};
  EXPECT_THROW(CaseGeometryMap::from_json(bad), ArgumentError);
}

TEST(BackToSource, OneHotOfPreprocessedLabelsIsExactWithoutResampling) {
  for (const auto& dir : {kIdentity, kFlipX, kPermutedFlipped}) {
    const Geometry g = make_geo({14, 12, 10}, {1, 1, 1}, dir);
    Volume img;
    LabelVolume lab;
    img.geo = lab.geo = g;
    Rng rng(9);
    for (int64_t z = 0; z < 10; ++z)
      for (int64_t y = 0; y < 12; ++y)
        for (int64_t x = 0; x < 14; ++x) {
          const bool in = x >= 2 && x < 11 && y >= 1 && y < 12 && z >= 3 && z < 8;
          img.data.push_back(in ? static_cast<float>(1 + rng.below(5)) : 0.0f);
          lab.data.push_back(in ? static_cast<uint16_t>(rng.below(3)) : 0);
        }
    const PreprocessedCase pc = preprocess_case(test_plan({1, 1, 1}), "exact", img, &lab, 1);
    ASSERT_FALSE(pc.map.resampled);
    ASSERT_LT(pc.labels.size(), lab.data.size()) << "the crop should remove the zero border";
    const std::vector<float> onehot = one_hot(pc.labels, 3);
    const std::vector<float> back = probabilities_to_source(pc.map, onehot.data(), 3);
    ASSERT_EQ(back.size(), lab.data.size() * 3);
    for (size_t i = 0; i < lab.data.size(); ++i)
      for (int c = 0; c < 3; ++c)
        ASSERT_EQ(back[i * 3 + c], lab.data[i] == c ? 1.0f : 0.0f)
            << "voxel " << i << " class " << c;
    const LabelVolume l1 = argmax_labels(back.data(), 3, pc.map.source);
    const LabelVolume l2 = labels_to_source(pc.map, onehot.data(), 3);
    EXPECT_EQ(l1.data, lab.data);
    EXPECT_EQ(l2.data, lab.data);
    EXPECT_TRUE(l2.geo.same_grid(g));
  }
}

TEST(BackToSource, OneHotRoundTripThroughResamplingKeepsDiceAbove095) {
  const Geometry g =
      make_geo({64, 20, 40}, {0.5, 2.0, 1.0}, rotated_about_z(kPermutedFlipped, 10), {0, 0, 0});
  const auto c1 = g.index_to_physical(24, 9, 18), c2 = g.index_to_physical(44, 11, 22);
  auto d2 = [](const std::array<double, 3>& p, const std::array<double, 3>& c) {
    return (p[0] - c[0]) * (p[0] - c[0]) + (p[1] - c[1]) * (p[1] - c[1]) +
           (p[2] - c[2]) * (p[2] - c[2]);
  };
  Volume img;
  LabelVolume lab;
  auto cls = [&](const std::array<double, 3>& p) {
    return uint16_t(d2(p, c1) < 64 ? 1 : (d2(p, c2) < 49 ? 2 : 0));  // radii 8 and 7 mm
  };
  fill(
      g, img, lab, [&](const auto& p) { return 5.0f + 10.0f * cls(p); }, cls);
  const PreprocessedCase pc = preprocess_case(test_plan({1, 1, 1}), "spheres", img, &lab, 1);
  ASSERT_TRUE(pc.map.resampled);
  const std::vector<float> onehot = one_hot(pc.labels, 3);
  const LabelVolume back = labels_to_source(pc.map, onehot.data(), 3);
  const std::vector<float> probs = probabilities_to_source(pc.map, onehot.data(), 3);
  EXPECT_EQ(argmax_labels(probs.data(), 3, g).data, back.data);
  for (size_t i = 0; i < lab.data.size(); ++i) {
    const float s = probs[i * 3] + probs[i * 3 + 1] + probs[i * 3 + 2];
    // Interpolating a partition of unity gives one up to float32 rounding of 8 weighted terms.
    ASSERT_NEAR(s, 1.0f, 1e-5) << "voxel " << i;
  }
  // Nearest labels down to 1 mm and linear back up to 0.5 / 2 mm each move a sphere's surface by
  // under a voxel: on radii of 7-8 mm that costs < 5% Dice; a misplacement would cost far more.
  EXPECT_GT(dice(back.data, lab.data, 1), 0.95);
  EXPECT_GT(dice(back.data, lab.data, 2), 0.95);
}

TEST(BackToSource, OutsideTheCropIsBackground) {
  const Geometry g = make_geo({10, 10, 10}, {1, 1, 1}, kIdentity);
  Volume img;
  img.geo = g;
  img.data.assign(1000, 0.0f);
  for (int64_t z = 4; z < 6; ++z)
    for (int64_t y = 4; y < 6; ++y)
      for (int64_t x = 4; x < 6; ++x) img.data[(z * 10 + y) * 10 + x] = 1;
  const PreprocessedCase pc = preprocess_case(test_plan({1, 1, 1}), "c", img, nullptr, 1);
  ASSERT_EQ(pc.shape, (std::array<int64_t, 3>{2, 2, 2}));
  const std::vector<float> all_two(8 * 3, 0.0f);
  std::vector<float> p = all_two;
  for (int i = 0; i < 8; ++i) p[i * 3 + 2] = 1.0f;
  const LabelVolume back = labels_to_source(pc.map, p.data(), 3);
  for (int64_t z = 0; z < 10; ++z)
    for (int64_t y = 0; y < 10; ++y)
      for (int64_t x = 0; x < 10; ++x) {
        const bool in = x >= 4 && x < 6 && y >= 4 && y < 6 && z >= 4 && z < 6;
        ASSERT_EQ(back.at(x, y, z), in ? 2 : 0) << x << "," << y << "," << z;
      }
}

// Real scans with non-trivial sform geometry (the MR has x and y flipped): labels stay on the same
// anatomy through reorientation and resampling, and come back onto the source grid.
TEST(RealScans, TotalSegmentatorLabelsStayAlignedAndComeBack) {
  MEDSEG_REQUIRE_SHARED("data/TotalSegmentator_examples/dataset.json");
  const fs::path dir = test::shared_dir() / "data/TotalSegmentator_examples";
  for (const std::string name : {"totalseg_ct_sm", "totalseg_mr_sm"}) {
    SCOPED_TRACE(name);
    const Volume img = io::read_image(dir / "imagesTr" / (name + ".nii.gz"));
    LabelVolume lab = io::read_labels(dir / "labelsTr" / (name + ".nii.gz"));
    // Three classes keep one-hot arrays small: the most frequent organ, any other organ,
    // background.
    std::vector<int64_t> count(65536, 0);
    for (uint16_t v : lab.data) ++count[v];
    count[0] = 0;
    const uint16_t top =
        static_cast<uint16_t>(std::max_element(count.begin(), count.end()) - count.begin());
    for (auto& v : lab.data) v = v == 0 ? 0 : (v == top ? 1 : 2);
    for (const double spacing : {3.0, 1.5}) {  // the files' own spacing (no resampling), and finer
      SCOPED_TRACE("target spacing " + std::to_string(spacing));
      const PreprocessedCase pc =
          preprocess_case(test_plan({spacing, spacing, spacing}), name, img, &lab, 1);
      EXPECT_EQ(pc.map.resampled, spacing != 3.0);
      // Centroid of the top organ in physical space, before and after.
      std::array<double, 3> before{0, 0, 0}, after{0, 0, 0};
      int64_t nb = 0, na = 0;
      for (int64_t z = 0; z < img.geo.size[2]; ++z)
        for (int64_t y = 0; y < img.geo.size[1]; ++y)
          for (int64_t x = 0; x < img.geo.size[0]; ++x)
            if (lab.at(x, y, z) == 1) {
              const auto p = img.geo.index_to_physical(double(x), double(y), double(z));
              for (int a = 0; a < 3; ++a) before[a] += p[a];
              ++nb;
            }
      const Geometry pg = pc.map.preprocessed_geometry();
      for (int64_t z = 0; z < pc.shape[0]; ++z)
        for (int64_t y = 0; y < pc.shape[1]; ++y)
          for (int64_t x = 0; x < pc.shape[2]; ++x)
            if (pc.labels[static_cast<size_t>((z * pc.shape[1] + y) * pc.shape[2] + x)] == 1) {
              const auto p = pg.index_to_physical(double(x), double(y), double(z));
              for (int a = 0; a < 3; ++a) after[a] += p[a];
              ++na;
            }
      ASSERT_GT(nb, 0);
      ASSERT_GT(na, 0);
      for (int a = 0; a < 3; ++a)
        // Nearest-neighbour moves boundaries by < half a source voxel (1.5 mm); averaged over an
        // organ the centroid moves far less. A flip or transposition moves it by centimetres.
        EXPECT_NEAR(after[a] / na, before[a] / nb, 1.5) << "axis " << a;
      const std::vector<float> onehot = one_hot(pc.labels, 3);
      const LabelVolume back = labels_to_source(pc.map, onehot.data(), 3);
      EXPECT_TRUE(back.geo.same_grid(img.geo));
      if (!pc.map.resampled) {
        EXPECT_EQ(back.data, lab.data);
      } else {
        // Down-and-up through 1.5 mm reproduces the 3 mm labels except at some boundary voxels.
        EXPECT_GT(dice(back.data, lab.data, 1), 0.95);
        EXPECT_GT(dice(back.data, lab.data, 2), 0.95);
      }
    }
  }
}
