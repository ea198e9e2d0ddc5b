// `medseg evaluate`: segmentation quality of predicted masks against reference masks.
#pragma once
#include <filesystem>
#include <vector>

namespace medseg::pipelines {

namespace fs = std::filesystem;

struct EvaluateConfig {
  fs::path pred, ref;       // folders of masks matched by file name, or two single files
  std::vector<int> labels;  // empty: every non-zero value found in any prediction or reference
  fs::path out_json;        // the JSON report; the CSV goes next to it (same stem, .csv)
};

// Per case and label: Dice, IoU, HD95 and mean surface distance (mm) as defined in
// lib/infer/metrics.hpp; per label: mean and std (population, ddof 0) over the cases where the
// value is defined (HD95/MSD are undefined, NaN, where exactly one mask is empty; they are null in
// JSON, empty in CSV and left out of the means, and the number of cases used is reported).
// Prints the table to stdout and writes JSON and CSV. Errors: a prediction without a reference, or
// a reference without a prediction -> IoError naming the missing file; mismatched geometry ->
// IoError naming both files and the difference. Returns 0.
int run_evaluate(const EvaluateConfig& cfg);

}  // namespace medseg::pipelines
