// `medseg train` and `medseg predict` with --device cuda against the same commands on the CPU, end to
// end through the binary (loader, loss, optimizer, validation, checkpoint, bundle, sliding window,
// folded inference). Exact fp32 (--no-tf32) so that the two devices differ only by summation order.
// Without a usable CUDA device the tests skip with "no CUDA device" and the reason `medseg info`
// gives.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "io/image_io.hpp"
#include "support/cli.hpp"
#include "support/train_log.hpp"

namespace fs = std::filesystem;
using namespace medseg;

namespace {
using test::run;
using test::scratch;
using test::step_losses;

// Empty when a CUDA device is usable, else why not.
std::string no_cuda_reason() {
  const auto r = run("info");
  const auto at = r.output.find("CUDA devices:");
  if (at == std::string::npos) return "medseg info gave no device line: " + r.output;
  const std::string line = r.output.substr(at, r.output.find('\n', at) - at);
  if (line.find("none usable") != std::string::npos) return line;
  if (r.output.find("cuda:0", at) == std::string::npos) return line;
  return "";
}

#define MEDSEG_REQUIRE_CUDA_BINARY()                        \
  do {                                                      \
    const std::string why_ = no_cuda_reason();              \
    if (!why_.empty()) GTEST_SKIP() << "no CUDA device: " << why_; \
  } while (0)

}  // namespace

// Runs everywhere: `medseg info` says whether the backend is compiled in and which devices it sees.
TEST(CudaCli, InfoNamesTheBackendAndTheDevices) {
  const auto r = run("info");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("CUDA backend:"), std::string::npos) << r.output;
  if (r.output.find("CUDA backend: compiled in") != std::string::npos) {
    EXPECT_NE(r.output.find("CUDA devices:"), std::string::npos) << r.output;
  }
}

TEST(CudaCli, TrainAndPredictOnTheGpuMatchTheCpu) {
  MEDSEG_REQUIRE_CUDA_BINARY();
  const fs::path w = scratch("cuda");
  ASSERT_EQ(run("sample-data --out " + (w / "data").string() + " --cases 6 --seed 4").code, 0);
  auto train = [&](const std::string& device) {
    const auto r = run("train --data " + (w / "data").string() + " --out " + (w / device).string() +
                       " --iterations 20 --patch 16,32,32 --base-filters 8 --batch-size 2 --seed 3 "
                       "--val-fraction 0.34 --epoch-length 10 --threads 2 --no-tf32 --device " + device);
    EXPECT_EQ(r.code, 0) << r.output;
    if (device == "cuda") {
      EXPECT_NE(r.output.find("device: cuda:0"), std::string::npos) << r.output;
    }
  };
  train("cpu");
  train("cuda");
  const auto lc = step_losses(w / "cpu"), lg = step_losses(w / "cuda");
  ASSERT_FALSE(lc.empty());
  ASSERT_EQ(lg.size(), lc.size());
  // Step 1: the same batch through the same initial weights: the loss agrees to fp32 noise.
  EXPECT_NEAR(lg[0], lc[0], 1e-4 * std::fabs(lc[0])) << "first step loss";
  // 20 SGD steps later the trajectories have drifted apart by rounding only (same batches).
  EXPECT_NEAR(lg.back(), lc.back(), 0.05 * std::fabs(lc.back())) << "last logged loss";

  // One model (the CPU one), predicted on both devices: the same masks up to voxels whose two
  // largest class probabilities are within rounding of each other.
  for (const char* device : {"cpu", "cuda"}) {
    const auto r = run("predict --model " + (w / "cpu").string() + " --input " +
                       (w / "data/imagesTs").string() + " --output " + (w / (std::string("pred_") + device)).string() +
                       " --no-tf32 --device " + device);
    ASSERT_EQ(r.code, 0) << r.output;
  }
  int64_t total = 0, differ = 0;
  for (const auto& e : fs::directory_iterator(w / "pred_cpu")) {
    const auto a = io::read_labels(e.path());
    const auto b = io::read_labels(w / "pred_cuda" / e.path().filename());
    ASSERT_EQ(a.data.size(), b.data.size()) << e.path();
    EXPECT_TRUE(a.geo.same_grid(b.geo, 0, 0, 0)) << e.path();
    for (size_t i = 0; i < a.data.size(); ++i) differ += a.data[i] != b.data[i];
    total += static_cast<int64_t>(a.data.size());
  }
  ASSERT_GT(total, 0);
  EXPECT_LE(static_cast<double>(differ), 1e-4 * static_cast<double>(total))
      << differ << " of " << total << " mask voxels differ between --device cpu and --device cuda";
}
