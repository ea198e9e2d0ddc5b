#include "io/volume.hpp"

#include <cmath>
#include <sstream>

namespace medseg {

std::array<double, 3> Geometry::index_to_physical(double x, double y, double z) const {
  const double idx[3] = {x * spacing[0], y * spacing[1], z * spacing[2]};
  std::array<double, 3> p{};
  for (int r = 0; r < 3; ++r)
    p[r] = origin[r] + direction[r * 3 + 0] * idx[0] + direction[r * 3 + 1] * idx[1] +
           direction[r * 3 + 2] * idx[2];
  return p;
}

bool Geometry::same_grid(const Geometry& o, double spacing_tol, double origin_tol,
                         double direction_tol) const {
  if (size != o.size) return false;
  for (int i = 0; i < 3; ++i) {
    if (std::abs(spacing[i] - o.spacing[i]) > spacing_tol * std::max(1.0, std::abs(spacing[i])))
      return false;
    // origin_tol mm near 0, growing by 1% of it per mm of distance from 0 (float32 header
    // precision): 0.013 mm at 1200 mm at the default, as nnU-Net's allclose check. A tolerance
    // proportional to the origin let a 1 mm shift through at -1200 mm.
    if (std::abs(origin[i] - o.origin[i]) > origin_tol * (1.0 + 0.01 * std::abs(origin[i])))
      return false;
  }
  for (int i = 0; i < 9; ++i)
    if (std::abs(direction[i] - o.direction[i]) > direction_tol) return false;
  return true;
}

std::string Geometry::describe() const {
  std::ostringstream os;
  os << "size " << size[0] << "x" << size[1] << "x" << size[2] << ", spacing " << spacing[0] << "x"
     << spacing[1] << "x" << spacing[2] << " mm, origin (" << origin[0] << ", " << origin[1] << ", "
     << origin[2] << "), direction [";
  for (int i = 0; i < 9; ++i) os << direction[i] << (i < 8 ? (i % 3 == 2 ? "; " : " ") : "]");
  return os.str();
}

}  // namespace medseg
