// End-to-end training pipeline on a tiny synthetic dataset: bundle files, exact resume, bad input.
#include <gtest/gtest.h>
#include <zlib.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/atomic_file.hpp"
#include "core/error.hpp"
#include "core/log.hpp"
#include "infer/synthetic.hpp"
#include "io/image_io.hpp"
#include "nn/model_bundle.hpp"
#include "pipelines/train.hpp"
#include "support/train_log.hpp"

using namespace medseg;
using test::step_losses;
namespace fs = std::filesystem;

namespace {
// Generated once per process (ctest runs every test in its own) and removed when it exits.
struct TinyDataset {
  fs::path dir = fs::temp_directory_path() / ("medseg_train_ds_" + std::to_string(::getpid()));
  TinyDataset() {
    fs::remove_all(dir);
    infer::SyntheticOptions o;
    o.train_cases = 4;
    o.test_cases = 1;
    o.size = {32, 32, 12};
    infer::generate_synthetic_dataset(dir, o);
  }
  ~TinyDataset() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};

fs::path tiny_dataset() {
  static const TinyDataset ds;
  return ds.dir;
}

pipelines::TrainConfig tiny_config(const fs::path& out) {
  pipelines::TrainConfig c;
  c.data = tiny_dataset();
  c.out = out;
  c.iterations = 6;
  c.epoch_length = 3;
  c.patch = std::array<int64_t, 3>{8, 16, 16};
  c.base_filters = 4;
  c.threads = 2;
  c.device = "cpu";
  c.val_fraction = 0.25;
  return c;
}

}  // namespace

class TrainPipeline : public ::testing::Test {
 protected:
  void SetUp() override { set_log_level(LogLevel::Warn); }
  fs::path scratch(const std::string& name) {
    fs::path p = fs::temp_directory_path() / ("medseg_train_" + name + "_" + std::to_string(::getpid()));
    fs::remove_all(p);
    return p;
  }
};

TEST_F(TrainPipeline, WritesACompleteBundle) {
  auto out = scratch("bundle");
  ASSERT_EQ(pipelines::run_train(tiny_config(out)), 0);
  for (const char* f : {"plan.json", "model.safetensors", "log.jsonl", "log.csv", "curves.svg",
                        "checkpoint_last/model.safetensors", "checkpoint_last/optimizer.safetensors",
                        "checkpoint_last/state.json", "checkpoint_best/model.safetensors"})
    EXPECT_TRUE(fs::exists(out / f)) << f;
  auto plan = nlohmann::json::parse(read_file(out / "plan.json"));
  EXPECT_EQ(plan["training"]["steps"], 6);
  EXPECT_EQ(plan["network"]["norm"], "batchrenorm");
  EXPECT_EQ(plan["plan"]["labels"].size(), 3u);
  for (auto& e : fs::recursive_directory_iterator(out))
    EXPECT_EQ(e.path().filename().string().rfind(".tmp-", 0), std::string::npos) << e.path();
  fs::remove_all(out);
}

// Pause after 3 steps, resume for the remaining 3: the losses equal those of one uninterrupted run,
// bit for bit (batches are a function of seed and step; optimiser, running statistics and schedule are
// restored from the checkpoint).
TEST_F(TrainPipeline, ResumeContinuesBitIdentically) {
  auto a = scratch("straight"), b = scratch("resumed");
  auto ca = tiny_config(a);
  ca.epoch_length = 100;  // no validation in between: only the checkpoints differ
  ASSERT_EQ(pipelines::run_train(ca), 0);
  auto cb = tiny_config(b);
  cb.epoch_length = 100;
  cb.stop_after_steps = 3;
  ASSERT_EQ(pipelines::run_train(cb), 0);
  cb.stop_after_steps = 0;
  cb.resume = true;
  ASSERT_EQ(pipelines::run_train(cb), 0);
  auto la = step_losses(a), lb = step_losses(b);
  ASSERT_EQ(la.size(), lb.size());
  for (size_t i = 0; i < la.size(); ++i) EXPECT_EQ(la[i], lb[i]) << "logged step " << i;
  auto wa = read_file(a / "model.safetensors"), wb = read_file(b / "model.safetensors");
  EXPECT_TRUE(wa == wb) << "final weights differ after resume";
  fs::remove_all(a);
  fs::remove_all(b);
}

TEST_F(TrainPipeline, LeftoverOldCheckpointIsUsedWhenTheNewOneIsMissing) {
  auto out = scratch("old");
  auto c = tiny_config(out);
  c.stop_after_steps = 3;
  c.epoch_length = 100;
  ASSERT_EQ(pipelines::run_train(c), 0);
  // Simulate a kill between the two renames of a checkpoint replacement.
  fs::rename(out / "checkpoint_last", out / "checkpoint_last.old");
  c.stop_after_steps = 0;
  c.resume = true;
  ASSERT_EQ(pipelines::run_train(c), 0);
  auto state = nlohmann::json::parse(read_file(out / "checkpoint_last/state.json"));
  EXPECT_EQ(state["step"], 6);
  fs::remove_all(out);
}

