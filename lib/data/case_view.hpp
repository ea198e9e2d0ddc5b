// A preprocessed case as the sampler sees it: voxels in the plan's space (resampled, cropped,
// normalised), read-only, usually memory-mapped from the preprocessing cache.
// Layout: image [z][y][x][c] (channels innermost, matching the tensor layout (N, D=z, H=y, W=x, C)),
// labels [z][y][x].
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace medseg::data {

using Index3 = std::array<int32_t, 3>;  // (z, y, x)

struct CaseView {
  std::string id;
  std::array<int64_t, 3> shape{0, 0, 0};  // (z, y, x)
  int channels = 1;
  const float* image = nullptr;
  const uint16_t* labels = nullptr;  // null for unlabelled cases
  // Sampled foreground voxel positions per class value (index = class value; [0] unused), so that a
  // foreground-forced patch can be centred without scanning the volume.
  const std::vector<std::vector<Index3>>* class_locations = nullptr;
  int64_t voxels() const { return shape[0] * shape[1] * shape[2]; }
};

}  // namespace medseg::data
