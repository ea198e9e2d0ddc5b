// Turning probabilities into a label volume, and the optional clean-up of the mask.
#pragma once
#include <cstdint>
#include <vector>

#include "io/volume.hpp"

namespace medseg::infer {

// Most probable class per voxel of probabilities laid out [voxel][k] (voxel order is kept, so the
// sliding window's [z][y][x][k] output maps onto LabelVolume::data directly). Ties go to the lowest
// class index, so an all-equal voxel becomes background.
std::vector<uint16_t> argmax_labels(const std::vector<float>& probabilities, int64_t voxels,
                                    int num_classes);

// Sets every voxel of `label` that is not in its largest connected component to background (0).
// Connectivity is 6 (face neighbours), as in nnU-Net's post-processing: two blobs that only touch
// at an edge or a corner are separate structures. Among equally large components, the one whose
// first voxel comes first in memory order (x fastest) is kept. Returns the number of voxels
// removed.
int64_t keep_largest_component(LabelVolume& mask, int label);

}  // namespace medseg::infer
