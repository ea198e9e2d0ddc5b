#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <set>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "data/cache.hpp"
#include "io/image_io.hpp"

using namespace medseg;
using namespace medseg::data;
namespace fs = std::filesystem;

namespace {

class CacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() /
            ("medseg_data_cache_" + std::to_string(::getpid()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    fs::create_directories(root_ / "src");
    cache_ = root_ / "cache";
    ds_.root = root_;
    ds_.layout = "folder";
    ds_.name = "cachetest";
    ds_.channel_names = {"MRI"};
    for (int v = 0; v < 3; ++v) ds_.labels.push_back({v, v ? "s" : "background", {0, 0, 0}});
    Rng rng(17);
    for (int i = 0; i < 3; ++i) {
      Volume img;
      LabelVolume lab;
      // Anisotropic spacing and a flipped axis so that every stage of preprocessing runs.
      img.geo.size = {24 + 2 * i, 20, 12};
      img.geo.spacing = {0.8, 0.8, 2.0};
      img.geo.direction = {-1, 0, 0, 0, 1, 0, 0, 0, 1};
      img.geo.origin = {5.0 * i, -3, 7};
      lab.geo = img.geo;
      for (int64_t z = 0; z < img.geo.size[2]; ++z)
        for (int64_t y = 0; y < img.geo.size[1]; ++y)
          for (int64_t x = 0; x < img.geo.size[0]; ++x) {
            const bool body = x > 2 && x < img.geo.size[0] - 3 && y > 1 && z > 0;
            img.data.push_back(body ? static_cast<float>(100 + rng.below(50)) : 0.0f);
            lab.data.push_back(body && x > 8 && x < 16 && y > 4 && y < 12
                                   ? static_cast<uint16_t>(1 + (z > 6))
                                   : 0);
          }
      io::CaseEntry e;
      e.id = "case" + std::to_string(i);
      e.images = {root_ / "src" / (e.id + ".nii.gz")};
      io::write_float_image(e.images[0], img);
      if (i < 2) {  // the last case is unlabelled, like a test image
        e.label = root_ / "src" / (e.id + "_seg.nii.gz");
        io::write_labels(e.label, lab);
      }
      entries_.push_back(e);
    }
    plan_.dataset_name = ds_.name;
    plan_.in_channels = 1;
    plan_.channel_names = {"MRI"};
    plan_.labels = ds_.labels;
    plan_.normalization = {ChannelNorm{}};
    plan_.target_spacing = {1, 1, 1.5};
    plan_.patch = {16, 16, 16};
    plan_.levels = 3;
  }
  void TearDown() override { fs::remove_all(root_); }

  // Runs prepare_cache and returns how many cases were redone (not reused).
  int prepare(std::vector<CachedCase>* out = nullptr, int threads = 2) {
    int redone = 0;
    size_t calls = 0;
    auto cases = prepare_cache(plan_, ds_, entries_, cache_, threads, [&](const CacheProgress& p) {
      ++calls;
      EXPECT_EQ(p.done, calls);
      EXPECT_EQ(p.total, entries_.size());
      redone += !p.reused;
    });
    EXPECT_EQ(calls, entries_.size());
    EXPECT_EQ(cases.size(), entries_.size());
    if (out) *out = std::move(cases);
    return redone;
  }

  fs::path root_, cache_;
  io::Dataset ds_;
  std::vector<io::CaseEntry> entries_;
  Plan plan_;
};

}  // namespace

