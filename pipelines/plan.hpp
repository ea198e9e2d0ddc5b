// The `plan` stage: fingerprint a dataset, derive its plan, print it and write plan.json.
#pragma once
#include <array>
#include <cstdint>
#include <filesystem>
#include <optional>

namespace medseg::pipelines {

namespace fs = std::filesystem;

struct PlanConfig {
  fs::path data;               // dataset root (MSD, nnU-Net v2 or plain folder layout)
  fs::path out = "plan.json";  // where the plan is written (atomically); parent folders created
  fs::path fingerprint_out;    // optional: the dataset fingerprint as JSON (empty: not written)
  int base_filters = 16;
  int max_filters = 320;
  int64_t max_patch_voxels = int64_t{128} * 128 * 128;
  double memory_budget_gb = 8.0;
  int batch_size = 2;
  std::optional<std::array<int64_t, 3>> patch;  // (z, y, x) override
  int max_cases = -1;  // fingerprint only the first N labelled cases (<= 0: all)
  bool exclude_bad_cases = false;  // drop cases that fail validation instead of refusing the dataset
};

// Validates the dataset as `train` does (io::validate_dataset, report on stderr): a failing case
// throws ArgumentError unless exclude_bad_cases drops it with a warning. Prints Plan::describe()
// to stdout and writes the plan. Throws ArgumentError when no case is left, IoError when a file
// cannot be read or written. Returns 0.
int run_plan(const PlanConfig& cfg);

}  // namespace medseg::pipelines
