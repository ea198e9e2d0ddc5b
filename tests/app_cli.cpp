// The medseg binary end to end, as a user runs it: sample data -> train -> predict (+export) ->
// evaluate, plus exit codes and messages for bad input.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>

#include <nlohmann/json.hpp>

#include "core/atomic_file.hpp"
#include "io/image_io.hpp"
#include "support/cli.hpp"
#include "support/four_d_nifti.hpp"
#include "support/nifti_header.hpp"
#include "support/shared_data.hpp"

namespace fs = std::filesystem;
using namespace medseg;

namespace {
using test::run;
using test::scratch;
// A real (barely trained) single-channel model bundle in w/model, from two generated cases, and the
// generated data in w/data. Seconds, not minutes: these tests are about plumbing, not accuracy.
void tiny_model(const fs::path& w) {
  ASSERT_EQ(run("sample-data --out " + (w / "data").string() + " --cases 3 --seed 5").code, 0);
  const auto r = run("train --data " + (w / "data").string() + " --out " + (w / "model").string() +
                     " --iterations 2 --patch 32,64,64 --base-filters 4 --device cpu --threads 2"
                     " --val-fraction 0.34 --log-level warning");
  ASSERT_EQ(r.code, 0) << r.output;
}
bool has_file_under(const fs::path& dir) {
  if (!fs::exists(dir)) return false;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) return true;
  return false;
}
}  // namespace

TEST(Cli, HelpVersionAndUsageErrors) {
  EXPECT_EQ(run("--version").code, 0);
  EXPECT_EQ(run("train --help").code, 0);
  auto r = run("train --data x --out y --bogus");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.output.find("bogus"), std::string::npos) << r.output;
  r = run("train --data x --out y --batch-size notanumber");
  EXPECT_EQ(r.code, 2) << r.output;
  r = run("frobnicate");
  EXPECT_EQ(r.code, 2);
  r = run("predict --model m");
  EXPECT_EQ(r.code, 2) << r.output;  // missing required options
  r = run("info");
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.output.find("oneDNN"), std::string::npos) << r.output;
}

TEST(Cli, DeviceCudaWithoutADeviceIsAOneLineError) {
  auto r = run("train --data x --out y --device cuda");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("--device cuda"), std::string::npos) << r.output;
  r = run("train --data x --out y --device tpu");
  EXPECT_EQ(r.code, 2) << r.output;
}

// The main job with a short budget: every output exists, masks have the input geometry, Dice of the
// organ clears a threshold a trained network reaches and an untrained one does not.
TEST(Cli, MainJobTrainsPredictsExportsAndEvaluates) {
  const fs::path w = scratch("main");
  ASSERT_EQ(run("sample-data --out " + (w / "data").string() + " --cases 8 --seed 3").code, 0);
  auto r = run("train --data " + (w / "data").string() + " --out " + (w / "model").string() +
               " --iterations 300 --patch 16,32,32 --base-filters 8 --device cpu --threads 2 "
               "--val-fraction 0.25 --epoch-length 150");
  ASSERT_EQ(r.code, 0) << r.output;
  r = run("predict --model " + (w / "model").string() + " --input " + (w / "data/imagesTs").string() +
          " --output " + (w / "pred").string() + " --export " + (w / "review").string() +
          " --no-tta --device cpu");
  ASSERT_EQ(r.code, 0) << r.output;
  int cases = 0;
  for (const auto& e : fs::directory_iterator(w / "data/imagesTs")) {
    const auto name = e.path().filename();
    ASSERT_TRUE(fs::exists(w / "pred" / name)) << name;
    const Geometry a = io::read_geometry(e.path()), b = io::read_geometry(w / "pred" / name);
    EXPECT_TRUE(a.same_grid(b, 1e-6, 1e-6, 1e-6)) << a.describe() << " vs " << b.describe();
    ++cases;
  }
  ASSERT_GT(cases, 0);
  r = run("evaluate --pred " + (w / "pred").string() + " --ref " + (w / "data/labelsTs").string() +
          " --out " + (w / "eval.json").string());
  ASSERT_EQ(r.code, 0) << r.output;
  ASSERT_TRUE(fs::exists(w / "eval.csv"));
  const auto j = nlohmann::json::parse(read_file(w / "eval.json"));
  const std::string dump = j.dump();
  double organ = -1;
  for (const auto& row : j.at("summary"))
    if (row.at("label") == 1) organ = row.at("dice").at("mean").get<double>();
  ASSERT_GE(organ, 0) << dump.substr(0, 2000);
  EXPECT_GT(organ, 0.6) << dump.substr(0, 2000);
  // A folder named like a prediction is an error naming it, not a case silently left out.
  fs::path first;
  for (const auto& e : fs::directory_iterator(w / "pred")) first = e.path();
  ASSERT_FALSE(first.empty());
  fs::remove(first);
  fs::create_directories(first);
  r = run("evaluate --pred " + (w / "pred").string() + " --ref " + (w / "data/labelsTs").string());
  EXPECT_NE(r.code, 0) << r.output;
  EXPECT_NE(r.output.find(first.filename().string() + ": is not a regular file"), std::string::npos)
      << r.output;
  fs::remove_all(w);
}

