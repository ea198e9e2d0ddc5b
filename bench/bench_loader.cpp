// Loader throughput: patches per second for batch 2 of 64^3 from synthetic 140^3 cases (no IO),
// with all augmentations on at their default probabilities, 1 and 2 worker threads; plus the cost
// of one patch on the copy path and on the interpolating path. Validates first (the loader's
// batches equal make_batch's, bit for bit), then warms up, repeats, and reports medians.
//
// A training step consumes one batch of 2 every ~0.3-1 s, i.e. 2-7 patches/s: the loader must stay
// well above that. Usage: bench_loader [batches_per_repeat=40] [repeats=3]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "core/rng.hpp"
#include "data/loader.hpp"

using namespace medseg;
using namespace medseg::data;
using Clock = std::chrono::steady_clock;

namespace {

struct SyntheticCase {
  std::string id;
  std::vector<float> image;
  std::vector<uint16_t> labels;
  std::vector<std::vector<Index3>> locations;
};

// A smooth background with noise and two spherical structures (classes 1 and 2); class locations
// subsampled like preprocessing does (every 7th foreground voxel).
SyntheticCase make_case(int k, int64_t n) {
  SyntheticCase c;
  c.id = "synthetic_" + std::to_string(k);
  c.image.resize(static_cast<size_t>(n * n * n));
  c.labels.resize(c.image.size());
  c.locations.resize(3);
  Rng rng(static_cast<uint64_t>(k) + 100);
  const double r1 = 18 + 3 * k, r2 = 10 + 2 * k;
  const double c1[3] = {50.0 + 5 * k, 60, 70}, c2[3] = {90, 85.0 - 4 * k, 60};
  int64_t fg = 0;
  for (int64_t z = 0; z < n; ++z)
    for (int64_t y = 0; y < n; ++y)
      for (int64_t x = 0; x < n; ++x) {
        const size_t i = static_cast<size_t>((z * n + y) * n + x);
        auto d2 = [&](const double* c) {
          return (z - c[0]) * (z - c[0]) + (y - c[1]) * (y - c[1]) + (x - c[2]) * (x - c[2]);
        };
        uint16_t l = 0;
        if (d2(c1) < r1 * r1) l = 1;
        if (d2(c2) < r2 * r2) l = 2;
        c.labels[i] = l;
        c.image[i] =
            static_cast<float>(0.5 * std::sin(0.05 * z + 0.03 * y) + l + 0.2 * rng.normal());
        if (l > 0 && (fg++ % 7) == 0)
          c.locations[l].push_back(
              {static_cast<int32_t>(z), static_cast<int32_t>(y), static_cast<int32_t>(x)});
      }
  return c;
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown";
}

bool same_batch(const Batch& a, const Batch& b) {
  return a.labels == b.labels && a.case_ids == b.case_ids &&
         std::equal(a.image.data(), a.image.data() + a.image.numel(), b.image.data());
}

}  // namespace

