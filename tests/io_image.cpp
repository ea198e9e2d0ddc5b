// Scan IO: synthetic round trips with non-trivial geometry in every supported format, label writing
// (type and NIfTI intent), real files checked against an independent NIfTI parse, error messages,
// and atomic writes that leave nothing behind when they fail.
#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "io/image_io.hpp"
#include "support/four_d_nifti.hpp"
#include "support/nifti_header.hpp"
#include "support/shared_data.hpp"

namespace medseg::io {
namespace {

class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() / ("medseg_io_image_" + std::to_string(::getpid()) + "_" +
                                         info->test_suite_name() + "_" + info->name());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::permissions(path_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }
  // Every entry of the folder, hidden temporaries included.
  std::vector<std::string> entries() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(path_)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }

 private:
  fs::path path_;
};

// Rotation by `angle` about the unit vector along `axis` (Rodrigues), row-major.
std::array<double, 9> rotation(std::array<double, 3> axis, double angle) {
  const double n = std::sqrt(axis[0] * axis[0] + axis[1] * axis[1] + axis[2] * axis[2]);
  const double x = axis[0] / n, y = axis[1] / n, z = axis[2] / n;
  const double c = std::cos(angle), s = std::sin(angle), t = 1 - c;
  return {t * x * x + c,     t * x * y - s * z, t * x * z + s * y, t * x * y + s * z, t * y * y + c,
          t * y * z - s * x, t * x * z - s * y, t * y * z + s * x, t * z * z + c};
}

Geometry synthetic_geometry(const std::array<double, 9>& direction) {
  Geometry g;
  g.size = {7, 5, 4};
  g.spacing = {0.8, 0.8, 2.5};
  // Binary fractions: NIfTI stores the origin as float32, so these survive exactly and the 1e-6
  // comparison below measures the IO, not float32 rounding of the test's numbers.
  g.origin = {-12.5, 30.25, 7.75};
  g.direction = direction;
  return g;
}

Volume synthetic_image(const Geometry& g) {
  Volume v;
  v.geo = g;
  v.data.resize(static_cast<size_t>(g.voxels()));
  for (size_t i = 0; i < v.data.size(); ++i)
    v.data[i] = static_cast<float>(std::sin(0.37 * static_cast<double>(i)) * 1000.0 + 0.125 * i);
  return v;
}

// Tolerance 1e-6: NIfTI keeps spacing, origin and the quaternion/sform as float32 (relative
// precision 6e-8), so a rotation rebuilt from them is off by a few 1e-8 at most.
void expect_geometry_near(const Geometry& got, const Geometry& want, double tol,
                          const std::string& what) {
  EXPECT_EQ(got.size, want.size) << what;
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(got.spacing[i], want.spacing[i], tol) << what << " spacing[" << i << "]";
    EXPECT_NEAR(got.origin[i], want.origin[i], tol) << what << " origin[" << i << "]";
  }
  for (int i = 0; i < 9; ++i)
    EXPECT_NEAR(got.direction[i], want.direction[i], tol) << what << " direction[" << i << "]";
}

bool is_gzip(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  unsigned char magic[2] = {0, 0};
  f.read(reinterpret_cast<char*>(magic), 2);
  return magic[0] == 0x1f && magic[1] == 0x8b;
}

const std::array<double, 9> kIdentity{1, 0, 0, 0, 1, 0, 0, 0, 1};
const std::array<double, 9> kFlipX{-1, 0, 0, 0, 1, 0, 0, 0, 1};  // determinant -1 (NIfTI qfac)
const std::array<double, 9> kFlipXY{-1, 0, 0, 0, -1, 0, 0, 0, 1};

TEST(ImageIo, FloatRoundTripKeepsGeometryAndVoxelsInEveryFormat) {
  TempDir dir;
  const std::vector<std::pair<std::string, std::array<double, 9>>> directions = {
      {"identity", kIdentity},
      {"flipx", kFlipX},
      {"flipxy", kFlipXY},
      {"oblique", rotation({1, 2, 3}, 0.3)}};
  for (const auto& [dname, dir_matrix] : directions) {
    const Volume v = synthetic_image(synthetic_geometry(dir_matrix));
    for (const std::string ext : {".nii.gz", ".nii", ".nrrd", ".mha"}) {
      const fs::path p = dir / ("img_" + dname + ext);
      write_float_image(p, v);
      const Volume r = read_image(p);
      const std::string what = p.filename().string();
      expect_geometry_near(r.geo, v.geo, 1e-6, what);
      expect_geometry_near(read_geometry(p), v.geo, 1e-6, what + " (header only)");
      ASSERT_EQ(r.data.size(), v.data.size()) << what;
      ASSERT_EQ(r.channels, 1);
      for (size_t i = 0; i < v.data.size(); ++i)
        ASSERT_EQ(r.data[i], v.data[i]) << what << " voxel " << i;
      if (ext.rfind(".nii", 0) == 0) {
        // The file on disk, read without ITK, holds the same geometry (in RAS, converted back).
        const auto h = test::parse_nifti(p);
        expect_geometry_near(h.sform_geometry(), v.geo, 1e-6, what + " sform (own parser)");
        expect_geometry_near(h.qform_geometry(), v.geo, 1e-6, what + " qform (own parser)");
        EXPECT_EQ(h.datatype, 16) << what << ": float32 expected";
        EXPECT_EQ(is_gzip(p), ext == ".nii.gz") << what << ": compression must follow the name";
      }
    }
  }
  // Only the written files remain: no temporaries.
  for (const auto& name : dir.entries()) EXPECT_NE(name[0], '.') << name;
}