TEST_F(TrainPipeline, BadOptionsAndDatasetsAreArgumentErrors) {
  auto out = scratch("bad");
  auto c = tiny_config(out);
  c.norm = "groupnorm";
  EXPECT_THROW(pipelines::run_train(c), ArgumentError);
  c = tiny_config(out);
  c.val_fraction = 1.5;
  EXPECT_THROW(pipelines::run_train(c), ArgumentError);
  c = tiny_config(out);
  c.data = out / "does-not-exist";
  EXPECT_THROW(pipelines::run_train(c), ArgumentError);
  // A dataset whose label has a different size from its image: validation report, exit code 2,
  // and no model written.
  fs::path bad = scratch("bad_ds");
  fs::copy(tiny_dataset(), bad, fs::copy_options::recursive);
  LabelVolume small;
  small.geo.size = {8, 8, 8};
  small.data.assign(512, 0);
  io::write_labels(bad / "labelsTr" / "synth_001.nii.gz", small);
  auto out2 = scratch("bad_out");
  c = tiny_config(out2);
  c.data = bad;
  try {
    pipelines::run_train(c);
    ADD_FAILURE() << "a case that fails validation must stop training";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("failed validation"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(out2 / "model.safetensors"));
  c.exclude_bad_cases = true;
  EXPECT_EQ(pipelines::run_train(c), 0);
  fs::remove_all(out2);
  fs::remove_all(bad);
  fs::remove_all(out);
}

// A scan that passes validation but fails when preprocessing reads it (a scale factor that
// overflows its finite stored values to Inf): the run fails naming the file, and the model folder
// it had made (plan, partial preprocessing cache) is removed; a folder that existed is kept.
// A case that passes validation but fails in preprocessing, after the model folder was made: a
// 1000 mm spacing (image and label alike, so their grids agree) that the plan's ~1 mm spacing would
// resample to more than 2^30 voxels.
TEST_F(TrainPipeline, AFailureBeforeTheFirstCheckpointLeavesNoModelFolder) {
  fs::path bad = scratch("overflow_ds");
  fs::copy(tiny_dataset(), bad, fs::copy_options::recursive);
  for (const fs::path& scan : {bad / "imagesTr" / "synth_001.nii.gz", bad / "labelsTr" / "synth_001.nii.gz"}) {
    std::vector<char> bytes;
    {
      gzFile in = gzopen(scan.c_str(), "rb");
      ASSERT_NE(in, nullptr);
      char buf[1 << 16];
      int n;
      while ((n = gzread(in, buf, sizeof buf)) > 0) bytes.insert(bytes.end(), buf, buf + n);
      gzclose(in);
    }
    ASSERT_GT(bytes.size(), 352u);
    for (int axis = 1; axis <= 3; ++axis) {  // pixdim[1..3]
      const float spacing = 1000.f;
      std::memcpy(bytes.data() + 76 + 4 * axis, &spacing, sizeof spacing);
    }
    const int16_t codes[2] = {1, 0};  // qform (from pixdim) only: no sform with the old spacing
    std::memcpy(bytes.data() + 252, codes, sizeof codes);
    gzFile out = gzopen(scan.c_str(), "wb");
    ASSERT_NE(out, nullptr);
    ASSERT_EQ(gzwrite(out, bytes.data(), static_cast<unsigned>(bytes.size())),
              static_cast<int>(bytes.size()));
    ASSERT_EQ(gzclose(out), Z_OK);
  }
  const fs::path parent = scratch("overflow_out");
  fs::create_directories(parent);
  auto c = tiny_config(parent / "model");
  c.data = bad;
  try {
    pipelines::run_train(c);
    ADD_FAILURE() << "a scan at 1000 mm spacing was trained on";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("case 'synth_001'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("2^30"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(parent / "model"));
  // The same failure into a folder that already existed: the folder stays.
  fs::create_directories(parent / "kept");
  c = tiny_config(parent / "kept");
  c.data = bad;
  EXPECT_ANY_THROW(pipelines::run_train(c));
  EXPECT_TRUE(fs::is_directory(parent / "kept"));
  fs::remove_all(parent);
  fs::remove_all(bad);
}

TEST_F(TrainPipeline, DeepSupervisionTrainsAuxiliaryHeadsAndInferenceLoadsTheModel) {
  auto out = scratch("deep_supervision");
  auto c = tiny_config(out);
  c.patch = std::array<int64_t, 3>{32, 32, 32};  // 4 levels: one auxiliary head at 1/2 resolution
  c.deep_supervision = true;
  ASSERT_EQ(pipelines::run_train(c), 0);
  const auto plan = nlohmann::json::parse(read_file(out / "plan.json"));
  ASSERT_GE(plan["network"].value("levels", 0), 4) << plan["network"].dump();
  EXPECT_EQ(plan["network"]["deep_supervision"], true);
  // The auxiliary head's weights are in the model and were trained (He init is not what was saved
  // after 6 steps of SGD with a non-zero gradient on them).
  nn::UNetConfig ucfg = nn::unet_config_from_json(plan["network"]);
  nn::UNet trained(ucfg, 0), fresh(ucfg, c.seed);
  nn::load_model(out / "model.safetensors", trained);
  auto pt = trained.parameters(), pf = fresh.parameters();
  bool found = false;
  for (size_t i = 0; i < pt.size(); ++i)
    if (pt[i].name == "ds.1.weight") {
      found = true;
      EXPECT_NE(pt[i].value->to_vector(), pf[i].value->to_vector());
    }
  EXPECT_TRUE(found);
  // The training loss is finite throughout, and inference (which ignores the heads) runs on the
  // loaded model.
  for (double l : step_losses(out)) EXPECT_TRUE(std::isfinite(l));
  Tensor x(Shape{1, 16, 32, 32, 1}), logits;
  x.fill(0.5f);
  trained.forward_infer(x, logits);
  EXPECT_EQ(logits.shape(), (Shape{1, 16, 32, 32, ucfg.num_classes}));
  fs::remove_all(out);
}
