// Reading and writing scans through ITK (the only unit that includes ITK headers).
// Every error is an IoError whose message names the file and what is wrong.
// Writes are atomic: the file is written under a temporary name in the same folder, then renamed.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "io/volume.hpp"

namespace medseg::io {

namespace fs = std::filesystem;

// Any scalar pixel type (uint8, int16, int32, float32, float64, ...) of a 3-D NIfTI (.nii,
// .nii.gz), NRRD or MHA file, converted to float; geometry in ITK's LPS convention.
Volume read_image(const fs::path& path);
// The image of one case, `channels` channels (0: as many as found):
// - several files: nnU-Net's layout, one 3-D file per channel, identical geometry required (else
//   IoError naming both files);
// - one file: a 3-D image (one channel), or MSD's multi-modal layout, a 4-D NIfTI with one volume
//   per channel (IoError naming the file when its volumes are not `channels`).
Volume read_image_channels(const std::vector<fs::path>& paths, int channels = 0);
// Label files may be stored as any type, float32 included; every value must be a non-negative
// integer below 65536 (else IoError naming the file and the first bad value).
LabelVolume read_labels(const fs::path& path);
// Reads only the header: the geometry of the first three axes (a 4-D NIfTI of several volumes is
// accepted).
Geometry read_geometry(const fs::path& path);

// Header facts beyond the geometry (read_header applies the same checks as read_image: one scalar
// component, 3-D or 4-D with a single volume, else IoError; with allow_volumes a 4-D NIfTI may hold
// several volumes, MSD's channels).
struct ImageHeader {
  Geometry geo;   // the first three axes
  int volumes = 1;  // the 4th axis
  int components = 1;
  std::string component_type;  // ITK's name of the stored type: "unsigned_char", "float", ...
};
ImageHeader read_header(const fs::path& path, bool allow_volumes = false);

// NaN/Inf voxels of an image file as stored. ITK's NIfTI reader replaces them by 0 on reading
// (niftilib does), so read_image never returns them; for float NIfTI files this scans the stored
// bytes, other files are read (in full) through ITK. Either way every voxel is decoded once, so a
// corrupt or truncated file raises IoError here.
// read_labels runs the same scan on float NIfTI label files and rejects non-finite values.
struct NonFiniteVoxels {
  int64_t count = 0;
  int64_t first_index = -1;  // linear voxel index, x fastest (all volumes of a 4-D file, in order)
  double first_value = 0;
};
NonFiniteVoxels count_nonfinite_voxels(const fs::path& path);

// The scan extension of a file name as written (.nii.gz, .nii, .nrrd, .nhdr, .mha or .mhd, in any
// case), "" for anything else: the formats every reader here accepts.
std::string image_extension(const std::string& name);

// "(x, y, z)" of a linear voxel index, for messages.
std::string voxel_string(const Geometry& g, int64_t index);

// What differs between two geometries under Geometry::same_grid's tolerances, for messages:
// e.g. "size 36x52x38 vs 36x52x37; origin (0, 0, 0) vs (1, 0, 0)"; "none" when the grids match.
std::string geometry_difference(const Geometry& a, const Geometry& b);

// uint8 when max label <= 255, else uint16; NIfTI intent code 1002 (NIFTI_INTENT_LABEL) set.
void write_labels(const fs::path& path, const LabelVolume& labels);
// float32, one file per channel when channels > 1 is not supported: channels must be 1.
void write_float_image(const fs::path& path, const Volume& image);
// 8-bit RGB PNG through ITK's PNG IO; rgb has width*height*3 bytes, row-major, top row first.
void write_png_rgb(const fs::path& path, int width, int height, const std::vector<uint8_t>& rgb);

// Writes `content` to path atomically (temp + rename). For text outputs (json, csv, ...).
void write_text_atomic(const fs::path& path, const std::string& content);
// Same for arbitrary bytes.
void write_bytes_atomic(const fs::path& path, const void* data, size_t size);

}  // namespace medseg::io
