// Scan IO through ITK: the only translation unit of medseg that includes ITK headers.
// Reading goes through ImageIOBase first (header only), so that vector images, 2-D files and 4-D
// files with more than one volume (except NIfTI where channels are expected: MSD's multi-modal
// layout) are rejected with a clear message before any voxel is read.
// Writing goes to a temporary file in the destination folder, then rename(): a reader never sees a
// half-written scan, and a failed write leaves nothing behind.
#include "io/image_io.hpp"

#include <unistd.h>
#include <zlib.h>

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "core/atomic_file.hpp"
#include "core/error.hpp"
#include "itkImage.h"
#include "itkImageFileReader.h"
#include "itkImageFileWriter.h"
#include "itkImageIOFactory.h"
#include "itkRGBPixel.h"

namespace medseg::io {

namespace {

// ITK's exception text is a multi-line dump (location, class, description, sometimes a list of
// every IO it tried). Users need one line: the description, whitespace collapsed, bounded length.
std::string condense(const std::string& text) {
  std::string out;
  bool space = false;
  for (char ch : text) {
    if (ch == '\n' || ch == '\r' || ch == '\t' || ch == ' ') {
      space = !out.empty();
      continue;
    }
    if (space) out += ' ';
    space = false;
    out += ch;
  }
  constexpr size_t kMax = 300;  // long enough for a path plus the reason; the rest is ITK's list
  if (out.size() > kMax) out = out.substr(0, kMax) + "...";
  return out;
}

std::string itk_reason(const itk::ExceptionObject& e) {
  const char* d = e.GetDescription();
  std::string text = condense(d && *d ? d : e.what());
  // Drop "ITK ERROR: NiftiImageIO(0x55d1...): ": an object address means nothing to a user.
  for (const char* tag : {"ITK ERROR: ", "itk::ERROR: "}) {
    if (text.rfind(tag, 0) != 0) continue;
    const size_t open = text.find("(0x");
    const size_t close = text.find("): ", open == std::string::npos ? 0 : open);
    if (open != std::string::npos && close != std::string::npos) {
      const std::string cls = text.substr(std::strlen(tag), open - std::strlen(tag));
      text = cls + ": " + text.substr(close + 3);
    }
    break;
  }
  return text;
}

[[noreturn]] void fail(const fs::path& path, const std::string& what) {
  throw IoError(path.string() + ": " + what);
}

// Header of a file: checked to be one scalar component in 3-D (or 4-D with a single volume; with
// allow_volumes, a 4-D NIfTI with several volumes, MSD's multi-modal layout).
struct OpenedIo {
  itk::ImageIOBase::Pointer io;
  Geometry geo;    // the first three axes
  int volumes = 1;  // size of the fourth axis
};

void check_nifti_header(const fs::path& path);  // below, with the other NIfTI-1 checks
bool ends_with(const std::string& s, const std::string& suffix);  // below; case-insensitive
enum class Format { Nifti, NiftiGz, Other };
Format format_of(const fs::path& p);  // below

bool is_analyze_pair(const fs::path& p) {
  const std::string name = p.filename().string();
  for (const char* e : {".hdr", ".img", ".hdr.gz", ".img.gz"})
    if (ends_with(name, e)) return true;
  return false;
}

OpenedIo open_header(const fs::path& path, bool allow_volumes = false) {
  std::error_code ec;
  if (!fs::exists(path, ec)) {
    std::error_code lec;
    if (fs::is_symlink(fs::symlink_status(path, lec)))
      fail(path, "is a symbolic link that leads nowhere (" +
                     (ec ? ec.message() : std::string("its target does not exist")) + ")");
    fail(path, "file not found");
  }
  if (fs::is_directory(path, ec)) fail(path, "is a folder, expected an image file");
  // A FIFO or device would block the reader (or never end): only regular files (after symlinks).
  if (!fs::is_regular_file(path, ec)) fail(path, "is not a regular file, expected an image file");
  // Only the formats medseg checks itself or that ITK reads strictly. Header + image pairs
  // (.hdr/.img) went to ITK unchecked: a NaN sform aborted the process, a short .img read as
  // zeros, a zero or NaN spacing became 1 mm.
  if (image_extension(path.filename().string()).empty())
    fail(path, "not a supported image file: expected .nii.gz or .nii (NIfTI-1), .nrrd/.nhdr or "
               ".mha/.mhd" +
                   std::string(is_analyze_pair(path)
                                   ? "; a .hdr/.img pair must be converted to one .nii.gz"
                                   : ""));
  // ITK 5.2's NIfTI reader looks for "<name>.nii" and "<name>.hdr" before "<name>.nii.gz": a stray
  // uncompressed copy beside the file would be read in its place, while every check here reads the
  // file named.
  {
    const std::string name = path.filename().string();
    if (ends_with(name, ".nii.gz")) {
      const std::string stem = name.substr(0, name.size() - 7);
      for (const char* ext : {".nii", ".hdr", ".NII", ".HDR"}) {
        const fs::path sibling = path.parent_path() / (stem + ext);
        if (fs::exists(sibling, ec))
          fail(path, "a file " + sibling.filename().string() +
                         " sits beside it, and the NIfTI reader would read that one instead; "
                         "remove or rename one of them");
      }
    }
  }
  check_nifti_header(path);
  OpenedIo out;
  out.io = itk::ImageIOFactory::CreateImageIO(path.c_str(), itk::ImageIOFactory::ReadMode);
  if (!out.io)
    fail(path,
         "not a readable image (no ITK reader accepts it; expected NIfTI .nii/.nii.gz, NRRD "
         "or MetaImage .mha/.mhd)");
  out.io->SetFileName(path.string());
  try {
    out.io->ReadImageInformation();
  } catch (const itk::ExceptionObject& e) {
    const std::string reason = itk_reason(e);
    if (reason.find("orthonormal") != std::string::npos)
      fail(path, "its qform/sform is not a rotation with scaling (sheared or non-orthogonal axes), "
                 "which medseg cannot represent: resample it to an orthogonal grid first");
    fail(path, "cannot read the header: " + reason);
  }
  const itk::ImageIOBase& io = *out.io;
  if (io.GetNumberOfComponents() != 1)
    fail(path, "has " + std::to_string(io.GetNumberOfComponents()) +
                   " components per voxel (pixel type " +
                   itk::ImageIOBase::GetPixelTypeAsString(io.GetPixelType()) +
                   "); expected a scalar image (one file per channel)");
  const unsigned dims = io.GetNumberOfDimensions();
  const bool several = dims == 4 && io.GetDimensions(3) != 1;
  // Several volumes only from NIfTI, whose completeness and NaN checks here cover every volume.
  const bool volumes_ok = allow_volumes && format_of(path) != Format::Other;
  if (dims < 3 || dims > 4 || (several && !volumes_ok)) {
    std::ostringstream os;
    os << "is " << dims << "-D with size ";
    for (unsigned i = 0; i < dims; ++i) os << (i ? "x" : "") << io.GetDimensions(i);
    os << "; expected a 3-D image (a 4-D file is accepted only with one volume";
    if (several)
      os << (allow_volumes ? ", or as a NIfTI file with one volume per channel"
                           : ", or with one volume per channel where a model or dataset.json "
                             "declares that many channels: MSD's multi-modal layout");
    os << ")";
    fail(path, os.str());
  }
  if (dims == 4) out.volumes = static_cast<int>(io.GetDimensions(3));
  Geometry& g = out.geo;
  for (unsigned i = 0; i < 3; ++i) {
    g.size[i] = static_cast<int64_t>(io.GetDimensions(i));
    // ImageFileReader replaces a zero spacing by 1; mirror it so that read_geometry and
    // read_image agree on every file.
    g.spacing[i] = io.GetSpacing(i) == 0.0 ? 1.0 : io.GetSpacing(i);
    g.origin[i] = io.GetOrigin(i);
    const std::vector<double> axis = io.GetDirection(i);
    for (unsigned r = 0; r < 3; ++r) g.direction[r * 3 + i] = axis[r];
  }
  const auto& d = g.direction;
  const double det = d[0] * (d[4] * d[8] - d[5] * d[7]) - d[1] * (d[3] * d[8] - d[5] * d[6]) +
                     d[2] * (d[3] * d[7] - d[4] * d[6]);
  // ImageFileReader also falls back to identity for a degenerate direction; mirror it.
  if (det == 0.0) g.direction = {1, 0, 0, 0, 1, 0, 0, 0, 1};
  return out;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  if (s.size() < suffix.size()) return false;
  for (size_t i = 0; i < suffix.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(s[s.size() - suffix.size() + i])) != suffix[i])
      return false;
  return true;
}

Format format_of(const fs::path& p) {
  const std::string name = p.filename().string();
  if (ends_with(name, ".nii.gz")) return Format::NiftiGz;
  if (ends_with(name, ".nii")) return Format::Nifti;
  return Format::Other;
}

constexpr int16_t kNiftiIntentLabel = 1002;
constexpr std::streamoff kNiftiIntentOffset = 68;  // int16 intent_code in the NIfTI-1 header

// Patches intent_code of an uncompressed NIfTI-1 file written by ITK (native byte order).
void set_nifti_intent(const fs::path& nii, int16_t intent) {
  std::fstream f(nii, std::ios::in | std::ios::out | std::ios::binary);
  int32_t sizeof_hdr = 0;
  f.read(reinterpret_cast<char*>(&sizeof_hdr), sizeof sizeof_hdr);
  if (!f || sizeof_hdr != 348)
    throw std::runtime_error("ITK wrote " + nii.string() + " without a NIfTI-1 header");
  f.seekp(kNiftiIntentOffset);
  f.write(reinterpret_cast<const char*>(&intent), sizeof intent);
  f.close();
  if (!f) throw std::runtime_error("cannot set the NIfTI intent code in " + nii.string());
}

// Streams `from` into a gzip file `to`.
void gzip_file(const fs::path& from, const fs::path& to) {
  std::ifstream in(from, std::ios::binary);
  if (!in) throw std::runtime_error("cannot reopen " + from.string());
  // Level 6: zlib's default, the same trade-off ITK's own NIfTI writer makes.
  gzFile out = gzopen(to.c_str(), "wb6");
  if (!out) throw std::runtime_error("cannot open " + to.string() + " for writing");
  std::vector<char> buf(1 << 20);
  bool ok = true;
  while (ok && in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto n = static_cast<unsigned>(in.gcount());
    if (n > 0 && gzwrite(out, buf.data(), n) != static_cast<int>(n)) ok = false;
  }
  if (gzclose(out) != Z_OK) ok = false;
  if (!ok || in.bad()) throw std::runtime_error("compressing into " + to.string() + " failed");
}

// The NIfTI-1 header fields medseg checks itself (single-file .nii / .nii.gz): where the voxels
// start, how many bytes they take as stored, the stored type, and whether the byte order is
// swapped relative to this machine. nullopt for other formats (and NIfTI-2, left to ITK).
struct NiftiLayout {
  uint64_t vox_offset = 352;
  uint64_t data_bytes = 0;  // product of dim[1..dim[0]] x bitpix / 8
  int16_t datatype = 0;
  bool swapped = false;
};

void swap_bytes(void* p, size_t n) {
  auto* b = static_cast<unsigned char*>(p);
  for (size_t i = 0; i < n / 2; ++i) std::swap(b[i], b[n - 1 - i]);
}

constexpr int16_t kNiftiFloat32 = 16, kNiftiFloat64 = 64;

template <typename T>
T header_field(const unsigned char* hdr, size_t offset, bool swapped) {
  T v;
  std::memcpy(&v, hdr + offset, sizeof v);
  if (swapped) swap_bytes(&v, sizeof v);
  return v;
}

// Reads and checks the 348-byte header. ITK 5.2 aborts the process on a non-finite qform or sform
// (vnl "matrix has non-finite elements"), reads a NaN / huge vox_offset through an undefined
// float-to-integer conversion, and replaces a zero, negative or NaN spacing by 1 mm without a
// word (the mask would then not sit on the scan's grid): all of these are refused here, naming
// the field.
std::optional<NiftiLayout> nifti_layout(const fs::path& path) {
  if (format_of(path) == Format::Other) return std::nullopt;
  gzFile f = gzopen(path.c_str(), "rb");  // also reads uncompressed files
  if (!f) fail(path, "cannot open");
  unsigned char hdr[348];
  const int got = gzread(f, hdr, sizeof hdr);
  gzclose(f);
  if (got >= 2 && hdr[0] == 0x1f && hdr[1] == 0x8b)  // gzopen hands back the raw stream here
    fail(path, "is gzip-compressed twice: not a readable image");
  if (format_of(path) == Format::Nifti && got >= 2) {
    // gzopen decompresses transparently; ITK reads a .nii as raw bytes and would fail vaguely.
    unsigned char first[2] = {0, 0};
    std::ifstream raw(path, std::ios::binary);
    raw.read(reinterpret_cast<char*>(first), 2);
    if (first[0] == 0x1f && first[1] == 0x8b)
      fail(path, "is gzip-compressed: name it .nii.gz (a .nii is read uncompressed)");
  }
  if (got >= 8 && std::memcmp(hdr + 4, "n+2\0", 4) == 0)
    fail(path, "is a NIfTI-2 file, which medseg does not read: convert it to NIfTI-1 (.nii.gz)");
  if (got < static_cast<int>(sizeof hdr))
    fail(path, "not a readable image: " + std::to_string(std::max(got, 0)) +
                   " bytes, shorter than a NIfTI-1 header (348)");
  // A NIfTI-1 header is told by its magic, not by sizeof_hdr (files with 0 or 540 there exist and
  // read). Without the magic, ITK falls back to ANALYZE 7.5, which ignores the qform and sform:
  // the scan would be read in a different orientation than its header states.
  if (std::memcmp(hdr + 344, "n+1\0", 4) != 0 && std::memcmp(hdr + 344, "ni1\0", 4) != 0) {
    std::string magic;
    for (int i = 344; i < 348 && hdr[i]; ++i)
      magic += std::isprint(hdr[i]) ? static_cast<char>(hdr[i]) : '?';
    fail(path, "not a readable image: NIfTI-1 magic '" + magic +
                   "' where 'n+1' is expected (an ANALYZE 7.5 header has no reliable orientation)");
  }
  NiftiLayout out;
  // Byte order as niftilib decides it: dim[0] must read as 1..7.
  const int16_t dim0 = header_field<int16_t>(hdr, 40, false);
  const int16_t dim0_swapped = header_field<int16_t>(hdr, 40, true);
  if ((dim0 < 1 || dim0 > 7) && (dim0_swapped < 1 || dim0_swapped > 7))
    fail(path, "NIfTI header dim[0] = " + std::to_string(dim0) + " (must be 1 to 7)");
  out.swapped = dim0 < 1 || dim0 > 7;
  const bool sw = out.swapped;
  const auto i16 = [&](size_t off) { return header_field<int16_t>(hdr, off, sw); };
  const auto f32 = [&](size_t off) { return header_field<float>(hdr, off, sw); };
  const int16_t ndim = i16(40);
  if (ndim < 1 || ndim > 7)
    fail(path, "NIfTI header dim[0] = " + std::to_string(ndim) + " (must be 1 to 7)");
  uint64_t voxels = 1;
  for (int i = 1; i <= ndim; ++i) {
    const int16_t n = i16(40 + 2 * static_cast<size_t>(i));
    if (n < 1)
      fail(path, "NIfTI header dim[" + std::to_string(i) + "] = " + std::to_string(n) +
                     " (sizes must be positive)");
    voxels *= static_cast<uint64_t>(n);
  }
  out.datatype = i16(70);
  // Bytes per voxel from the datatype (what niftilib reads by, whatever bitpix says).
  int bytes = 0;
  switch (out.datatype) {
    case 2: case 256: bytes = 1; break;                       // uint8, int8
    case 4: case 512: bytes = 2; break;                       // int16, uint16
    case 8: case 16: case 768: case 2304: bytes = 4; break;   // int32, float32, uint32, RGBA
    case 64: case 1024: case 1280: case 32: bytes = 8; break; // float64, int64, uint64, complex64
    case 128: bytes = 3; break;                               // RGB
    case 1792: bytes = 16; break;                             // complex128
    default:  // binary (1), float128, complex256 and undefined codes: nothing reads them
      fail(path, "NIfTI header datatype " + std::to_string(out.datatype) +
                     " is not a voxel type medseg reads (integers, float32/64)");
  }
  out.data_bytes = voxels * static_cast<uint64_t>(bytes);
  for (int i = 1; i <= std::min<int>(ndim, 3); ++i) {
    const float sp = f32(76 + 4 * static_cast<size_t>(i));
    // 1e-5 to 1e5 mm: from electron microscopy to a whole body in one voxel.
    if (!(std::isfinite(sp) && std::fabs(sp) >= 1e-5f && std::fabs(sp) <= 1e5f) || sp < 0.f) {
      std::ostringstream os;
      os << "NIfTI header pixdim[" << i << "] (voxel spacing) = " << sp
         << " (must be a positive size in mm, 1e-5 to 1e5)";
      fail(path, os.str());
    }
  }
  const float vox_offset = f32(108);
  if (!(std::isfinite(vox_offset) && vox_offset >= 352.f && vox_offset < 1e12f)) {
    std::ostringstream os;
    os << "NIfTI header vox_offset = " << vox_offset
       << " (the voxels of a single-file NIfTI start at byte 352 or later)";
    fail(path, os.str());
  }
  out.vox_offset = static_cast<uint64_t>(vox_offset);
  const auto check_finite = [&](const char* what, size_t off, int count) {
    for (int k = 0; k < count; ++k) {
      const float v = f32(off + 4 * static_cast<size_t>(k));
      if (!std::isfinite(v)) {
        std::ostringstream os;
        os << "NIfTI header " << what << " has a non-finite value (" << v << ")";
        fail(path, os.str());
      }
    }
  };
  if (i16(252) > 0) check_finite("qform (quatern_b/c/d, qoffset_x/y/z)", 256, 6);
  if (i16(254) > 0) check_finite("sform (srow_x/y/z)", 280, 12);
  // scl_slope / scl_inter are not checked here: a NaN or zero slope means "no scaling" to niftilib
  // and nibabel alike (such files exist); a scaling that does produce NaN / Inf is caught in the
  // decoded voxels (read_image).
  return out;
}

void check_metaimage(const fs::path& path, bool check_data);  // below

void check_nifti_header(const fs::path& path) {
  if (nifti_layout(path)) return;
  const std::string name = path.filename().string();
  if (ends_with(name, ".mha") || ends_with(name, ".mhd")) check_metaimage(path, false);
}

// ITK 5.2 reads a .nii or .nii.gz that was cut short without complaint (the missing voxels come
// back as zeros), and niftilib silently replaces NaN and Inf in float32/float64 data by 0. So one
// pass over the decompressed file checks its length against the header (vox_offset plus the voxel
// bytes as stored: the datatype's size, not the type ITK converts to) and, with count_floats and a
// float datatype, counts the non-finite voxels. A .nii.gz is read to the end, which also checks its
// CRC (the trailer's length alone let corrupt streams through, and a forged one made ITK allocate
// whatever the header declared); a plain .nii without float counting needs only its size.
NonFiniteVoxels verify_nifti(const fs::path& path, const NiftiLayout& layout, bool count_floats) {
  const uint64_t expected = layout.vox_offset + layout.data_bytes;
  NonFiniteVoxels out;
  const bool floats =
      count_floats && (layout.datatype == kNiftiFloat32 || layout.datatype == kNiftiFloat64);
  uint64_t actual = 0;
  if (format_of(path) == Format::Nifti && !floats) {
    std::error_code ec;
    actual = fs::file_size(path, ec);
    if (ec) fail(path, "cannot get the file size: " + ec.message());
  } else {
    gzFile z = gzopen(path.c_str(), "rb");  // also reads uncompressed files
    if (!z) fail(path, "cannot open");
    gzbuffer(z, 1 << 17);
    // The header and extensions first, so that every later chunk starts on a voxel boundary
    // (gzread fills a whole chunk except at the end of the data).
    std::vector<unsigned char> buf(1 << 20);
    int n = 1;
    while (actual < layout.vox_offset && n > 0) {
      n = gzread(z, buf.data(),
                 static_cast<unsigned>(std::min<uint64_t>(buf.size(), layout.vox_offset - actual)));
      if (n > 0) actual += static_cast<uint64_t>(n);
    }
    const size_t width = layout.datatype == kNiftiFloat32 ? 4 : 8;
    while (n > 0 && (n = gzread(z, buf.data(), static_cast<unsigned>(buf.size()))) > 0) {
      const uint64_t begin = actual, end = std::min<uint64_t>(actual + n, expected);
      for (uint64_t off = begin; floats && off + width <= end; off += width) {
        unsigned char* q = &buf[off - begin];
        if (layout.swapped) swap_bytes(q, width);
        double v;
        if (width == 4) {
          float f;
          std::memcpy(&f, q, 4);
          v = f;
        } else {
          std::memcpy(&v, q, 8);
        }
        if (!std::isfinite(v) && out.count++ == 0) {
          out.first_index = static_cast<int64_t>((off - layout.vox_offset) / width);
          out.first_value = v;
        }
      }
      actual += static_cast<uint64_t>(n);
    }
    int err = Z_OK;
    const char* msg = gzerror(z, &err);
    std::string zmsg = msg ? msg : "";
    if (zmsg.rfind(path.string() + ": ", 0) == 0) zmsg = zmsg.substr(path.string().size() + 2);
    gzclose(z);
    if (n < 0 || (err != Z_OK && err != Z_STREAM_END))
      fail(path, "compressed data is corrupt or truncated" +
                     (actual ? " after " + std::to_string(actual) + " bytes" : std::string()) +
                     " (zlib: " + zmsg + ")");
  }
  if (actual < expected)
    fail(path, "file is truncated: " + std::to_string(actual) +
                   " bytes (uncompressed), the header "
                   "needs " +
                   std::to_string(expected));
  return out;
}

// MetaImage (.mha/.mhd): MetaIO reads a short data block with only a console message ("data not
// read completely"), leaving the rest of the image as it was. So the header is parsed here (text
// "Key = Value" lines up to ElementDataFile) and the data checked long enough: the voxel bytes, or
// CompressedDataSize for compressed data. Listed and patterned data files are left to MetaIO.
// With check_data false, the header alone: spacing as for NIfTI (a positive size in mm, 1e-5 to
// 1e5; MetaIO turned a NaN into an unrelated "No such file or directory"), a finite origin and
// direction.
void check_metaimage(const fs::path& path, bool check_data) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(path, "cannot open");
  std::vector<uint64_t> dims;
  uint64_t channels = 1, element = 0;
  int64_t header_size = 0;
  uint64_t compressed_size = 0;
  bool compressed = false;
  std::string line, data_file;
  while (std::getline(f, line)) {
    const auto eq = line.find('=');
    if (eq == std::string::npos) continue;
    const auto trim = [](std::string t) {
      const auto b = t.find_first_not_of(" \t\r"), e = t.find_last_not_of(" \t\r");
      return b == std::string::npos ? std::string() : t.substr(b, e - b + 1);
    };
    const std::string key = trim(line.substr(0, eq)), value = trim(line.substr(eq + 1));
    std::istringstream v(value);
    const auto numbers = [&] {
      std::vector<double> out;
      std::istringstream in(value);
      std::string tok;
      while (in >> tok) out.push_back(std::strtod(tok.c_str(), nullptr));
      return out;
    };
    if (key == "ElementSpacing" || key == "ElementSize") {
      for (double sp : numbers())
        if (!(std::isfinite(sp) && sp >= 1e-5 && sp <= 1e5)) {
          std::ostringstream os;
          os << "MetaImage " << key << " has " << sp << " (must be a positive size in mm, 1e-5 to 1e5)";
          fail(path, os.str());
        }
    } else if (key == "Offset" || key == "Position" || key == "Origin" || key == "TransformMatrix" ||
               key == "Rotation" || key == "Orientation" || key == "CenterOfRotation") {
      for (double x : numbers())
        if (!std::isfinite(x)) fail(path, "MetaImage " + key + " has a non-finite value");
    } else if (key == "DimSize") {
      dims.clear();
      for (double d : numbers()) dims.push_back(d >= 0 ? static_cast<uint64_t>(d) : 0);
    } else if (key == "ElementNumberOfChannels") {
      v >> channels;
    } else if (key == "CompressedData") {
      compressed = value == "True" || value == "true" || value == "1";
    } else if (key == "CompressedDataSize") {
      v >> compressed_size;
    } else if (key == "HeaderSize") {
      v >> header_size;
    } else if (key == "ElementType") {
      static const std::map<std::string, uint64_t> sizes = {
          {"MET_UCHAR", 1}, {"MET_CHAR", 1},  {"MET_USHORT", 2},    {"MET_SHORT", 2},
          {"MET_UINT", 4},  {"MET_INT", 4},   {"MET_ULONG", 4},     {"MET_LONG", 4},
          {"MET_FLOAT", 4}, {"MET_DOUBLE", 8}, {"MET_ULONG_LONG", 8}, {"MET_LONG_LONG", 8}};
      const auto it = sizes.find(value);
      element = it == sizes.end() ? 0 : it->second;
    } else if (key == "ElementDataFile") {
      data_file = value;
      break;
    }
  }
  if (!check_data) return;
  if (data_file.empty() || dims.empty() || element == 0 || (compressed && compressed_size == 0) ||
      data_file == "LIST" || data_file.find('%') != std::string::npos ||
      data_file.find(' ') != std::string::npos)
    return;
  uint64_t expected = element * std::max<uint64_t>(channels, 1);
  for (uint64_t d : dims) expected *= d;
  if (compressed) expected = compressed_size;  // the deflate stream's length, from the header
  std::error_code ec;
  uint64_t available = 0;
  fs::path data_path = path;
  if (data_file == "LOCAL") {
    const std::streamoff begin = f.tellg();
    const uint64_t total = fs::file_size(path, ec);
    if (ec || begin < 0) return;
    available = total > static_cast<uint64_t>(begin) ? total - static_cast<uint64_t>(begin) : 0;
  } else {
    data_path = fs::path(data_file).is_absolute() ? fs::path(data_file) : path.parent_path() / data_file;
    const uint64_t total = fs::file_size(data_path, ec);
    if (ec) fail(path, "its data file " + data_path.string() + " cannot be read: " + ec.message());
    // HeaderSize -1: the data are the last bytes of the file, whatever precedes them.
    const uint64_t skip = header_size > 0 ? static_cast<uint64_t>(header_size) : 0;
    available = header_size == -1 ? total : (total > skip ? total - skip : 0);
  }
  if (available < expected)
    fail(path, "file is truncated: " + std::to_string(available) + " bytes of voxel data" +
                   (data_path == path ? std::string() : " in " + data_path.string()) +
                   ", the header needs " + std::to_string(expected));
}