TEST(Cli, PredictBadInputsFailCleanlyWithoutOutputs) {
  const fs::path w = scratch("bad");
  // Missing model files.
  fs::create_directories(w / "model");
  std::ofstream(w / "scan.nii.gz") << "this is not a NIfTI file";
  auto r = run("predict --model " + (w / "model").string() + " --input " + (w / "scan.nii.gz").string() +
               " --output " + (w / "out.nii.gz").string() + " --device cpu");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("plan.json"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(w / "out.nii.gz"));
  fs::remove_all(w);
}

TEST(Cli, PredictRejectsUnreadableScansAndWrongChannelCounts) {
  const fs::path w = scratch("badscan");
  tiny_model(w);
  if (HasFatalFailure()) return;
  // An unreadable scan: the message names it, nothing is written.
  std::ofstream(w / "garbage.nii.gz") << "this is not a NIfTI file";
  auto r = run("predict --model " + (w / "model").string() + " --input " + (w / "garbage.nii.gz").string() +
               " --output " + (w / "new/deeper/out.nii.gz").string() + " --export " +
               (w / "review").string() + " --device cpu");
  EXPECT_NE(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("garbage.nii.gz"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(w / "new")) << "output folders made for a failed run";
  EXPECT_FALSE(has_file_under(w / "review"));
  // A two-channel case (nnU-Net layout: _0000, _0001) for a one-channel model.
  fs::path scan;
  for (const auto& e : fs::directory_iterator(w / "data/imagesTs")) scan = e.path();
  ASSERT_FALSE(scan.empty());
  fs::create_directories(w / "two");
  fs::copy_file(scan, w / "two/case_0000.nii.gz");
  fs::copy_file(scan, w / "two/case_0001.nii.gz");
  r = run("predict --model " + (w / "model").string() + " --input " + (w / "two").string() +
          " --output " + (w / "pred").string() + " --device cpu");
  EXPECT_NE(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("channel"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("case"), std::string::npos) << r.output;
  EXPECT_FALSE(has_file_under(w / "pred"));
  // The same model on a good scan: it was trained without mirroring (the default), so predict
  // leaves mirroring TTA off unless asked.
  r = run("predict --model " + (w / "model").string() + " --input " + scan.string() + " --output " +
          (w / "ok.nii.gz").string() + " --device cpu");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("TTA off (trained without mirroring)"), std::string::npos) << r.output;
  EXPECT_TRUE(fs::exists(w / "ok.nii.gz"));
  fs::remove_all(w);
}

// MSD's multi-modal layout end to end: a dataset whose cases are 4-D files (two modalities, one
// volume each) plans and trains, predict takes a folder of such files for the two-channel model and
// writes masks on their 3-D grid, and a 3-D scan for that model is refused by name.
TEST(Cli, MsdFourDModalitiesTrainAndPredict) {
  const fs::path w = scratch("msd4d");
  ASSERT_EQ(run("sample-data --out " + (w / "src").string() + " --cases 3 --seed 5").code, 0);
  // The generated dataset with a second modality per case (the scan negated), as MSD stores it.
  for (const std::string sub : {"imagesTr", "imagesTs"}) {
    fs::create_directories(w / "data" / sub);
    for (const auto& e : fs::directory_iterator(w / "src" / sub)) {
      const Volume v = io::read_image(e.path());
      std::vector<float> negated(v.data);
      for (float& x : negated) x = -x;
      test::write_4d_nifti(w / "data" / sub / e.path().filename(), v.geo, {v.data, negated});
    }
  }
  fs::copy(w / "src/labelsTr", w / "data/labelsTr");
  nlohmann::json j = nlohmann::json::parse(std::ifstream(w / "src/dataset.json"));
  j["modality"] = {{"0", "MRI"}, {"1", "MRI negated"}};
  std::ofstream(w / "data/dataset.json") << j.dump(2);

  auto r = run("train --data " + (w / "data").string() + " --out " + (w / "model").string() +
               " --iterations 2 --patch 32,64,64 --base-filters 4 --device cpu --threads 2"
               " --val-fraction 0.34");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("2 channel(s)"), std::string::npos) << r.output;
  const nlohmann::json plan = nlohmann::json::parse(std::ifstream(w / "model/plan.json"));
  EXPECT_EQ(plan["plan"]["in_channels"], 2) << plan.dump();

  r = run("predict --model " + (w / "model").string() + " --input " + (w / "data/imagesTs").string() +
          " --output " + (w / "pred").string() + " --device cpu");
  ASSERT_EQ(r.code, 0) << r.output;
  for (const auto& e : fs::directory_iterator(w / "src/imagesTs")) {
    const fs::path mask = w / "pred" / e.path().filename();
    ASSERT_TRUE(fs::exists(mask)) << mask;
    const Geometry src = io::read_geometry(e.path()), got = io::read_geometry(mask);
    EXPECT_TRUE(got.same_grid(src)) << io::geometry_difference(got, src);
  }
  fs::path scan3d;
  for (const auto& e : fs::directory_iterator(w / "src/imagesTs")) scan3d = e.path();
  r = run("predict --model " + (w / "model").string() + " --input " + scan3d.string() + " --output " +
          (w / "no.nii.gz").string() + " --device cpu");
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find(scan3d.string() + ": has 1 volume along its 4th axis; the model takes 2"),
            std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(w / "no.nii.gz"));
  // export: a 4-D scan of the model's channels gives a review package, one of 3 volumes is refused.
  fs::path scan4d, mask;
  for (const auto& e : fs::directory_iterator(w / "data/imagesTs")) scan4d = e.path();
  mask = w / "pred" / scan4d.filename();
  r = run("export --model " + (w / "model").string() + " --image " + scan4d.string() + " --mask " +
          mask.string() + " --out " + (w / "review").string());
  EXPECT_EQ(r.code, 0) << r.output;
  const Volume v = io::read_image(scan3d);
  test::write_4d_nifti(w / "three.nii.gz", v.geo, {v.data, v.data, v.data});
  r = run("export --model " + (w / "model").string() + " --image " + (w / "three.nii.gz").string() +
          " --mask " + mask.string() + " --out " + (w / "review3").string());
  EXPECT_NE(r.code, 0) << r.output;
  EXPECT_NE(r.output.find((w / "three.nii.gz").string() + ": has 3 volumes"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(w / "review3"));
  fs::remove_all(w);
}

