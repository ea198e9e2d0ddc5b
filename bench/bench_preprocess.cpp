// Preprocessing throughput on real data: the first 20 MSD Hippocampus cases (../shared/data).
// Validates first (every case preprocesses, its labels map back onto the source grid exactly,
// z-scored intensities have mean 0 / std 1), then times, as medians of `repeats` runs:
//   read      reading image + labels (NIfTI, gzip) only
//   compute   preprocess_case on volumes already in memory
//   cache     prepare_cache into an empty folder (read + preprocess + write), `threads` workers,
//             and again when every case is up to date (meta checks + mmap only)
// Then, without data: mapping 3-class probabilities of a CT-sized case (512 x 512 x 300 at
// 0.7 x 0.7 x 1 mm, preprocessed at 1.5 mm) back to the source grid, labels only and full
// probabilities, with the peak resident memory (the probabilities alone are 0.94 GB).
// Usage: bench_preprocess [repeats=3] [threads=2] [big=1]. The Hippocampus part is skipped with a
// message when the data is absent (set MEDSEG_SHARED_DIR to the shared folder).
#include <sys/resource.h>
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

double peak_rss_gb() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / (1024.0 * 1024.0);  // ru_maxrss is in KiB on Linux
}

// Back-mapping of a CT-sized case; returns 0, or 1 when the result is wrong.
int bench_back_to_source(int threads) {
  Geometry src;
  src.size = {512, 512, 300};
  src.spacing = {0.7, 0.7, 1.0};
  src.direction = {-1, 0, 0, 0, -1, 0, 0, 0, 1};  // flipped x and y, as many CT headers are
  CaseGeometryMap map;
  map.source = src;
  map.orientation = canonical_orientation(src);
  map.canonical = reoriented_geometry(src, map.orientation);
  map.resampled = true;
  const auto r = resampled_size(map.canonical.size, map.canonical.spacing, {1.5, 1.5, 1.5});
  map.resampled_shape = {r[2], r[1], r[0]};
  for (int a = 0; a < 3; ++a) {  // a body-sized crop: 10% off each side
    map.crop.begin[a] = map.resampled_shape[a] / 10;
    map.crop.end[a] = map.resampled_shape[a] - map.resampled_shape[a] / 10;
  }
  const auto s = map.shape();
  const int64_t n = s[0] * s[1] * s[2];
  // Class 2 in the upper half of the crop (z), class 1 elsewhere inside: a known answer.
  std::vector<float> probs(static_cast<size_t>(n * 3), 0.0f);
  for (int64_t v = 0; v < n; ++v) probs[v * 3 + (v / (s[1] * s[2]) >= s[0] / 2 ? 2 : 1)] = 1.0f;
  const double rss0 = peak_rss_gb();
  auto t0 = Clock::now();
  const LabelVolume labels = labels_to_source(map, probs.data(), 3);
  const double t_labels = seconds_since(t0);
  const double rss1 = peak_rss_gb();
  t0 = Clock::now();
  const std::vector<float> full = probabilities_to_source(map, probs.data(), 3);
  const double t_full = seconds_since(t0);
  const double rss2 = peak_rss_gb();
  // Source z 200 / 100 sit at resampled z 133 / 66 (crop 20..180, class 2 from 100 on); the corner
  // (0, 0, 0) is outside the crop.
  if (labels.at(256, 256, 200) != 2 || labels.at(256, 256, 100) != 1 || labels.at(0, 0, 0) != 0 ||
      full[static_cast<size_t>(((200 * 512 + 256) * 512 + 256) * 3 + 2)] != 1.0f) {
    std::fprintf(stderr, "bench_preprocess: VALIDATION FAILED on the CT-sized back-mapping\n");
    return 1;
  }
  std::printf(
      "back to source, 512x512x300 from %lldx%lldx%lld (z,y,x), 3 classes, %d threads: labels "
      "%.2f s (+%.2f GB peak RSS), probabilities %.2f s (+%.2f GB peak RSS)\n",
      static_cast<long long>(s[0]), static_cast<long long>(s[1]), static_cast<long long>(s[2]),
      threads, t_labels, rss1 - rss0, t_full, rss2 - rss1);
  std::printf(
      "{\"bench\":\"back_to_source\",\"source\":[512,512,300],\"classes\":3,\"threads\":%d,"
      "\"labels_s\":%.3f,\"probabilities_s\":%.3f,\"peak_rss_gb\":%.3f}\n",
      threads, t_labels, t_full, rss2);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const int repeats = argc > 1 ? std::max(1, std::atoi(argv[1])) : 3;
  const int threads = argc > 2 ? std::max(1, std::atoi(argv[2])) : 2;
  const bool big = argc > 3 ? std::atoi(argv[3]) != 0 : true;
  set_num_threads(threads);
  const fs::path root = find_hippocampus();
  if (root.empty()) {
    std::printf(
        "bench_preprocess: SKIPPED the Hippocampus part: data/Task04_Hippocampus not found under "
        "$MEDSEG_SHARED_DIR, ../shared or ../../shared\n");
    return big ? bench_back_to_source(threads) : 0;
  }
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
  return big ? bench_back_to_source(threads) : 0;
}