void check_complete(const fs::path& path) {
  if (const auto layout = nifti_layout(path)) {
    verify_nifti(path, *layout, false);
    return;
  }
  const std::string name = path.filename().string();
  if (ends_with(name, ".mha") || ends_with(name, ".mhd")) check_metaimage(path, true);
}

// The non-finite voxels of a float32/float64 NIfTI as stored, with the file checked complete on
// the way. nullopt when this does not apply (other formats, integer types: ITK's own reading shows
// non-finite values as they are, and the completeness check is left to read_pixels).
std::optional<NonFiniteVoxels> scan_nifti_nonfinite(const fs::path& path) {
  const auto layout = nifti_layout(path);
  // The stored type: ITK reports scaled integers as float, but their bytes are integers.
  if (!layout || (layout->datatype != kNiftiFloat32 && layout->datatype != kNiftiFloat64))
    return std::nullopt;
  return verify_nifti(path, *layout, true);
}

template <typename ImageT>
Geometry geometry_of(const ImageT& image) {
  Geometry g;
  const auto size = image.GetLargestPossibleRegion().GetSize();
  for (unsigned i = 0; i < 3; ++i) {
    g.size[i] = static_cast<int64_t>(size[i]);
    g.spacing[i] = image.GetSpacing()[i];
    g.origin[i] = image.GetOrigin()[i];
    for (unsigned r = 0; r < 3; ++r) g.direction[r * 3 + i] = image.GetDirection()[r][i];
  }
  return g;
}

