// Dataset discovery for MSD, nnU-Net v2 and plain folders built from tiny files, the validation
// report for each kind of bad file, and the real hippocampus dataset.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <functional>
#include <set>

#include "core/error.hpp"
#include "io/dataset.hpp"
#include "io/image_io.hpp"
#include "support/four_d_nifti.hpp"
#include "support/shared_data.hpp"

namespace medseg::io {
namespace {

class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() /
            ("medseg_io_dataset_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

void write_file(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << text;
}

Geometry tiny_geometry(std::array<int64_t, 3> size = {10, 9, 8}) {
  Geometry g;
  g.size = size;
  g.spacing = {1.5, 1.5, 3.0};
  g.origin = {-4, 2, 10};
  return g;
}

void write_image(const fs::path& p, const Geometry& g, float value = 1.0f) {
  fs::create_directories(p.parent_path());
  Volume v;
  v.geo = g;
  v.data.resize(static_cast<size_t>(g.voxels()));
  for (size_t i = 0; i < v.data.size(); ++i) v.data[i] = value + static_cast<float>(i % 7);
  write_float_image(p, v);
}

// Label 0 everywhere except value `fg` in one corner block.
void write_label(const fs::path& p, const Geometry& g, uint16_t fg = 1) {
  fs::create_directories(p.parent_path());
  LabelVolume l;
  l.geo = g;
  l.data.assign(static_cast<size_t>(g.voxels()), 0);
  for (size_t i = 0; i < 20; ++i) l.data[i] = fg;
  write_labels(p, l);
}

std::string msd_json(const std::vector<std::string>& cases,
                     const std::string& labels = R"({"0": "background", "1": "a"})") {
  std::string training;
  for (const auto& c : cases)
    training += std::string(training.empty() ? "" : ",") + R"({"image": "./imagesTr/)" + c +
                R"(.nii.gz", "label": "./labelsTr/)" + c + R"(.nii.gz"})";
  return R"({"name": "Tiny", "modality": {"0": "MRI"}, "labels": )" + labels +
         R"(, "numTraining": )" + std::to_string(cases.size()) + R"(, "training": [)" + training +
         "]}";
}

// An MSD dataset of good cases named `cases`.
void make_msd(const fs::path& root, const std::vector<std::string>& cases) {
  for (const auto& c : cases) {
    write_image(root / "imagesTr" / (c + ".nii.gz"), tiny_geometry());
    write_label(root / "labelsTr" / (c + ".nii.gz"), tiny_geometry());
  }
  write_file(root / "dataset.json", msd_json(cases));
}

TEST(Dataset, MsdLayoutListsCasesLabelsAndTestImages) {
  TempDir dir;
  const fs::path root = dir / "Task99_Tiny";
  make_msd(root, {"tiny_002", "tiny_001"});
  // Labels out of order in the file; discovery sorts them by value.
  write_file(root / "dataset.json",
             msd_json({"tiny_002", "tiny_001"}, R"({"2": "b", "0": "background", "1": "a"})"));
  write_image(root / "imagesTs" / "tiny_100.nii.gz", tiny_geometry());
  const Dataset ds = discover_dataset(root);
  EXPECT_EQ(ds.layout, "msd");
  EXPECT_EQ(ds.name, "Tiny");
  EXPECT_EQ(ds.root, fs::absolute(root));
  EXPECT_EQ(ds.channel_names, std::vector<std::string>{"MRI"});
  ASSERT_EQ(ds.labels.size(), 3u);
  for (int v = 0; v < 3; ++v) {
    EXPECT_EQ(ds.labels[v].value, v);
    EXPECT_EQ(ds.labels[v].color, default_label_color(v));
  }
  EXPECT_EQ(ds.labels[1].name, "a");
  EXPECT_EQ(ds.labels[2].name, "b");
  ASSERT_EQ(ds.training.size(), 2u);
  EXPECT_EQ(ds.training[0].id, "tiny_002");  // dataset.json order is kept
  ASSERT_EQ(ds.training[0].images.size(), 1u);
  EXPECT_EQ(ds.training[0].images[0], fs::absolute(root / "imagesTr" / "tiny_002.nii.gz"));
  EXPECT_EQ(ds.training[0].label, fs::absolute(root / "labelsTr" / "tiny_002.nii.gz"));
  ASSERT_EQ(ds.test.size(), 1u);
  EXPECT_EQ(ds.test[0].id, "tiny_100");
  EXPECT_TRUE(ds.test[0].label.empty());
  const ValidationReport r = validate_dataset(ds, ValidationOptions{});
  EXPECT_TRUE(r.ok()) << r.text();
  EXPECT_TRUE(r.problems.empty()) << r.text();
}

