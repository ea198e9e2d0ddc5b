#include "infer/metrics.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.hpp"

namespace medseg::infer {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Lower envelope of the parabolas s2 * (q - p)^2 + f[p] over the finite samples p of one line
// (Felzenszwalb & Huttenlocher 2012), written with the axis spacing folded into s2 = spacing^2.
// f and d are strided views of the same line length n; v and z are scratch of n and n + 1.
void edt_line(const double* f, int64_t stride, int64_t n, double s2, double* d_out,
              std::vector<int64_t>& v, std::vector<double>& z, std::vector<double>& line) {
  for (int64_t q = 0; q < n; ++q) line[static_cast<size_t>(q)] = f[q * stride];
  int64_t k = -1;
  for (int64_t q = 0; q < n; ++q) {
    const double fq = line[static_cast<size_t>(q)];
    if (fq == kInf) continue;
    double s = -kInf;
    while (k >= 0) {
      const int64_t p = v[static_cast<size_t>(k)];
      const double fp = line[static_cast<size_t>(p)];
      s = ((fq + s2 * static_cast<double>(q * q)) - (fp + s2 * static_cast<double>(p * p))) /
          (2.0 * s2 * static_cast<double>(q - p));
      if (s <= z[static_cast<size_t>(k)]) {
        --k;
        continue;
      }
      break;
    }
    ++k;
    v[static_cast<size_t>(k)] = q;
    z[static_cast<size_t>(k)] = (k == 0) ? -kInf : s;
    z[static_cast<size_t>(k + 1)] = kInf;
  }
  if (k < 0) {
    for (int64_t q = 0; q < n; ++q) d_out[q * stride] = kInf;
    return;
  }
  int64_t j = 0;
  for (int64_t q = 0; q < n; ++q) {
    while (z[static_cast<size_t>(j + 1)] < static_cast<double>(q)) ++j;
    const int64_t p = v[static_cast<size_t>(j)];
    const double dq = static_cast<double>(q - p);
    d_out[q * stride] = s2 * dq * dq + line[static_cast<size_t>(p)];
  }
}

struct Box {
  std::array<int64_t, 3> lo{0, 0, 0}, hi{-1, -1, -1};  // inclusive, (x, y, z)
  bool empty() const { return hi[0] < lo[0]; }
  std::array<int64_t, 3> size() const {
    return {hi[0] - lo[0] + 1, hi[1] - lo[1] + 1, hi[2] - lo[2] + 1};
  }
};

// Surface voxels of (mask == label) inside the box, as a box-sized 0/1 array. Voxels outside the
// box are never in the mask (the box bounds it), matching "outside the volume counts as outside".
std::vector<uint8_t> surface_in_box(const LabelVolume& m, uint16_t label, const Box& box) {
  const auto bs = box.size();
  const auto& n = m.geo.size;
  std::vector<uint8_t> s(static_cast<size_t>(bs[0] * bs[1] * bs[2]), 0);
  auto inside = [&](int64_t x, int64_t y, int64_t z) {
    if (x < 0 || x >= n[0] || y < 0 || y >= n[1] || z < 0 || z >= n[2]) return false;
    return m.at(x, y, z) == label;
  };
  for (int64_t z = box.lo[2]; z <= box.hi[2]; ++z)
    for (int64_t y = box.lo[1]; y <= box.hi[1]; ++y)
      for (int64_t x = box.lo[0]; x <= box.hi[0]; ++x) {
        if (!inside(x, y, z)) continue;
        const bool surface = !inside(x - 1, y, z) || !inside(x + 1, y, z) || !inside(x, y - 1, z) ||
                             !inside(x, y + 1, z) || !inside(x, y, z - 1) || !inside(x, y, z + 1);
        if (surface)
          s[static_cast<size_t>(((z - box.lo[2]) * bs[1] + (y - box.lo[1])) * bs[0] +
                                (x - box.lo[0]))] = 1;
      }
  return s;
}

// Distances (mm) from each surface voxel of `from` to the nearest surface voxel of `to`.
std::vector<double> directed_distances(const std::vector<uint8_t>& from,
                                       const std::vector<uint8_t>& to, std::array<int64_t, 3> size,
                                       std::array<double, 3> spacing) {
  const std::vector<double> d2 = squared_distance_transform(to, size, spacing);
  std::vector<double> out;
  for (size_t i = 0; i < from.size(); ++i)
    if (from[i]) out.push_back(std::sqrt(d2[i]));
  return out;
}

}  // namespace