template <typename ImageT>
void set_geometry(ImageT& image, const Geometry& g) {
  typename ImageT::RegionType region;
  typename ImageT::SizeType size;
  typename ImageT::SpacingType spacing;
  typename ImageT::PointType origin;
  typename ImageT::DirectionType direction;
  for (unsigned i = 0; i < 3; ++i) {
    size[i] = static_cast<itk::SizeValueType>(g.size[i]);
    spacing[i] = g.spacing[i];
    origin[i] = g.origin[i];
    for (unsigned r = 0; r < 3; ++r) direction[r][i] = g.direction[r * 3 + i];
  }
  region.SetSize(size);
  image.SetRegions(region);
  image.SetSpacing(spacing);
  image.SetOrigin(origin);
  image.SetDirection(direction);
}

// Reads the voxels of an already checked file as PixelT (ITK converts from the stored type);
// `verified`: scan_nifti_nonfinite has already checked the file complete. Dim 4 for a file of
// several volumes (volume after volume in the buffer).
template <typename PixelT, unsigned Dim = 3>
typename itk::Image<PixelT, Dim>::Pointer read_pixels(const fs::path& path, OpenedIo& opened,
                                                      bool verified = false) {
  using ImageT = itk::Image<PixelT, Dim>;
  auto reader = itk::ImageFileReader<ImageT>::New();
  reader->SetFileName(path.string());
  reader->SetImageIO(opened.io);
  if (!verified) check_complete(path);
  try {
    reader->Update();
  } catch (const itk::ExceptionObject& e) {
    fail(path, "cannot read the voxels: " + itk_reason(e));
  }
  typename ImageT::Pointer image = reader->GetOutput();
  const Geometry g = geometry_of(*image);
  if (g.size != opened.geo.size)
    fail(path, "voxel data size " + std::to_string(g.size[0]) + "x" + std::to_string(g.size[1]) +
                   "x" + std::to_string(g.size[2]) + " differs from the header");
  if constexpr (Dim == 4) {
    if (static_cast<int>(image->GetLargestPossibleRegion().GetSize()[3]) != opened.volumes)
      fail(path, "the voxel data holds another number of volumes than the header (" +
                     std::to_string(opened.volumes) + ")");
  }
  opened.geo = g;
  return image;
}

