// A standalone NIfTI-1 reader for tests: parses the header bytes and the voxels itself (zlib for
// .nii.gz), so that geometry and voxels read through ITK can be checked against an independent
// reading of the file. Little-endian, single-file (.nii / .nii.gz) NIfTI-1 only.
#pragma once
#include <zlib.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "io/volume.hpp"

namespace medseg::test {

// The whole file, decompressed when it ends in .gz.
inline std::vector<uint8_t> read_file_bytes(const std::filesystem::path& path) {
  std::vector<uint8_t> out;
  gzFile f = gzopen(path.c_str(), "rb");  // gzread passes uncompressed files through unchanged
  if (!f) throw std::runtime_error("cannot open " + path.string());
  uint8_t buf[1 << 16];
  int n;
  while ((n = gzread(f, buf, sizeof buf)) > 0) out.insert(out.end(), buf, buf + n);
  gzclose(f);
  if (n < 0) throw std::runtime_error("gzread failed on " + path.string());
  return out;
}

struct NiftiFile {
  int16_t dims[8]{};
  int16_t intent_code = 0;
  int16_t datatype = 0;
  float pixdim[8]{};
  float vox_offset = 0;
  float scl_slope = 0, scl_inter = 0;
  int16_t qform_code = 0, sform_code = 0;
  float quatern[3]{}, qoffset[3]{};
  float srow[3][4]{};
  std::vector<uint8_t> bytes;

  template <typename T>
  T get(size_t offset) const {
    T v;
    std::memcpy(&v, bytes.data() + offset, sizeof v);
    return v;
  }

  // Geometry from the qform (quaternion + pixdim + qfac), converted from RAS to ITK's LPS.
  Geometry qform_geometry() const {
    Geometry g = base();
    const double b = quatern[0], c = quatern[1], d = quatern[2];
    const double a = std::sqrt(std::max(0.0, 1.0 - (b * b + c * c + d * d)));
    const double r[9] = {a * a + b * b - c * c - d * d, 2 * (b * c - a * d),
                         2 * (b * d + a * c),           2 * (b * c + a * d),
                         a * a + c * c - b * b - d * d, 2 * (c * d - a * b),
                         2 * (b * d - a * c),           2 * (c * d + a * b),
                         a * a + d * d - c * c - b * b};
    const double qfac = pixdim[0] < 0 ? -1.0 : 1.0;  // NIfTI: 0 means 1
    for (int row = 0; row < 3; ++row) {
      const double lps = row < 2 ? -1.0 : 1.0;
      for (int col = 0; col < 3; ++col)
        g.direction[row * 3 + col] = lps * r[row * 3 + col] * (col == 2 ? qfac : 1.0);
      g.origin[row] = lps * qoffset[row];
    }
    for (int i = 0; i < 3; ++i) g.spacing[i] = pixdim[i + 1];
    return g;
  }

  // Geometry from the sform (affine rows), converted from RAS to LPS.
  Geometry sform_geometry() const {
    Geometry g = base();
    for (int col = 0; col < 3; ++col) {
      double norm = 0;
      for (int row = 0; row < 3; ++row) norm += double(srow[row][col]) * srow[row][col];
      g.spacing[col] = std::sqrt(norm);
      for (int row = 0; row < 3; ++row)
        g.direction[row * 3 + col] = (row < 2 ? -1.0 : 1.0) * srow[row][col] / g.spacing[col];
    }
    for (int row = 0; row < 3; ++row) g.origin[row] = (row < 2 ? -1.0 : 1.0) * srow[row][3];
    return g;
  }

  // The transform NIfTI readers prefer: sform when its code is set, else qform.
  Geometry geometry() const { return sform_code > 0 ? sform_geometry() : qform_geometry(); }

  // Voxels as double after scl_slope/scl_inter, for the stored types medseg meets.
  std::vector<double> voxels() const {
    const size_t n = static_cast<size_t>(dims[1]) * dims[2] * dims[3];
    std::vector<double> out(n);
    const size_t off = static_cast<size_t>(vox_offset);
    const bool scaled = scl_slope != 0 && !(scl_slope == 1 && scl_inter == 0);
    for (size_t i = 0; i < n; ++i) {
      double v;
      switch (datatype) {
        case 2:
          v = get<uint8_t>(off + i);
          break;
        case 4:
          v = get<int16_t>(off + i * 2);
          break;
        case 8:
          v = get<int32_t>(off + i * 4);
          break;
        case 16:
          v = get<float>(off + i * 4);
          break;
        case 64:
          v = get<double>(off + i * 8);
          break;
        case 256:
          v = get<int8_t>(off + i);
          break;
        case 512:
          v = get<uint16_t>(off + i * 2);
          break;
        default:
          throw std::runtime_error("datatype " + std::to_string(datatype) + " not handled");
      }
      out[i] = scaled ? v * scl_slope + scl_inter : v;
    }
    return out;
  }

 private:
  Geometry base() const {
    Geometry g;
    for (int i = 0; i < 3; ++i) g.size[i] = dims[i + 1];
    return g;
  }
};

inline NiftiFile parse_nifti(const std::filesystem::path& path) {
  NiftiFile h;
  h.bytes = read_file_bytes(path);
  if (h.bytes.size() < 348 || h.get<int32_t>(0) != 348)
    throw std::runtime_error(path.string() + ": not a little-endian NIfTI-1 file");
  for (int i = 0; i < 8; ++i) h.dims[i] = h.get<int16_t>(40 + 2 * i);
  h.intent_code = h.get<int16_t>(68);
  h.datatype = h.get<int16_t>(70);
  for (int i = 0; i < 8; ++i) h.pixdim[i] = h.get<float>(76 + 4 * i);
  h.vox_offset = h.get<float>(108);
  h.scl_slope = h.get<float>(112);
  h.scl_inter = h.get<float>(116);
  h.qform_code = h.get<int16_t>(252);
  h.sform_code = h.get<int16_t>(254);
  for (int i = 0; i < 3; ++i) {
    h.quatern[i] = h.get<float>(256 + 4 * i);
    h.qoffset[i] = h.get<float>(268 + 4 * i);
  }
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 4; ++c) h.srow[r][c] = h.get<float>(280 + 16 * r + 4 * c);
  return h;
}

}  // namespace medseg::test
