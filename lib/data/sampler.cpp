// Patch sampling. The identity case (no rotation or scaling drawn, about 64% of patches with the
// default probabilities) is a row-wise memcpy; only a drawn affine transform pays for
// interpolation.
#include "data/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.hpp"

namespace medseg::data {
namespace {

int64_t floor_div2(int64_t v) {
  return v >= 0 ? v / 2 : -((-v + 1) / 2);
}

void check_case(const CaseView& cs) {
  MEDSEG_CHECK(cs.image != nullptr, "case '", cs.id, "' has no image");
  MEDSEG_CHECK(cs.shape[0] > 0 && cs.shape[1] > 0 && cs.shape[2] > 0, "case '", cs.id,
               "' has an empty shape (", cs.shape[0], ", ", cs.shape[1], ", ", cs.shape[2], ")");
  MEDSEG_CHECK(cs.channels >= 1, "case '", cs.id, "' has ", cs.channels, " channels");
}

void check_patch(const std::array<int64_t, 3>& p) {
  MEDSEG_CHECK(p[0] > 0 && p[1] > 0 && p[2] > 0, "patch size must be positive, got (", p[0], ", ",
               p[1], ", ", p[2], ")");
}

}  // namespace

std::vector<bool> forced_foreground_plan(int batch_size, double fraction, Rng& rng) {
  MEDSEG_CHECK(batch_size >= 1, "batch size ", batch_size);
  MEDSEG_CHECK(fraction >= 0.0 && fraction <= 1.0, "foreground fraction ", fraction,
               " is not in [0, 1]");
  std::vector<bool> plan(static_cast<size_t>(batch_size), false);
  const int64_t random_count = std::llround(batch_size * (1.0 - fraction));
  const int64_t forced = batch_size - random_count;
  if (forced > 0) {
    for (int64_t i = random_count; i < batch_size; ++i) plan[static_cast<size_t>(i)] = true;
  } else if (fraction > 0.0) {
    for (auto&& p : plan) p = rng.uniform() < fraction;
  }
  return plan;
}

std::array<int64_t, 3> choose_patch_centre(const CaseView& cs, const SamplerConfig& cfg,
                                           bool force_fg, Rng& rng) {
  check_case(cs);
  check_patch(cfg.patch);
  MEDSEG_CHECK(cfg.max_overhang >= 0.0 && cfg.max_overhang <= 0.5, "max_overhang ",
               cfg.max_overhang, " is not in [0, 0.5]");
  std::array<int64_t, 3> centre{};
  if (force_fg && cs.class_locations != nullptr) {
    const auto& locations = *cs.class_locations;
    std::vector<size_t> present;
    for (size_t c = 1; c < locations.size(); ++c)
      if (!locations[c].empty()) present.push_back(c);
    if (!present.empty()) {
      const size_t cls = present[rng.below(present.size())];
      const auto& voxels = locations[cls];
      const Index3& v = voxels[rng.below(voxels.size())];
      for (int a = 0; a < 3; ++a) {
        MEDSEG_CHECK(v[a] >= 0 && v[a] < cs.shape[a], "case '", cs.id, "': class ", cls,
                     " location (", v[0], ", ", v[1], ", ", v[2], ") lies outside the case shape (",
                     cs.shape[0], ", ", cs.shape[1], ", ", cs.shape[2], ")");
      }
      for (int a = 0; a < 3; ++a) {
        const int64_t j = cfg.patch[a] / 8;
        centre[a] = v[a] + rng.integer(-j, j);
      }
      return centre;
    }
  }
  for (int a = 0; a < 3; ++a) {
    const int64_t size = cs.shape[a], p = cfg.patch[a], h = p / 2;
    const int64_t overhang = static_cast<int64_t>(std::floor(cfg.max_overhang * p));
    const int64_t lo = h - overhang;
    const int64_t hi = std::min(size - p + h + overhang, size - 1);
    centre[a] = hi >= lo ? rng.integer(lo, hi) : floor_div2(size - p) + h;
  }
  return centre;
}

void extract_patch(const CaseView& cs, const std::array<int64_t, 3>& origin,
                   const std::array<int64_t, 3>& patch, float* image_out, uint16_t* label_out) {
  const int64_t D = patch[0], H = patch[1], W = patch[2], C = cs.channels;
  const int64_t S0 = cs.shape[0], S1 = cs.shape[1], S2 = cs.shape[2];
  // The x range inside the case is the same for every row.
  const int64_t x0 = std::clamp<int64_t>(-origin[2], 0, W);
  const int64_t x1 = std::clamp<int64_t>(S2 - origin[2], x0, W);
  for (int64_t z = 0; z < D; ++z) {
    const int64_t sz = origin[0] + z;
    for (int64_t y = 0; y < H; ++y) {
      const int64_t sy = origin[1] + y;
      float* img = image_out + ((z * H + y) * W) * C;
      uint16_t* lab = label_out ? label_out + (z * H + y) * W : nullptr;
      if (sz < 0 || sz >= S0 || sy < 0 || sy >= S1 || x1 <= x0) {
        std::fill(img, img + W * C, 0.f);
        if (lab) std::fill(lab, lab + W, uint16_t{0});
        continue;
      }
      const int64_t src = (sz * S1 + sy) * S2 + origin[2];
      std::fill(img, img + x0 * C, 0.f);
      std::memcpy(img + x0 * C, cs.image + (src + x0) * C,
                  static_cast<size_t>((x1 - x0) * C) * sizeof(float));
      std::fill(img + x1 * C, img + W * C, 0.f);
      if (lab) {
        std::fill(lab, lab + x0, uint16_t{0});
        if (cs.labels)
          std::memcpy(lab + x0, cs.labels + src + x0,
                      static_cast<size_t>(x1 - x0) * sizeof(uint16_t));
        else
          std::fill(lab + x0, lab + x1, uint16_t{0});
        std::fill(lab + x1, lab + W, uint16_t{0});
      }
    }
  }
}

void resample_patch(const CaseView& cs, const std::array<int64_t, 3>& centre,
                    const std::array<int64_t, 3>& patch, const SpatialDraw& draw, float* image_out,
                    uint16_t* label_out) {
  const int64_t D = patch[0], H = patch[1], W = patch[2], C = cs.channels;
  const int64_t S0 = cs.shape[0], S1 = cs.shape[1], S2 = cs.shape[2];
  const int64_t sdz = S1 * S2 * C, sdy = S2 * C;  // strides of the case image
  const auto& m = draw.matrix;
  const double hz = static_cast<double>(D / 2), hy = static_cast<double>(H / 2),
               hx = static_cast<double>(W / 2);
  const float* img = cs.image;
  for (int64_t z = 0; z < D; ++z) {
    const double oz = static_cast<double>(z) - hz;
    for (int64_t y = 0; y < H; ++y) {
      const double oy = static_cast<double>(y) - hy;
      // Source coordinate of x = 0 in this row, then a constant step per x.
      const double bz = static_cast<double>(centre[0]) + m[0] * oz + m[1] * oy - m[2] * hx;
      const double by = static_cast<double>(centre[1]) + m[3] * oz + m[4] * oy - m[5] * hx;
      const double bx = static_cast<double>(centre[2]) + m[6] * oz + m[7] * oy - m[8] * hx;
      float* out = image_out + ((z * H + y) * W) * C;
      uint16_t* lab = label_out ? label_out + (z * H + y) * W : nullptr;
      for (int64_t x = 0; x < W; ++x) {
        const double fxd = static_cast<double>(x);
        const double sz = bz + m[2] * fxd, sy = by + m[5] * fxd, sx = bx + m[8] * fxd;
        const double flz = std::floor(sz), fly = std::floor(sy), flx = std::floor(sx);
        const int64_t iz = static_cast<int64_t>(flz), iy = static_cast<int64_t>(fly),
                      ix = static_cast<int64_t>(flx);
        const float tz = static_cast<float>(sz - flz), ty = static_cast<float>(sy - fly),
                    tx = static_cast<float>(sx - flx);
        float* o = out + x * C;
        const float w[8] = {(1 - tz) * (1 - ty) * (1 - tx),
                            (1 - tz) * (1 - ty) * tx,
                            (1 - tz) * ty * (1 - tx),
                            (1 - tz) * ty * tx,
                            tz * (1 - ty) * (1 - tx),
                            tz * (1 - ty) * tx,
                            tz * ty * (1 - tx),
                            tz * ty * tx};
        if (iz >= 0 && iz + 1 < S0 && iy >= 0 && iy + 1 < S1 && ix >= 0 && ix + 1 < S2) {
          const float* p = img + iz * sdz + iy * sdy + ix * C;
          for (int64_t c = 0; c < C; ++c) {
            o[c] = w[0] * p[c] + w[1] * p[C + c] + w[2] * p[sdy + c] + w[3] * p[sdy + C + c] +
                   w[4] * p[sdz + c] + w[5] * p[sdz + C + c] + w[6] * p[sdz + sdy + c] +
                   w[7] * p[sdz + sdy + C + c];
          }
        } else {
          // Near or beyond the border: corners outside the case contribute 0.
          for (int64_t c = 0; c < C; ++c) o[c] = 0.f;
          for (int k = 0; k < 8; ++k) {
            const int64_t cz = iz + (k >> 2), cy = iy + ((k >> 1) & 1), cx = ix + (k & 1);
            if (cz < 0 || cz >= S0 || cy < 0 || cy >= S1 || cx < 0 || cx >= S2) continue;
            const float* p = img + cz * sdz + cy * sdy + cx * C;
            for (int64_t c = 0; c < C; ++c) o[c] += w[k] * p[c];
          }
        }
        if (lab) {
          const int64_t nz = static_cast<int64_t>(std::floor(sz + 0.5)),
                        ny = static_cast<int64_t>(std::floor(sy + 0.5)),
                        nx = static_cast<int64_t>(std::floor(sx + 0.5));
          const bool inside =
              cs.labels && nz >= 0 && nz < S0 && ny >= 0 && ny < S1 && nx >= 0 && nx < S2;
          lab[x] = inside ? cs.labels[(nz * S1 + ny) * S2 + nx] : uint16_t{0};
        }
      }
    }
  }
}

void mirror_patch(const std::array<bool, 3>& axes, const std::array<int64_t, 3>& patch,
                  int channels, float* image, uint16_t* labels) {
  const int64_t D = patch[0], H = patch[1], W = patch[2], C = channels;
  if (axes[2]) {
    for (int64_t r = 0; r < D * H; ++r) {
      float* row = image + r * W * C;
      for (int64_t x = 0; x < W / 2; ++x)
        std::swap_ranges(row + x * C, row + (x + 1) * C, row + (W - 1 - x) * C);
      if (labels) std::reverse(labels + r * W, labels + (r + 1) * W);
    }
  }
  if (axes[1]) {
    for (int64_t z = 0; z < D; ++z)
      for (int64_t y = 0; y < H / 2; ++y) {
        const int64_t a = z * H + y, b = z * H + (H - 1 - y);
        std::swap_ranges(image + a * W * C, image + (a + 1) * W * C, image + b * W * C);
        if (labels) std::swap_ranges(labels + a * W, labels + (a + 1) * W, labels + b * W);
      }
  }
  if (axes[0]) {
    const int64_t slice = H * W;
    for (int64_t z = 0; z < D / 2; ++z) {
      const int64_t a = z, b = D - 1 - z;
      std::swap_ranges(image + a * slice * C, image + (a + 1) * slice * C, image + b * slice * C);
      if (labels)
        std::swap_ranges(labels + a * slice, labels + (a + 1) * slice, labels + b * slice);
    }
  }
}

void sample_augmented_patch(const CaseView& cs, const SamplerConfig& sampler,
                            const AugmentConfig& augment, bool force_fg, Rng& rng, float* image_out,
                            uint16_t* label_out) {
  MEDSEG_CHECK(image_out != nullptr, "sample_augmented_patch: no output buffer");
  const std::array<int64_t, 3> centre = choose_patch_centre(cs, sampler, force_fg, rng);
  const SpatialDraw draw = draw_spatial(augment, sampler.patch, rng);
  if (draw.affine) {
    resample_patch(cs, centre, sampler.patch, draw, image_out, label_out);
  } else {
    std::array<int64_t, 3> origin{};
    for (int a = 0; a < 3; ++a) origin[a] = centre[a] - sampler.patch[a] / 2;
    extract_patch(cs, origin, sampler.patch, image_out, label_out);
  }
  if (draw.mirror[0] || draw.mirror[1] || draw.mirror[2])
    mirror_patch(draw.mirror, sampler.patch, cs.channels, image_out, label_out);
}

}  // namespace medseg::data