// Calls fn(voxels, count) with every voxel of a checked file as PixelT, all of its volumes
// (volume after volume, x fastest within each).
template <typename PixelT, typename Fn>
void with_pixels(const fs::path& path, OpenedIo& opened, bool verified, Fn&& fn) {
  if (opened.volumes == 1) {
    auto image = read_pixels<PixelT, 3>(path, opened, verified);
    fn(static_cast<const PixelT*>(image->GetBufferPointer()), opened.geo.voxels());
  } else {
    auto image = read_pixels<PixelT, 4>(path, opened, verified);
    fn(static_cast<const PixelT*>(image->GetBufferPointer()), opened.geo.voxels() * opened.volumes);
  }
}

void check_destination(const fs::path& dest) {
  if (dest.filename().empty()) fail(dest, "cannot write: the destination has no file name");
  const fs::path folder = dest.has_parent_path() ? dest.parent_path() : fs::path(".");
  std::error_code ec;
  if (!fs::is_directory(folder, ec))
    fail(dest, "cannot write: folder " + folder.string() + " does not exist");
}

// Runs write_to(temp), then renames temp onto dest (core's commit_atomic: temp removed on any
// failure); ITK and other errors become IoError naming dest.
template <typename WriteFn>
void write_atomic(const fs::path& dest, WriteFn&& write_to) {
  check_destination(dest);
  commit_atomic(dest, [&](const fs::path& tmp) {
    try {
      write_to(tmp);
    } catch (const itk::ExceptionObject& e) {
      fail(dest, "cannot write: " + itk_reason(e));
    } catch (const IoError&) {
      throw;
    } catch (const std::exception& e) {
      fail(dest, std::string("cannot write: ") + e.what());
    }
  });
}

