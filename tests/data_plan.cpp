#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "core/error.hpp"
#include "data/plan.hpp"
#include "io/dataset.hpp"
#include "support/shared_data.hpp"

using namespace medseg;
using namespace medseg::data;

namespace {

io::Dataset synthetic_dataset(std::vector<std::string> channels, int classes = 3) {
  io::Dataset ds;
  ds.root = "/nonexistent/synthetic";
  ds.layout = "msd";
  ds.name = "Synthetic";
  ds.channel_names = std::move(channels);
  for (int v = 0; v < classes; ++v)
    ds.labels.push_back({v,
                         v == 0 ? "background" : "structure" + std::to_string(v),
                         {static_cast<uint8_t>(10 * v), 20, 30}});
  return ds;
}

// n cases with the given spacings (x, y, z) and shapes (x, y, z), channel samples 0..999 per
// channel.
Fingerprint synthetic_fingerprint(const std::vector<std::array<double, 3>>& spacings,
                                  const std::vector<std::array<int64_t, 3>>& shapes,
                                  int channels = 1) {
  std::vector<CaseFingerprint> cases;
  for (size_t i = 0; i < spacings.size(); ++i) {
    CaseFingerprint c;
    c.id = "case" + std::to_string(i);
    c.spacing = spacings[i];
    c.shape = shapes[i];
    c.cropped_shape = shapes[i];
    cases.push_back(c);
  }
  std::vector<std::vector<float>> samples(static_cast<size_t>(channels));
  for (auto& s : samples)
    for (int v = 0; v < 1000; ++v) s.push_back(static_cast<float>(v));
  return summarize_fingerprint(std::move(cases), std::move(samples));
}

void expect_valid_patch(const Plan& p, const PlanOptions& opt) {
  const int64_t div = int64_t{1} << (p.levels - 1);
  EXPECT_GE(p.levels, 1);
  EXPECT_LE(p.levels, opt.max_levels);
  for (int a = 0; a < 3; ++a) {
    EXPECT_EQ(p.patch[a] % div, 0)
        << "axis " << a << " patch " << p.patch[a] << " levels " << p.levels;
    EXPECT_GE(p.patch[a] / div, 4)
        << "axis " << a << " patch " << p.patch[a] << " levels " << p.levels;
  }
  EXPECT_LE(p.patch[0] * p.patch[1] * p.patch[2], opt.max_patch_voxels);
}

}  // namespace

TEST(Fingerprint, SummaryGivesMediansMomentsAndPercentiles) {
  const Fingerprint fp = synthetic_fingerprint({{1, 2, 3}, {1, 2, 5}, {3, 2, 4}},
                                               {{10, 20, 30}, {12, 22, 31}, {14, 18, 29}});
  EXPECT_EQ(fp.median_spacing, (std::array<double, 3>{1, 2, 4}));
  EXPECT_EQ(fp.median_shape, (std::array<int64_t, 3>{12, 20, 30}));
  ASSERT_EQ(fp.channels.size(), 1u);
  // Samples 0..999: mean 499.5, population std sqrt((1000^2 - 1) / 12), percentiles by linear
  // interpolation: 0.005 * 999 = 4.995 and 0.995 * 999 = 994.005.
  EXPECT_DOUBLE_EQ(fp.channels[0].mean, 499.5);
  EXPECT_NEAR(fp.channels[0].std, std::sqrt((1000.0 * 1000.0 - 1.0) / 12.0), 1e-9);
  EXPECT_NEAR(fp.channels[0].p00_5, 4.995, 1e-9);
  EXPECT_NEAR(fp.channels[0].p99_5, 994.005, 1e-9);
  EXPECT_EQ(fp.channels[0].samples, 1000);
}

TEST(PlanTargetSpacing, IsotropicUsesTheMedian) {
  const Fingerprint fp = synthetic_fingerprint({{0.9, 0.9, 1.1}, {1.0, 1.0, 1.0}, {1.2, 1.2, 0.8}},
                                               {{50, 50, 50}, {50, 50, 50}, {50, 50, 50}});
  EXPECT_EQ(plan_target_spacing(fp), (std::array<double, 3>{1.0, 1.0, 1.0}));
}

