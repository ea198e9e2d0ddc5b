// `medseg sample-data`: the deterministic synthetic dataset (lib/infer/synthetic.hpp).
#pragma once
#include <cstdint>
#include <filesystem>

namespace medseg::pipelines {

namespace fs = std::filesystem;

struct SampleDataConfig {
  fs::path out;
  int cases = 16;  // training cases; test cases (imagesTs + labelsTs) = max(1, cases / 4)
  uint64_t seed = 1;
};

// Writes the MSD dataset into cfg.out (64 x 64 x 24 voxels per case). Returns 0.
int run_sample_data(const SampleDataConfig& cfg);

}  // namespace medseg::pipelines