template <typename ImageT>
void write_itk(const fs::path& tmp, const ImageT* image) {
  auto writer = itk::ImageFileWriter<ImageT>::New();
  writer->SetFileName(tmp.string());
  writer->SetInput(image);
  // MetaImage and NRRD compress their voxels when asked. NIfTI must not be asked: ITK 5.2 then
  // gzips even a plain .nii; the .gz extension alone selects compression there.
  writer->SetUseCompression(format_of(tmp) == Format::Other);
  writer->Update();
}

void check_geometry_arg(const Geometry& g, size_t values, size_t expected, const char* what) {
  MEDSEG_CHECK(g.size[0] > 0 && g.size[1] > 0 && g.size[2] > 0, what, ": empty size ", g.size[0],
               "x", g.size[1], "x", g.size[2]);
  MEDSEG_CHECK(values == expected, what, ": ", values, " values for ", expected, " voxels");
}

}  // namespace

std::string image_extension(const std::string& name) {
  for (const char* ext : {".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"}) {
    const size_t n = std::strlen(ext);
    if (name.size() > n && ends_with(name, ext)) return name.substr(name.size() - n);
  }
  return "";
}

NonFiniteVoxels count_nonfinite_voxels(const fs::path& path) {
  OpenedIo opened = open_header(path, true);
  const auto raw = scan_nifti_nonfinite(path);
  if (raw && raw->count) return *raw;
  // The voxels as training reads them, decoded in full (this is the one voxel pass validation
  // makes over an image, and it must meet corrupt data now, not during training): a value that is
  // finite as stored but not as a 32-bit float after the scale factor (an overflowing scl_slope,
  // a float64 beyond float range) counts as non-finite too, with its decoded value.
  NonFiniteVoxels out;
  constexpr double kFloatMax = std::numeric_limits<float>::max();
  with_pixels<double>(path, opened, raw.has_value(), [&](const double* p, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      if (std::isfinite(p[i]) && std::fabs(p[i]) <= kFloatMax) continue;
      if (out.count++ == 0) {
        out.first_index = i;
        out.first_value = p[i];
      }
    }
  });
  return out;
}

