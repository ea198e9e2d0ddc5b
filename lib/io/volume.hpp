// A scan in memory: voxels plus geometry (ITK/LPS physical space). Pure data, no ITK types.
// Voxel order: x fastest, then y, then z (ITK buffer order), channels innermost for multi-channel
// images: index ((z * ny + y) * nx + x) * channels + c. This maps onto the tensor layout
// (N, D=z, H=y, W=x, C).
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace medseg {

struct Geometry {
  std::array<int64_t, 3> size{0, 0, 0};           // nx, ny, nz
  std::array<double, 3> spacing{1, 1, 1};         // mm, per axis x, y, z
  std::array<double, 3> origin{0, 0, 0};          // mm, LPS
  std::array<double, 9> direction{1, 0, 0, 0, 1, 0, 0, 0, 1};  // row-major 3x3; column j = axis j
  int64_t voxels() const { return size[0] * size[1] * size[2]; }
  double voxel_volume_mm3() const { return spacing[0] * spacing[1] * spacing[2]; }
  // Physical point (LPS, mm) of a continuous index (x, y, z).
  std::array<double, 3> index_to_physical(double x, double y, double z) const;
  // Same size, and spacing/origin/direction within the tolerances (spacing relative; origin in mm,
  // widened by 1% per mm of distance from 0; direction cosines absolute).
  bool same_grid(const Geometry& o, double spacing_tol = 1e-4, double origin_tol = 1e-3,
                 double direction_tol = 1e-4) const;
  std::string describe() const;
};

// A float image with C channels.
struct Volume {
  Geometry geo;
  int channels = 1;
  std::vector<float> data;  // voxels() * channels values
  float at(int64_t x, int64_t y, int64_t z, int c = 0) const {
    return data[static_cast<size_t>(((z * geo.size[1] + y) * geo.size[0] + x) * channels + c)];
  }
};

// Integer labels (0 = background).
struct LabelVolume {
  Geometry geo;
  std::vector<uint16_t> data;  // voxels() values
  uint16_t at(int64_t x, int64_t y, int64_t z) const {
    return data[static_cast<size_t>((z * geo.size[1] + y) * geo.size[0] + x)];
  }
};

}  // namespace medseg