TEST(PlanTargetSpacing, StronglyAnisotropicAxisUsesThe10thPercentile) {
  std::vector<std::array<double, 3>> sp;
  std::vector<std::array<int64_t, 3>> sh;
  for (double z : {2.5, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0}) {
    sp.push_back({0.8, 0.8, z});
    sh.push_back({512, 512, 60});
  }
  const Fingerprint fp = synthetic_fingerprint(sp, sh);
  ASSERT_DOUBLE_EQ(fp.median_spacing[2], 5.0);  // > 3 x 0.8: anisotropic
  const auto t = plan_target_spacing(fp);
  // 10th percentile of the 10 sorted z spacings: position 0.9 between 2.5 and 3.0.
  EXPECT_NEAR(t[2], 2.5 + 0.9 * 0.5, 1e-6);
  EXPECT_DOUBLE_EQ(t[0], 0.8);
  EXPECT_DOUBLE_EQ(t[1], 0.8);
}

TEST(PlanTargetSpacing, MildAnisotropyKeepsTheMedian) {
  const Fingerprint fp = synthetic_fingerprint({{1, 1, 2.5}, {1, 1, 2.0}, {1, 1, 1.0}},
                                               {{64, 64, 64}, {64, 64, 64}, {64, 64, 64}});
  EXPECT_DOUBLE_EQ(plan_target_spacing(fp)[2], 2.0);  // 2.0 <= 3 x 1.0
}

TEST(MakePlan, HippocampusLikeCoversTheMedianCase) {
  // MSD Hippocampus: 1 mm isotropic, median shape about 36 x 50 x 35 (x, y, z).
  const Fingerprint fp = synthetic_fingerprint({{1, 1, 1}, {1, 1, 1}, {1, 1, 1}},
                                               {{34, 48, 33}, {36, 50, 35}, {38, 52, 37}});
  const PlanOptions opt;
  const Plan p = make_plan(synthetic_dataset({"MRI"}), fp, opt);
  EXPECT_EQ(p.target_spacing, (std::array<double, 3>{1, 1, 1}));
  EXPECT_EQ(p.median_shape, (std::array<int64_t, 3>{35, 50, 36}));
  EXPECT_EQ(p.patch, (std::array<int64_t, 3>{40, 56, 40}));
  EXPECT_EQ(p.levels, 4);
  expect_valid_patch(p, opt);
  ASSERT_EQ(p.normalization.size(), 1u);
  EXPECT_EQ(p.normalization[0].scheme, "zscore");
  EXPECT_EQ(p.num_classes(), 3);
}

TEST(MakePlan, CtChannelGetsClippingWithDatasetStatistics) {
  const Fingerprint fp = synthetic_fingerprint({{1, 1, 1}}, {{64, 64, 64}}, 2);
  const Plan p = make_plan(synthetic_dataset({"ct", "T2"}), fp);
  ASSERT_EQ(p.normalization.size(), 2u);
  EXPECT_EQ(p.normalization[0].scheme, "ct");  // case-insensitive
  EXPECT_NEAR(p.normalization[0].clip_lo, 4.995, 1e-9);
  EXPECT_NEAR(p.normalization[0].clip_hi, 994.005, 1e-9);
  EXPECT_DOUBLE_EQ(p.normalization[0].mean, 499.5);
  EXPECT_NEAR(p.normalization[0].std, fp.channels[0].std, 1e-12);
  EXPECT_EQ(p.normalization[1].scheme, "zscore");
}