std::string voxel_string(const Geometry& g, int64_t index) {
  const int64_t nx = g.size[0], ny = g.size[1];
  const int64_t volume = g.voxels() > 0 ? index / g.voxels() : 0;
  if (volume > 0) index %= g.voxels();
  // A stream, not string operator+: g++ 12 gives a false -Wrestrict on the concatenation.
  std::ostringstream os;
  os << "(" << index % nx << ", " << (index / nx) % ny << ", " << index / (nx * ny) << ")";
  if (volume > 0) os << " of volume " << volume;
  return os.str();
}

ImageHeader read_header(const fs::path& path, bool allow_volumes) {
  OpenedIo opened = open_header(path, allow_volumes);
  ImageHeader h;
  h.geo = opened.geo;
  h.volumes = opened.volumes;
  h.components = static_cast<int>(opened.io->GetNumberOfComponents());
  h.component_type = itk::ImageIOBase::GetComponentTypeAsString(opened.io->GetComponentType());
  return h;
}

Geometry read_geometry(const fs::path& path) {
  return open_header(path, true).geo;
}

namespace {
// The voxels of a file as float32, channel-interleaved (one channel per volume).
// NaN / Inf would go through the network and come out as a plausible-looking mask: refused here
// for every reader (training validation reports them earlier, with a count). The stored bytes are
// scanned because niftilib turns NaN into 0; the decoded values because a scale factor can
// overflow finite integers to Inf.
Volume read_volumes(const fs::path& path, OpenedIo& opened) {
  const auto nonfinite_error = [&](int64_t index, double value, int64_t count) {
    std::ostringstream os;
    os << "voxel " << voxel_string(opened.geo, index) << " is " << value << " (" << count
       << " NaN/Inf voxels); an image must hold finite intensities";
    fail(path, os.str());
  };
  const auto raw = scan_nifti_nonfinite(path);
  if (raw && raw->count) nonfinite_error(raw->first_index, raw->first_value, raw->count);
  Volume v;
  with_pixels<float>(path, opened, raw.has_value(), [&](const float* p, int64_t n) {
    v.geo = opened.geo;
    v.channels = opened.volumes;
    int64_t bad = 0, first = -1;
    for (int64_t i = 0; i < n; ++i)
      if (!std::isfinite(p[i]) && bad++ == 0) first = i;
    if (bad) {
      // The stored values were finite: the scale factor or the conversion to float32 overflowed.
      std::ostringstream os;
      os << "voxel " << voxel_string(opened.geo, first) << " becomes " << p[first]
         << " as a 32-bit float (" << bad
         << " voxels; a stored value beyond float range, or a scale factor overflowing); an image "
            "must hold finite intensities";
      fail(path, os.str());
    }
    if (v.channels == 1) {
      v.data.assign(p, p + n);
      return;
    }
    // Volume-major in the file, channels-last in a Volume.
    const int64_t voxels = v.geo.voxels();
    const int C = v.channels;
    v.data.resize(static_cast<size_t>(n));
    for (int c = 0; c < C; ++c) {
      const float* src = p + static_cast<int64_t>(c) * voxels;
      float* dst = v.data.data() + c;
      for (int64_t i = 0; i < voxels; ++i) dst[i * C] = src[i];
    }
  });
  return v;
}
}  // namespace

