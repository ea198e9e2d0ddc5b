#include "infer/synthetic.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "io/image_io.hpp"

namespace medseg::infer {

namespace {

constexpr double kSpacing[3] = {0.8, 0.8, 2.5};  // mm: a typical thick-slice abdominal series
constexpr int kSub[3] = {2, 2,
                         3};  // partial-volume sub-samples per voxel along x, y, z (z is thick)
// Intensity unit: the values below are in "reference units"; the stored value is kUnit times that.
// Half-size units keep every contrast-to-noise ratio and make the integers half as wide, which gzip
// turns into about one bit less per voxel (the committed sample set must stay small).
constexpr double kUnit = 0.4;
constexpr double kNoiseSigma = 10.0;

using Vec3 = std::array<double, 3>;
using Mat3 = std::array<double, 9>;  // row-major

Mat3 multiply(const Mat3& a, const Mat3& b) {
  Mat3 r{};
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 3; ++k) r[i * 3 + j] += a[i * 3 + k] * b[k * 3 + j];
  return r;
}

// Random orientation: any turn about z, then a tilt of up to max_tilt radians about x and y, so
// that structures stay roughly aligned with the slices as organs in axial scans do.
Mat3 random_rotation(Rng& rng, double max_tilt) {
  const double yaw = rng.uniform(0, 2 * M_PI), tx = rng.uniform(-max_tilt, max_tilt),
               ty = rng.uniform(-max_tilt, max_tilt);
  const Mat3 rz{std::cos(yaw), -std::sin(yaw), 0, std::sin(yaw), std::cos(yaw), 0, 0, 0, 1};
  const Mat3 rx{1, 0, 0, 0, std::cos(tx), -std::sin(tx), 0, std::sin(tx), std::cos(tx)};
  const Mat3 ry{std::cos(ty), 0, std::sin(ty), 0, 1, 0, -std::sin(ty), 0, std::cos(ty)};
  return multiply(rz, multiply(rx, ry));
}

// A rotated ellipsoid whose radius is modulated by a few low-order angular harmonics (lobulation),
// so that shapes are not all perfect ellipsoids.
struct Blob {
  Vec3 centre{}, axes{};
  Mat3 rot{};  // columns: the blob's own axes in the volume frame
  std::array<double, 3> lobe_amp{}, lobe_phase{};
  double polar_amp = 0;

  bool inside(const Vec3& p) const {
    Vec3 d{p[0] - centre[0], p[1] - centre[1], p[2] - centre[2]};
    Vec3 u{};  // rot^T d, scaled by the axes
    for (int j = 0; j < 3; ++j)
      u[j] = (rot[0 * 3 + j] * d[0] + rot[1 * 3 + j] * d[1] + rot[2 * 3 + j] * d[2]) / axes[j];
    const double r2 = u[0] * u[0] + u[1] * u[1] + u[2] * u[2];
    if (r2 < 0.5) return true;  // the lobulation never reaches this deep (amplitudes sum < 0.3)
    if (r2 > 2.0) return false;
    const double r = std::sqrt(r2);
    const double theta = std::atan2(u[1], u[0]);
    double bound = 1.0 + polar_amp * (u[2] / r);
    for (int m = 0; m < 3; ++m) bound += lobe_amp[m] * std::cos((m + 2) * theta + lobe_phase[m]);
    return r < bound;
  }
};

Blob random_blob(Rng& rng, const Vec3& centre, const Vec3& axes_lo, const Vec3& axes_hi,
                 double lobulation) {
  Blob b;
  b.centre = centre;
  for (int a = 0; a < 3; ++a) b.axes[a] = rng.uniform(axes_lo[a], axes_hi[a]);
  b.rot = random_rotation(rng, 0.35);
  for (int m = 0; m < 3; ++m) {
    b.lobe_amp[m] = rng.uniform(0, lobulation);
    b.lobe_phase[m] = rng.uniform(0, 2 * M_PI);
  }
  b.polar_amp = rng.uniform(-lobulation, lobulation);
  return b;
}

// Smooth texture: a sum of plane waves with wavelengths of 6-20 mm, unit variance on average.
struct Waves {
  std::vector<std::array<double, 4>> w;  // kx, ky, kz, phase
  void init(Rng& rng, int count) {
    for (int i = 0; i < count; ++i) {
      const double lambda = rng.uniform(6, 20);
      Vec3 dir{rng.normal(), rng.normal(), 0.3 * rng.normal()};
      const double n = std::sqrt(dir[0] * dir[0] + dir[1] * dir[1] + dir[2] * dir[2]) + 1e-12;
      const double k = 2 * M_PI / lambda / n;
      w.push_back({dir[0] * k, dir[1] * k, dir[2] * k, rng.uniform(0, 2 * M_PI)});
    }
  }
  double operator()(const Vec3& p) const {
    double s = 0;
    for (const auto& v : w) s += std::sin(v[0] * p[0] + v[1] * p[1] + v[2] * p[2] + v[3]);
    return s * std::sqrt(2.0 / static_cast<double>(w.size()));
  }
};

// Rounds to a multiple of 1/64 mm, exact in the float32 NIfTI header, so origins read back
// unchanged.
double header_exact(double v) {
  return std::round(v * 64.0) / 64.0;
}

std::string case_id(int index) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "synth_%03d", index + 1);
  return buf;
}

}  // namespace