// MSD's multi-modal layout (BrainTumour, Prostate): one 4-D file per case, a volume per modality
// declared in dataset.json; labels 3-D. Validation checks the volume count of every case.
TEST(Dataset, MsdModalitiesAreTheVolumesOfOneFourDFile) {
  TempDir dir;
  const fs::path root = dir / "Task98_Two";
  const Geometry g = tiny_geometry();
  const auto volume = [&](float base) {
    std::vector<float> v(static_cast<size_t>(g.voxels()));
    for (size_t i = 0; i < v.size(); ++i) v[i] = base + static_cast<float>(i % 5);
    return v;
  };
  for (const std::string c : {"two_001", "two_002", "two_003", "two_004"}) {
    test::write_4d_nifti(root / "imagesTr" / (c + ".nii.gz"), g, {volume(1), volume(100)});
    write_label(root / "labelsTr" / (c + ".nii.gz"), g);
  }
  fs::create_directories(root / "imagesTs");
  test::write_4d_nifti(root / "imagesTs" / "two_010.nii.gz", g, {volume(1), volume(100)});
  std::string json = msd_json({"two_001", "two_002", "two_003", "two_004"});
  json.replace(json.find(R"({"0": "MRI"})"), 12, R"({"0": "T2", "1": "ADC"})");
  write_file(root / "dataset.json", json);
  Dataset ds = discover_dataset(root);
  EXPECT_TRUE(ds.channels_in_volumes);
  EXPECT_EQ(ds.num_channels(), 2);
  ASSERT_EQ(ds.training.size(), 4u);
  EXPECT_EQ(ds.training[0].images.size(), 1u);
  ASSERT_EQ(ds.test.size(), 1u);
  ValidationOptions opt;
  opt.check_voxels = true;
  const ValidationReport good = validate_dataset(ds, opt);
  EXPECT_TRUE(good.problems.empty()) << good.text();
  const Volume v = read_image_channels(ds.training[0].images, ds.num_channels());
  EXPECT_EQ(v.channels, 2);
  EXPECT_EQ(v.geo.size, g.size);
  EXPECT_EQ(v.at(3, 2, 1, 1), volume(100)[static_cast<size_t>((1 * 9 + 2) * 10 + 3)]);

  // Three volumes, a 3-D file, a NaN in the second volume: each named.
  test::write_4d_nifti(root / "imagesTr" / "two_002.nii.gz", g, {volume(1), volume(2), volume(3)});
  write_image(root / "imagesTr" / "two_003.nii.gz", g);
  std::vector<float> nan_volume = volume(100);
  nan_volume[static_cast<size_t>((1 * 9 + 2) * 10 + 3)] = NAN;
  test::write_4d_nifti(root / "imagesTr" / "two_004.nii.gz", g, {volume(1), nan_volume});
  const ValidationReport bad = validate_dataset(ds, opt);
  EXPECT_EQ(bad.bad_cases, (std::vector<std::string>{"two_002", "two_003", "two_004"})) << bad.text();
  const std::string text = bad.text();
  EXPECT_NE(text.find("two_002.nii.gz: has 3 volumes along its 4th axis, dataset.json declares 2"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("two_003.nii.gz: has 1 volume along its 4th axis"), std::string::npos) << text;
  EXPECT_NE(text.find("(3, 2, 1) of volume 1"), std::string::npos) << text;
}

TEST(Dataset, NnunetTwoChannelsGroupedByCase) {
  TempDir dir;
  const fs::path root = dir / "Dataset042_Two";
  for (const std::string c : {"beta", "alpha"}) {
    write_image(root / "imagesTr" / (c + "_0000.nii.gz"), tiny_geometry(), 1);
    write_image(root / "imagesTr" / (c + "_0001.nii.gz"), tiny_geometry(), 100);
    write_label(root / "labelsTr" / (c + ".nii.gz"), tiny_geometry(), 2);
  }
  write_image(root / "imagesTs" / "gamma_0000.nii.gz", tiny_geometry());
  write_image(root / "imagesTs" / "gamma_0001.nii.gz", tiny_geometry());
  write_file(root / "imagesTr" / "README.txt", "not an image, ignored");
  write_file(root / "dataset.json",
             R"({"channel_names": {"1": "T2", "0": "T1"}, "labels": {"background": 0, "edema": 2,
                 "core": 1}, "numTraining": 2, "file_ending": ".nii.gz"})");
  const Dataset ds = discover_dataset(root);
  EXPECT_EQ(ds.layout, "nnunet");
  EXPECT_EQ(ds.name, "Dataset042_Two");  // no "name" in dataset.json: the folder name
  EXPECT_EQ(ds.channel_names, (std::vector<std::string>{"T1", "T2"}));
  ASSERT_EQ(ds.labels.size(), 3u);
  EXPECT_EQ(ds.labels[1].name, "core");
  EXPECT_EQ(ds.labels[2].name, "edema");
  ASSERT_EQ(ds.training.size(), 2u);
  EXPECT_EQ(ds.training[0].id, "alpha");
  ASSERT_EQ(ds.training[0].images.size(), 2u);
  EXPECT_EQ(ds.training[0].images[0].filename(), "alpha_0000.nii.gz");
  EXPECT_EQ(ds.training[0].images[1].filename(), "alpha_0001.nii.gz");
  EXPECT_EQ(ds.training[0].label.filename(), "alpha.nii.gz");
  ASSERT_EQ(ds.test.size(), 1u);
  EXPECT_EQ(ds.test[0].images.size(), 2u);
  const ValidationReport r = validate_dataset(ds, ValidationOptions{});
  EXPECT_TRUE(r.problems.empty()) << r.text();

  // A case with one channel missing names the case.
  fs::remove(root / "imagesTr" / "beta_0001.nii.gz");
  try {
    discover_dataset(root);
    ADD_FAILURE() << "case with a missing channel accepted";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("\"beta\""), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("{0}"), std::string::npos) << e.what();
  }
}

