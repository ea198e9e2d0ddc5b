// Writes 4-D NIfTI files (MSD's multi-modal layout: one volume per channel) for tests. medseg writes
// only 3-D scans, so the volumes are written stacked along z as one 3-D .nii, whose header dims are
// then rewritten to (x, y, z, volumes); a .nii.gz destination is compressed from that with zlib.
#pragma once
#include <zlib.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "io/image_io.hpp"

namespace medseg::test {

// Rewrites dim[0..] of an uncompressed NIfTI-1 header (byte 40).
inline void patch_nifti_dims(const std::filesystem::path& p, const std::vector<int16_t>& dims) {
  std::fstream f(p, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(40);
  f.write(reinterpret_cast<const char*>(dims.data()), static_cast<std::streamsize>(dims.size() * 2));
  if (!f) throw std::runtime_error("cannot patch the dims of " + p.string());
}

inline void gzip_file_copy(const std::filesystem::path& from, const std::filesystem::path& to) {
  std::ifstream in(from, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  gzFile out = gzopen(to.c_str(), "wb");
  if (!out) throw std::runtime_error("cannot open " + to.string());
  const int n = gzwrite(out, bytes.data(), static_cast<unsigned>(bytes.size()));
  if (gzclose(out) != Z_OK || n != static_cast<int>(bytes.size()))
    throw std::runtime_error("cannot compress into " + to.string());
}

// `volumes[t]` holds the voxels of volume t on grid g (x fastest).
inline void write_4d_nifti(const std::filesystem::path& p, const Geometry& g,
                           const std::vector<std::vector<float>>& volumes) {
  Volume stacked;
  stacked.geo = g;
  stacked.geo.size[2] = g.size[2] * static_cast<int64_t>(volumes.size());
  for (const auto& v : volumes) {
    if (static_cast<int64_t>(v.size()) != g.voxels())
      throw std::runtime_error("write_4d_nifti: a volume of the wrong size");
    stacked.data.insert(stacked.data.end(), v.begin(), v.end());
  }
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path());
  const std::string name = p.filename().string();
  const bool gz = name.size() > 7 && name.substr(name.size() - 7) == ".nii.gz";
  const std::filesystem::path nii = gz ? std::filesystem::path(p.string() + ".tmp.nii") : p;
  io::write_float_image(nii, stacked);
  patch_nifti_dims(nii, {4, static_cast<int16_t>(g.size[0]), static_cast<int16_t>(g.size[1]),
                         static_cast<int16_t>(g.size[2]), static_cast<int16_t>(volumes.size())});
  if (gz) {
    gzip_file_copy(nii, p);
    std::filesystem::remove(nii);
  }
}

}  // namespace medseg::test