TEST(ImageIo, LabelsPickUint8OrUint16AndSetIntentLabel) {
  TempDir dir;
  LabelVolume small;
  small.geo = synthetic_geometry(rotation({0, 1, 1}, -0.4));
  small.data.resize(static_cast<size_t>(small.geo.voxels()));
  for (size_t i = 0; i < small.data.size(); ++i) small.data[i] = static_cast<uint16_t>(i % 256);
  LabelVolume big = small;
  big.data[3] = 1000;
  big.data[4] = 65535;

  struct Case {
    const LabelVolume* labels;
    const char* name;
    int16_t datatype;  // NIfTI: 2 = uint8, 512 = uint16
  };
  for (const Case& c : {Case{&small, "small", 2}, Case{&big, "big", 512}}) {
    for (const std::string ext : {".nii.gz", ".nii", ".nrrd", ".mha"}) {
      const fs::path p = dir / (std::string(c.name) + ext);
      write_labels(p, *c.labels);
      const LabelVolume r = read_labels(p);
      expect_geometry_near(r.geo, c.labels->geo, 1e-6, p.filename().string());
      ASSERT_EQ(r.data, c.labels->data) << p.filename();
      EXPECT_EQ(read_header(p).component_type, c.datatype == 2 ? "unsigned_char" : "unsigned_short")
          << p.filename();
      if (ext.rfind(".nii", 0) == 0) {
        const auto h = test::parse_nifti(p);
        EXPECT_EQ(h.datatype, c.datatype) << p.filename();
        EXPECT_EQ(is_gzip(p), ext == ".nii.gz") << p.filename();
        EXPECT_EQ(h.intent_code, 1002) << p.filename() << ": NIFTI_INTENT_LABEL expected";
        const auto raw = h.voxels();
        for (size_t i = 0; i < raw.size(); ++i)
          ASSERT_EQ(raw[i], c.labels->data[i]) << p.filename() << " voxel " << i;
      }
    }
  }
}

TEST(ImageIo, ReadLabelsRejectsNonIntegerNegativeAndTooLargeValues) {
  TempDir dir;
  Geometry g = synthetic_geometry(kIdentity);
  for (const float bad : {1.5f, -1.0f, 70000.0f, NAN}) {
    Volume v;
    v.geo = g;
    v.data.assign(static_cast<size_t>(g.voxels()), 1.0f);
    v.data[9] = bad;  // voxel (2, 1, 0) with nx = 7
    const fs::path p = dir / "bad_label.nii.gz";
    write_float_image(p, v);
    try {
      read_labels(p);
      ADD_FAILURE() << "value " << bad << " accepted";
    } catch (const IoError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(p.string()), std::string::npos) << msg;
      EXPECT_NE(msg.find("(2, 1, 0)"), std::string::npos) << msg;
    }
  }
  // Integral float labels are fine (the hippocampus set stores two label files as float32).
  Volume v;
  v.geo = g;
  v.data.assign(static_cast<size_t>(g.voxels()), 2.0f);
  write_float_image(dir / "float_label.nii.gz", v);
  const LabelVolume l = read_labels(dir / "float_label.nii.gz");
  for (uint16_t x : l.data) ASSERT_EQ(x, 2);
}

TEST(ImageIo, NonFiniteVoxelsAreCountedAsStored) {
  TempDir dir;
  Volume v = synthetic_image(synthetic_geometry(kFlipXY));
  v.data[11] = NAN;
  v.data[20] = INFINITY;
  v.data[21] = -INFINITY;
  for (const std::string ext : {".nii.gz", ".nii", ".nrrd", ".mha"}) {
    const fs::path p = dir / ("nan" + ext);
    write_float_image(p, v);
    const NonFiniteVoxels n = count_nonfinite_voxels(p);
    EXPECT_EQ(n.count, 3) << p.filename();
    EXPECT_EQ(n.first_index, 11) << p.filename();
    EXPECT_TRUE(std::isnan(n.first_value)) << p.filename() << ": " << n.first_value;
    EXPECT_THROW(read_labels(p), IoError) << p.filename();
  }
  LabelVolume l;
  l.geo = v.geo;
  l.data.assign(v.data.size(), 3);
  write_labels(dir / "int.nii.gz", l);
  EXPECT_EQ(count_nonfinite_voxels(dir / "int.nii.gz").count, 0);
  v.data[11] = v.data[20] = v.data[21] = 0.0f;
  write_float_image(dir / "finite.nii.gz", v);
  EXPECT_EQ(count_nonfinite_voxels(dir / "finite.nii.gz").count, 0);
}

