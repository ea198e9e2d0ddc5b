// Augmentation transforms. The order and the per-channel choices follow nnU-Net v2's default
// training transforms: noise, blur, brightness, contrast, low resolution, inverted gamma, gamma;
// mirroring and the affine part are drawn here but applied by the sampler.
#include "data/augment.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.hpp"

namespace medseg::data {
namespace {

// nnU-Net's "BGContrast" draw for multiplicative factors: half the time below 1, half above, so
// that a range like (0.75, 1.25) or (0.7, 1.5) shrinks as often as it stretches, whatever its
// asymmetry.
double draw_factor(double lo, double hi, Rng& rng) {
  const bool below_one = rng.uniform() < 0.5;
  const double u = rng.uniform();
  if (below_one && lo < 1.0) return lo + (std::min(hi, 1.0) - lo) * u;
  const double a = std::max(lo, 1.0);
  return a + (hi - a) * u;
}

struct ChannelStats {
  double mean = 0, std = 0;
  float min = 0, max = 0;
};

ChannelStats channel_stats(const float* image, int64_t voxels, int channels, int channel) {
  ChannelStats s;
  if (voxels == 0) return s;
  double sum = 0, sum2 = 0;
  float mn = image[channel], mx = image[channel];
  for (int64_t i = 0; i < voxels; ++i) {
    const float v = image[i * channels + channel];
    sum += v;
    sum2 += static_cast<double>(v) * v;
    mn = std::min(mn, v);
    mx = std::max(mx, v);
  }
  s.mean = sum / static_cast<double>(voxels);
  s.std = std::sqrt(std::max(0.0, sum2 / static_cast<double>(voxels) - s.mean * s.mean));
  s.min = mn;
  s.max = mx;
  return s;
}

// Convolves `n` values spaced `stride` apart with the normalised kernel (radius r), repeating the
// edge values beyond the ends. `line` is scratch of at least n + 2r floats.
void convolve_line(float* data, int64_t n, int64_t stride, const std::vector<float>& kernel,
                   std::vector<float>& line) {
  const int64_t r = static_cast<int64_t>(kernel.size() / 2);
  line.resize(static_cast<size_t>(n + 2 * r));
  for (int64_t i = 0; i < n + 2 * r; ++i) {
    const int64_t src = std::clamp<int64_t>(i - r, 0, n - 1);
    line[static_cast<size_t>(i)] = data[src * stride];
  }
  for (int64_t i = 0; i < n; ++i) {
    float acc = 0.f;
    for (size_t k = 0; k < kernel.size(); ++k) acc += kernel[k] * line[static_cast<size_t>(i) + k];
    data[i * stride] = acc;
  }
}

std::vector<float> gaussian_kernel(double sigma) {
  // Radius 3 sigma keeps all but 0.3% of the weight; the kernel is renormalised to sum 1 so a
  // constant image stays exactly constant.
  const int r = std::max(1, static_cast<int>(std::ceil(3.0 * sigma)));
  std::vector<float> k(static_cast<size_t>(2 * r + 1));
  double sum = 0;
  for (int i = -r; i <= r; ++i) {
    const double v = std::exp(-0.5 * (i * i) / (sigma * sigma));
    k[static_cast<size_t>(i + r)] = static_cast<float>(v);
    sum += v;
  }
  for (auto& v : k) v = static_cast<float>(v / sum);
  return k;
}

// Linear sample positions for resizing n_src -> n_dst with pixel centres aligned.
struct Lerp {
  int64_t i0, i1;
  float t;
};
std::vector<Lerp> linear_positions(int64_t n_src, int64_t n_dst) {
  std::vector<Lerp> out(static_cast<size_t>(n_dst));
  const double scale = static_cast<double>(n_src) / static_cast<double>(n_dst);
  for (int64_t j = 0; j < n_dst; ++j) {
    double x = (static_cast<double>(j) + 0.5) * scale - 0.5;
    x = std::clamp(x, 0.0, static_cast<double>(n_src - 1));
    const int64_t i0 = static_cast<int64_t>(std::floor(x));
    const int64_t i1 = std::min(i0 + 1, n_src - 1);
    out[static_cast<size_t>(j)] = {i0, i1, static_cast<float>(x - static_cast<double>(i0))};
  }
  return out;
}

}  // namespace

bool is_anisotropic_patch(const std::array<int64_t, 3>& patch) {
  return std::max(patch[1], patch[2]) > 3 * patch[0];
}

SpatialDraw draw_spatial(const AugmentConfig& cfg, const std::array<int64_t, 3>& patch, Rng& rng) {
  SpatialDraw d;
  if (!cfg.enabled) return d;
  // Fixed consumption: 3 mirror draws, 1 rotation decision + 3 angles, 1 scaling decision + 1
  // factor.
  std::array<double, 3> u_mirror{};
  for (auto& u : u_mirror) u = rng.uniform();
  const double u_rot = rng.uniform();
  std::array<double, 3> u_angle{};
  for (auto& u : u_angle) u = rng.uniform();
  const double u_scale = rng.uniform();
  const double u_factor = rng.uniform();

  if (cfg.mirror) {
    for (int a = 0; a < 3; ++a)
      d.mirror[a] = cfg.mirror_axes[a] && u_mirror[a] < cfg.p_mirror_per_axis;
  }
  const bool rotate = cfg.rotation && u_rot < cfg.p_rotation;
  const bool scale = cfg.scaling && u_scale < cfg.p_scaling;
  if (!rotate && !scale) return d;

  d.affine = true;
  if (rotate) {
    const bool in_plane = cfg.rotation_axes == RotationAxes::InPlane ||
                          (cfg.rotation_axes == RotationAxes::Auto && is_anisotropic_patch(patch));
    const double max_rad = cfg.rotation_max_deg * M_PI / 180.0;
    for (int a = 0; a < 3; ++a) {
      if (in_plane && a != 0) continue;  // only about z
      d.angles_rad[a] = (2.0 * u_angle[a] - 1.0) * max_rad;
    }
  }
  if (scale) d.scale = cfg.scale_min + (cfg.scale_max - cfg.scale_min) * u_factor;

  // (z, y, x) coordinates. About z rotates (y, x); about y rotates (z, x); about x rotates (z, y).
  const double cz = std::cos(d.angles_rad[0]), sz = std::sin(d.angles_rad[0]);
  const double cy = std::cos(d.angles_rad[1]), sy = std::sin(d.angles_rad[1]);
  const double cx = std::cos(d.angles_rad[2]), sx = std::sin(d.angles_rad[2]);
  const double rz[9] = {1, 0, 0, 0, cz, -sz, 0, sz, cz};
  const double ry[9] = {cy, 0, sy, 0, 1, 0, -sy, 0, cy};
  const double rx[9] = {cx, -sx, 0, sx, cx, 0, 0, 0, 1};
  auto mul = [](const double* a, const double* b, double* c) {
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) {
        double s = 0;
        for (int k = 0; k < 3; ++k) s += a[i * 3 + k] * b[k * 3 + j];
        c[i * 3 + j] = s;
      }
  };
  double tmp[9], m[9];
  mul(rz, ry, tmp);
  mul(tmp, rx, m);
  for (int i = 0; i < 9; ++i) d.matrix[static_cast<size_t>(i)] = d.scale * m[i];
  return d;
}

