// `medseg train`: from a folder of labelled scans to a model bundle (see lib/nn/model_bundle.hpp).
#pragma once
#include <array>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

namespace medseg::pipelines {

namespace fs = std::filesystem;

struct TrainConfig {
  fs::path data;
  fs::path out;
  std::string norm = "batchrenorm";
  int batch_size = 0;                              // 0: from the plan (2)
  std::optional<std::array<int64_t, 3>> patch;     // (z, y, x); default from the plan
  int64_t iterations = 0;                          // 0: from --time-limit, else 250 x 40
  double val_fraction = 0.2;
  int fold = -1, folds = 5;                        // fold >= 0 selects k-fold validation
  std::string device = "auto";
  bool tf32 = true;  // GPU convolutions on TF32 tensor cores
  int threads = 0;                                 // 0: all cores
  uint64_t seed = 42;
  double time_limit_minutes = 0;                   // > 0: fit the whole schedule into this wall time
  bool resume = false;
  bool dry_run = false;
  bool exclude_bad_cases = false;
  int base_filters = 16;
  int max_filters = 320;
  std::string optimizer = "sgd";
  double lr = 1e-2;
  int64_t epoch_length = 0;                        // steps between validations; 0: automatic
  int workers = 1;                                 // loader threads
  // Augmentation preset: "none" (default), "mirror" or "full" (nnU-Net's set). A time-boxed run sees
  // each training case a few dozen times; nnU-Net's heavy set is made for ~1000 epochs and slows
  // fitting here (hippocampus, 500 steps, same seed: mean validation Dice 0.46 full, 0.51 mirror,
  // 0.74 none). predict turns mirroring TTA off by default for models trained without mirroring.
  std::string augment = "none";
  // At the last validation, also score the model in training mode (batch statistics): the norm
  // study's train/inference gap.
  bool report_batch_stats = false;
  // nnU-Net's deep supervision: auxiliary heads on the decoder at 1/2, 1/4, ... resolution with
  // downsampled labels and loss weights 2^-l (see nn::UNetConfig::deep_supervision).
  bool deep_supervision = false;
  int max_validation_cases = 0;                    // 0: all
  // Batch renorm schedule (fractions of the planned steps; overrides when >= 0).
  double renorm_warmup = 0.05, renorm_r_end = 0.25, renorm_d_end = 0.15;
  float r_max = 3, d_max = 5;
  // Moving-average rate of the running statistics (batchrenorm, batchnorm): alpha of the spec.
  // The spec's (and the paper's) 0.01 belongs to runs of ~100k steps. Our runs are a few thousand
  // steps with a fast-moving poly schedule, over which a 100-step average lags the weights: renorm's
  // r and d then correct towards stale statistics. Measured on the hippocampus data (500 steps, same
  // seed): mean validation Dice 0.29 at alpha 0.01 against 0.46 at 0.1 (PyTorch's BN default).
  float norm_momentum = 0.1f;
  int64_t renorm_warmup_steps = -1, renorm_r_end_step = -1, renorm_d_end_step = -1;
  // Stop after this many steps of this process (tests of resume); 0: no limit.
  int64_t stop_after_steps = 0;
  // Data-parallel runs (mpirun): every rank samples the same patches instead of its own. With it, P
  // ranks compute P copies of one gradient, and the run must equal a single-process run - the
  // check that the averaging is right (tests); it has no use in real training.
  bool same_batches_on_all_ranks = false;
};

// Returns 0 when done (or stopped by a signal after saving). Throws ArgumentError for invalid options
// or datasets, other medseg::Error subclasses for runtime failures; under mpirun, dist::GroupError
// for a failure every rank knows about (see pipelines/data_parallel.hpp).
int run_train(const TrainConfig& cfg);

}  // namespace medseg::pipelines