TEST(ImageIo, ChannelsInterleaveAndMustShareGeometry) {
  TempDir dir;
  const Volume a = synthetic_image(synthetic_geometry(kFlipX));
  Volume b = a;
  for (float& x : b.data) x = -x;
  write_float_image(dir / "c_0000.nii.gz", a);
  write_float_image(dir / "c_0001.nii.gz", b);
  const Volume both = read_image_channels({dir / "c_0000.nii.gz", dir / "c_0001.nii.gz"});
  ASSERT_EQ(both.channels, 2);
  ASSERT_EQ(both.data.size(), a.data.size() * 2);
  EXPECT_EQ(both.at(3, 2, 1, 0), a.at(3, 2, 1));
  EXPECT_EQ(both.at(3, 2, 1, 1), b.at(3, 2, 1));

  Volume shifted = b;
  shifted.geo.origin[2] += 5.0;
  write_float_image(dir / "c_0001.nii.gz", shifted);
  try {
    read_image_channels({dir / "c_0000.nii.gz", dir / "c_0001.nii.gz"});
    ADD_FAILURE() << "channels with different origins accepted";
  } catch (const IoError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("c_0000.nii.gz"), std::string::npos) << msg;
    EXPECT_NE(msg.find("c_0001.nii.gz"), std::string::npos) << msg;
    EXPECT_NE(msg.find("origin"), std::string::npos) << msg;
  }
}

template <typename Fn>
void expect_io_error(const fs::path& p, Fn&& call, const std::vector<std::string>& parts) {
  try {
    call();
    ADD_FAILURE() << p << " accepted";
  } catch (const IoError& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(p.string() + ": ", 0), 0u) << msg;
    for (const auto& part : parts) EXPECT_NE(msg.find(part), std::string::npos) << msg;
  }
}

TEST(ImageIo, AcceptsFourDWithOneVolume) {
  TempDir dir;
  const Volume v = synthetic_image(synthetic_geometry(kIdentity));  // 7x5x4
  const fs::path one = dir / "one_volume.nii";
  write_float_image(one, v);
  test::patch_nifti_dims(one, {4, 7, 5, 4, 1});
  const Volume r = read_image(one);
  EXPECT_EQ(r.geo.size, v.geo.size);
  ASSERT_EQ(r.data, v.data);
  const Volume c = read_image_channels({one}, 1);
  EXPECT_EQ(c.channels, 1);
  EXPECT_EQ(c.data, v.data);
}

// MSD's multi-modal layout: one 4-D NIfTI per case, a volume per channel. Only the readers that
// are told to expect channels accept it; read_image, a one-channel read and the strict header
// refuse it by name.
TEST(ImageIo, FourDNiftiVolumesAreChannelsWhereChannelsAreExpected) {
  TempDir dir;
  Volume v = synthetic_image(synthetic_geometry(kFlipXY));  // 7x5x4: two volumes of 7x5x2
  Geometry g3 = v.geo;
  g3.size = {7, 5, 2};
  const auto half = [&](int t) {
    return std::vector<float>(v.data.begin() + t * g3.voxels(), v.data.begin() + (t + 1) * g3.voxels());
  };
  const fs::path nii = dir / "two.nii", gz = dir / "two_gz.nii.gz", nan_nii = dir / "nan.nii";
  test::write_4d_nifti(nii, g3, {half(0), half(1)});
  test::write_4d_nifti(gz, g3, {half(0), half(1)});
  std::vector<float> with_nan = half(1);
  with_nan[static_cast<size_t>((1 * 5 + 2) * 7 + 1)] = NAN;  // (1, 2, 1) of volume 1
  test::write_4d_nifti(nan_nii, g3, {half(0), with_nan});
  for (const fs::path& p : {nii, gz}) {
    SCOPED_TRACE(p.filename().string());
    for (const Volume& c : {read_image_channels({p}, 2), read_image_channels({p})}) {
      ASSERT_EQ(c.channels, 2);
      expect_geometry_near(c.geo, g3, 1e-6, "4-D channels");
      ASSERT_EQ(c.data.size(), v.data.size());
      for (int64_t z = 0; z < 2; ++z)
        for (int64_t y = 0; y < 5; ++y)
          for (int64_t x = 0; x < 7; ++x)
            for (int t = 0; t < 2; ++t)
              ASSERT_EQ(c.at(x, y, z, t), v.at(x, y, z + 2 * t)) << x << "," << y << "," << z;
    }
    expect_geometry_near(read_geometry(p), g3, 1e-6, "read_geometry");
    EXPECT_EQ(read_header(p, true).volumes, 2);
    EXPECT_EQ(read_header(p, true).geo.size, g3.size);
    EXPECT_EQ(count_nonfinite_voxels(p).count, 0);
    expect_io_error(p, [&] { read_image(p); }, {"7x5x2x2", "one volume per channel"});
    expect_io_error(p, [&] { read_header(p); }, {"7x5x2x2"});
    expect_io_error(p, [&] { read_image_channels({p}, 1); }, {"7x5x2x2"});
    expect_io_error(p, [&] { read_image_channels({p}, 3); }, {"2 volumes", "expected 3"});
  }
  // A NaN in the second volume is placed in that volume.
  const NonFiniteVoxels nf = count_nonfinite_voxels(nan_nii);
  EXPECT_EQ(nf.count, 1);
  EXPECT_EQ(voxel_string(g3, nf.first_index), "(1, 2, 1) of volume 1");
  expect_io_error(nan_nii, [&] { read_image_channels({nan_nii}, 2); }, {"(1, 2, 1) of volume 1"});
  // A 3-D file where two channels are expected.
  const fs::path flat = dir / "flat.nii.gz";
  write_float_image(flat, v);
  expect_io_error(flat, [&] { read_image_channels({flat}, 2); }, {"1 volume ", "expected 2"});
  // Any 3-D format reads as one channel.
  const fs::path mha = dir / "flat.mha";
  write_float_image(mha, v);
  EXPECT_EQ(read_image_channels({mha}).channels, 1);
}

