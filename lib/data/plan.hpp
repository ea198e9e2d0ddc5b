// Experiment planning: a dataset fingerprint (spacings, shapes, foreground intensities) and the
// plan derived from it (target spacing, per-channel normalisation, patch size, network depth),
// after nnU-Net's recipe (see ../shared/docs/field-reference.md).
//
// Axis conventions (written once, used everywhere in lib/data):
//  - spacings and Fingerprint shapes are (x, y, z), like medseg::Geometry;
//  - Plan::patch and Plan::median_shape are (z, y, x), like the tensor layout (N, D=z, H=y, W=x,
//  C);
//  - all of them are in the canonical orientation (axes permuted/flipped so that the direction is
//    closest to identity in LPS, see preprocess.hpp), not in the files' stored axis order.
#pragma once
#include <array>
#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "io/dataset.hpp"

namespace medseg::data {

// How one input channel is normalised.
//  "zscore": per image, (v - mean) / std over the cropped region (mean/std fields unused);
//  "ct":     clip to [clip_lo, clip_hi], then (v - mean) / std with the dataset's foreground
//  statistics.
struct ChannelNorm {
  std::string scheme = "zscore";
  double clip_lo = 0, clip_hi = 0, mean = 0, std = 1;
};

struct ChannelStats {
  double mean = 0, std = 1;
  double p00_5 = 0, p99_5 = 0;  // 0.5 and 99.5 percentiles
  int64_t samples = 0;          // foreground voxels that went into the statistics
};

struct CaseFingerprint {
  std::string id;
  std::array<double, 3> spacing{1, 1, 1};  // (x, y, z) mm, canonical orientation
  std::array<int64_t, 3> shape{0, 0, 0};   // (x, y, z) voxels, canonical orientation
  // (x, y, z) size of the bounding box of the non-zero image region (what preprocessing keeps).
  std::array<int64_t, 3> cropped_shape{0, 0, 0};
};

struct Fingerprint {
  std::vector<CaseFingerprint> cases;
  std::vector<ChannelStats> channels;             // per channel, over sampled foreground voxels
  std::array<double, 3> median_spacing{1, 1, 1};  // (x, y, z)
  std::array<int64_t, 3> median_shape{0, 0, 0};   // (x, y, z), median of cropped_shape
  nlohmann::json to_json() const;
};

// Foreground intensity statistics and the medians from per-case geometry and intensity samples.
// Exposed so that plans can be tested on synthetic fingerprints. `samples[c]` holds channel c's
// foreground samples; they are reordered (nth_element).
Fingerprint summarize_fingerprint(std::vector<CaseFingerprint> cases,
                                  std::vector<std::vector<float>> samples);

// Reads every training case (images and labels) of `ds`, or the first max_cases when max_cases > 0.
// Samples at most kFingerprintSamplesPerCase foreground (label > 0) voxels per case, seeded, for
// the intensity statistics; a case without foreground contributes none. Throws IoError on
// unreadable files and ArgumentError when the dataset has no labelled training case.
constexpr int kFingerprintSamplesPerCase = 10000;
Fingerprint fingerprint_dataset(const io::Dataset& ds, int max_cases = -1, uint64_t seed = 1234);

struct PlanOptions {
  int base_filters = 16;
  int max_filters = 320;
  // Upper bound on patch voxels. 128^3 is the patch nnU-Net reaches for CT at 8 GB with twice our
  // base filters; smaller datasets are clipped to their median shape long before.
  int64_t max_patch_voxels = int64_t{128} * 128 * 128;
  // Training memory the activations may take (see estimate_training_memory_gb); the patch shrinks
  // until it fits.
  double memory_budget_gb = 8.0;
  int batch_size = 2;
  int max_levels = 6;
  // Use this patch (z, y, x) instead of the computed one; it must be divisible by 2^(levels-1) for
  // some levels >= 1 with a bottleneck of >= 4 voxels per axis, else ArgumentError.
  std::optional<std::array<int64_t, 3>> patch_override;
};

struct Plan {
  std::string dataset_name;
  int in_channels = 1;
  std::vector<std::string> channel_names;
  std::vector<io::LabelInfo>
      labels;  // background (0) first; values are 0..K-1 (class index = value)
  int num_classes() const { return static_cast<int>(labels.size()); }
  std::array<double, 3> target_spacing{1, 1, 1};  // (x, y, z) mm
  std::vector<ChannelNorm> normalization;         // one per channel
  std::array<int64_t, 3> patch{0, 0, 0};  // (z, y, x) voxels, each divisible by 2^(levels-1)
  int levels = 1;                         // resolution levels of the U-Net (pools = levels-1)
  int base_filters = 16;
  int max_filters = 320;
  int batch_size = 2;
  std::array<int64_t, 3> median_shape{0, 0, 0};  // (z, y, x) after resampling and cropping

  nlohmann::json to_json() const;
  // Throws ArgumentError naming the field when `j` is malformed or inconsistent.
  static Plan from_json(const nlohmann::json& j);
  // Multi-line, human-readable summary (for `medseg plan`).
  std::string describe() const;
  // Hash (16 hex digits) of what preprocessing depends on: target spacing, normalisation, channels
  // and classes, and the preprocessing code version. Patch and network fields are excluded so that
  // changing them does not invalidate a preprocessing cache.
  std::string preprocessing_hash() const;
  // Filters at level l (0 = full resolution): base_filters * 2^l, capped at max_filters.
  int filters_at(int level) const;
};

// Target spacing (x, y, z): the median spacing; on an axis whose median spacing is more than 3x the
// smallest axis's, the 10th percentile of that axis's spacings instead (never finer than the other
// axes' target spacing).
std::array<double, 3> plan_target_spacing(const Fingerprint& fp);

// A rough peak estimate of training memory (GB) for a U-Net: activations saved for backward plus
// their gradients at all levels, float32. Used only to rank and bound patch sizes.
double estimate_training_memory_gb(const std::array<int64_t, 3>& patch, int levels,
                                   int base_filters, int max_filters, int batch_size,
                                   int in_channels, int num_classes);

// The number of levels a patch (z, y, x) supports: the largest L <= max_levels such that each axis
// is divisible by 2^(L-1) and has >= 4 voxels at the bottleneck; at least 1.
int levels_for_patch(const std::array<int64_t, 3>& patch, int max_levels = 6);

// The plan for `ds` from its fingerprint. Throws ArgumentError when the dataset's labels are not
// 0..K-1 or channel names do not match the fingerprint.
Plan make_plan(const io::Dataset& ds, const Fingerprint& fp, const PlanOptions& opt = {});

// plan.json on disk. read_plan throws IoError when the file cannot be read or is not JSON, and
// ArgumentError naming the file when a field is malformed; write_plan is atomic (temp + rename).
Plan read_plan(const std::filesystem::path& path);
void write_plan(const std::filesystem::path& path, const Plan& plan);

}  // namespace medseg::data