// Scans of a few thick slices (cardiac short-axis stacks, thick-slab MR), or of one slice, train and
// predict: the plan's patch is padded beyond the thin axis. Only a scan that is not even a 4x4 slice
// is refused.
class ThinScans : public ::testing::TestWithParam<int> {};
INSTANTIATE_TEST_SUITE_P(Cli, ThinScans, ::testing::Values(5, 1));
TEST_P(ThinScans, TrainAndPredictOnTheirGrid) {
  const int slices = GetParam();
  const fs::path w = scratch("thin" + std::to_string(slices));
  ASSERT_EQ(run("sample-data --out " + (w / "src").string() + " --cases 4 --seed 5").code, 0);
  // Each case cut to `slices` slices through the middle of its labels (origin moved with the cut).
  for (const auto& e : fs::directory_iterator(w / "src/labelsTr")) {
    const std::string name = e.path().filename().string();
    const LabelVolume l = io::read_labels(e.path());
    const Volume v = io::read_image(w / "src/imagesTr" / name);
    int64_t lo = l.geo.size[2], hi = -1;
    for (int64_t z = 0; z < l.geo.size[2]; ++z)
      for (int64_t y = 0; y < l.geo.size[1]; ++y)
        for (int64_t x = 0; x < l.geo.size[0]; ++x)
          if (l.at(x, y, z)) lo = std::min(lo, z), hi = std::max(hi, z);
    ASSERT_GE(hi, lo) << name;
    const int64_t z0 = std::clamp<int64_t>((lo + hi) / 2 - slices / 2, 0, l.geo.size[2] - slices);
    Geometry g = l.geo;
    g.size[2] = slices;
    for (int r = 0; r < 3; ++r) g.origin[r] += g.direction[r * 3 + 2] * g.spacing[2] * z0;
    const int64_t plane = g.size[0] * g.size[1];
    LabelVolume tl{g, std::vector<uint16_t>(l.data.begin() + z0 * plane, l.data.begin() + (z0 + slices) * plane)};
    Volume tv;
    tv.geo = g;
    tv.data.assign(v.data.begin() + z0 * plane, v.data.begin() + (z0 + slices) * plane);
    fs::create_directories(w / "data/imagesTr");
    fs::create_directories(w / "data/labelsTr");
    io::write_float_image(w / "data/imagesTr" / name, tv);
    io::write_labels(w / "data/labelsTr" / name, tl);
  }
  fs::copy_file(w / "src/dataset.json", w / "data/dataset.json");
  auto r = run("train --data " + (w / "data").string() + " --out " + (w / "model").string() +
               " --iterations 2 --base-filters 4 --device cpu --threads 2 --val-fraction 0.25");
  ASSERT_EQ(r.code, 0) << r.output;
  fs::path scan;
  for (const auto& e : fs::directory_iterator(w / "data/imagesTr")) scan = e.path();
  r = run("predict --model " + (w / "model").string() + " --input " + scan.string() + " --output " +
          (w / "mask.nii.gz").string() + " --device cpu");
  ASSERT_EQ(r.code, 0) << r.output;
  const Geometry src = io::read_geometry(scan), got = io::read_geometry(w / "mask.nii.gz");
  EXPECT_TRUE(got.same_grid(src)) << io::geometry_difference(got, src);
  EXPECT_EQ(got.size[2], slices);
  fs::remove_all(w);
}