void expect_io_error_naming(const fs::path& p, const std::string& reason_part) {
  for (int k = 0; k < 3; ++k) {
    try {
      if (k == 0) read_image(p);
      if (k == 1) read_labels(p);
      if (k == 2) read_geometry(p);
      ADD_FAILURE() << p << " read without error (call " << k << ")";
    } catch (const IoError& e) {
      const std::string msg = e.what();
      EXPECT_EQ(msg.rfind(p.string() + ": ", 0), 0u) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << "multi-line message: " << msg;
      EXPECT_EQ(msg.find("(0x"), std::string::npos) << "ITK object address in: " << msg;
      EXPECT_NE(msg.find(reason_part), std::string::npos) << msg;
    }
  }
}

// A 40x30x20 image of varied values (its .nii.gz spans many deflate blocks).
Volume larger_image() {
  Volume v = synthetic_image(synthetic_geometry(kIdentity));
  v.geo.size = {40, 30, 20};
  v.data.resize(static_cast<size_t>(v.geo.voxels()));
  for (size_t i = 0; i < v.data.size(); ++i) v.data[i] = static_cast<float>((i * 7919) % 1000);
  return v;
}

void expect_io_error_naming_image(const fs::path& dir, const std::string& name, const Volume& v,
                                  const std::string& reason_part) {
  const fs::path p = dir / name;
  write_float_image(p, v);
  try {
    read_image(p);
    ADD_FAILURE() << p << " read without error";
  } catch (const IoError& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(p.string() + ": ", 0), 0u) << msg;
    EXPECT_NE(msg.find(reason_part), std::string::npos) << msg;
  }
}

TEST(ImageIo, MissingTruncatedAndNonImageFilesGiveOneLineIoErrors) {
  TempDir dir;
  expect_io_error_naming(dir / "absent.nii.gz", "not found");

  std::ofstream(dir / "notes.nii.gz") << "this is a text file, not an image\n";
  expect_io_error_naming(dir / "notes.nii.gz", "");

  // A NIfTI header with an impossible dim[0].
  const fs::path bad_dims = dir / "bad_dims.nii";
  write_float_image(bad_dims, synthetic_image(synthetic_geometry(kIdentity)));
  test::patch_nifti_dims(bad_dims, {9});
  expect_io_error_naming(bad_dims, "dim[0] = 9");

  // A real compressed scan cut in half: the header reads, the voxels do not.
  const fs::path full = dir / "full.nii.gz";
  write_float_image(full, larger_image());
  const auto size = fs::file_size(full);
  const fs::path cut = dir / "cut.nii.gz";
  fs::copy_file(full, cut);
  fs::resize_file(cut, size / 2);
  for (int k = 0; k < 2; ++k) {
    try {
      if (k == 0)
        read_image(cut);
      else
        read_labels(cut);
      ADD_FAILURE() << "truncated file read without error";
    } catch (const IoError& e) {
      const std::string msg = e.what();
      EXPECT_EQ(msg.rfind(cut.string() + ": ", 0), 0u) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
      EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
    }
  }
}

// Overwrites `count` bytes at `offset` of an uncompressed file.
void patch_bytes(const fs::path& p, std::streamoff offset, const void* data, size_t count) {
  std::fstream f(p, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(offset);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(count));
  ASSERT_TRUE(f.good()) << p;
}

void patch_float(const fs::path& p, std::streamoff offset, float v) {
  patch_bytes(p, offset, &v, sizeof v);
}