TEST(MakePlan, PatchIsDivisibleWithBottleneckOfFourOnManyShapes) {
  PlanOptions opt;
  int checked = 0;
  for (std::array<double, 3> sp : std::vector<std::array<double, 3>>{
           {1, 1, 1}, {0.7, 0.7, 5}, {0.8, 0.8, 2.5}, {1.5, 1.5, 1.5}, {3, 0.5, 0.5}})
    for (std::array<int64_t, 3> sh : std::vector<std::array<int64_t, 3>>{
             {36, 50, 35}, {512, 512, 120}, {320, 320, 20}, {200, 150, 400}, {24, 24, 24}}) {
      const Fingerprint fp = synthetic_fingerprint({sp}, {sh});
      for (int64_t budget : {int64_t{64} * 64 * 64, int64_t{128} * 128 * 128}) {
        opt.max_patch_voxels = budget;
        const Plan p = make_plan(synthetic_dataset({"MRI"}), fp, opt);
        SCOPED_TRACE("spacing " + std::to_string(sp[0]) + "," + std::to_string(sp[1]) + "," +
                     std::to_string(sp[2]) + " shape " + std::to_string(sh[0]) + "," +
                     std::to_string(sh[1]) + "," + std::to_string(sh[2]) + " budget " +
                     std::to_string(budget));
        expect_valid_patch(p, opt);
        EXPECT_LE(estimate_training_memory_gb(p.patch, p.levels, p.base_filters, p.max_filters,
                                              p.batch_size, p.in_channels, p.num_classes()),
                  opt.memory_budget_gb);
        // Never more than one rounding step beyond the median shape.
        const int64_t div = int64_t{1} << (p.levels - 1);
        for (int a = 0; a < 3; ++a)
          EXPECT_LE(p.patch[a], std::max<int64_t>((p.median_shape[a] + div - 1) / div * div, 16))
              << "axis " << a;
        ++checked;
      }
    }
  EXPECT_EQ(checked, 50);
}

TEST(MakePlan, LargeAnisotropicCtGetsFlatPatchWithinBudget) {
  const Fingerprint fp = synthetic_fingerprint({{0.7, 0.7, 5}, {0.8, 0.8, 5}, {0.75, 0.75, 5}},
                                               {{512, 512, 80}, {512, 512, 90}, {512, 512, 100}});
  PlanOptions opt;
  const Plan p = make_plan(synthetic_dataset({"CT"}), fp, opt);
  expect_valid_patch(p, opt);
  // z spacing ~5 mm vs 0.75 in-plane: the patch covers similar physical extents, so it is much
  // shorter in z (voxels) than in-plane.
  EXPECT_LT(p.patch[0] * 2, p.patch[1]) << p.describe();
  EXPECT_GE(p.levels, 3) << p.describe();
}

TEST(MakePlan, SmallBudgetShrinksTheLargestAxisFirst) {
  const Fingerprint fp = synthetic_fingerprint({{1, 1, 1}}, {{200, 200, 200}});
  PlanOptions opt;
  opt.max_patch_voxels = 96 * 96 * 80;
  const Plan p = make_plan(synthetic_dataset({"MRI"}), fp, opt);
  expect_valid_patch(p, opt);
  EXPECT_GE(p.patch[0] * p.patch[1] * p.patch[2], opt.max_patch_voxels / 2)
      << "the budget should be mostly used: " << p.describe();
}

TEST(MakePlan, PatchOverrideIsKeptAndLevelsDerived) {
  const Fingerprint fp = synthetic_fingerprint({{1, 1, 1}}, {{100, 100, 100}});
  PlanOptions opt;
  opt.patch_override = std::array<int64_t, 3>{32, 64, 48};
  const Plan p = make_plan(synthetic_dataset({"MRI"}), fp, opt);
  EXPECT_EQ(p.patch, (std::array<int64_t, 3>{32, 64, 48}));
  EXPECT_EQ(p.levels, 4);  // 48 = 3 x 16 is not divisible by 16 with 5 levels
  opt.patch_override = std::array<int64_t, 3>{2, 64, 64};
  EXPECT_THROW(make_plan(synthetic_dataset({"MRI"}), fp, opt), ArgumentError);
}

TEST(MakePlan, RejectsNonConsecutiveLabels) {
  io::Dataset ds = synthetic_dataset({"MRI"});
  ds.labels[2].value = 5;
  const Fingerprint fp = synthetic_fingerprint({{1, 1, 1}}, {{64, 64, 64}});
  try {
    make_plan(ds, fp);
    FAIL() << "no throw";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("has value 5"), std::string::npos) << e.what();
  }
}