TEST(Dataset, NnunetRegionLabelsAreRefused) {
  TempDir dir;
  write_image(dir / "imagesTr" / "a_0000.nii.gz", tiny_geometry());
  write_file(dir / "dataset.json",
             R"({"channel_names": {"0": "CT"}, "labels": {"background": 0, "whole": [1, 2]},
                 "file_ending": ".nii.gz"})");
  try {
    discover_dataset(dir.path());
    ADD_FAILURE() << "region label accepted";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("label \"whole\" is a region [1,2]"), std::string::npos)
        << e.what();
  }
}

// Label values are range-checked before they are narrowed (4294967298 wrapped to 2 and was
// accepted), and a file_ending that matches nothing says so instead of "no training cases".
TEST(Dataset, NnunetLabelValuesOutOfRangeAndWrongFileEndingAreNamed) {
  TempDir dir;
  write_image(dir / "imagesTr" / "a_0000.nii.gz", tiny_geometry());
  write_label(dir / "labelsTr" / "a.nii.gz", tiny_geometry());
  for (const std::string v : {"4294967298", "18446744073709551615", "-1", "65536"}) {
    write_file(dir / "dataset.json", R"({"channel_names": {"0": "CT"}, "labels": {"background": 0,
                   "liver": )" + v + R"(}, "file_ending": ".nii.gz"})");
    try {
      discover_dataset(dir.path());
      ADD_FAILURE() << "label value " << v << " accepted";
    } catch (const ArgumentError& e) {
      EXPECT_NE(std::string(e.what()).find("\"liver\" has value " + v), std::string::npos)
          << e.what();
    }
  }
  write_file(dir / "dataset.json", R"({"channel_names": {"0": "CT"}, "labels": {"background": 0,
                 "liver": 1}, "file_ending": ".nii"})");
  try {
    discover_dataset(dir.path());
    ADD_FAILURE() << "no case matched, yet accepted";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("\"file_ending\" is \".nii\""), std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("a_0000.nii.gz"), std::string::npos) << e.what();
  }
}

