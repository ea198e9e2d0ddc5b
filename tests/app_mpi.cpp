// `mpirun -np 2 medseg train`: synchronous data-parallel training on the CPU (issue: MPI data parallel).
// Needs a medseg built with MPI and OpenMPI's mpirun; skips loudly otherwise.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/atomic_file.hpp"
#include "support/cli.hpp"

namespace fs = std::filesystem;
using namespace medseg;
using test::run;
using test::scratch;

namespace {

#ifdef MEDSEG_MPIEXEC
// Two processes on this machine. As root (CI containers) OpenMPI wants explicit consent; the
// single-copy mechanism is off because containers often forbid the ptrace it needs.
std::string mpirun(int np) {
  return "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 300 " + std::string(MEDSEG_MPIEXEC) +
         " --oversubscribe --mca btl_vader_single_copy_mechanism none -np " + std::to_string(np) + " ";
}
#define REQUIRE_MPI() (void)0
#else
std::string mpirun(int) { return ""; }
#define REQUIRE_MPI() GTEST_SKIP() << "medseg was built without MPI (install libopenmpi-dev openmpi-bin): " \
                                      "multi-process training is not tested"
#endif

// Every tensor of a safetensors file, as floats.
std::map<std::string, std::vector<float>> read_tensors(const fs::path& p) {
  const std::string bytes = read_file(p);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  const auto header = nlohmann::json::parse(bytes.substr(8, n));
  std::map<std::string, std::vector<float>> out;
  for (const auto& [name, t] : header.items()) {
    if (name == "__metadata__") continue;
    const size_t a = t.at("data_offsets")[0], b = t.at("data_offsets")[1];
    std::vector<float> v((b - a) / 4);
    std::memcpy(v.data(), bytes.data() + 8 + n + a, b - a);
    out[name] = std::move(v);
  }
  return out;
}

// Largest |a - b| over all tensors (and a hard failure when the names differ).
double max_difference(const fs::path& pa, const fs::path& pb) {
  const auto a = read_tensors(pa), b = read_tensors(pb);
  EXPECT_EQ(a.size(), b.size());
  double d = 0;
  for (const auto& [name, va] : a) {
    const auto it = b.find(name);
    if (it == b.end() || it->second.size() != va.size()) {
      ADD_FAILURE() << "tensor " << name << " missing or of another size in " << pb;
      return INFINITY;
    }
    for (size_t i = 0; i < va.size(); ++i) d = std::max(d, std::fabs(double(va[i]) - it->second[i]));
  }
  return d;
}

const char* kTrainArgs =
    " --iterations 6 --patch 16,32,32 --base-filters 4 --device cpu --threads 1 --val-fraction 0.25 "
    "--epoch-length 3 --seed 11 --log-level info";

fs::path sample(const fs::path& w) {
  EXPECT_EQ(run("sample-data --out " + (w / "data").string() + " --cases 4 --seed 2").code, 0);
  return w / "data";
}

// `medseg train` on w/data into w/<out> with kTrainArgs and `extra`, as one process or under mpirun.
test::Run train_one(const fs::path& w, const std::string& out, const std::string& extra = "",
                    const std::string& args = kTrainArgs) {
  return run("train --data " + (w / "data").string() + " --out " + (w / out).string() + args + extra);
}
// Two ranks with different command lines (MPMD): rank 0 trains on data0, rank 1 on data1 with extra1.
test::Run train_two_apart(const fs::path& w, const fs::path& data0, const fs::path& data1,
                          const std::string& extra1) {
  const std::string common = std::string(" train --out ") + (w / "model").string() + kTrainArgs;
  return test::run_shell(mpirun(1) + MEDSEG_BINARY + common + " --data " + data0.string() + " : -np 1 " +
                         MEDSEG_BINARY + common + " --data " + data1.string() + extra1);
}
test::Run train_two(const fs::path& w, const std::string& out, const std::string& extra = "",
                    const std::string& args = kTrainArgs) {
  return test::run_shell(mpirun(2) + MEDSEG_BINARY + " train --data " + (w / "data").string() + " --out " +
                         (w / out).string() + args + extra);
}

}  // namespace

TEST(DataParallel, TwoRanksWithTheSameBatchesEqualOneProcess) {
  REQUIRE_MPI();
  const fs::path w = scratch("mpi_same");
  sample(w);
  auto one = train_one(w, "one");
  ASSERT_EQ(one.code, 0) << one.output;
  auto two = train_two(w, "two", " --same-batches-on-all-ranks");
  ASSERT_EQ(two.code, 0) << two.output;
  EXPECT_NE(two.output.find("data-parallel training on 2 processes"), std::string::npos) << two.output;
  // Rank 0 compares a checksum of every rank's weights at each checkpoint and fails the run if they
  // differ; the last one is reported.
  EXPECT_NE(two.output.find("weights identical on all 2 ranks"), std::string::npos) << two.output;
  const auto plan = nlohmann::json::parse(read_file(w / "two/plan.json"));
  EXPECT_EQ(plan.at("training").at("processes"), 2);
  // Two copies of one gradient average to that gradient: (g + g) / 2 is exact in floating point, and
  // both runs use one thread per process, so the models agree to the bit (the tolerance is there
  // only for MPI implementations that reduce in another order).
  EXPECT_LE(max_difference(w / "one/model.safetensors", w / "two/model.safetensors"), 1e-6);
  fs::remove_all(w);
}