std::vector<double> squared_distance_transform(const std::vector<uint8_t>& features,
                                               std::array<int64_t, 3> size,
                                               std::array<double, 3> spacing) {
  const int64_t nx = size[0], ny = size[1], nz = size[2];
  MEDSEG_CHECK(nx >= 1 && ny >= 1 && nz >= 1, "size ", nx, "x", ny, "x", nz);
  MEDSEG_CHECK(static_cast<int64_t>(features.size()) == nx * ny * nz, "features hold ",
               features.size(), " values for a ", nx, "x", ny, "x", nz, " grid");
  for (int a = 0; a < 3; ++a)
    MEDSEG_CHECK(spacing[a] > 0 && std::isfinite(spacing[a]), "spacing[", a, "] = ", spacing[a]);
  std::vector<double> d(features.size());
  for (size_t i = 0; i < d.size(); ++i) d[i] = features[i] ? 0.0 : kInf;
  const int64_t nmax = std::max({nx, ny, nz});
  // One pass per axis; each pass reads and writes the same line, through a copy (edt_line's
  // `line`).
  const std::array<int64_t, 3> n{nx, ny, nz};
  const std::array<int64_t, 3> stride{1, nx, nx * ny};
  for (int axis = 0; axis < 3; ++axis) {
    const double s2 = spacing[axis] * spacing[axis];
    const int a1 = (axis + 1) % 3, a2 = (axis + 2) % 3;
#pragma omp parallel if (nx * ny * nz >= (int64_t{1} << 15))  // tiny grids: fork/join dominates
    {
      std::vector<int64_t> v(static_cast<size_t>(nmax));
      std::vector<double> z(static_cast<size_t>(nmax + 1));
      std::vector<double> line(static_cast<size_t>(nmax));
#pragma omp for collapse(2)
      for (int64_t j = 0; j < n[a2]; ++j)
        for (int64_t i = 0; i < n[a1]; ++i) {
          double* base = d.data() + i * stride[a1] + j * stride[a2];
          edt_line(base, stride[axis], n[axis], s2, base, v, z, line);
        }
    }
  }
  return d;
}

double percentile(std::vector<double> values, double q) {
  MEDSEG_CHECK(q >= 0 && q <= 100, "percentile q = ", q);
  if (values.empty()) return std::numeric_limits<double>::quiet_NaN();
  std::sort(values.begin(), values.end());
  const double pos = q / 100.0 * static_cast<double>(values.size() - 1);
  const auto lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, values.size() - 1);
  const double frac = pos - static_cast<double>(lo);
  return values[lo] + (values[hi] - values[lo]) * frac;
}

std::vector<LabelMetrics> evaluate_case(const LabelVolume& pred, const LabelVolume& ref,
                                        const std::vector<int>& labels) {
  const auto& n = ref.geo.size;
  MEDSEG_CHECK(pred.geo.size == ref.geo.size, "prediction size ", pred.geo.size[0], "x",
               pred.geo.size[1], "x", pred.geo.size[2], " differs from reference size ", n[0], "x",
               n[1], "x", n[2]);
  MEDSEG_CHECK(static_cast<int64_t>(pred.data.size()) == pred.geo.voxels() &&
                   static_cast<int64_t>(ref.data.size()) == ref.geo.voxels(),
               "voxel buffers do not match the geometry");
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<LabelMetrics> out;
  for (int label : labels) {
    MEDSEG_CHECK(label >= 0 && label < 65536, "label ", label);
    const auto L = static_cast<uint16_t>(label);
    LabelMetrics m;
    m.label = label;
    int64_t both = 0;
    Box box;
    box.lo = {n[0], n[1], n[2]};
    for (int64_t z = 0; z < n[2]; ++z)
      for (int64_t y = 0; y < n[1]; ++y)
        for (int64_t x = 0; x < n[0]; ++x) {
          const bool p = pred.at(x, y, z) == L, r = ref.at(x, y, z) == L;
          m.pred_voxels += p;
          m.ref_voxels += r;
          both += p && r;
          if (p || r) {
            const int64_t c[3] = {x, y, z};
            for (int a = 0; a < 3; ++a) {
              box.lo[a] = std::min(box.lo[a], c[a]);
              box.hi[a] = std::max(box.hi[a], c[a]);
            }
          }
        }
    if (m.pred_voxels == 0 && m.ref_voxels == 0) {
      m.dice = 1;
      m.iou = 1;
      m.hd95 = 0;
      m.msd = 0;
    } else if (m.pred_voxels == 0 || m.ref_voxels == 0) {
      m.dice = 0;
      m.iou = 0;
      m.hd95 = nan;
      m.msd = nan;
    } else {
      const double sum = static_cast<double>(m.pred_voxels + m.ref_voxels);
      m.dice = 2.0 * static_cast<double>(both) / sum;
      m.iou = static_cast<double>(both) / (sum - static_cast<double>(both));
      const auto sp = surface_in_box(pred, L, box);
      const auto sr = surface_in_box(ref, L, box);
      const auto d_pr = directed_distances(sp, sr, box.size(), ref.geo.spacing);
      const auto d_rp = directed_distances(sr, sp, box.size(), ref.geo.spacing);
      m.hd95 = std::max(percentile(d_pr, 95), percentile(d_rp, 95));
      double total = 0;
      for (double v : d_pr) total += v;
      for (double v : d_rp) total += v;
      m.msd = total / static_cast<double>(d_pr.size() + d_rp.size());
    }
    out.push_back(m);
  }
  return out;
}

}  // namespace medseg::infer