// Entries named like images that are not files (a looping or dangling symlink, a folder) are
// reported by name, not skipped (nor an internal filesystem error).
TEST(Dataset, EntriesNamedLikeImagesThatAreNotFilesAreReported) {
  TempDir dir;
  const fs::path root = dir / "nn";
  write_image(root / "imagesTr" / "a_0000.nii.gz", tiny_geometry());
  write_label(root / "labelsTr" / "a.nii.gz", tiny_geometry());
  write_file(root / "dataset.json", R"({"channel_names": {"0": "CT"}, "labels": {"background": 0,
                 "liver": 1}, "file_ending": ".nii.gz"})");
  fs::create_symlink("loop_0000.nii.gz", root / "imagesTr" / "loop_0000.nii.gz");
  fs::create_directories(root / "imagesTr" / "folder_0000.nii.gz");
  const Dataset ds = discover_dataset(root);
  ASSERT_EQ(ds.training.size(), 3u);
  const ValidationReport r = validate_dataset(ds, ValidationOptions{});
  EXPECT_EQ(r.bad_cases, (std::vector<std::string>{"folder", "loop"})) << r.text();
  EXPECT_NE(r.text().find("folder_0000.nii.gz: is a folder"), std::string::npos) << r.text();
  EXPECT_NE(r.text().find("loop_0000.nii.gz"), std::string::npos) << r.text();

  fs::create_directories(dir / "in");
  fs::create_symlink("nowhere.nii.gz", dir / "in" / "dangling.nii.gz");
  write_image(dir / "in" / "good.nii.gz", tiny_geometry());
  const auto inputs = discover_inputs(dir / "in", 1);
  ASSERT_EQ(inputs.size(), 2u);
  EXPECT_THROW(read_header(inputs[0].images[0]), IoError);
}

TEST(Dataset, PlainFoldersInferLabelsFromData) {
  TempDir dir;
  for (const std::string c : {"b", "a"}) {
    write_image(dir / "images" / (c + ".nrrd"), tiny_geometry());
    write_label(dir / "labels" / (c + ".nrrd"), tiny_geometry(), 7);
  }
  const Dataset ds = discover_dataset(dir.path());
  EXPECT_EQ(ds.layout, "folder");
  EXPECT_EQ(ds.channel_names, std::vector<std::string>{"unknown"});
  // Labels 0..7 inferred from the files (the largest value found), with default names.
  ASSERT_EQ(ds.labels.size(), 8u);
  for (int v = 0; v < 8; ++v) EXPECT_EQ(ds.labels[static_cast<size_t>(v)].value, v);
  EXPECT_EQ(ds.labels[0].name, "background");
  EXPECT_EQ(ds.labels[7].name, "label_7");
  ASSERT_EQ(ds.training.size(), 2u);
  EXPECT_EQ(ds.training[0].id, "a");
  EXPECT_EQ(ds.training[0].label.filename(), "a.nrrd");
  const ValidationReport r = validate_dataset(ds, ValidationOptions{});
  EXPECT_TRUE(r.problems.empty()) << r.text();

  // A value that would make more classes than a label map has: an error asking for dataset.json.
  TempDir huge;
  write_image(huge / "images" / "c.nrrd", tiny_geometry());
  write_label(huge / "labels" / "c.nrrd", tiny_geometry(), 1000);
  try {
    discover_dataset(huge.path());
    ADD_FAILURE() << "label value 1000 inferred as 1001 classes";
  } catch (const ArgumentError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("c.nrrd"), std::string::npos) << msg;
    EXPECT_NE(msg.find("dataset.json"), std::string::npos) << msg;
  }

  TempDir empty;
  EXPECT_THROW(discover_dataset(empty.path()), ArgumentError);
}