// Header fields ITK 5.2 mishandles (aborts on a non-finite qform/sform, reads through a NaN
// vox_offset, silently replaces a zero, negative or NaN spacing by 1 mm): refused with the field
// named, by every reader. A named pipe is refused before it is opened (opening one blocks).
TEST(ImageIo, BrokenHeaderFieldsAndNonRegularFilesAreRefused) {
  TempDir dir;
  const Volume v = synthetic_image(synthetic_geometry(kIdentity));
  const float nan = std::nanf(""), inf = INFINITY;
  struct Patch {
    const char* name;
    std::streamoff offset;
    float value;
    const char* reason;
  };
  for (const Patch& c : {Patch{"spacing_zero", 80, 0.f, "pixdim[1]"},
                         Patch{"spacing_negative", 84, -1.5f, "pixdim[2]"},
                         Patch{"spacing_nan", 88, nan, "pixdim[3]"},
                         Patch{"spacing_huge", 80, 1e30f, "pixdim[1]"},
                         Patch{"qoffset_nan", 268, nan, "qform"},
                         Patch{"quatern_inf", 260, inf, "qform"},
                         Patch{"srow_nan", 280, nan, "sform"},
                         Patch{"vox_offset_nan", 108, nan, "vox_offset"},
                         Patch{"vox_offset_small", 108, 100.f, "vox_offset"},
                         Patch{"vox_offset_huge", 108, 1e30f, "vox_offset"}}) {
    const fs::path p = dir / (std::string(c.name) + ".nii");
    write_float_image(p, v);
    int16_t codes[2] = {1, 1};  // qform_code, sform_code: both in use, so both are checked
    patch_bytes(p, 252, codes, sizeof codes);
    patch_float(p, c.offset, c.value);
    expect_io_error_naming(p, c.reason);
  }
  const fs::path fifo = dir / "pipe.nii.gz";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  expect_io_error_naming(fifo, "not a regular file");
}

// What ITK would read wrongly or not at all, refused by name before it gets there: a header +
// image pair (.hdr/.img went to ITK unchecked: a NaN sform aborted the process), a .nii.gz without
// the NIfTI-1 magic (read as ANALYZE 7.5, whose orientation ignores the sform), a NIfTI-2 file, gzip
// data named .nii, and a MetaImage whose voxel data is short (MetaIO only prints a message).
TEST(ImageIo, UncheckableAndMisnamedFilesAreRefusedByName) {
  TempDir dir;
  const Volume v = synthetic_image(synthetic_geometry(kIdentity));
  std::ofstream(dir / "pair.hdr") << std::string(348, '\0');
  std::ofstream(dir / "pair.img") << std::string(64, '\0');
  expect_io_error_naming(dir / "pair.hdr", ".hdr/.img pair");
  expect_io_error_naming(dir / "pair.img", ".hdr/.img pair");
  fs::create_symlink("nowhere.nii.gz", dir / "dangling.nii.gz");
  expect_io_error_naming(dir / "dangling.nii.gz", "symbolic link that leads nowhere");
  std::ofstream(dir / "volume.vtk") << "# vtk DataFile Version 3.0\n";
  expect_io_error_naming(dir / "volume.vtk", "not a supported image file");

  const fs::path magic = dir / "magic.nii";
  write_float_image(magic, v);
  patch_bytes(magic, 344, "xyz", 4);
  expect_io_error_naming(magic, "magic 'xyz'");

  const fs::path nifti2 = dir / "two.nii";
  write_float_image(nifti2, v);
  const int32_t n2 = 540;
  patch_bytes(nifti2, 0, &n2, 4);
  patch_bytes(nifti2, 4, "n+2", 4);
  expect_io_error_naming(nifti2, "NIfTI-2");

  const fs::path gz = dir / "packed.nii.gz", misnamed = dir / "packed.nii";
  write_float_image(gz, v);
  fs::copy_file(gz, misnamed);
  expect_io_error_naming(misnamed, "name it .nii.gz");

  // MetaImage, uncompressed (as other tools write it) and compressed (as medseg writes it): whole
  // files read, short ones do not.
  const auto write_mha = [&](const fs::path& p, int64_t floats) {
    std::ofstream f(p, std::ios::binary);
    f << "ObjectType = Image\nNDims = 3\nDimSize = 4 3 2\nElementSpacing = 1 1 2\n"
         "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n";
    for (int64_t i = 0; i < floats; ++i) {
      const float x = static_cast<float>(i);
      f.write(reinterpret_cast<const char*>(&x), 4);
    }
  };
  write_mha(dir / "whole.mha", 24);
  const Volume whole = read_image(dir / "whole.mha");
  EXPECT_EQ(whole.data.size(), 24u);
  EXPECT_EQ(whole.data.back(), 23.f);
  // A sheared sform (and no qform): ITK cannot represent it; said in words, not in ITK's.
  const fs::path sheared = dir / "sheared.nii";
  write_float_image(sheared, v);
  const int16_t sform_only[2] = {0, 1};
  patch_bytes(sheared, 252, sform_only, sizeof sform_only);
  const float srow[12] = {1, 0.4f, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0};
  patch_bytes(sheared, 280, srow, sizeof srow);
  expect_io_error_naming(sheared, "not a rotation with scaling");

  // A stray uncompressed copy beside a .nii.gz: ITK 5.2 would read the copy.
  write_float_image(dir / "shadowed.nii.gz", v);
  write_float_image(dir / "shadowed.nii", larger_image());
  expect_io_error_naming(dir / "shadowed.nii.gz", "shadowed.nii sits beside it");

  const fs::path mha = dir / "short.mha";
  write_mha(mha, 20);
  const fs::path packed = dir / "packed_short.mha";
  write_float_image(packed, larger_image());
  fs::resize_file(packed, fs::file_size(packed) - 100);
  for (const fs::path& bad : {mha, packed})
  for (int k = 0; k < 2; ++k) {
    try {
      if (k == 0) read_image(bad);
      if (k == 1) read_labels(bad);
      ADD_FAILURE() << bad << ": a truncated MetaImage read without error (call " << k << ")";
    } catch (const IoError& e) {
      const std::string msg = e.what();
      EXPECT_EQ(msg.rfind(bad.string() + ": ", 0), 0u) << msg;
      EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
    }
  }
}