void add_gaussian_noise(float* image, int64_t count, double stddev, Rng& rng) {
  for (int64_t i = 0; i < count; ++i) image[i] += static_cast<float>(stddev * rng.normal());
}

void gaussian_blur_channel(float* image, std::array<int64_t, 3> shape, int channels, int channel,
                           const std::array<double, 3>& sigma) {
  const int64_t D = shape[0], H = shape[1], W = shape[2], C = channels;
  std::vector<float> line;
  const std::vector<float> kz = gaussian_kernel(sigma[0]);
  const std::vector<float> ky = gaussian_kernel(sigma[1]);
  const std::vector<float> kx = gaussian_kernel(sigma[2]);
  float* base = image + channel;
  for (int64_t z = 0; z < D; ++z)
    for (int64_t y = 0; y < H; ++y) convolve_line(base + ((z * H + y) * W) * C, W, C, kx, line);
  for (int64_t z = 0; z < D; ++z)
    for (int64_t x = 0; x < W; ++x) convolve_line(base + (z * H * W + x) * C, H, W * C, ky, line);
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; ++x) convolve_line(base + (y * W + x) * C, D, H * W * C, kz, line);
}

void simulate_low_resolution_channel(float* image, std::array<int64_t, 3> shape, int channels,
                                     int channel, const std::array<double, 3>& zoom) {
  const int64_t C = channels;
  std::array<int64_t, 3> low{};
  for (int a = 0; a < 3; ++a)
    low[a] = std::max<int64_t>(1, std::llround(static_cast<double>(shape[a]) * zoom[a]));
  if (low == shape) return;
  // Nearest-neighbour downsample: the low-resolution voxel j takes the full-resolution voxel under
  // its centre.
  std::array<std::vector<int64_t>, 3> pick;
  for (int a = 0; a < 3; ++a) {
    pick[a].resize(static_cast<size_t>(low[a]));
    const double step = static_cast<double>(shape[a]) / static_cast<double>(low[a]);
    for (int64_t j = 0; j < low[a]; ++j)
      pick[a][static_cast<size_t>(j)] = std::min<int64_t>(
          shape[a] - 1, static_cast<int64_t>(std::floor((static_cast<double>(j) + 0.5) * step)));
  }
  std::vector<float> small(static_cast<size_t>(low[0] * low[1] * low[2]));
  for (int64_t z = 0; z < low[0]; ++z)
    for (int64_t y = 0; y < low[1]; ++y)
      for (int64_t x = 0; x < low[2]; ++x) {
        const int64_t src = (pick[0][z] * shape[1] + pick[1][y]) * shape[2] + pick[2][x];
        small[static_cast<size_t>((z * low[1] + y) * low[2] + x)] = image[src * C + channel];
      }
  // Trilinear upsample back to the patch shape.
  const auto lz = linear_positions(low[0], shape[0]);
  const auto ly = linear_positions(low[1], shape[1]);
  const auto lx = linear_positions(low[2], shape[2]);
  const int64_t LY = low[1], LX = low[2];
  for (int64_t z = 0; z < shape[0]; ++z) {
    const Lerp& pz = lz[static_cast<size_t>(z)];
    for (int64_t y = 0; y < shape[1]; ++y) {
      const Lerp& py = ly[static_cast<size_t>(y)];
      const float* r00 = small.data() + (pz.i0 * LY + py.i0) * LX;
      const float* r01 = small.data() + (pz.i0 * LY + py.i1) * LX;
      const float* r10 = small.data() + (pz.i1 * LY + py.i0) * LX;
      const float* r11 = small.data() + (pz.i1 * LY + py.i1) * LX;
      float* out = image + ((z * shape[1] + y) * shape[2]) * C + channel;
      for (int64_t x = 0; x < shape[2]; ++x) {
        const Lerp& px = lx[static_cast<size_t>(x)];
        auto lerp_x = [&](const float* r) { return r[px.i0] + px.t * (r[px.i1] - r[px.i0]); };
        const float a0 = lerp_x(r00) + py.t * (lerp_x(r01) - lerp_x(r00));
        const float a1 = lerp_x(r10) + py.t * (lerp_x(r11) - lerp_x(r10));
        out[x * C] = a0 + pz.t * (a1 - a0);
      }
    }
  }
}

