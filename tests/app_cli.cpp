// The medseg binary end to end, as a user runs it: sample data -> train -> predict (+export) ->
// evaluate, plus exit codes and messages for bad input.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>

#include <nlohmann/json.hpp>

#include "core/atomic_file.hpp"
#include "io/image_io.hpp"

namespace fs = std::filesystem;
using namespace medseg;

namespace {
struct Run {
  int code;
  std::string output;
};
Run run(const std::string& args) {
  const std::string cmd = std::string(MEDSEG_BINARY) + " " + args + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  while (p && fgets(buf, sizeof buf, p)) out += buf;
  const int status = p ? ::pclose(p) : -1;
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}
fs::path scratch(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("medseg_cli_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
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