// Ensembles: several --model bundles average their probabilities. A model ensembled with itself gives
// the single model's bits (masks and probability maps); models that segment other labels or
// preprocess differently are refused by name before anything is written.
TEST(Cli, PredictEnsemblesModelsOfOnePlan) {
  const fs::path w = scratch("ensemble");
  tiny_model(w);
  if (HasFatalFailure()) return;
  fs::path scan;
  for (const auto& e : fs::directory_iterator(w / "data/imagesTs")) scan = e.path();
  const std::string model = (w / "model").string();
  auto r = run("predict --model " + model + " --input " + scan.string() + " --output " +
               (w / "one/mask.nii.gz").string() + " --probabilities --device cpu");
  ASSERT_EQ(r.code, 0) << r.output;
  r = run("predict --model " + model + " " + model + " --input " + scan.string() + " --output " +
          (w / "two/mask.nii.gz").string() + " --probabilities --device cpu");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("ensemble of 2 models"), std::string::npos) << r.output;
  size_t compared = 0;
  for (const auto& e : fs::directory_iterator(w / "one")) {
    const auto a = test::read_file_bytes(e.path());
    const auto b = test::read_file_bytes(w / "two" / e.path().filename());
    EXPECT_TRUE(a == b) << e.path().filename() << " differs between one model and the model twice";
    ++compared;
  }
  EXPECT_GE(compared, 4u);  // the mask and a probability map per class

  // Two different models (another seed): the ensemble's probability maps are the mean of the
  // single models' maps (--model given twice, as boost's composing option allows).
  r = run("train --data " + (w / "data").string() + " --out " + (w / "model_b").string() +
          " --iterations 2 --patch 32,64,64 --base-filters 4 --device cpu --threads 2"
          " --val-fraction 0.34 --seed 7 --log-level warning");
  ASSERT_EQ(r.code, 0) << r.output;
  r = run("predict --model " + (w / "model_b").string() + " --input " + scan.string() + " --output " +
          (w / "b/mask.nii.gz").string() + " --probabilities --device cpu");
  ASSERT_EQ(r.code, 0) << r.output;
  r = run("predict --model " + model + " --model " + (w / "model_b").string() + " --input " +
          scan.string() + " --output " + (w / "ab/mask.nii.gz").string() + " --probabilities --device cpu");
  ASSERT_EQ(r.code, 0) << r.output;
  double members_differ = 0;
  size_t maps = 0;
  for (const auto& e : fs::directory_iterator(w / "ab")) {
    const std::string name = e.path().filename().string();
    if (name.find("_prob_") == std::string::npos) continue;
    const Volume ab = io::read_image(e.path()), a = io::read_image(w / "one" / name),
                 b = io::read_image(w / "b" / name);
    ASSERT_EQ(ab.data.size(), a.data.size());
    ASSERT_EQ(ab.data.size(), b.data.size());
    for (size_t i = 0; i < ab.data.size(); ++i) {
      members_differ = std::max(members_differ, std::fabs(double(a.data[i]) - b.data[i]));
      ASSERT_NEAR(ab.data[i], 0.5 * (double(a.data[i]) + b.data[i]), 1e-5) << name << " voxel " << i;
    }
    ++maps;
  }
  EXPECT_EQ(maps, 3u);
  EXPECT_GT(members_differ, 1e-3) << "the two models agree: the test would not see a wrong member";

  const auto edited = [&](const std::string& name, const std::function<void(nlohmann::json&)>& edit) {
    fs::copy(w / "model", w / name, fs::copy_options::recursive);
    nlohmann::json j = nlohmann::json::parse(std::ifstream(w / name / "plan.json"));
    edit(j);
    std::ofstream(w / name / "plan.json") << j.dump(2);
    return (w / name).string();
  };
  const std::string renamed = edited("renamed", [](nlohmann::json& j) { j["plan"]["labels"][1]["name"] = "other"; });
  const std::string respaced = edited("respaced", [](nlohmann::json& j) {
    j["plan"]["target_spacing"][2] = j["plan"]["target_spacing"][2].get<double>() * 2;
  });
  const std::string rechanneled =
      edited("rechanneled", [](nlohmann::json& j) { j["plan"]["channel_names"][0] = "T2"; });
  for (const auto& [other, why] : {std::pair{renamed, "segment different labels"},
                                   std::pair{respaced, "preprocess differently"},
                                   std::pair{rechanneled, "read their channels as {T2} and {MRI}"},
                                   std::pair{(w / "model/plan.json").string(), "is a file"}}) {
    r = run("predict --model " + model + " " + other + " --input " + scan.string() + " --output " +
            (w / "bad/mask.nii.gz").string() + " --device cpu");
    EXPECT_NE(r.code, 0) << r.output;
    EXPECT_NE(r.output.find(other), std::string::npos) << r.output;
    EXPECT_NE(r.output.find(why), std::string::npos) << r.output;
    EXPECT_FALSE(fs::exists(w / "bad")) << r.output;
  }
  fs::remove_all(w);
}