// Validation's voxel pass counts what training would read as non-finite: a stored value that
// overflows float32 only after the scale factor counts, with its decoded value.
TEST(ImageIo, NonFiniteCountIncludesScaleFactorOverflow) {
  TempDir dir;
  const fs::path p = dir / "scaled.nii";
  write_float_image(p, larger_image());
  EXPECT_EQ(count_nonfinite_voxels(p).count, 0);
  patch_float(p, 112, 1e37f);  // scl_slope
  const NonFiniteVoxels n = count_nonfinite_voxels(p);
  EXPECT_GT(n.count, 0);
  EXPECT_GE(n.first_index, 0);
  EXPECT_FALSE(std::isfinite(n.first_value) && std::fabs(n.first_value) <= 3.5e38)
      << n.first_value;
}

// Scaled integers (CT: int16 with scl_slope / scl_inter) are valid: the length check counts the
// stored bytes, not the float ITK converts them to (they were refused as "truncated").
TEST(ImageIo, ScaledIntegerNiftiIsReadWithItsScaling) {
  TempDir dir;
  LabelVolume l;
  l.geo = synthetic_geometry(kIdentity);
  l.data.resize(static_cast<size_t>(l.geo.voxels()));
  for (size_t i = 0; i < l.data.size(); ++i) l.data[i] = static_cast<uint16_t>(i % 7);
  const fs::path p = dir / "scaled.nii";
  write_labels(p, l);  // uint8
  patch_float(p, 112, 2.5f);      // scl_slope
  patch_float(p, 116, -1024.f);   // scl_inter
  const Volume r = read_image(p);
  ASSERT_EQ(r.data.size(), l.data.size());
  for (size_t i = 0; i < l.data.size(); ++i)
    ASSERT_EQ(r.data[i], 2.5f * static_cast<float>(l.data[i]) - 1024.f) << i;
}

// NaN / Inf voxels are refused by read_image (every command reads scans through it), and a
// compressed file whose deflate data is damaged is refused even when its trailer's length fits.
TEST(ImageIo, NonFiniteVoxelsAndCorruptCompressedDataAreRefused) {
  TempDir dir;
  Volume v = synthetic_image(synthetic_geometry(kIdentity));
  v.data[5] = std::nanf("");
  expect_io_error_naming_image(dir.path(), "nan.nii.gz", v, "NaN/Inf");
  v.data[5] = -INFINITY;
  expect_io_error_naming_image(dir.path(), "inf.nii", v, "NaN/Inf");

  const fs::path p = dir / "corrupt.nii.gz";
  write_float_image(p, larger_image());
  std::vector<char> bytes(fs::file_size(p));
  std::ifstream(p, std::ios::binary).read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  for (size_t i = bytes.size() / 2; i < bytes.size() / 2 + 16; ++i) bytes[i] ^= 0x5a;
  std::ofstream(p, std::ios::binary | std::ios::trunc)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  try {
    read_image(p);
    ADD_FAILURE() << "corrupt deflate data accepted";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("corrupt"), std::string::npos) << e.what();
  }
}

