// The review package: everything a clinical reviewer needs to open a predicted mask in the viewers
// they already use, with the structures named and coloured, and the numbers they read first.
//
// Files written into out_dir for case CASE (names with the label value and a file-safe label name):
//   CASE_mask.nii.gz                  the mask (io::write_labels: uint8/uint16, intent 1002, the
//                                     scan's geometry)
//   CASE_slicer.ctbl                  3D Slicer colour table: "# comment" lines, then
//                                     "index name R G B A" (0-255; spaces in names become '_')
//   CASE_slicer.csv                   Slicer's CSV colour table:
//                                     LabelValue,Name,Color_R,Color_G,Color_B,Color_A
//   CASE_itksnap.txt                  ITK-SNAP label description ("# ITK-SnAP Label Description
//                                     File", IDX R G B A VIS MSH "LABEL", A in 0-1, index 0 "Clear
//                                     Label")
//   CASE_niivue.json                  NiiVue label colour map {R[], G[], B[], A[], I[], labels[]}
//   CASE_volumes.csv / .json          per structure: voxels, mL (voxels x voxel volume / 1000),
//                                     bounding box in voxel indices (x, y, z, inclusive), centroid
//                                     in LPS mm
//   CASE_overlay_V_NAME_VIEW.png      for each structure present, axial/coronal/sagittal slices
//                                     through its centroid (see below)
//   README.txt                        how to open each file in 3D Slicer, ITK-SNAP and NiiVue
// Every file is written atomically; if any write fails, the files of this case already written by
// this call are removed again before the error propagates (README.txt, shared by all cases, stays).
//
// Colour tables hold background (0, alpha 0), every label given, and any other value found in the
// mask (named "label_V", default palette colour), so that no voxel shows up uncoloured.
//
// Overlays: the scan (channel 0) windowed to its 1st-99th percentile in grey (percentiles from at
// most 4 million evenly strided voxels), with the outline of every label in the slice drawn in its
// colour. Slices are shown in radiological convention using the direction matrix (each index axis
// is matched to the closest patient axis): axial = patient left on the image right, anterior up;
// coronal = left on the right, superior up; sagittal = anterior left, superior up. Pixels are
// repeated by integer factors so that their physical aspect ratio is kept (rounded to an integer
// ratio) and the short side is at least 256 pixels.
#pragma once
#include <filesystem>
#include <string>
#include <vector>

#include "io/dataset.hpp"
#include "io/volume.hpp"

namespace medseg::infer {

namespace fs = std::filesystem;

// image and mask must share the grid (ArgumentError naming both geometries otherwise). `labels` may
// or may not contain background. Returns the paths written (README.txt last).
std::vector<fs::path> write_review_package(const fs::path& out_dir, const std::string& case_id,
                                           const Volume& image, const LabelVolume& mask,
                                           const std::vector<io::LabelInfo>& labels);

// One structure of the volume report.
struct StructureVolume {
  int label = 0;
  std::string name;
  int64_t voxels = 0;
  double volume_ml = 0;
  std::array<int64_t, 3> bbox_min{0, 0, 0}, bbox_max{-1, -1, -1};  // voxel indices (x, y, z)
  std::array<double, 3> centroid_lps{0, 0, 0};  // mm; meaningless when voxels == 0
};
// The report for each label with value > 0 in `labels`, in order of value.
std::vector<StructureVolume> structure_volumes(const LabelVolume& mask,
                                               const std::vector<io::LabelInfo>& labels);

// Parsers of the written colour tables (for tests and round trips): value, name and RGB per entry,
// in file order. IoError naming the file and line when malformed.
std::vector<io::LabelInfo> read_slicer_ctbl(const fs::path& path);
std::vector<io::LabelInfo> read_itksnap_labels(const fs::path& path);
std::vector<io::LabelInfo> read_niivue_colormap(const fs::path& path);

}  // namespace medseg::infer
