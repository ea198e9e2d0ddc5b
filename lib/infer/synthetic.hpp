// A deterministic synthetic dataset that looks like real scans, for the out-of-the-box demo, the
// tutorials and end-to-end tests.
//
// What a case contains (MRI-like; intensities below are in reference units, the stored integers are
// 0.4 times them, which keeps every contrast-to-noise ratio and makes the files smaller):
//  - geometry: size opt.size (x, y, z), spacing 0.8 x 0.8 x 2.5 mm, direction diag(-1, -1, 1) (the
//    "flipped x and y" that a RAS-stored NIfTI shows in ITK's LPS space), an origin that varies per
//    case;
//  - a body: an elliptic cylinder of soft tissue (about 120, with a smooth plane-wave texture and a
//    few small bright blobs) wrapped in a fat layer (about 260), air (0) outside;
//  - label 1 "organ": a lobulated ellipsoid with random semi-axes (8-15 mm in-plane, 12-20 mm in
//    z), random rotation and position, brighter than tissue (about 200, varying per case);
//  - label 2 "lesion": a smaller rotated ellipsoid (semi-axes 4.5-8 mm in-plane, 6-10 mm in z)
//    centred inside the organ, sometimes reaching its border, darker than tissue (about 70); it
//    overrides the organ;
//  - partial volume at every boundary (2 x 2 x 3 sub-samples per voxel), a smooth multiplicative
//    bias field (typically +-10%, at most +-35% in a corner), and Rician noise (sigma 10), then
//    rounding to integers in the int16 range.
// A label voxel is the structure when at least half its sub-samples are inside it, which is also
// where its intensity crosses the midpoint between the neighbouring tissues: labels and intensities
// agree.
//
// Reproducibility: every random number comes from medseg::Rng(seed).split(case index), consumed in
// a fixed order by one thread, so the same seed gives the same voxels and geometry bit for bit (on
// one platform: the libm functions exp/sin/cos are the only other ingredients, and the final
// rounding to integers absorbs their last-ulp differences except at exact .5 ties).
#pragma once
#include <array>
#include <cstdint>
#include <filesystem>
#include <string>

#include "io/volume.hpp"

namespace medseg::infer {

namespace fs = std::filesystem;

struct SyntheticOptions {
  int train_cases = 16, test_cases = 4;
  uint64_t seed = 1;
  std::array<int64_t, 3> size{64, 64, 24};  // (x, y, z) voxels
};

struct SyntheticCase {
  std::string id;  // synth_001, synth_002, ... (case index + 1)
  Volume image;    // one channel, integer-valued
  LabelVolume labels;
};

// Case `index` (0-based; training cases first, then test cases) of the dataset `opt` describes.
SyntheticCase generate_synthetic_case(const SyntheticOptions& opt, int index);

// Writes the dataset in MSD layout: imagesTr/, labelsTr/, imagesTs/, labelsTs/ (NIfTI .nii.gz) and
// dataset.json (name, description, modality {"0": "MRI"}, labels {"0": "background", "1": "organ",
// "2": "lesion"}, numTraining, numTest, training [{image, label}], test [image]). dataset.json is
// written last, so a dataset.json on disk means every case is there. Images are stored as float32
// holding integer values (io offers no integer image writer). out_dir is created when missing; an
// existing folder must be empty or hold a dataset.json (a previous run to regenerate), else
// ArgumentError: the generator never writes into an unrelated folder.
void generate_synthetic_dataset(const fs::path& out_dir, const SyntheticOptions& opt);

}  // namespace medseg::infer