TEST(Dataset, PathsLeavingTheRootAreRefused) {
  TempDir dir;
  const fs::path root = dir / "set";
  make_msd(root, {"x"});
  write_image(dir / "outside.nii.gz", tiny_geometry());
  for (const std::string& bad :
       std::vector<std::string>{"../outside.nii.gz", "./imagesTr/../../outside.nii.gz",
                                (dir / "outside.nii.gz").string()}) {
    write_file(root / "dataset.json",
               R"({"modality": {"0": "CT"}, "labels": {"0": "background"}, "training": [
                   {"image": ")" +
                   bad + R"(", "label": "./labelsTr/x.nii.gz"}]})");
    try {
      discover_dataset(root);
      ADD_FAILURE() << bad << " accepted";
    } catch (const ArgumentError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find((root / "dataset.json").string()), std::string::npos) << msg;
      EXPECT_NE(msg.find("leaves the dataset folder"), std::string::npos) << msg;
      EXPECT_NE(msg.find("training[0]"), std::string::npos) << msg;
    }
  }
  // An absolute path inside the root is fine.
  write_file(root / "dataset.json",
             R"({"modality": {"0": "CT"}, "labels": {"0": "background"}, "training": [
                 {"image": ")" +
                 fs::absolute(root / "imagesTr/x.nii.gz").string() +
                 R"(", "label": "./labelsTr/x.nii.gz"}]})");
  EXPECT_EQ(discover_dataset(root).training.size(), 1u);
}

TEST(Dataset, MalformedJsonNamesTheFileAndTheError) {
  TempDir dir;
  make_msd(dir.path(), {"x"});
  write_file(dir / "dataset.json", R"({"modality": {"0": "CT"}, "training": [)");
  try {
    discover_dataset(dir.path());
    ADD_FAILURE() << "malformed JSON accepted";
  } catch (const ArgumentError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find((dir / "dataset.json").string()), std::string::npos) << msg;
    EXPECT_NE(msg.find("parse error"), std::string::npos) << msg;
  }
  auto expect_error = [&](const std::string& json_text, const std::string& part) {
    write_file(dir / "dataset.json", json_text);
    try {
      discover_dataset(dir.path());
      ADD_FAILURE() << json_text << " accepted";
    } catch (const ArgumentError& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("dataset.json"), std::string::npos) << e.what();
    }
  };
  expect_error(R"({"description": "neither layout"})", "layout not recognised");
  expect_error(R"([1, 2])", "expected a JSON object");
  expect_error(R"({"modality": {"0": "T1", "00": "T2"}, "labels": {"0": "background"}, "training": []})",
               "two entries for index 0");
  expect_error(
      R"({"modality": {"0": "CT"}, "labels": {"0": "background"}, "training": [{"x": 1}]})",
      "training[0] must be {\"image\"");
  expect_error(R"({"modality": {"0": "CT"}, "labels": {"0": "background", "1": "a", "01": "b"},
                   "training": []})",
               "share the value 1");
}

// Builds one bad case next to a good one and returns the report.
struct BadCase {
  std::string name;
  std::function<fs::path(const fs::path& root)> make;  // writes the case, returns the bad file
  std::string expected;                                // part of the message
  bool fatal = true;
  bool needs_voxels = false;
};

