// Dataset discovery (MSD, nnU-Net v2 and plain folders) and validation before training.
#pragma once
#include <array>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "io/volume.hpp"

namespace medseg::io {

namespace fs = std::filesystem;

struct LabelInfo {
  int value = 0;
  std::string name;
  std::array<uint8_t, 3> color{0, 0, 0};  // RGB 0-255; a default palette fills unnamed colours
};

struct CaseEntry {
  std::string id;                 // case name without channel suffix or extension
  std::vector<fs::path> images;   // one path per channel, absolute
  fs::path label;                 // empty when unlabelled
};

struct Dataset {
  fs::path root;
  std::string layout;                      // "msd" | "nnunet" | "folder"
  std::string name;
  std::vector<std::string> channel_names;  // modality per channel, e.g. {"CT"} or {"MRI"}
  std::vector<LabelInfo> labels;           // background (0) first, sorted by value
  std::vector<CaseEntry> training;
  std::vector<CaseEntry> test;             // imagesTs when present (unlabelled, or with labelsTs)
  // MSD with several modalities: each case's one image file is a 4-D NIfTI, one volume per channel.
  bool channels_in_volumes = false;
  int num_channels() const { return static_cast<int>(channel_names.size()); }
};

// Throws ArgumentError (layout not recognised, malformed dataset.json, entries leaving the root...)
// naming the file.
// Layouts: "msd" (dataset.json with "modality", "labels" {"0": "background", ...}, "training"
// [{image, label}], one file per case: 3-D, or 4-D with one volume per modality), "nnunet" (dataset.json with "channel_names", "labels"
// name -> value, "file_ending"; cases found from imagesTr/{CASE}_{XXXX}{ending} with
// labelsTr/{CASE}{ending}), "folder" (no dataset.json: images/ and labels/ with matching names, one
// channel "unknown"; labels 0 .. the largest value in the readable training label files, named
// "background", "label_1", ...; empty when no label file is readable or all are background; more
// than 64 classes is an ArgumentError asking for a dataset.json).
// imagesTs/ (and labelsTs/ when present) fill `test`. A training case whose label file is missing
// keeps the expected path so that validate_dataset reports it by name.
Dataset discover_dataset(const fs::path& root);

// Inputs for prediction: one file, or a folder of MSD images, nnU-Net _XXXX channel files, or plain
// files. `channels` is the model's channel count: with several, a case is either nnU-Net's channel
// files or one MSD 4-D file (its volume count is checked when it is read).
std::vector<CaseEntry> discover_inputs(const fs::path& input, int channels);

// Strips .nii.gz / .nii / .nrrd / .mha / .mhd and an nnU-Net _XXXX suffix when strip_channel is set.
std::string case_id_from_path(const fs::path& p, bool strip_channel);

// The default colour of label value v (a fixed, distinguishable palette).
std::array<uint8_t, 3> default_label_color(int v);

struct ValidationProblem {
  std::string case_id;
  fs::path file;         // the file concerned
  std::string message;   // what is wrong, with the values found
  bool fatal = true;     // fatal problems exclude the case (or stop the run)
};

struct ValidationOptions {
  // A training scan must be at least a slice: two axes of min_slice voxels or more. Thinner axes
  // (a few thick slices, or one) are fine: patches are padded beyond the scan.
  int64_t min_slice = 4;
  bool check_voxels = true;                  // read voxels (NaN/Inf, label values), not just headers
};

struct ValidationReport {
  std::vector<ValidationProblem> problems;
  std::vector<std::string> bad_cases;  // ids with at least one fatal problem
  bool ok() const { return bad_cases.empty(); }
  std::string text() const;  // one report, a line per problem
};

// Checks each training case: files present and readable, image/label geometry equal (within
// tolerance), channels' geometry equal, label values integral and in the declared set, no NaN/Inf,
// image at least a min_slice x min_slice slice. Never throws for a bad case; records it.
ValidationReport validate_dataset(const Dataset& ds, const ValidationOptions& opt);

// What `plan` and `train` do with a report that has bad cases: without `exclude`, throw an
// ArgumentError (exit 2) saying how many cases of `data` failed and that --exclude-bad-cases drops
// them; with it, remove them from ds.training with a warning naming them. A clean report is a no-op.
void drop_or_refuse_bad_cases(Dataset& ds, const ValidationReport& report, bool exclude,
                              const std::filesystem::path& data);

}  // namespace medseg::io