Volume read_image(const fs::path& path) {
  OpenedIo opened = open_header(path);
  return read_volumes(path, opened);
}

Volume read_image_channels(const std::vector<fs::path>& paths, int channels) {
  MEDSEG_CHECK(!paths.empty(), "read_image_channels needs at least one file");
  if (paths.size() == 1) {
    OpenedIo opened = open_header(paths[0], channels != 1);
    if (channels > 0 && opened.volumes != channels)
      fail(paths[0], "has " + std::to_string(opened.volumes) + " volume" +
                         (opened.volumes == 1 ? "" : "s") + " along its 4th axis, expected " +
                         std::to_string(channels) + " (one per channel: MSD's multi-modal layout)");
    return read_volumes(paths[0], opened);
  }
  if (channels > 0 && static_cast<int>(paths.size()) != channels)
    throw IoError(paths[0].string() + ": a case of " + std::to_string(paths.size()) +
                  " channel files, expected " + std::to_string(channels));
  Volume out;
  out.channels = static_cast<int>(paths.size());
  for (size_t c = 0; c < paths.size(); ++c) {
    Volume one = read_image(paths[c]);
    if (c == 0) {
      out.geo = one.geo;
      out.data.resize(static_cast<size_t>(one.geo.voxels()) * paths.size());
    } else if (!one.geo.same_grid(out.geo)) {
      throw IoError(paths[c].string() + ": channel " + std::to_string(c) +
                    " geometry differs from channel 0 (" + paths[0].string() +
                    "): " + geometry_difference(one.geo, out.geo));
    }
    const size_t n = one.data.size();
    for (size_t i = 0; i < n; ++i) out.data[i * paths.size() + c] = one.data[i];
  }
  return out;
}

LabelVolume read_labels(const fs::path& path) {
  OpenedIo opened = open_header(path);
  // double holds every stored type exactly (int32 and float32 included), so that 1.5 or 70000
  // is seen as it is, not rounded or wrapped by a cast to an integer type.
  const auto nonfinite = scan_nifti_nonfinite(path);
  if (nonfinite && nonfinite->count)
    fail(path, "label value " + std::to_string(nonfinite->first_value) + " at voxel " +
                   voxel_string(opened.geo, nonfinite->first_index) +
                   " is not an integer in [0, 65535] (" + std::to_string(nonfinite->count) +
                   " non-finite values)");
  auto image = read_pixels<double>(path, opened, nonfinite.has_value());
  LabelVolume out;
  out.geo = opened.geo;
  const int64_t n = out.geo.voxels();
  out.data.resize(static_cast<size_t>(n));
  const double* p = image->GetBufferPointer();
  for (int64_t i = 0; i < n; ++i) {
    const double v = p[i];
    if (!(v >= 0.0 && v < 65536.0 && v == std::floor(v))) {
      std::ostringstream os;
      os.precision(17);
      os << "label value " << v << " at voxel " << voxel_string(out.geo, i)
         << " is not an integer in [0, 65535]";
      fail(path, os.str());
    }
    out.data[static_cast<size_t>(i)] = static_cast<uint16_t>(v);
  }
  return out;
}