TEST(Validation, EachProblemNamesTheFileAndTheValuesFound) {
  const Geometry g = tiny_geometry();
  auto img = [](const fs::path& root, const std::string& c) {
    return root / "imagesTr" / (c + ".nii.gz");
  };
  auto lab = [](const fs::path& root, const std::string& c) {
    return root / "labelsTr" / (c + ".nii.gz");
  };
  const std::vector<BadCase> cases = {
      {"size_mismatch",
       [&](const fs::path& r) {
         write_image(img(r, "size_mismatch"), tiny_geometry({10, 9, 8}));
         write_label(lab(r, "size_mismatch"), tiny_geometry({10, 9, 7}));
         return lab(r, "size_mismatch");
       },
       "label geometry differs from image: size 10x9x7 vs 10x9x8"},
      {"origin_mismatch",
       [&](const fs::path& r) {
         write_image(img(r, "origin_mismatch"), g);
         Geometry moved = g;
         moved.origin[1] += 2.5;
         write_label(lab(r, "origin_mismatch"), moved);
         return lab(r, "origin_mismatch");
       },
       "origin (-4, 4.5, 10) vs (-4, 2, 10)"},
      {"undeclared",
       [&](const fs::path& r) {
         write_image(img(r, "undeclared"), g);
         write_label(lab(r, "undeclared"), g, 3);
         return lab(r, "undeclared");
       },
       "label values not declared in dataset.json: 3 (20 voxels)", true, true},
      {"fractional",
       [&](const fs::path& r) {
         write_image(img(r, "fractional"), g);
         write_image(lab(r, "fractional"), g, 0.5f);  // 0.5 + i % 7
         return lab(r, "fractional");
       },
       "label value 0.5 at voxel (0, 0, 0) is not an integer", true, true},
      {"nan_image",
       [&](const fs::path& r) {
         Volume v;
         v.geo = g;
         v.data.assign(static_cast<size_t>(g.voxels()), 1.0f);
         v.data[12] = NAN;
         v.data[13] = INFINITY;
         write_float_image(img(r, "nan_image"), v);
         write_label(lab(r, "nan_image"), g);
         return img(r, "nan_image");
       },
       "2 NaN/Inf voxels (first: nan at voxel (2, 1, 0))", true, true},
      {"too_small",
       [&](const fs::path& r) {
         write_image(img(r, "too_small"), tiny_geometry({10, 3, 2}));
         write_label(lab(r, "too_small"), tiny_geometry({10, 3, 2}));
         return img(r, "too_small");
       },
       "image size 10x3x2 is not a volume or a slice: at least two axes need 4 voxels or more"},
      {"missing_image",
       [&](const fs::path& r) {
         write_label(lab(r, "missing_image"), g);
         return img(r, "missing_image");
       },
       "image file is missing"},
      {"missing_label",
       [&](const fs::path& r) {
         write_image(img(r, "missing_label"), g);
         return lab(r, "missing_label");
       },
       "label file is missing"},
      {"not_an_image",
       [&](const fs::path& r) {
         write_file(img(r, "not_an_image"), "plain text\n");
         write_label(lab(r, "not_an_image"), g);
         return img(r, "not_an_image");
       },
       "not a readable image"},
      {"truncated",
       [&](const fs::path& r) {
         write_image(img(r, "truncated"), g);
         fs::resize_file(img(r, "truncated"), fs::file_size(img(r, "truncated")) - 40);
         write_label(lab(r, "truncated"), g);
         return img(r, "truncated");
       },
       "truncated", true, true},
      {"empty_label",
       [&](const fs::path& r) {
         write_image(img(r, "empty_label"), g);
         write_label(lab(r, "empty_label"), g, 0);
         return lab(r, "empty_label");
       },
       "label contains only background (0)", false, true},
  };
  TempDir dir;
  for (const BadCase& bc : cases) {
    SCOPED_TRACE(bc.name);
    const fs::path root = dir / bc.name;
    make_msd(root, {"good"});
    const fs::path bad_file = bc.make(root);
    write_file(root / "dataset.json", msd_json({"good", bc.name}));
    const Dataset ds = discover_dataset(root);
    for (const bool voxels : {true, false}) {
      ValidationOptions opt;
      opt.check_voxels = voxels;
      const ValidationReport r = validate_dataset(ds, opt);
      if (!voxels && bc.needs_voxels) {
        EXPECT_TRUE(r.problems.empty()) << "header-only validation read voxels:\n" << r.text();
        continue;
      }
      ASSERT_EQ(r.problems.size(), 1u) << r.text();
      const ValidationProblem& p = r.problems[0];
      EXPECT_EQ(p.case_id, bc.name);
      EXPECT_EQ(p.file, fs::absolute(bad_file));
      EXPECT_NE(p.message.find(bc.expected), std::string::npos)
          << "message: " << p.message << "\nexpected part: " << bc.expected;
      EXPECT_EQ(p.fatal, bc.fatal);
      EXPECT_EQ(r.bad_cases,
                bc.fatal ? std::vector<std::string>{bc.name} : std::vector<std::string>{});
      const std::string line = bc.name + ": " + fs::absolute(bad_file).string() + ": " +
                               (bc.fatal ? "" : "warning: ") + p.message + "\n";
      EXPECT_EQ(r.text(), line);
    }
  }
}