void gamma_channel(float* image, int64_t voxels, int channels, int channel, double gamma,
                   bool invert) {
  if (voxels == 0) return;
  float* p = image + channel;
  const int64_t C = channels;
  if (invert)
    for (int64_t i = 0; i < voxels; ++i) p[i * C] = -p[i * C];
  const ChannelStats before = channel_stats(image, voxels, channels, channel);
  // The epsilon keeps a constant channel finite (range 0); nnU-Net uses the same 1e-7.
  const double range = static_cast<double>(before.max) - before.min + 1e-7;
  const float g = static_cast<float>(gamma);
  for (int64_t i = 0; i < voxels; ++i) {
    const double t = std::max(0.0, (static_cast<double>(p[i * C]) - before.min) / range);
    p[i * C] = static_cast<float>(std::pow(static_cast<float>(t), g) * range + before.min);
  }
  const ChannelStats after = channel_stats(image, voxels, channels, channel);
  // Restores mean and standard deviation (nnU-Net's retain_stats); 1e-8 guards a constant result.
  const double k = before.std / (after.std + 1e-8);
  for (int64_t i = 0; i < voxels; ++i)
    p[i * C] = static_cast<float>((p[i * C] - after.mean) * k + before.mean);
  if (invert)
    for (int64_t i = 0; i < voxels; ++i) p[i * C] = -p[i * C];
}