// predict never writes over its inputs, reads every scan of a folder before the first mask (a bad
// one later in the folder used to leave the earlier masks behind), and refuses options that would
// run for ages or mean nothing; a dry run leaves no model folder; evaluate's --out is a .json.
TEST(Cli, PredictProtectsInputsAndChecksEveryScanFirst) {
  const fs::path w = scratch("protect");
  tiny_model(w);
  if (HasFatalFailure()) return;
  fs::path scan;
  for (const auto& e : fs::directory_iterator(w / "data/imagesTs")) scan = e.path();
  ASSERT_FALSE(scan.empty());
  const std::string model = " --model " + (w / "model").string() + " --device cpu --no-tta";
  fs::create_directories(w / "in");
  fs::copy_file(scan, w / "in/a.nii.gz");
  Volume nan_scan = io::read_image(scan);
  nan_scan.data[nan_scan.data.size() / 2] = std::nanf("");
  io::write_float_image(w / "in/b.nii.gz", nan_scan);
  auto r = run("predict" + model + " --input " + (w / "in").string() + " --output " + (w / "out").string());
  EXPECT_NE(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("b.nii.gz"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(w / "out")) << "a mask was written before a bad scan was found";
  fs::remove(w / "in/b.nii.gz");

  const std::string before = read_file(w / "in/a.nii.gz");
  for (const fs::path& out : {w / "in/a.nii.gz", w / "in"}) {
    r = run("predict" + model + " --input " + (out == w / "in" ? w / "in" : w / "in/a.nii.gz").string() +
            " --output " + out.string());
    EXPECT_EQ(r.code, 2) << r.output;
    EXPECT_NE(r.output.find("would overwrite the input scan"), std::string::npos) << r.output;
  }
  EXPECT_EQ(read_file(w / "in/a.nii.gz"), before) << "the input scan changed";

  std::ofstream(w / "occupied") << "a file";
  const std::vector<std::pair<std::string, std::string>> refused = {
      {" --output " + (w / "occupied").string(), "exists and is not a folder"},
      {" --output " + (w / "mask.png").string(), "must end in .nii.gz or .nii"},
      {" --output " + (w / "o.nii.gz").string() + " --step 0.01", "--step"},
      {" --output " + (w / "o.nii.gz").string() + " --step nan", "--step"},
      {" --output " + (w / "o.nii.gz").string() + " --tiles-per-batch 0", "--tiles-per-batch"},
      {" --output " + (w / "o.nii.gz").string() + " --keep-largest 7", "--keep-largest"}};
  for (const auto& [args, message] : refused) {
    r = run("predict" + model + " --input " + (w / "in/a.nii.gz").string() + args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.output;
    EXPECT_NE(r.output.find(message), std::string::npos) << args << "\n" << r.output;
    EXPECT_EQ(r.output.find("internal error"), std::string::npos) << r.output;
  }
  EXPECT_FALSE(fs::exists(w / "o.nii.gz"));
  EXPECT_FALSE(fs::exists(w / "mask.png"));
  r = run("predict" + model + " --input " + (w / "in/a.nii.gz").string() + " --output " +
          (w / "occupied/sub/o.nii.gz").string());
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("it is a file"), std::string::npos) << r.output;
  // An upper-case extension names a file too (ITK would refuse to write it).
  r = run("predict" + model + " --input " + (w / "in/a.nii.gz").string() + " --output " +
          (w / "UPPER.NII.GZ").string());
  EXPECT_EQ(r.code, 0) << r.output;
  ASSERT_TRUE(fs::is_regular_file(w / "UPPER.NII.GZ"));
  EXPECT_EQ(io::read_labels(w / "UPPER.NII.GZ").geo.size, io::read_geometry(w / "in/a.nii.gz").size);

  r = run("train --data " + (w / "data").string() + " --out " + (w / "dry").string() +
          " --dry-run --patch 32,64,64 --base-filters 4 --device cpu --threads 2");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_FALSE(fs::exists(w / "dry")) << "a dry run left a model folder";

  r = run("evaluate --pred " + (w / "in").string() + " --ref " + (w / "in").string() + " --out " +
          (w / "report.csv").string());
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("is a .json file"), std::string::npos) << r.output;
  fs::remove_all(w);
}