TEST(ImageIo, FailedWritesLeaveNoFileBehind) {
  TempDir dir;
  const Volume v = synthetic_image(synthetic_geometry(kIdentity));
  auto expect_failure = [&](const fs::path& dest, auto&& write) {
    try {
      write(dest);
      ADD_FAILURE() << "write to " << dest << " succeeded";
    } catch (const IoError& e) {
      EXPECT_NE(std::string(e.what()).find(dest.string()), std::string::npos) << e.what();
    }
  };
  auto write_image = [&](const fs::path& p) { write_float_image(p, v); };
  // Folder missing.
  expect_failure(dir / "no_such_folder" / "x.nii.gz", write_image);
  expect_failure(dir / "no_such_folder" / "x.txt",
                 [](const fs::path& p) { write_text_atomic(p, "abc"); });
  EXPECT_FALSE(fs::exists(dir / "no_such_folder"));
  // Destination is a non-empty folder: the temporary file is written, the rename fails.
  fs::create_directories(dir / "occupied.nii.gz" / "inside");
  expect_failure(dir / "occupied.nii.gz", write_image);
  expect_failure(dir / "occupied.nii.gz", [](const fs::path& p) { write_text_atomic(p, "abc"); });
  // A format that cannot hold the data: ITK fails while writing the temporary file.
  expect_failure(dir / "volume.png", write_image);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"occupied.nii.gz"});

  // An earlier good file survives a failed overwrite untouched.
  write_text_atomic(dir / "keep.txt", "first");
  fs::create_directories(dir / "sub");
  write_float_image(dir / "sub" / "good.nii.gz", v);
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"keep.txt", "occupied.nii.gz", "sub"}));
}

TEST(ImageIo, FailedWriteIntoReadOnlyFolderLeavesNothing) {
  if (::geteuid() == 0) GTEST_SKIP() << "running as root: permissions do not block writes";
  TempDir dir;
  fs::create_directories(dir / "ro");
  fs::permissions(dir / "ro", fs::perms::owner_read | fs::perms::owner_exec);
  const Volume v = synthetic_image(synthetic_geometry(kIdentity));
  EXPECT_THROW(write_float_image(dir / "ro" / "x.nii.gz", v), IoError);
  EXPECT_THROW(write_text_atomic(dir / "ro" / "x.json", "{}"), IoError);
  fs::permissions(dir / "ro", fs::perms::owner_all);
  EXPECT_TRUE(fs::is_empty(dir / "ro"));
}

TEST(ImageIo, TextAndBytesAreWrittenWhole) {
  TempDir dir;
  write_text_atomic(dir / "a.json", "{\"x\": 1}\n");
  write_text_atomic(dir / "a.json", "{\"x\": 2}\n");  // replaces
  std::ifstream f(dir / "a.json");
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  EXPECT_EQ(s, "{\"x\": 2}\n");
  const uint8_t bytes[5] = {0, 255, 10, 13, 0};
  write_bytes_atomic(dir / "b.bin", bytes, 5);
  EXPECT_EQ(test::read_file_bytes(dir / "b.bin"), std::vector<uint8_t>(bytes, bytes + 5));
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"a.json", "b.bin"}));
}

// Minimal PNG decoder for 8-bit RGB (colour type 2, no interlace): chunks, inflate, unfilter.
std::vector<uint8_t> decode_png_rgb(const fs::path& p, int& width, int& height) {
  const auto bytes = test::read_file_bytes(p);
  auto be32 = [&](size_t o) {
    return (uint32_t(bytes[o]) << 24) | (uint32_t(bytes[o + 1]) << 16) |
           (uint32_t(bytes[o + 2]) << 8) | bytes[o + 3];
  };
  static const uint8_t sig[8] = {137, 80, 78, 71, 13, 10, 26, 10};
  if (bytes.size() < 8 || !std::equal(sig, sig + 8, bytes.begin())) throw std::runtime_error("sig");
  std::vector<uint8_t> idat;
  for (size_t o = 8; o + 8 <= bytes.size();) {
    const uint32_t len = be32(o);
    const std::string type(bytes.begin() + o + 4, bytes.begin() + o + 8);
    if (type == "IHDR") {
      width = static_cast<int>(be32(o + 8));
      height = static_cast<int>(be32(o + 12));
      if (bytes[o + 16] != 8 || bytes[o + 17] != 2 || bytes[o + 20] != 0)
        throw std::runtime_error("not 8-bit RGB non-interlaced");
    } else if (type == "IDAT") {
      idat.insert(idat.end(), bytes.begin() + o + 8, bytes.begin() + o + 8 + len);
    }
    o += 12 + len;
  }
  const size_t stride = static_cast<size_t>(width) * 3;
  std::vector<uint8_t> raw((stride + 1) * height);
  uLongf raw_len = raw.size();
  if (uncompress(raw.data(), &raw_len, idat.data(), idat.size()) != Z_OK || raw_len != raw.size())
    throw std::runtime_error("inflate");
  std::vector<uint8_t> out(stride * height);
  for (int y = 0; y < height; ++y) {
    const uint8_t filter = raw[y * (stride + 1)];
    const uint8_t* in = &raw[y * (stride + 1) + 1];
    uint8_t* row = &out[y * stride];
    const uint8_t* up = y ? &out[(y - 1) * stride] : nullptr;
    for (size_t i = 0; i < stride; ++i) {
      const int a = i >= 3 ? row[i - 3] : 0, b = up ? up[i] : 0, c = (up && i >= 3) ? up[i - 3] : 0;
      int pred = 0;
      if (filter == 1) pred = a;
      if (filter == 2) pred = b;
      if (filter == 3) pred = (a + b) / 2;
      if (filter == 4) {
        const int pa = std::abs(b - c), pb = std::abs(a - c), pc = std::abs(a + b - 2 * c);
        pred = (pa <= pb && pa <= pc) ? a : (pb <= pc ? b : c);
      }
      row[i] = static_cast<uint8_t>(in[i] + pred);
    }
  }
  return out;
}