TEST(Validation, ChannelGeometryMismatchIsReported) {
  TempDir dir;
  const Geometry g = tiny_geometry();
  Geometry other = g;
  other.spacing[2] = 2.0;
  write_image(dir / "imagesTr" / "c_0000.nii.gz", g);
  write_image(dir / "imagesTr" / "c_0001.nii.gz", other);
  write_label(dir / "labelsTr" / "c.nii.gz", g);
  write_file(dir / "dataset.json",
             R"({"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "x": 1},
                 "file_ending": ".nii.gz"})");
  const ValidationReport r = validate_dataset(discover_dataset(dir.path()), ValidationOptions{});
  ASSERT_EQ(r.problems.size(), 1u) << r.text();
  EXPECT_EQ(r.problems[0].file.filename(), "c_0001.nii.gz");
  EXPECT_NE(r.problems[0].message.find("spacing (1.5, 1.5, 2) vs (1.5, 1.5, 3)"), std::string::npos)
      << r.problems[0].message;
  EXPECT_EQ(r.bad_cases, std::vector<std::string>{"c"});
}

TEST(DatasetInputs, FilesFoldersAndChannelGroups) {
  TempDir dir;
  const Geometry g = tiny_geometry();
  write_image(dir / "one" / "scan.nii.gz", g);
  auto single = discover_inputs(dir / "one" / "scan.nii.gz", 1);
  ASSERT_EQ(single.size(), 1u);
  EXPECT_EQ(single[0].id, "scan");
  // One file for a 2-channel model is an MSD 4-D case (its volumes are checked when it is read).
  auto packed = discover_inputs(dir / "one" / "scan.nii.gz", 2);
  ASSERT_EQ(packed.size(), 1u);
  EXPECT_EQ(packed[0].id, "scan");
  EXPECT_EQ(packed[0].images.size(), 1u);
  EXPECT_THROW(discover_inputs(dir / "absent.nii.gz", 1), IoError);

  write_image(dir / "msd" / "b.nii.gz", g);
  write_image(dir / "msd" / "a.mha", g);
  write_file(dir / "msd" / "notes.txt", "ignored");
  auto msd = discover_inputs(dir / "msd", 1);
  ASSERT_EQ(msd.size(), 2u);
  EXPECT_EQ(msd[0].id, "a");
  EXPECT_EQ(msd[1].id, "b");
  EXPECT_TRUE(msd[0].label.empty());
  EXPECT_EQ(discover_inputs(dir / "msd", 2).size(), 2u);  // MSD 4-D files, one case each
  write_image(dir / "msd" / "c_0000.nii.gz", g);
  try {
    discover_inputs(dir / "msd", 2);
    ADD_FAILURE() << "a folder mixing channel files and plain files accepted";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("a.mha"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("mixes"), std::string::npos) << e.what();
  }

  for (const std::string c : {"p1", "p2"})
    for (const std::string ch : {"_0000", "_0001"})
      write_image(dir / "nn" / (c + ch + ".nii.gz"), g);
  auto nn = discover_inputs(dir / "nn", 2);
  ASSERT_EQ(nn.size(), 2u);
  EXPECT_EQ(nn[1].id, "p2");
  ASSERT_EQ(nn[1].images.size(), 2u);
  EXPECT_EQ(nn[1].images[1].filename(), "p2_0001.nii.gz");
  write_image(dir / "nn" / "p3_0000.nii.gz", g);
  try {
    discover_inputs(dir / "nn", 2);
    ADD_FAILURE() << "case p3 with one of two channels accepted";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("\"p3\""), std::string::npos) << e.what();
  }
}

