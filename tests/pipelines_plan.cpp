#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "data/plan.hpp"
#include "io/image_io.hpp"
#include "pipelines/plan.hpp"
#include "support/shared_data.hpp"

using namespace medseg;
namespace fs = std::filesystem;

namespace {

// A small MSD-layout dataset: 3 cases of 30 x 26 x 20 voxels at 1 x 1 x 2 mm, one structure.
fs::path write_msd_dataset(const fs::path& root) {
  fs::create_directories(root / "imagesTr");
  fs::create_directories(root / "labelsTr");
  nlohmann::json j;
  j["name"] = "TinyMSD";
  j["modality"] = {{"0", "MRI"}};
  j["labels"] = {{"0", "background"}, {"1", "blob"}};
  j["training"] = nlohmann::json::array();
  Rng rng(3);
  for (int i = 0; i < 3; ++i) {
    Volume img;
    LabelVolume lab;
    img.geo.size = {30, 26, 20};
    img.geo.spacing = {1, 1, 2};
    lab.geo = img.geo;
    for (int64_t z = 0; z < 20; ++z)
      for (int64_t y = 0; y < 26; ++y)
        for (int64_t x = 0; x < 30; ++x) {
          const bool blob = x > 10 && x < 20 && y > 8 && y < 16 && z > 5 && z < 12;
          img.data.push_back(static_cast<float>(50 + 40 * blob + rng.normal(0, 5)));
          lab.data.push_back(blob);
        }
    const std::string name = "tiny_" + std::to_string(i) + ".nii.gz";
    io::write_float_image(root / "imagesTr" / name, img);
    io::write_labels(root / "labelsTr" / name, lab);
    j["training"].push_back({{"image", "./imagesTr/" + name}, {"label", "./labelsTr/" + name}});
  }
  j["numTraining"] = 3;
  std::ofstream(root / "dataset.json") << j.dump(2);
  return root;
}

}  // namespace

TEST(PlanPipeline, WritesAPlanThatReadsBackAndPrintsIt) {
  const fs::path tmp =
      fs::temp_directory_path() / ("medseg_plan_pipeline_" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  pipelines::PlanConfig cfg;
  cfg.data = write_msd_dataset(tmp / "data");
  cfg.out = tmp / "out" / "plan.json";
  cfg.fingerprint_out = tmp / "out" / "fingerprint.json";
  testing::internal::CaptureStdout();
  EXPECT_EQ(pipelines::run_plan(cfg), 0);
  const std::string printed = testing::internal::GetCapturedStdout();
  const data::Plan plan = data::read_plan(cfg.out);
  EXPECT_EQ(printed, plan.describe());
  EXPECT_EQ(plan.dataset_name, "TinyMSD");
  EXPECT_EQ(plan.num_classes(), 2);
  EXPECT_EQ(plan.target_spacing, (std::array<double, 3>{1, 1, 2}));
  EXPECT_EQ(plan.median_shape, (std::array<int64_t, 3>{20, 26, 30}));
  EXPECT_TRUE(fs::exists(cfg.fingerprint_out));
  for (const auto& f : fs::directory_iterator(tmp / "out"))
    EXPECT_TRUE(f.path().filename() == "plan.json" || f.path().filename() == "fingerprint.json")
        << "stray file " << f.path();
  fs::remove_all(tmp);
}

TEST(PlanPipeline, MissingDatasetIsAnArgumentOrIoError) {
  pipelines::PlanConfig cfg;
  cfg.data = "/nonexistent/medseg/dataset";
  cfg.out = fs::temp_directory_path() / "medseg_never_written_plan.json";
  EXPECT_THROW(pipelines::run_plan(cfg), Error);
  EXPECT_FALSE(fs::exists(cfg.out));
}

// plan validates like train: a case with a label value the dataset does not declare (and one with
// a NaN voxel, which a header check cannot see) refuses the dataset, names the files, writes no
// plan; --exclude-bad-cases plans from the others.
TEST(PlanPipeline, RefusesCasesThatTrainingWouldRefuseUnlessExcluded) {
  const fs::path tmp =
      fs::temp_directory_path() / ("medseg_plan_badcase_" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  const fs::path data = write_msd_dataset(tmp / "data");
  LabelVolume lab = io::read_labels(data / "labelsTr" / "tiny_1.nii.gz");
  lab.data[100] = 7;
  io::write_labels(data / "labelsTr" / "tiny_1.nii.gz", lab);
  Volume img = io::read_image(data / "imagesTr" / "tiny_2.nii.gz");
  img.data[5] = std::numeric_limits<float>::quiet_NaN();
  io::write_float_image(data / "imagesTr" / "tiny_2.nii.gz", img);

  pipelines::PlanConfig cfg;
  cfg.data = data;
  cfg.out = tmp / "out" / "plan.json";
  testing::internal::CaptureStderr();
  try {
    pipelines::run_plan(cfg);
    ADD_FAILURE() << "a dataset with bad cases was planned";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("2 case(s)"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("--exclude-bad-cases"), std::string::npos) << e.what();
  }
  const std::string report = testing::internal::GetCapturedStderr();
  EXPECT_NE(report.find("tiny_1.nii.gz"), std::string::npos) << report;
  EXPECT_NE(report.find("tiny_2.nii.gz"), std::string::npos) << report;
  EXPECT_FALSE(fs::exists(cfg.out));

  cfg.exclude_bad_cases = true;
  testing::internal::CaptureStdout();
  testing::internal::CaptureStderr();
  EXPECT_EQ(pipelines::run_plan(cfg), 0);
  testing::internal::GetCapturedStdout();
  testing::internal::GetCapturedStderr();
  const data::Plan plan = data::read_plan(cfg.out);
  EXPECT_EQ(plan.num_classes(), 2);
  fs::remove_all(tmp);
}