TEST(ImageIo, PngKeepsRowOrderAndColours) {
  TempDir dir;
  const int w = 5, h = 3;
  std::vector<uint8_t> rgb(static_cast<size_t>(w) * h * 3);
  for (size_t i = 0; i < rgb.size(); ++i) rgb[i] = static_cast<uint8_t>(i * 37 + 11);
  write_png_rgb(dir / "x.png", w, h, rgb);
  int gw = 0, gh = 0;
  EXPECT_EQ(decode_png_rgb(dir / "x.png", gw, gh), rgb);
  EXPECT_EQ(gw, w);
  EXPECT_EQ(gh, h);
  EXPECT_THROW(write_png_rgb(dir / "y.png", w, h, std::vector<uint8_t>(10)), ArgumentError);
}

// Real files: ITK's geometry and voxels against the independent NIfTI parse.
void check_against_own_parse(const fs::path& p, bool is_label) {
  SCOPED_TRACE(p.string());
  const auto h = test::parse_nifti(p);
  const Geometry want = h.geometry();
  // Both transforms, when present, describe the same grid in these files; 1e-5 because the
  // sform is stored as float32 products spacing x direction (relative error ~1e-7 x spacing 3).
  if (h.qform_code > 0 && h.sform_code > 0)
    expect_geometry_near(h.qform_geometry(), h.sform_geometry(), 1e-5, "qform vs sform");
  const auto raw = h.voxels();
  if (is_label) {
    const LabelVolume l = read_labels(p);
    expect_geometry_near(l.geo, want, 1e-6, "read_labels");
    ASSERT_EQ(l.data.size(), raw.size());
    for (size_t i = 0; i < raw.size(); ++i) ASSERT_EQ(l.data[i], raw[i]) << "voxel " << i;
  } else {
    const Volume v = read_image(p);
    expect_geometry_near(v.geo, want, 1e-6, "read_image");
    ASSERT_EQ(v.data.size(), raw.size());
    for (size_t i = 0; i < raw.size(); ++i)
      ASSERT_EQ(v.data[i], static_cast<float>(raw[i])) << "voxel " << i;
  }
  expect_geometry_near(read_geometry(p), want, 1e-6, "read_geometry");
}

TEST(ImageIoRealData, TotalSegmentatorSformOnlyFlippedScans) {
  MEDSEG_REQUIRE_SHARED("data/TotalSegmentator_examples");
  const fs::path root = test::shared_dir() / "data/TotalSegmentator_examples";
  for (const char* name : {"totalseg_ct_sm.nii.gz", "totalseg_mr_sm.nii.gz"}) {
    const auto h = test::parse_nifti(root / "imagesTr" / name);
    ASSERT_EQ(h.qform_code, 0) << name << ": the test expects sform-only files";
    ASSERT_GT(h.sform_code, 0) << name;
    check_against_own_parse(root / "imagesTr" / name, false);
    check_against_own_parse(root / "labelsTr" / name, true);
  }
  // The MR scan's x and y axes are flipped in RAS, i.e. they point along +L, +P in LPS.
  const Geometry mr = read_geometry(root / "imagesTr/totalseg_mr_sm.nii.gz");
  EXPECT_GT(mr.direction[0], 0.9);
  EXPECT_GT(mr.direction[4], 0.9);
}

TEST(ImageIoRealData, HippocampusUint8AndFloatCases) {
  MEDSEG_REQUIRE_SHARED("data/Task04_Hippocampus");
  const fs::path root = test::shared_dir() / "data/Task04_Hippocampus";
  // 003: float32 image and float32 label; 004 and 007: a mix; the test finds a uint8 image below.
  for (const char* name : {"hippocampus_003.nii.gz", "hippocampus_004.nii.gz"}) {
    check_against_own_parse(root / "imagesTr" / name, false);
    check_against_own_parse(root / "labelsTr" / name, true);
  }
  EXPECT_EQ(test::parse_nifti(root / "labelsTr/hippocampus_003.nii.gz").datatype, 16)
      << "hippocampus_003's label is expected to be stored as float32";
  int uint8_images = 0;
  for (const auto& e : fs::directory_iterator(root / "imagesTr")) {
    if (test::parse_nifti(e.path()).datatype != 2) continue;
    check_against_own_parse(e.path(), false);
    check_against_own_parse(root / "labelsTr" / e.path().filename(), true);
    if (++uint8_images == 2) break;
  }
  EXPECT_EQ(uint8_images, 2) << "no uint8 image found in " << root;
}

}  // namespace
}  // namespace medseg::io