int main(int argc, char** argv) {
  const int batches = argc > 1 ? std::max(1, std::atoi(argv[1])) : 40;
  const int repeats = argc > 2 ? std::max(1, std::atoi(argv[2])) : 3;
  const int64_t n = 140;
  const int batch_size = 2;
  const uint64_t seed = 2024;

  std::vector<SyntheticCase> owned;
  for (int k = 0; k < 4; ++k) owned.push_back(make_case(k, n));
  std::vector<CaseView> cases;
  for (const auto& c : owned) {
    CaseView v;
    v.id = c.id;
    v.shape = {n, n, n};
    v.channels = 1;
    v.image = c.image.data();
    v.labels = c.labels.data();
    v.class_locations = &c.locations;
    cases.push_back(v);
  }
  SamplerConfig sampler;
  sampler.patch = {64, 64, 64};
  const AugmentConfig all_on;  // every augmentation on, default probabilities

  std::printf("bench_loader: %d cases of %lld^3, batch %d of 64^3, %u hardware threads, CPU %s\n",
              static_cast<int>(cases.size()), static_cast<long long>(n), batch_size,
              std::thread::hardware_concurrency(), cpu_model().c_str());

  // ---- validate: the loader yields exactly make_batch's batches, in order, with 2 workers.
  {
    BatchLoader loader(cases, sampler, all_on, batch_size, 2, seed);
    for (uint64_t k = 0; k < 4; ++k) {
      const Batch got = loader.next();
      if (!same_batch(got, make_batch(cases, sampler, all_on, batch_size, seed, k))) {
        std::fprintf(stderr, "validation failed: loader batch %llu differs from make_batch\n",
                     static_cast<unsigned long long>(k));
        return 1;
      }
      for (int64_t i = 0; i < got.image.numel(); ++i)
        if (!std::isfinite(got.image.data()[i])) {
          std::fprintf(stderr, "validation failed: batch %llu value %lld is not finite\n",
                       static_cast<unsigned long long>(k), static_cast<long long>(i));
          return 1;
        }
    }
    std::printf("validated: loader batches 0-3 equal make_batch bit for bit, all finite\n");
  }

  // ---- per-patch cost of the two sampling paths and of the intensity transforms (1 thread).
  {
    const int reps = 20;
    std::vector<float> img(64 * 64 * 64);
    std::vector<uint16_t> lab(img.size());
    AugmentConfig copy_only = AugmentConfig::none();
    AugmentConfig affine = AugmentConfig::none();
    affine.enabled = true;
    affine.p_rotation = affine.p_scaling = 1.0;
    affine.p_mirror_per_axis = 0.0;
    for (const auto& [name, aug] :
         {std::pair<const char*, AugmentConfig>{"copy", copy_only},
          std::pair<const char*, AugmentConfig>{"rotate+scale", affine}}) {
      std::vector<double> t;
      Rng rng(1);
      for (int r = 0; r < reps; ++r) {
        const auto t0 = Clock::now();
        sample_augmented_patch(cases[static_cast<size_t>(r) % cases.size()], sampler, aug,
                               r % 3 == 0, rng, img.data(), lab.data());
        t.push_back(seconds_since(t0));
      }
      std::printf("patch path %-13s median %8.3f ms per 64^3 patch\n", name, 1e3 * median(t));
      std::printf("{\"bench\":\"loader_patch\",\"path\":\"%s\",\"ms_per_patch\":%.4f}\n", name,
                  1e3 * median(t));
    }
    AugmentConfig intensity_all = AugmentConfig();
    intensity_all.p_noise = intensity_all.p_blur = intensity_all.p_brightness =
        intensity_all.p_contrast = intensity_all.p_low_resolution = intensity_all.p_gamma =
            intensity_all.p_gamma_inverted = 1.0;
    intensity_all.p_blur_per_channel = intensity_all.p_low_resolution_per_channel = 1.0;
    std::vector<double> t;
    Rng rng(2);
    for (int r = 0; r < reps; ++r) {
      const auto t0 = Clock::now();
      augment_intensity(intensity_all, rng, img.data(), sampler.patch, 1);
      t.push_back(seconds_since(t0));
    }
    std::printf("intensity, every transform drawn: median %8.3f ms per 64^3 patch\n",
                1e3 * median(t));
    std::printf("{\"bench\":\"loader_intensity_all\",\"ms_per_patch\":%.4f}\n", 1e3 * median(t));
  }

  // ---- loader throughput: a consumer taking batches as fast as they come.
  for (const auto& [name, aug] :
       {std::pair<const char*, AugmentConfig>{"none", AugmentConfig::none()},
        std::pair<const char*, AugmentConfig>{"all", all_on}}) {
    for (int workers : {1, 2}) {
      std::vector<double> rates;
      uint64_t first = 0;
      for (int r = 0; r < repeats; ++r) {
        BatchLoader loader(cases, sampler, aug, batch_size, workers, seed, 4, first);
        for (int w = 0; w < 3; ++w) loader.next();  // warm-up: threads started, queue primed
        const auto t0 = Clock::now();
        for (int b = 0; b < batches; ++b) loader.next();
        rates.push_back(batches * batch_size / seconds_since(t0));
        first = loader.next_batch_index();  // later repeats see other batches
      }
      const double rate = median(rates);
      std::printf(
          "augment %-4s workers %d: %7.1f patches/s (%.1f batches/s, median of %d x %d "
          "batches)\n",
          name, workers, rate, rate / batch_size, repeats, batches);
      std::printf(
          "{\"bench\":\"loader\",\"augment\":\"%s\",\"workers\":%d,\"batch\":%d,"
          "\"patch\":64,\"patches_per_s\":%.2f}\n",
          name, workers, batch_size, rate);
    }
  }
  return 0;
}