// train and plan check options and places before any work: option values out of range (as option
// errors, not internal checks), a --config that is no regular file (a FIFO hung for ever), a model
// folder that is the dataset or sits among its scans, a plan written over a dataset file, a resume
// on another dataset or from a damaged state.json.
TEST(Cli, TrainAndPlanRefuseBadOptionsPlacesAndResumes) {
  const fs::path w = scratch("trainopts");
  tiny_model(w);
  if (HasFatalFailure()) return;
  const std::string data = " --data " + (w / "data").string();
  const std::string out = " --out " + (w / "m2").string() + " --device cpu";
  ASSERT_EQ(mkfifo((w / "cfg.fifo").c_str(), 0600), 0);
  fs::create_directories(w / "cfg.dir");
  const std::vector<std::pair<std::string, std::string>> refused = {
      {"train" + data + out + " --lr 0", "--lr"},
      {"train" + data + out + " --time-limit nan", "--time-limit"},
      {"train" + data + out + " --base-filters 0", "--base-filters"},
      {"train" + data + out + " --renorm-warmup 2", "--renorm-warmup"},
      {"train" + data + out + " --patch 1024,1024,1024", "GB available"},
      {"train" + data + out + " --config " + (w / "cfg.fifo").string(), "not a regular file"},
      {"train" + data + out + " --config " + (w / "cfg.dir").string(), "not a regular file"},
      {"train" + data + " --device cpu --out " + (w / "data").string(), "is the dataset folder"},
      {"train" + data + " --device cpu --out " + (w / "data/imagesTr/m").string(), "scan folder"},
      {"plan" + data + " --batch-size 0", "--batch-size"},
      {"plan" + data + " --out " + (w / "data/dataset.json").string(), "is a file of the dataset"}};
  const std::string json_before = read_file(w / "data/dataset.json");
  for (const auto& [args, message] : refused) {
    const auto r = run(args + " --threads 2");
    EXPECT_EQ(r.code, 2) << args << "\n" << r.output;
    EXPECT_NE(r.output.find(message), std::string::npos) << args << "\n" << r.output;
    EXPECT_EQ(r.output.find("lib/"), std::string::npos) << "a source path in: " << r.output;
    EXPECT_EQ(r.output.find("unrecognised"), std::string::npos) << r.output;
  }
  EXPECT_EQ(read_file(w / "data/dataset.json"), json_before);
  EXPECT_FALSE(fs::exists(w / "m2"));
  EXPECT_FALSE(fs::exists(w / "data/imagesTr/m"));

  // --resume on another dataset (same cases, another name) and from a damaged state.json.
  fs::copy(w / "data", w / "other", fs::copy_options::recursive);
  auto j = nlohmann::json::parse(read_file(w / "other/dataset.json"));
  j["name"] = "AnotherDataset";
  write_text_file_atomic(w / "other/dataset.json", j.dump(1));
  const std::string resume = " --out " + (w / "model").string() +
                             " --resume --iterations 4 --patch 32,64,64 --base-filters 4 --device cpu"
                             " --threads 2 --val-fraction 0.34";
  auto r = run("train --data " + (w / "other").string() + resume);
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("was planned on dataset"), std::string::npos) << r.output;
  r = run("train" + data + resume + " --optimizer adamw");
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("was trained with --optimizer sgd"), std::string::npos) << r.output;
  const fs::path state = w / "model/checkpoint_last/state.json";
  ASSERT_TRUE(fs::exists(state));
  write_text_file_atomic(state, "{\"step\": \"two\"}");
  r = run("train" + data + resume);
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("state.json: malformed"), std::string::npos) << r.output;
  EXPECT_TRUE(fs::exists(w / "model/model.safetensors")) << "a failed resume removed the model";
  fs::remove_all(w);
}