TEST(DataParallel, RanksSampleTheirOwnPatchesAndStayIdentical) {
  REQUIRE_MPI();
  const fs::path w = scratch("mpi_own");
  sample(w);
  auto one = train_one(w, "one");
  ASSERT_EQ(one.code, 0) << one.output;
  auto two = train_two(w, "two");
  ASSERT_EQ(two.code, 0) << two.output;
  EXPECT_NE(two.output.find("weights identical on all 2 ranks"), std::string::npos) << two.output;
  // Rank 1 trained on other patches, so the averaged gradients - and the model - differ from one process.
  EXPECT_GT(max_difference(w / "one/model.safetensors", w / "two/model.safetensors"), 1e-4);
  // Only rank 0 writes: one log, one bundle.
  EXPECT_TRUE(fs::exists(w / "two/checkpoint_last/model.safetensors"));
  fs::remove_all(w);
}

TEST(DataParallel, ARankWithBadInputStopsTheJobWithItsMessage) {
  REQUIRE_MPI();
  const fs::path w = scratch("mpi_bad");
  const fs::path data = sample(w);
  // Rank 1 reads a copy of the dataset in which one scan is truncated (a node with a broken copy).
  fs::copy(data, w / "broken", fs::copy_options::recursive);
  fs::path victim;
  for (const auto& e : fs::directory_iterator(w / "broken/imagesTr")) victim = e.path();
  ASSERT_FALSE(victim.empty());
  fs::resize_file(victim, 200);
  auto r = train_two_apart(w, data, w / "broken", "");
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("rank 1: "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("failed validation"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(victim.filename().string()), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(w / "model/model.safetensors"));
  EXPECT_FALSE(fs::exists(w / "model/checkpoint_last"));
  fs::remove_all(w);
}

TEST(DataParallel, ARankThatFailsAloneStopsTheOthersInsteadOfHanging) {
  REQUIRE_MPI();
  const fs::path w = scratch("mpi_abort");
  const fs::path data = sample(w);
  // Rank 1 cannot even parse its options; rank 0 goes on into the first collective and would wait
  // forever if rank 1 just exited. (timeout 300 in mpirun() turns a hang into a failure.)
  auto r = train_two_apart(w, data, data, " --no-such-option");
  EXPECT_NE(r.code, 0) << r.output;
  EXPECT_NE(r.code, 124) << "mpirun hung until the timeout:\n" << r.output;
  EXPECT_NE(r.output.find("(rank 1)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("no-such-option"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(w / "model/model.safetensors"));
  fs::remove_all(w);
}

TEST(DataParallel, ResumeBetweenCheckpointsContinuesExactly) {
  REQUIRE_MPI();
  const fs::path w = scratch("mpi_resume");
  const fs::path data = sample(w);
  // 12 steps, validation and checkpoints every 4; the renorm warm-up ends at step 6, so the running
  // statistics drive r and d from then on and must be every rank's own after the resume.
  const std::string args = std::string(" train --data ") + data.string() +
                           " --iterations 12 --patch 16,32,32 --base-filters 4 --device cpu --threads 1"
                           " --val-fraction 0.25 --epoch-length 4 --seed 5 --log-level warning --out ";
  auto full = test::run_shell(mpirun(2) + MEDSEG_BINARY + args + (w / "full").string());
  ASSERT_EQ(full.code, 0) << full.output;
  auto first = test::run_shell(mpirun(2) + MEDSEG_BINARY + args + (w / "res").string() + " --stop-after 5");
  ASSERT_EQ(first.code, 0) << first.output;
  EXPECT_TRUE(fs::exists(w / "res/checkpoint_last/rank_statistics.safetensors"));
  auto rest = test::run_shell(mpirun(2) + MEDSEG_BINARY + args + (w / "res").string() + " --resume");
  ASSERT_EQ(rest.code, 0) << rest.output;
  // Same ranks, same thread count, same batches: the same bits.
  EXPECT_EQ(max_difference(w / "full/model.safetensors", w / "res/model.safetensors"), 0.0);
  fs::remove_all(w);
}

// Two ranks on two GPUs (cuda:<local rank>), gradients averaged by NCCL when it loads: with the same
// batches on both ranks the result is the one-GPU run's. Not bit for bit: cuDNN picks its algorithms
// by timing, separately in each process, so sums may be ordered differently.
TEST(DataParallel, TwoGpuRanksWithTheSameBatchesEqualOneGpu) {
  REQUIRE_MPI();
  const std::string info = run("info").output;
  if (info.find("cuda:1") == std::string::npos)
    GTEST_SKIP() << "no CUDA device: two GPUs needed for one per rank (medseg info: "
                 << info.substr(info.find("CUDA")) << ")";
  std::string args = kTrainArgs;
  args.replace(args.find("--device cpu"), std::strlen("--device cpu"), "--device cuda --no-tf32");
  const fs::path w = scratch("mpi_gpu");
  sample(w);
  auto one = train_one(w, "one", "", args);
  ASSERT_EQ(one.code, 0) << one.output;
  auto two = train_two(w, "two", " --same-batches-on-all-ranks", args);
  ASSERT_EQ(two.code, 0) << two.output;
  if (info.find("NCCL (multi-GPU gradients): 2.") != std::string::npos) {
    EXPECT_NE(two.output.find("gradients averaged on the GPUs with NCCL"), std::string::npos) << two.output;
  }
  EXPECT_NE(two.output.find("weights identical on all 2 ranks"), std::string::npos) << two.output;
  EXPECT_LE(max_difference(w / "one/model.safetensors", w / "two/model.safetensors"), 1e-3);
}