TEST_F(CacheTest, MissThenHitAndTheMappedViewEqualsThePreprocessedArrays) {
  EXPECT_EQ(prepare(), 3);
  std::vector<CachedCase> cases;
  EXPECT_EQ(prepare(&cases), 0);
  for (size_t i = 0; i < entries_.size(); ++i) {
    const PreprocessedCase pc = preprocess_entry(plan_, entries_[i]);
    const CaseView v = cases[i].view();
    ASSERT_EQ(v.id, entries_[i].id);
    ASSERT_EQ(v.shape, pc.shape);
    ASSERT_EQ(v.channels, pc.channels);
    EXPECT_EQ(std::memcmp(v.image, pc.image.data(), pc.image.size() * sizeof(float)), 0)
        << entries_[i].id;
    if (pc.labels.empty()) {
      EXPECT_EQ(v.labels, nullptr) << entries_[i].id;
    } else {
      ASSERT_NE(v.labels, nullptr);
      EXPECT_EQ(std::memcmp(v.labels, pc.labels.data(), pc.labels.size() * sizeof(uint16_t)), 0)
          << entries_[i].id;
      EXPECT_FALSE(pc.class_locations[1].empty());
    }
    ASSERT_NE(v.class_locations, nullptr);
    EXPECT_EQ(*v.class_locations, pc.class_locations) << entries_[i].id;
    EXPECT_EQ(cases[i].map().to_json(), pc.map.to_json());
  }
}

TEST_F(CacheTest, LeavesNoStrayFiles) {
  prepare();
  std::set<std::string> names;
  for (const auto& f : fs::directory_iterator(cache_)) names.insert(f.path().filename().string());
  const std::set<std::string> expect{
      "case0.image.f32", "case0.labels.u16", "case0.locations.i32", "case0.json",
      "case1.image.f32", "case1.labels.u16", "case1.locations.i32", "case1.json",
      "case2.image.f32", "case2.json"};
  EXPECT_EQ(names, expect);
}

TEST_F(CacheTest, PlanChangeRedoesOnlyWhenPreprocessingChanges) {
  prepare();
  plan_.patch = {32, 32, 32};  // network-only change: the cache stays valid
  plan_.base_filters = 32;
  EXPECT_EQ(prepare(), 0);
  plan_.target_spacing = {1, 1, 2};
  std::vector<CachedCase> cases;
  EXPECT_EQ(prepare(&cases), 3);
  for (size_t i = 0; i < cases.size(); ++i)
    EXPECT_EQ(cases[i].view().shape, preprocess_entry(plan_, entries_[i]).shape);
  EXPECT_EQ(prepare(), 0);
}

TEST_F(CacheTest, TouchedSourceIsRedone) {
  prepare();
  const fs::path f = entries_[1].label;
  fs::last_write_time(f, fs::last_write_time(f) + std::chrono::seconds(5));
  EXPECT_FALSE(cache_is_fresh(plan_, entries_[1], cache_));
  EXPECT_TRUE(cache_is_fresh(plan_, entries_[0], cache_));
  EXPECT_EQ(prepare(), 1);
  EXPECT_TRUE(cache_is_fresh(plan_, entries_[1], cache_));
}

TEST_F(CacheTest, TruncatedRawFileIsRedoneAndRefusedByOpen) {
  prepare();
  const CachePaths p = cache_paths(cache_, "case0");
  fs::resize_file(p.image, fs::file_size(p.image) - 4);
  try {
    CachedCase::open(cache_, "case0");
    FAIL() << "no throw";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("case0.image.f32"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(cache_is_fresh(plan_, entries_[0], cache_));
  EXPECT_EQ(prepare(), 1);
}

TEST_F(CacheTest, ViewsSurviveMovingTheCases) {
  std::vector<CachedCase> cases;
  prepare(&cases, 1);
  const CaseView before = cases[0].view();
  const float first = before.image[0];
  std::vector<CachedCase> moved;
  for (auto& c : cases) moved.push_back(std::move(c));
  const CaseView after = moved[0].view();
  EXPECT_EQ(after.image, before.image);  // same mapping
  EXPECT_EQ(after.class_locations, before.class_locations);
  EXPECT_EQ(after.image[0], first);
}

TEST_F(CacheTest, MissingSourceFailsNamingTheFile) {
  fs::remove(entries_[2].images[0]);
  try {
    prepare_cache(plan_, ds_, entries_, cache_, 2);
    FAIL() << "no throw";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("case2.nii.gz"), std::string::npos) << e.what();
  }
}
