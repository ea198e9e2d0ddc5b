// Segmentation quality per label: overlap (Dice, IoU) and surface distances in millimetres.
//
// Definitions (the values users compare against other tools, so they are spelled out):
//  - Dice = 2|P n R| / (|P| + |R|), IoU = |P n R| / |P u R|, over voxels of the label.
//  - Surface of a mask: its voxels with at least one of the 6 face neighbours outside the mask; a
//    neighbour beyond the volume border counts as outside.
//  - Distances are between voxel centres in mm, using the grid spacing (direction does not change
//    lengths), from an exact Euclidean distance transform (separable lower-envelope algorithm of
//    Felzenszwalb & Huttenlocher, one pass per axis with that axis's spacing).
//  - d(P->R): for each surface voxel of P, the distance to the nearest surface voxel of R; d(R->P)
//    likewise.
//  - HD95 = max(95th percentile of d(P->R), 95th percentile of d(R->P)) (the symmetric robust
//    Hausdorff distance, as MONAI computes it); percentiles interpolate linearly between order
//    statistics (numpy's default).
//  - MSD (average symmetric surface distance) = (sum d(P->R) + sum d(R->P)) / (|S(P)| + |S(R)|).
//  - Empty cases: both masks empty -> Dice 1, IoU 1, HD95 0, MSD 0 (a correct "absent" call);
//    exactly one empty -> Dice 0, IoU 0, HD95 and MSD NaN (undefined: no surface to measure to),
//    written as null in JSON and left out of means.
#pragma once
#include <array>
#include <cstdint>
#include <vector>

#include "io/volume.hpp"

namespace medseg::infer {

struct LabelMetrics {
  int label = 0;
  double dice = 0, iou = 0, hd95 = 0, msd = 0;
  int64_t pred_voxels = 0, ref_voxels = 0;
};

// Metrics for each label in `labels`, in that order. pred and ref must have the same size (else
// ArgumentError with both sizes); the spacing is taken from ref.
std::vector<LabelMetrics> evaluate_case(const LabelVolume& pred, const LabelVolume& ref,
                                        const std::vector<int>& labels);

// Squared Euclidean distance (mm^2) from every voxel to the nearest voxel with features != 0, on a
// grid of size (nx, ny, nz) with x fastest; +infinity everywhere when there is no feature voxel.
std::vector<double> squared_distance_transform(const std::vector<uint8_t>& features,
                                               std::array<int64_t, 3> size,
                                               std::array<double, 3> spacing);

// q-th percentile (q in [0, 100]) with linear interpolation between order statistics; NaN when
// empty.
double percentile(std::vector<double> values, double q);

}  // namespace medseg::infer