void contrast_channel(float* image, int64_t voxels, int channels, int channel, double factor) {
  if (voxels == 0) return;
  const ChannelStats s = channel_stats(image, voxels, channels, channel);
  float* p = image + channel;
  const float f = static_cast<float>(factor), m = static_cast<float>(s.mean);
  for (int64_t i = 0; i < voxels; ++i) {
    const float v = (p[i * channels] - m) * f + m;
    p[i * channels] = std::clamp(v, s.min, s.max);
  }
}

void augment_intensity(const AugmentConfig& cfg, Rng& rng, float* image,
                       std::array<int64_t, 3> shape, int channels) {
  if (!cfg.enabled) return;
  MEDSEG_CHECK(image != nullptr && channels >= 1 && shape[0] > 0 && shape[1] > 0 && shape[2] > 0,
               "augment_intensity: bad patch (", shape[0], ", ", shape[1], ", ", shape[2], ") x ",
               channels, " channels");
  const int64_t voxels = shape[0] * shape[1] * shape[2];
  const int64_t C = channels;

  if (rng.bernoulli(cfg.p_noise) && cfg.noise) {
    const double variance = rng.uniform(0.0, cfg.noise_variance_max);
    add_gaussian_noise(image, voxels * C, std::sqrt(variance), rng);
  }
  if (rng.bernoulli(cfg.p_blur) && cfg.blur) {
    for (int c = 0; c < channels; ++c) {
      if (!rng.bernoulli(cfg.p_blur_per_channel)) continue;
      std::array<double, 3> sigma{};
      for (auto& s : sigma) s = rng.uniform(cfg.blur_sigma_min, cfg.blur_sigma_max);
      gaussian_blur_channel(image, shape, channels, c, sigma);
    }
  }
  if (rng.bernoulli(cfg.p_brightness) && cfg.brightness) {
    for (int c = 0; c < channels; ++c) {
      const float f = static_cast<float>(draw_factor(cfg.brightness_min, cfg.brightness_max, rng));
      for (int64_t i = 0; i < voxels; ++i) image[i * C + c] *= f;
    }
  }
  if (rng.bernoulli(cfg.p_contrast) && cfg.contrast) {
    for (int c = 0; c < channels; ++c)
      contrast_channel(image, voxels, channels, c,
                       draw_factor(cfg.contrast_min, cfg.contrast_max, rng));
  }
  if (rng.bernoulli(cfg.p_low_resolution) && cfg.low_resolution) {
    // One zoom for all axes of a channel (nnU-Net synchronises axes); a thin anisotropic patch
    // keeps its few z slices.
    const bool keep_z = is_anisotropic_patch(shape);
    for (int c = 0; c < channels; ++c) {
      if (!rng.bernoulli(cfg.p_low_resolution_per_channel)) continue;
      const double z = rng.uniform(cfg.low_resolution_zoom_min, cfg.low_resolution_zoom_max);
      simulate_low_resolution_channel(image, shape, channels, c, {keep_z ? 1.0 : z, z, z});
    }
  }
  if (rng.bernoulli(cfg.p_gamma_inverted) && cfg.gamma_inverted) {
    for (int c = 0; c < channels; ++c)
      gamma_channel(image, voxels, channels, c, draw_factor(cfg.gamma_min, cfg.gamma_max, rng),
                    true);
  }
  if (rng.bernoulli(cfg.p_gamma) && cfg.gamma) {
    for (int c = 0; c < channels; ++c)
      gamma_channel(image, voxels, channels, c, draw_factor(cfg.gamma_min, cfg.gamma_max, rng),
                    false);
  }
}

AugmentConfig AugmentConfig::mirror_only() {
  AugmentConfig c;
  c.rotation = c.scaling = false;
  c.noise = c.blur = c.brightness = c.contrast = c.low_resolution = false;
  c.gamma_inverted = c.gamma = false;
  return c;
}

AugmentConfig AugmentConfig::preset(const std::string& name) {
  if (name == "full") return AugmentConfig{};
  if (name == "mirror") return mirror_only();
  if (name == "none") return none();
  throw ArgumentError("unknown augmentation '" + name + "' (expected full, mirror or none)");
}

}  // namespace medseg::data