TEST(PlanJson, RoundTripKeepsEveryField) {
  const Fingerprint fp = synthetic_fingerprint({{0.7, 0.7, 5}}, {{512, 512, 80}}, 2);
  const Plan p = make_plan(synthetic_dataset({"CT", "MRI"}), fp);
  const Plan q = Plan::from_json(nlohmann::json::parse(p.to_json().dump()));
  EXPECT_EQ(q.to_json(), p.to_json());
  EXPECT_EQ(q.dataset_name, p.dataset_name);
  EXPECT_EQ(q.patch, p.patch);
  EXPECT_EQ(q.levels, p.levels);
  EXPECT_EQ(q.target_spacing, p.target_spacing);
  EXPECT_EQ(q.labels.size(), p.labels.size());
  EXPECT_EQ(q.labels[1].color, p.labels[1].color);
  EXPECT_EQ(q.normalization[0].clip_hi, p.normalization[0].clip_hi);
  EXPECT_EQ(q.preprocessing_hash(), p.preprocessing_hash());
  EXPECT_NE(p.describe().find("patch (z, y, x)"), std::string::npos);
}

TEST(PlanJson, MalformedPlansNameTheField) {
  const Fingerprint fp = synthetic_fingerprint({{1, 1, 1}}, {{36, 50, 35}});
  const nlohmann::json good = make_plan(synthetic_dataset({"MRI"}), fp).to_json();
  auto expect_error = [](nlohmann::json j, const std::string& field) {
    try {
      Plan::from_json(j);
      ADD_FAILURE() << "no throw for " << field;
    } catch (const ArgumentError& e) {
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  };
  nlohmann::json j = good;
  j.erase("patch");
  expect_error(j, "'patch'");
  j = good;
  j["patch"] = {40, 56, 44};  // 44 is not divisible by 8 (levels 4)
  expect_error(j, "'patch'");
  j = good;
  j["normalization"][0]["scheme"] = "minmax";
  expect_error(j, "'normalization'");
  j = good;
  j["target_spacing"] = {1, -1, 1};
  expect_error(j, "'target_spacing'");
  j = good;
  j["in_channels"] = 2;
  expect_error(j, "'channel_names'");
  j = good;
  j["levels"] = "four";
  expect_error(j, "'levels'");
  j = good;
  j["levels"] = 9;  // beyond the U-Net's 7
  expect_error(j, "'levels'");
  j = good;
  j["patch"] = {4096, 4096, 4096};  // would allocate terabytes
  expect_error(j, "'patch'");
  EXPECT_THROW(Plan::from_json(nlohmann::json::array()), ArgumentError);
}

TEST(PlanHash, ChangesWithPreprocessingNotWithPatch) {
  const Fingerprint fp = synthetic_fingerprint({{1, 1, 1}}, {{36, 50, 35}});
  const Plan p = make_plan(synthetic_dataset({"MRI"}), fp);
  Plan q = p;
  q.patch = {32, 32, 32};
  q.base_filters = 32;
  EXPECT_EQ(q.preprocessing_hash(), p.preprocessing_hash());
  q.target_spacing[2] = 1.5;
  EXPECT_NE(q.preprocessing_hash(), p.preprocessing_hash());
  q = p;
  q.normalization[0].scheme = "ct";
  EXPECT_NE(q.preprocessing_hash(), p.preprocessing_hash());
  EXPECT_EQ(p.preprocessing_hash().size(), 16u);
}

TEST(HippocampusPlan, OneMillimetreAndAPatchCoveringMostOfACase) {
  MEDSEG_REQUIRE_SHARED("data/Task04_Hippocampus/dataset.json");
  const io::Dataset ds = io::discover_dataset(test::shared_dir() / "data/Task04_Hippocampus");
  const Fingerprint fp = fingerprint_dataset(ds);
  ASSERT_EQ(fp.cases.size(), ds.training.size());
  const PlanOptions opt;
  const Plan p = make_plan(ds, fp, opt);
  for (int a = 0; a < 3; ++a) EXPECT_NEAR(p.target_spacing[a], 1.0, 1e-3) << p.describe();
  EXPECT_EQ(p.levels, 4) << p.describe();
  expect_valid_patch(p, opt);
  for (int a = 0; a < 3; ++a) {
    // "Covering most of a case": at least the median extent on every axis, and not more than one
    // rounding step (8 voxels at 4 levels) beyond it.
    EXPECT_GE(p.patch[a], p.median_shape[a]) << p.describe();
    EXPECT_LT(p.patch[a], p.median_shape[a] + 8) << p.describe();
  }
  EXPECT_EQ(p.normalization[0].scheme, "zscore");
  EXPECT_EQ(p.num_classes(), 3);
  std::cout << p.describe();
}