namespace {
template <typename PixelT>
void write_label_image(const fs::path& dest, const LabelVolume& labels) {
  using ImageT = itk::Image<PixelT, 3>;
  auto image = ImageT::New();
  set_geometry(*image, labels.geo);
  image->Allocate();
  PixelT* p = image->GetBufferPointer();
  for (size_t i = 0; i < labels.data.size(); ++i) p[i] = static_cast<PixelT>(labels.data[i]);
  const Format format = format_of(dest);
  if (format == Format::Other) {
    write_atomic(dest, [&](const fs::path& tmp) { write_itk<ImageT>(tmp, image.GetPointer()); });
    return;
  }
  // NIfTI: mark the file as a label volume (intent 1002, NIFTI_INTENT_LABEL), which viewers use to
  // show it as a segmentation. ITK 5.2's NIfTI writer ignores an "intent_code" dictionary entry, so
  // ITK writes an uncompressed .nii, the header is patched in place, and .nii.gz is compressed
  // here.
  write_atomic(dest, [&](const fs::path& tmp) {
    // ".tmp-...-name.nii.gz" -> ".tmp-...-name.nii"; the extension in lower case whatever the
    // destination's (ITK 5.2 calls "OUT.NII" a bad NIfTI file name).
    const std::string name = tmp.filename().string();
    const size_t ext = format == Format::NiftiGz ? 7 : 4;
    const fs::path plain = tmp.parent_path() / (name.substr(0, name.size() - ext) + ".nii");
    try {
      write_itk<ImageT>(plain, image.GetPointer());
      set_nifti_intent(plain, kNiftiIntentLabel);
      if (format == Format::NiftiGz)
        gzip_file(plain, tmp);
      else if (plain != tmp)
        fs::rename(plain, tmp);
    } catch (...) {
      std::error_code ec;
      if (plain != tmp) fs::remove(plain, ec);
      throw;
    }
    std::error_code ec;
    if (plain != tmp) fs::remove(plain, ec);
  });
}
}  // namespace

void write_labels(const fs::path& path, const LabelVolume& labels) {
  check_geometry_arg(labels.geo, labels.data.size(), static_cast<size_t>(labels.geo.voxels()),
                     "write_labels");
  uint16_t max_label = 0;
  for (uint16_t v : labels.data) max_label = std::max(max_label, v);
  if (max_label <= 255)
    write_label_image<uint8_t>(path, labels);
  else
    write_label_image<uint16_t>(path, labels);
}

void write_float_image(const fs::path& path, const Volume& image) {
  MEDSEG_CHECK(image.channels == 1, "write_float_image writes one channel; got ", image.channels,
               " for ", path.string());
  check_geometry_arg(image.geo, image.data.size(), static_cast<size_t>(image.geo.voxels()),
                     "write_float_image");
  using ImageT = itk::Image<float, 3>;
  auto img = ImageT::New();
  set_geometry(*img, image.geo);
  img->Allocate();
  std::copy(image.data.begin(), image.data.end(), img->GetBufferPointer());
  write_atomic(path, [&](const fs::path& tmp) { write_itk<ImageT>(tmp, img.GetPointer()); });
}

void write_png_rgb(const fs::path& path, int width, int height, const std::vector<uint8_t>& rgb) {
  MEDSEG_CHECK(width > 0 && height > 0, "write_png_rgb: size ", width, "x", height);
  MEDSEG_CHECK(rgb.size() == static_cast<size_t>(width) * height * 3, "write_png_rgb: ", rgb.size(),
               " bytes for ", width, "x", height, " RGB");
  using PixelT = itk::RGBPixel<unsigned char>;
  using ImageT = itk::Image<PixelT, 2>;
  auto img = ImageT::New();
  ImageT::RegionType region;
  region.SetSize(
      {{static_cast<itk::SizeValueType>(width), static_cast<itk::SizeValueType>(height)}});
  img->SetRegions(region);
  img->Allocate();
  PixelT* p = img->GetBufferPointer();  // x fastest, row y = 0 first: PNG's top row
  for (size_t i = 0; i < static_cast<size_t>(width) * height; ++i) {
    p[i][0] = rgb[3 * i];
    p[i][1] = rgb[3 * i + 1];
    p[i][2] = rgb[3 * i + 2];
  }
  write_atomic(path, [&](const fs::path& tmp) {
    auto writer = itk::ImageFileWriter<ImageT>::New();
    writer->SetFileName(tmp.string());
    writer->SetInput(img);
    writer->Update();
  });
}

void write_bytes_atomic(const fs::path& path, const void* data, size_t size) {
  write_atomic(path, [&](const fs::path& tmp) {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw std::runtime_error("cannot open " + tmp.string() + " for writing");
    f.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
    f.close();
    if (!f) throw std::runtime_error("writing " + std::to_string(size) + " bytes failed");
  });
}

void write_text_atomic(const fs::path& path, const std::string& content) {
  write_bytes_atomic(path, content.data(), content.size());
}

std::string geometry_difference(const Geometry& a, const Geometry& b) {
  std::ostringstream os;
  os.precision(6);
  auto sep = [&] {
    if (os.tellp() > 0) os << "; ";
  };
  if (a.size != b.size)
    os << "size " << a.size[0] << "x" << a.size[1] << "x" << a.size[2] << " vs " << b.size[0] << "x"
       << b.size[1] << "x" << b.size[2];
  auto triple = [&](const char* name, const std::array<double, 3>& x,
                    const std::array<double, 3>& y) {
    sep();
    os << name << " (" << x[0] << ", " << x[1] << ", " << x[2] << ") vs (" << y[0] << ", " << y[1]
       << ", " << y[2] << ")";
  };
  // Same tolerances as Geometry::same_grid, field by field, so the message names what failed.
  Geometry sa = a, sb = b;
  sa.size = sb.size = {1, 1, 1};
  sa.origin = sb.origin = {0, 0, 0};
  sa.direction = sb.direction = {1, 0, 0, 0, 1, 0, 0, 0, 1};
  if (!sa.same_grid(sb)) triple("spacing", a.spacing, b.spacing);
  sa = a;
  sb = b;
  sa.size = sb.size = {1, 1, 1};
  sa.spacing = sb.spacing = {1, 1, 1};
  sa.direction = sb.direction = {1, 0, 0, 0, 1, 0, 0, 0, 1};
  if (!sa.same_grid(sb)) triple("origin", a.origin, b.origin);
  sa = a;
  sb = b;
  sa.size = sb.size = {1, 1, 1};
  sa.spacing = sb.spacing = {1, 1, 1};
  sa.origin = sb.origin = {0, 0, 0};
  if (!sa.same_grid(sb)) {
    sep();
    os << "direction [";
    for (int i = 0; i < 9; ++i) os << (i ? " " : "") << a.direction[i];
    os << "] vs [";
    for (int i = 0; i < 9; ++i) os << (i ? " " : "") << b.direction[i];
    os << "]";
  }
  if (os.tellp() == 0) os << "none";
  return os.str();
}

}  // namespace medseg::io