SyntheticCase generate_synthetic_case(const SyntheticOptions& opt, int index) {
  const auto& n = opt.size;
  MEDSEG_CHECK(n[0] >= 16 && n[1] >= 16 && n[2] >= 8, "synthetic volume size ", n[0], "x", n[1],
               "x", n[2], " is too small for the structures (at least 16x16x8)");
  MEDSEG_CHECK(index >= 0, "case index ", index);
  Rng rng = Rng(opt.seed).split(static_cast<uint64_t>(index));

  SyntheticCase c;
  c.id = case_id(index);
  Geometry geo;
  geo.size = n;
  geo.spacing = {kSpacing[0], kSpacing[1], kSpacing[2]};
  geo.direction = {-1, 0, 0, 0, -1, 0, 0, 0, 1};
  const Vec3 half{(n[0] - 1) * kSpacing[0] / 2, (n[1] - 1) * kSpacing[1] / 2,
                  (n[2] - 1) * kSpacing[2] / 2};
  // World position of the volume centre varies per case like a table position does.
  const Vec3 world_centre{rng.uniform(-15, 15), rng.uniform(-30, 0), rng.uniform(-200, -100)};
  for (int a = 0; a < 3; ++a)
    geo.origin[a] = header_exact(world_centre[a] - geo.direction[a * 3 + a] * half[a]);

  // Anatomy, in mm relative to the volume centre (index frame, before the direction flip).
  const double body_a = half[0] * rng.uniform(0.80, 0.92),
               body_b = half[1] * rng.uniform(0.70, 0.85);
  const Vec3 body_c{rng.uniform(-2, 2), rng.uniform(-2, 2), 0};
  const double fat = rng.uniform(2.5, 4.5);
  const double inner_a = body_a - fat, inner_b = body_b - fat;

  const Vec3 organ_c{rng.uniform(-0.3, 0.3) * inner_a, rng.uniform(-0.3, 0.3) * inner_b,
                     rng.uniform(-0.2, 0.2) * half[2]};
  const Blob organ = random_blob(rng, organ_c, {9, 8, 12}, {15, 13, 20}, 0.08);
  Vec3 dir{rng.normal(), rng.normal(), rng.normal()};
  const double dn = std::sqrt(dir[0] * dir[0] + dir[1] * dir[1] + dir[2] * dir[2]) + 1e-12;
  const double reach =
      rng.uniform(0, 0.7);  // 0 = centred in the organ; 0.7 often touches its border
  Vec3 lesion_c = organ.centre;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j)
      lesion_c[i] += organ.rot[i * 3 + j] * (dir[j] / dn) * reach * organ.axes[j];
  const Blob lesion = random_blob(rng, lesion_c, {6, 6, 7.5}, {9, 9, 11}, 0.05);

  // Intensities (arbitrary MRI-like units); the contrast varies per case as between scanners.
  const double gain = rng.uniform(0.85, 1.15);
  const double v_tissue = rng.normal(120, 6), v_fat = rng.normal(260, 10),
               v_organ = rng.normal(200, 10), v_lesion = rng.normal(45, 6);
  Waves tissue_tex, organ_tex;
  tissue_tex.init(rng, 6);
  organ_tex.init(rng, 4);
  struct Spot {
    Vec3 c;
    double r, amp;
  };
  std::vector<Spot> spots(6);  // small bright structures (vessels in cross-section) in the tissue
  for (auto& s : spots)
    s = {{rng.uniform(-body_a, body_a), rng.uniform(-body_b, body_b),
          rng.uniform(-half[2], half[2])},
         rng.uniform(1.2, 2.5),
         rng.uniform(30, 55)};
  std::array<double, 5> bias{};
  for (double& b : bias) b = rng.uniform(-1, 1);

  c.image.geo = geo;
  c.image.channels = 1;
  c.image.data.resize(static_cast<size_t>(geo.voxels()));
  c.labels.geo = geo;
  c.labels.data.resize(static_cast<size_t>(geo.voxels()));
  const double subs = kSub[0] * kSub[1] * kSub[2];
  for (int64_t z = 0; z < n[2]; ++z)
    for (int64_t y = 0; y < n[1]; ++y)
      for (int64_t x = 0; x < n[0]; ++x) {
        const Vec3 p{x * kSpacing[0] - half[0], y * kSpacing[1] - half[1],
                     z * kSpacing[2] - half[2]};
        double f_air = 0, f_fat = 0, f_tissue = 0, f_organ = 0, f_lesion = 0;
        for (int sz = 0; sz < kSub[2]; ++sz)
          for (int sy = 0; sy < kSub[1]; ++sy)
            for (int sx = 0; sx < kSub[0]; ++sx) {
              const Vec3 q{p[0] + ((sx + 0.5) / kSub[0] - 0.5) * kSpacing[0],
                           p[1] + ((sy + 0.5) / kSub[1] - 0.5) * kSpacing[1],
                           p[2] + ((sz + 0.5) / kSub[2] - 0.5) * kSpacing[2]};
              const double bx = q[0] - body_c[0], by = q[1] - body_c[1];
              const double outer = (bx / body_a) * (bx / body_a) + (by / body_b) * (by / body_b);
              const double inner =
                  (bx / inner_a) * (bx / inner_a) + (by / inner_b) * (by / inner_b);
              if (outer >= 1)
                f_air += 1;
              else if (inner >= 1)
                f_fat += 1;
              else if (lesion.inside(q))
                f_lesion += 1;
              else if (organ.inside(q))
                f_organ += 1;
              else
                f_tissue += 1;
            }
        f_air /= subs, f_fat /= subs, f_tissue /= subs, f_organ /= subs, f_lesion /= subs;
        double tissue = v_tissue + 10 * tissue_tex(p);
        for (const auto& s : spots) {
          const double d2 = (p[0] - s.c[0]) * (p[0] - s.c[0]) + (p[1] - s.c[1]) * (p[1] - s.c[1]) +
                            (p[2] - s.c[2]) * (p[2] - s.c[2]);
          tissue += s.amp * std::exp(-d2 / (2 * s.r * s.r));
        }
        double v = f_fat * v_fat + f_tissue * tissue + f_organ * (v_organ + 6 * organ_tex(p)) +
                   f_lesion * (v_lesion + 3 * organ_tex(p));
        (void)f_air;  // air is 0
        const double X = p[0] / half[0], Y = p[1] / half[1], Z = p[2] / half[2];
        v *= gain * std::exp(0.06 * (bias[0] * X + bias[1] * Y + bias[2] * Z + bias[3] * X * Y +
                                     bias[4] * (X * X - Y * Y)));
        // Rician magnitude noise, as in a magnitude MR image: the background is not zero-mean.
        v *= kUnit;
        const double re = v + rng.normal(0, kUnit * kNoiseSigma);
        const double im = rng.normal(0, kUnit * kNoiseSigma);
        const double mag = std::min(32767.0, std::round(std::sqrt(re * re + im * im)));
        const size_t i = static_cast<size_t>((z * n[1] + y) * n[0] + x);
        c.image.data[i] = static_cast<float>(mag);
        c.labels.data[i] = f_lesion >= 0.5 ? 2 : (f_lesion + f_organ >= 0.5 ? 1 : 0);
      }
  return c;
}