// An edited bundle is refused at load, naming plan.json: a format this build does not write, a
// network whose classes disagree with the plan's labels, a norm epsilon that is not positive.
TEST(Cli, EditedModelBundlesAreRefusedNamingPlanJson) {
  const fs::path w = scratch("bundle");
  tiny_model(w);
  if (HasFatalFailure()) return;
  fs::path scan;
  for (const auto& e : fs::directory_iterator(w / "data/imagesTs")) scan = e.path();
  const auto original = nlohmann::json::parse(read_file(w / "model/plan.json"));
  const std::vector<std::pair<std::function<void(nlohmann::json&)>, std::string>> edits = {
      {[](nlohmann::json& j) { j.erase("format"); }, "format is missing"},
      {[](nlohmann::json& j) { j["format"] = "medseg-model-bundle/99"; }, "medseg-model-bundle/99"},
      {[](nlohmann::json& j) { j["network"]["num_classes"] = j["network"]["num_classes"].get<int>() + 1; },
       "classes"},
      {[](nlohmann::json& j) { j["network"]["norm_eps"] = -1; }, "norm_eps"},
      {[](nlohmann::json& j) { j["plan"]["version"] = 99; }, "version"}};
  for (const auto& [edit, message] : edits) {
    nlohmann::json j = original;
    edit(j);
    write_text_file_atomic(w / "model/plan.json", j.dump(1));
    const auto r = run("predict --model " + (w / "model").string() + " --input " + scan.string() +
                       " --output " + (w / "o.nii.gz").string() + " --device cpu --no-tta");
    EXPECT_EQ(r.code, 1) << message << "\n" << r.output;
    EXPECT_NE(r.output.find("plan.json"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find(message), std::string::npos) << r.output;
    EXPECT_FALSE(fs::exists(w / "o.nii.gz"));
  }
  fs::remove_all(w);
}

// Masks of real scans land on exactly the input grid, read back by an independent NIfTI parser:
// an oblique-free CT and an MR whose x and y axes are flipped, both 3 mm, int16, sform only.
TEST(Cli, PredictKeepsTheGridOfRealScans) {
  MEDSEG_REQUIRE_SHARED("data/TotalSegmentator_examples/imagesTr");
  const fs::path w = scratch("realgrid");
  tiny_model(w);
  if (HasFatalFailure()) return;
  const fs::path in = test::shared_dir() / "data/TotalSegmentator_examples/imagesTr";
  auto r = run("predict --model " + (w / "model").string() + " --input " + in.string() + " --output " +
               (w / "pred").string() + " --no-tta --step 1 --device cpu --threads 2");
  ASSERT_EQ(r.code, 0) << r.output;
  int n = 0;
  for (const auto& e : fs::directory_iterator(in)) {
    const auto a = test::parse_nifti(e.path());
    const auto b = test::parse_nifti(w / "pred" / e.path().filename());
    for (int i = 0; i < 4; ++i) EXPECT_EQ(a.dims[i], b.dims[i]) << e.path() << " dim " << i;
    const Geometry ga = a.geometry(), gb = b.geometry();
    EXPECT_TRUE(ga.same_grid(gb, 1e-5, 1e-4, 1e-6)) << ga.describe() << " vs " << gb.describe();
    EXPECT_EQ(b.intent_code, 1002) << "label intent";
    const auto labels = b.voxels();
    for (float v : labels) ASSERT_TRUE(v >= 0 && v <= 2 && v == std::floor(v)) << v;
    ++n;
  }
  EXPECT_EQ(n, 2);
  fs::remove_all(w);
}
