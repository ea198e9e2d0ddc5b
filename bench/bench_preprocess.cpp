// Preprocessing throughput on real data: the first 20 MSD Hippocampus cases (../shared/data).
// Validates first (every case preprocesses, its labels map back onto the source grid exactly,
// z-scored intensities have mean 0 / std 1), then times, as medians of `repeats` runs:
//   read      reading image + labels (NIfTI, gzip) only
//   compute   preprocess_case on volumes already in memory
//   cache     prepare_cache into an empty folder (read + preprocess + write), `threads` workers,
//             and again when every case is up to date (meta checks + mmap only)
// Usage: bench_preprocess [repeats=3] [threads=2]. Skips with a message when the data is absent
// (set MEDSEG_SHARED_DIR to the shared folder).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "core/threads.hpp"
#include "data/cache.hpp"
#include "data/plan.hpp"
#include "data/preprocess.hpp"
#include "io/dataset.hpp"
#include "io/image_io.hpp"

using namespace medseg;
using namespace medseg::data;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

fs::path find_hippocampus() {
  std::vector<fs::path> roots;
  if (const char* env = std::getenv("MEDSEG_SHARED_DIR")) roots.emplace_back(env);
  roots.emplace_back("../shared");
  roots.emplace_back("../../shared");
  for (const auto& r : roots)
    if (fs::exists(r / "data/Task04_Hippocampus/dataset.json"))
      return r / "data/Task04_Hippocampus";
  return {};
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int repeats = argc > 1 ? std::max(1, std::atoi(argv[1])) : 3;
  const int threads = argc > 2 ? std::max(1, std::atoi(argv[2])) : 2;
  const fs::path root = find_hippocampus();
  if (root.empty()) {
    std::printf(
        "bench_preprocess: SKIPPED: data/Task04_Hippocampus not found under "
        "$MEDSEG_SHARED_DIR, ../shared or ../../shared\n");
    return 0;
  }
  set_num_threads(threads);
  io::Dataset ds = io::discover_dataset(root);
  if (ds.training.size() > 20) ds.training.resize(20);
  const std::vector<io::CaseEntry>& cases = ds.training;
  const Fingerprint fp = fingerprint_dataset(ds);
  const Plan plan = make_plan(ds, fp);

  // ---- validate
  std::vector<Volume> images;
  std::vector<LabelVolume> labels;
  int64_t voxels = 0;
  for (const auto& e : cases) {
    images.push_back(io::read_image_channels(e.images));
    labels.push_back(io::read_labels(e.label));
    voxels += images.back().geo.voxels();
  }
  for (size_t i = 0; i < cases.size(); ++i) {
    const PreprocessedCase pc = preprocess_case(plan, cases[i].id, images[i], &labels[i], 1);
    std::vector<float> onehot(pc.labels.size() * 3, 0.0f);
    for (size_t v = 0; v < pc.labels.size(); ++v) onehot[v * 3 + pc.labels[v]] = 1.0f;
    const LabelVolume back = labels_to_source(pc.map, onehot.data(), 3);
    int64_t wrong = 0;
    for (size_t v = 0; v < back.data.size(); ++v) wrong += back.data[v] != labels[i].data[v];
    double s = 0, s2 = 0;
    for (float v : pc.image) s += v;
    const double mean = s / static_cast<double>(pc.image.size());
    for (float v : pc.image) s2 += (v - mean) * (v - mean);
    const double sd = std::sqrt(s2 / static_cast<double>(pc.image.size()));
    // Without resampling the way back is exact; z-scoring in float32 leaves ~1e-6 of drift.
    if ((!pc.map.resampled && wrong != 0) || std::abs(mean) > 1e-4 || std::abs(sd - 1) > 1e-4) {
      std::fprintf(stderr,
                   "bench_preprocess: VALIDATION FAILED on %s: %lld labels differ after the round "
                   "trip (resampled %d), mean %g, std %g\n",
                   cases[i].id.c_str(), static_cast<long long>(wrong), pc.map.resampled ? 1 : 0,
                   mean, sd);
      return 1;
    }
  }
  std::printf(
      "validated %zu cases (%lld source voxels): exact label round trip, z-score mean 0 "
      "std 1\n",
      cases.size(), static_cast<long long>(voxels));

  // ---- time
  std::vector<double> t_read, t_compute, t_cold, t_warm;
  const fs::path tmp =
      fs::temp_directory_path() / ("medseg_bench_preprocess_" + std::to_string(::getpid()));
  for (int r = 0; r < repeats + 1; ++r) {  // the first round warms caches and is dropped
    auto t0 = Clock::now();
    for (const auto& e : cases) {
      const Volume im = io::read_image_channels(e.images);
      const LabelVolume lb = io::read_labels(e.label);
      if (im.geo.voxels() != lb.geo.voxels()) return 1;
    }
    const double read = seconds_since(t0);
    t0 = Clock::now();
    for (size_t i = 0; i < cases.size(); ++i)
      if (preprocess_case(plan, cases[i].id, images[i], &labels[i], 1).image.empty()) return 1;
    const double compute = seconds_since(t0);
    fs::remove_all(tmp);
    t0 = Clock::now();
    auto cold = prepare_cache(plan, ds, cases, tmp, threads);
    const double t_c = seconds_since(t0);
    cold.clear();
    t0 = Clock::now();
    auto warm = prepare_cache(plan, ds, cases, tmp, threads);
    const double t_w = seconds_since(t0);
    if (r > 0) {
      t_read.push_back(read);
      t_compute.push_back(compute);
      t_cold.push_back(t_c);
      t_warm.push_back(t_w);
    }
  }
  fs::remove_all(tmp);

  const double n = static_cast<double>(cases.size());
  char host[256] = "unknown";
  ::gethostname(host, sizeof host - 1);
  std::printf("machine: %s, %u hardware threads, OpenMP threads %d\n", host,
              std::thread::hardware_concurrency(), threads);
  std::printf("read only            %8.1f cases/s  (%.2f ms/case)\n", n / median(t_read),
              1e3 * median(t_read) / n);
  std::printf("preprocess only      %8.1f cases/s  (%.2f ms/case)\n", n / median(t_compute),
              1e3 * median(t_compute) / n);
  std::printf("cache, cold (%d thr)  %8.1f cases/s  (%.2f ms/case)\n", threads, n / median(t_cold),
              1e3 * median(t_cold) / n);
  std::printf("cache, all hits      %8.1f cases/s  (%.2f ms/case)\n", n / median(t_warm),
              1e3 * median(t_warm) / n);
  std::printf(
      "{\"bench\":\"preprocess\",\"dataset\":\"Task04_Hippocampus\",\"cases\":%zu,"
      "\"threads\":%d,\"repeats\":%d,\"read_cases_per_s\":%.2f,"
      "\"preprocess_cases_per_s\":%.2f,\"cache_cold_cases_per_s\":%.2f,"
      "\"cache_warm_cases_per_s\":%.2f}\n",
      cases.size(), threads, repeats, n / median(t_read), n / median(t_compute), n / median(t_cold),
      n / median(t_warm));
  return 0;
}
