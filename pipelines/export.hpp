// `medseg export`: the review package (lib/infer/export.hpp) for one scan and its mask.
#pragma once
#include <filesystem>
#include <vector>

#include "io/dataset.hpp"

namespace medseg::pipelines {

namespace fs = std::filesystem;

struct ExportConfig {
  fs::path image, mask, out;
  // The model's labels. Entries with value > 0 and colour (0,0,0) get the default palette colour (a
  // black outline would be invisible); empty: the values found in the mask, named label_N.
  std::vector<io::LabelInfo> labels;
  // The model's channels: a 4-D image must hold that many volumes (a 3-D image, one channel file of
  // a case, is always accepted as the backdrop); 0: any.
  int channels = 0;
};

// The case name comes from the image file name (nnU-Net _XXXX channel suffix stripped). The mask
// must be on the image's grid (IoError naming both files otherwise). Returns 0.
int run_export(const ExportConfig& cfg);

}  // namespace medseg::pipelines