void generate_synthetic_dataset(const fs::path& out_dir, const SyntheticOptions& opt) {
  MEDSEG_CHECK(opt.train_cases >= 1 && opt.test_cases >= 0, "train_cases ", opt.train_cases,
               " test_cases ", opt.test_cases);
  std::error_code ec;
  if (fs::exists(out_dir, ec)) {
    if (!fs::is_directory(out_dir, ec))
      throw ArgumentError(out_dir.string() + ": exists and is not a folder");
    if (!fs::is_empty(out_dir, ec) && !fs::exists(out_dir / "dataset.json", ec))
      throw ArgumentError(out_dir.string() +
                          ": folder is not empty and holds no dataset.json; refusing to write a "
                          "synthetic dataset into it (choose an empty or new folder)");
  }
  for (const char* sub : {"imagesTr", "labelsTr", "imagesTs", "labelsTs"}) {
    if (std::string(sub).ends_with("Ts") && opt.test_cases == 0) continue;
    fs::create_directories(out_dir / sub, ec);
    if (ec) throw IoError(out_dir.string() + "/" + sub + ": cannot create folder: " + ec.message());
  }
  nlohmann::ordered_json training = nlohmann::ordered_json::array();
  nlohmann::ordered_json test = nlohmann::ordered_json::array();
  const int total = opt.train_cases + opt.test_cases;
  for (int i = 0; i < total; ++i) {
    const SyntheticCase c = generate_synthetic_case(opt, i);
    const bool is_train = i < opt.train_cases;
    const std::string file = c.id + ".nii.gz";
    const std::string img = std::string(is_train ? "imagesTr/" : "imagesTs/") + file;
    const std::string lab = std::string(is_train ? "labelsTr/" : "labelsTs/") + file;
    io::write_float_image(out_dir / img, c.image);
    io::write_labels(out_dir / lab, c.labels);
    if (is_train)
      training.push_back({{"image", "./" + img}, {"label", "./" + lab}});
    else
      test.push_back("./" + img);
  }
  nlohmann::ordered_json j;
  j["name"] = "SyntheticOrganLesion";
  j["description"] = "Synthetic MRI-like scans generated by medseg (seed " +
                     std::to_string(opt.seed) +
                     "): a lobulated organ with a hypointense lesion, bias field and Rician noise. "
                     "Not patient data.";
  j["reference"] = "medseg synthetic generator";
  j["licence"] = "CC0";
  j["tensorImageSize"] = "3D";
  j["modality"] = {{"0", "MRI"}};
  j["labels"] = {{"0", "background"}, {"1", "organ"}, {"2", "lesion"}};
  j["numTraining"] = opt.train_cases;
  j["numTest"] = opt.test_cases;
  j["training"] = training;
  j["test"] = test;
  io::write_text_atomic(out_dir / "dataset.json", j.dump(4) + "\n");
}

}  // namespace medseg::infer
