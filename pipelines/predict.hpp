// `medseg predict`: masks for new scans on their own grid, optional probability maps and review export.
#pragma once
#include <filesystem>
#include <string>
#include <vector>

namespace medseg::pipelines {

namespace fs = std::filesystem;

struct PredictConfig {
  // One model bundle, or several for an ensemble (their probabilities averaged; they must share the
  // labels, the channels and the preprocessing, as the folds of one plan do).
  std::vector<fs::path> models;
  fs::path input, output;
  // Mirroring test-time augmentation. -1: as the model was trained (on when its training mirrored
  // the patches, off for `--augment none`: flips it never saw would only add out-of-distribution
  // votes), 0: off, 1: on.
  int tta = -1;
  double step = 0.5;
  std::string device = "auto";
  bool tf32 = true;  // GPU convolutions on TF32 tensor cores
  bool probabilities = false;
  fs::path export_dir;        // empty: no review package
  int keep_largest = -1;      // -1: as recorded in the model, 0: off, 1: on
  bool fold_norms = true;     // inference-mode normalisation folded into the convolutions
  int tiles_per_batch = 2;
};

int run_predict(const PredictConfig& cfg);

}  // namespace medseg::pipelines
