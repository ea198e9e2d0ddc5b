#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/atomic_file.hpp"
#include "core/error.hpp"
#include "infer/export.hpp"
#include "io/image_io.hpp"

namespace medseg::infer {
namespace {

namespace fs = std::filesystem;

fs::path fresh_dir(const std::string& name) {
  const fs::path p =
      fs::temp_directory_path() / ("medseg_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  return p;
}

// 20 x 16 x 6 voxels of 0.7 x 0.7 x 3 mm, x and y flipped (as RAS-stored NIfTI shows in LPS).
Geometry test_geometry() {
  Geometry g;
  g.size = {20, 16, 6};
  g.spacing = {0.7, 0.7, 3.0};
  g.origin = {12.5, -4.25, 30};
  g.direction = {-1, 0, 0, 0, -1, 0, 0, 0, 1};
  return g;
}

struct Case {
  Volume image;
  LabelVolume mask;
  std::vector<io::LabelInfo> labels;
};

Case test_case() {
  Case c;
  c.image.geo = c.mask.geo = test_geometry();
  const auto& n = c.image.geo.size;
  c.image.data.resize(static_cast<size_t>(c.image.geo.voxels()));
  c.mask.data.assign(static_cast<size_t>(c.mask.geo.voxels()), 0);
  for (int64_t z = 0; z < n[2]; ++z)
    for (int64_t y = 0; y < n[1]; ++y)
      for (int64_t x = 0; x < n[0]; ++x) {
        const size_t i = static_cast<size_t>((z * n[1] + y) * n[0] + x);
        c.image.data[i] = static_cast<float>(x * 3 + y * 2 + z);
        if (x >= 3 && x < 9 && y >= 2 && y < 7 && z >= 1 && z < 4) c.mask.data[i] = 1;  // 90 voxels
        if (x >= 12 && x < 14 && y >= 10 && y < 13 && z == 2) c.mask.data[i] = 2;       // 6 voxels
        if (x == 19 && y == 15 && z == 5) c.mask.data[i] = 5;  // a value the label list lacks
      }
  c.labels = {{0, "background", {0, 0, 0}},
              {1, "left kidney", {220, 20, 60}},
              {2, "cyst", {30, 144, 255}},
              {3, "absent structure", {0, 200, 0}}};
  return c;
}

// Width and height from a PNG's IHDR chunk (bytes 16-23, big-endian), after checking the signature.
std::pair<uint32_t, uint32_t> png_size(const fs::path& p) {
  const std::string b = read_file(p);
  EXPECT_GE(b.size(), 24u) << p;
  EXPECT_EQ(b.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8)) << p;
  EXPECT_EQ(b.substr(12, 4), "IHDR") << p;
  auto be32 = [&](size_t o) {
    return (uint32_t(uint8_t(b[o])) << 24) | (uint32_t(uint8_t(b[o + 1])) << 16) |
           (uint32_t(uint8_t(b[o + 2])) << 8) | uint32_t(uint8_t(b[o + 3]));
  };
  return {be32(16), be32(20)};
}

void expect_table(const std::vector<io::LabelInfo>& got, const std::vector<std::string>& names,
                  const Case& c) {
  // Expected: background, 1, 2, 3 from the list, then 5 found in the mask with the default palette.
  ASSERT_EQ(got.size(), 5u);
  const int values[5] = {0, 1, 2, 3, 5};
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(got[i].value, values[i]) << "entry " << i;
    EXPECT_EQ(got[i].name, names[i]) << "entry " << i;
    std::array<uint8_t, 3> want = i < 4 ? c.labels[i].color : io::default_label_color(5);
    if (i == 0) want = {0, 0, 0};
    EXPECT_EQ(got[i].color, want) << "entry " << i << " (" << names[i] << ")";
  }
}

TEST(ReviewPackage, ColourTablesParseBackToTheNamesAndColoursGiven) {
  const Case c = test_case();
  const fs::path dir = fresh_dir("export_tables");
  write_review_package(dir, "case7", c.image, c.mask, c.labels);
  expect_table(read_slicer_ctbl(dir / "case7_slicer.ctbl"),
               {"background", "left_kidney", "cyst", "absent_structure", "label_5"}, c);
  expect_table(read_itksnap_labels(dir / "case7_itksnap.txt"),
               {"Clear Label", "left kidney", "cyst", "absent structure", "label_5"}, c);
  expect_table(read_niivue_colormap(dir / "case7_niivue.json"),
               {"background", "left kidney", "cyst", "absent structure", "label_5"}, c);
  const std::string csv = read_file(dir / "case7_slicer.csv");
  EXPECT_EQ(csv.substr(0, csv.find('\n')), "LabelValue,Name,Color_R,Color_G,Color_B,Color_A");
  EXPECT_NE(csv.find("\n1,left kidney,220,20,60,255\n"), std::string::npos) << csv;
  EXPECT_NE(csv.find("\n0,background,0,0,0,0\n"), std::string::npos) << csv;
  const std::string snap = read_file(dir / "case7_itksnap.txt");
  EXPECT_EQ(snap.rfind("# ITK-SnAP Label Description File", 0), 0u);
  EXPECT_TRUE(fs::exists(dir / "case7_mask.nii.gz"));
  EXPECT_TRUE(fs::exists(dir / "README.txt"));
  const auto back = io::read_labels(dir / "case7_mask.nii.gz");
  EXPECT_EQ(back.data, c.mask.data);
  EXPECT_TRUE(back.geo.same_grid(c.mask.geo)) << back.geo.describe();
  fs::remove_all(dir);
}

TEST(ReviewPackage, ReportedVolumesAreVoxelCountTimesVoxelVolume) {
  const Case c = test_case();
  const fs::path dir = fresh_dir("export_volumes");
  write_review_package(dir, "case7", c.image, c.mask, c.labels);
  const auto j = nlohmann::json::parse(read_file(dir / "case7_volumes.json"));
  const double voxel_ml = 0.7 * 0.7 * 3.0 / 1000.0;
  const auto& s = j.at("structures");
  ASSERT_EQ(s.size(), 4u);  // 1, 2, 3 (absent) and 5 (found in the mask)
  EXPECT_EQ(s[0]["voxels"], 90);
  EXPECT_DOUBLE_EQ(s[0]["volume_ml"].get<double>(), 90 * 0.7 * 0.7 * 3.0 / 1000.0);
  EXPECT_EQ(s[1]["voxels"], 6);
  EXPECT_DOUBLE_EQ(s[1]["volume_ml"].get<double>(), 6 * voxel_ml);
  EXPECT_EQ(s[2]["voxels"], 0);
  EXPECT_EQ(s[2]["volume_ml"].get<double>(), 0.0);
  EXPECT_TRUE(s[2]["centroid_lps_mm"].is_null());
  EXPECT_EQ(s[3]["voxels"], 1);
  EXPECT_EQ(s[0]["bbox_min_voxel"], nlohmann::json({3, 2, 1}));
  EXPECT_EQ(s[0]["bbox_max_voxel"], nlohmann::json({8, 6, 3}));
  // Centroid of label 1: mean index (5.5, 4, 2) -> LPS with the flipped x and y axes.
  const auto want = c.mask.geo.index_to_physical(5.5, 4, 2);
  for (int a = 0; a < 3; ++a)
    EXPECT_NEAR(s[0]["centroid_lps_mm"][a].get<double>(), want[a], 1e-9) << "axis " << a;
  EXPECT_NEAR(want[0], 12.5 - 5.5 * 0.7, 1e-12);
  const std::string csv = read_file(dir / "case7_volumes.csv");
  EXPECT_NE(csv.find("\n2,cyst,6,"), std::string::npos) << csv;
  EXPECT_NE(csv.find("\n3,absent structure,0,0,,,,,,,,,\n"), std::string::npos) << csv;
  fs::remove_all(dir);
}

TEST(ReviewPackage, OverlaysExistWithAspectCorrectSizes) {
  const Case c = test_case();
  const fs::path dir = fresh_dir("export_png");
  write_review_package(dir, "case7", c.image, c.mask, c.labels);
  // axial: 20 x 16 pixels of 0.7 x 0.7 mm -> x16 so the short side reaches 256.
  EXPECT_EQ(png_size(dir / "case7_overlay_1_left_kidney_axial.png"), std::make_pair(320u, 256u));
  // coronal: 20 columns of 0.7 mm, 6 rows of 3 mm: rows x round(3/0.7) = 4 -> 20 x 24, then x13.
  EXPECT_EQ(png_size(dir / "case7_overlay_1_left_kidney_coronal.png"), std::make_pair(260u, 312u));
  // sagittal: 16 columns (y) of 0.7 mm, 6 rows x4 -> 16 x 24, then x16.
  EXPECT_EQ(png_size(dir / "case7_overlay_1_left_kidney_sagittal.png"), std::make_pair(256u, 384u));
  for (const char* v : {"axial", "coronal", "sagittal"}) {
    EXPECT_TRUE(fs::exists(dir / (std::string("case7_overlay_2_cyst_") + v + ".png"))) << v;
    EXPECT_TRUE(fs::exists(dir / (std::string("case7_overlay_5_label_5_") + v + ".png"))) << v;
    EXPECT_FALSE(fs::exists(dir / (std::string("case7_overlay_3_absent_structure_") + v + ".png")));
  }
  fs::remove_all(dir);
}

TEST(ReviewPackage, AFailedWriteLeavesNoFilesOfTheCase) {
  const Case c = test_case();
  const fs::path dir = fresh_dir("export_fail");
  fs::create_directories(dir / "case7_niivue.json");  // a folder where a file must go: rename fails
  EXPECT_THROW(write_review_package(dir, "case7", c.image, c.mask, c.labels), IoError);
  for (const auto& e : fs::directory_iterator(dir))
    EXPECT_EQ(e.path().filename(), "case7_niivue.json") << "left behind: " << e.path();
  fs::remove_all(dir);
}

TEST(ReviewPackage, MismatchedGridsAreRejectedBeforeWriting) {
  Case c = test_case();
  c.mask.geo.spacing[2] = 2.0;
  const fs::path dir = fresh_dir("export_grid");
  EXPECT_THROW(write_review_package(dir, "case7", c.image, c.mask, c.labels), ArgumentError);
  EXPECT_FALSE(fs::exists(dir));
}

TEST(ReviewPackage, StructureVolumesIgnoreBackground) {
  const Case c = test_case();
  const auto v = structure_volumes(c.mask, c.labels);
  ASSERT_EQ(v.size(), 3u);
  EXPECT_EQ(v[0].label, 1);
  EXPECT_EQ(v[0].voxels, 90);
  EXPECT_EQ(v[2].voxels, 0);
}

}  // namespace
}  // namespace medseg::infer