TEST(DatasetInputs, ChannelCountMismatchNamesTheCase) {
  TempDir dir;
  write_image(dir / "nn" / "only_0000.nii.gz", tiny_geometry());
  const auto ok = discover_inputs(dir / "nn", 1);
  ASSERT_EQ(ok.size(), 1u);
  EXPECT_EQ(ok[0].id, "only");
  try {
    discover_inputs(dir / "nn", 3);
    ADD_FAILURE() << "1 channel accepted for a 3-channel model";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("\"only\" has channels {0}, expected 0..2"),
              std::string::npos)
        << e.what();
  }
}

TEST(Dataset, CaseIdsStripExtensionsAndChannelSuffix) {
  EXPECT_EQ(case_id_from_path("/x/la_003.nii.gz", false), "la_003");
  EXPECT_EQ(case_id_from_path("/x/la_003_0000.nii.gz", true), "la_003");
  EXPECT_EQ(case_id_from_path("/x/la_003_0000.nii.gz", false), "la_003_0000");
  EXPECT_EQ(case_id_from_path("ct.NII", true), "ct");
  EXPECT_EQ(case_id_from_path("ct.nrrd", true), "ct");
  EXPECT_EQ(case_id_from_path("ct_12.mha", true), "ct_12");  // not a 4-digit channel
  EXPECT_EQ(case_id_from_path("a.b.mhd", true), "a.b");
}

TEST(Dataset, DefaultColoursAreFixedAndDistinct) {
  EXPECT_EQ(default_label_color(0), (std::array<uint8_t, 3>{0, 0, 0}));
  EXPECT_EQ(default_label_color(1), (std::array<uint8_t, 3>{255, 0, 0}));
  EXPECT_EQ(default_label_color(2), (std::array<uint8_t, 3>{0, 255, 0}));
  EXPECT_EQ(default_label_color(3), (std::array<uint8_t, 3>{0, 0, 255}));
  std::set<std::array<uint8_t, 3>> seen;
  for (int v = 1; v <= 300; ++v) {
    const auto c = default_label_color(v);
    EXPECT_EQ(c, default_label_color(v)) << v;
    // Vivid: the brightest channel is at least 3/4 of full scale (the hash maps to value >= 0.75).
    EXPECT_GE(std::max({c[0], c[1], c[2]}), 128) << "label " << v << " too dark";
    EXPECT_TRUE(seen.insert(c).second) << "label " << v << " repeats an earlier colour";
  }
}

TEST(DatasetRealData, HippocampusDiscoversAndValidatesClean) {
  MEDSEG_REQUIRE_SHARED("data/Task04_Hippocampus");
  const fs::path root = test::shared_dir() / "data/Task04_Hippocampus";
  const Dataset ds = discover_dataset(root);
  EXPECT_EQ(ds.layout, "msd");
  EXPECT_EQ(ds.channel_names, std::vector<std::string>{"MRI"});
  ASSERT_EQ(ds.training.size(), 208u);
  ASSERT_EQ(ds.labels.size(), 3u);
  EXPECT_EQ(ds.labels[0].name, "background");
  EXPECT_EQ(ds.labels[1].name, "Anterior");
  EXPECT_EQ(ds.labels[2].name, "Posterior");
  EXPECT_TRUE(ds.test.empty());
  const auto t0 = std::chrono::steady_clock::now();
  const ValidationOptions opt;
  const ValidationReport r = validate_dataset(ds, opt);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_TRUE(r.problems.empty()) << r.text();
  std::printf("[ info ] validated %zu hippocampus cases with voxel checks in %.2f s\n",
              ds.training.size(), seconds);
}

}  // namespace
}  // namespace medseg::io
