#include "infer/sliding_window.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.hpp"

namespace medseg::infer {

std::array<std::vector<double>, 3> gaussian_profiles(std::array<int64_t, 3> patch, double sigma_scale) {
  MEDSEG_CHECK(patch[0] >= 1 && patch[1] >= 1 && patch[2] >= 1, "patch (z,y,x) = ", patch[0], ",",
               patch[1], ",", patch[2]);
  MEDSEG_CHECK(sigma_scale > 0 && std::isfinite(sigma_scale), "sigma_scale = ", sigma_scale);
  // Floor per axis: the product of three floored values is >= 1e-36, above float's smallest normal
  // (1.2e-38), so the 3-D map never holds a zero.
  constexpr double kFloor = 1e-12;
  std::array<std::vector<double>, 3> profile;
  for (int a = 0; a < 3; ++a) {
    const double centre = (static_cast<double>(patch[a]) - 1.0) / 2.0;
    const double sigma = sigma_scale * static_cast<double>(patch[a]);
    profile[a].resize(static_cast<size_t>(patch[a]));
    for (int64_t i = 0; i < patch[a]; ++i) {
      const double d = (static_cast<double>(i) - centre) / sigma;
      profile[a][static_cast<size_t>(i)] = std::exp(-0.5 * d * d);
    }
    const double peak = *std::max_element(profile[a].begin(), profile[a].end());
    for (double& v : profile[a]) v = std::max(v / peak, kFloor);
  }
  return profile;
}

namespace {
// The 3-D map as the product of the per-axis profiles, [z][y][x].
std::vector<float> map_from_profiles(const std::array<std::vector<double>, 3>& p, std::array<int64_t, 3> patch) {
  std::vector<float> map(static_cast<size_t>(patch[0] * patch[1] * patch[2]));
  size_t i = 0;
  for (int64_t z = 0; z < patch[0]; ++z)
    for (int64_t y = 0; y < patch[1]; ++y)
      for (int64_t x = 0; x < patch[2]; ++x, ++i)
        map[i] = static_cast<float>(p[0][static_cast<size_t>(z)] * p[1][static_cast<size_t>(y)] *
                                    p[2][static_cast<size_t>(x)]);
  return map;
}
}  // namespace

std::vector<float> gaussian_importance_map(std::array<int64_t, 3> patch, double sigma_scale) {
  return map_from_profiles(gaussian_profiles(patch, sigma_scale), patch);
}

std::vector<int64_t> tile_starts(int64_t size, int64_t patch, double step) {
  MEDSEG_CHECK(patch >= 1 && size >= patch, "size ", size, " patch ", patch);
  MEDSEG_CHECK(step > 0 && step <= 1, "step = ", step, " (must be in (0, 1])");
  if (size == patch) return {0};
  const double span = static_cast<double>(size - patch);
  const int64_t n = static_cast<int64_t>(std::ceil(span / (step * static_cast<double>(patch)))) + 1;
  std::vector<int64_t> starts(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    starts[static_cast<size_t>(i)] = static_cast<int64_t>(
        std::llround(static_cast<double>(i) * span / static_cast<double>(n - 1)));
  return starts;
}

namespace {

struct WorkItem {
  int64_t tile;  // index into the tile list
  int mirror;    // bit 0: flip x, bit 1: flip y, bit 2: flip z
};

}  // namespace

std::vector<float> sliding_window_probabilities(const float* image, std::array<int64_t, 3> shape,
                                                int channels, int num_classes,
                                                const PatchForward& forward,
                                                const SlidingWindowOptions& options) {
  MEDSEG_CHECK(image != nullptr, "image is null");
  MEDSEG_CHECK(shape[0] >= 1 && shape[1] >= 1 && shape[2] >= 1, "shape (z,y,x) = ", shape[0], ",",
               shape[1], ",", shape[2]);
  MEDSEG_CHECK(channels >= 1 && num_classes >= 1, "channels ", channels, " classes ", num_classes);
  MEDSEG_CHECK(options.max_batch >= 1, "max_batch = ", options.max_batch);
  MEDSEG_CHECK(static_cast<bool>(forward), "no forward function");
  const auto& patch = options.patch;
  MEDSEG_CHECK(patch[0] >= 1 && patch[1] >= 1 && patch[2] >= 1, "patch (z,y,x) = ", patch[0], ",",
               patch[1], ",", patch[2]);

  std::array<int64_t, 3> padded{}, pad_before{};
  for (int a = 0; a < 3; ++a) {
    padded[a] = std::max(shape[a], patch[a]);
    pad_before[a] = (padded[a] - shape[a]) / 2;
  }
  std::array<std::vector<int64_t>, 3> starts;
  for (int a = 0; a < 3; ++a) starts[a] = tile_starts(padded[a], patch[a], options.step);
  std::vector<std::array<int64_t, 3>> tiles;
  for (int64_t sz : starts[0])
    for (int64_t sy : starts[1])
      for (int64_t sx : starts[2]) tiles.push_back({sz, sy, sx});
  const int64_t num_tiles = static_cast<int64_t>(tiles.size());
  const int num_mirrors = options.tta ? 8 : 1;

  const auto profiles = gaussian_profiles(patch);
  const std::vector<float> importance = map_from_profiles(profiles, patch);
  const int64_t K = num_classes;
  const int64_t C = channels;
  const int64_t patch_voxels = patch[0] * patch[1] * patch[2];
  const int64_t padded_voxels = padded[0] * padded[1] * padded[2];
  std::vector<float> acc(static_cast<size_t>(padded_voxels * K), 0.0f);
  // The total weight of a voxel, sum over covering tiles of the importance map, factorises like the
  // map and the tile grid: weight(z, y, x) = W_z[z] * W_y[y] * W_x[x] with W_a[i] the sum of axis
  // a's profile over the tiles covering i. Three short vectors instead of a volume.
  std::array<std::vector<double>, 3> axis_weight;
  for (int a = 0; a < 3; ++a) {
    axis_weight[a].assign(static_cast<size_t>(padded[a]), 0.0);
    for (int64_t s0 : starts[a])
      for (int64_t i = 0; i < patch[a]; ++i)
        axis_weight[a][static_cast<size_t>(s0 + i)] += profiles[a][static_cast<size_t>(i)];
  }
  std::vector<float> tile_prob(static_cast<size_t>(patch_voxels * K), 0.0f);
  std::vector<float> expv(static_cast<size_t>(K));

  // Threads only pay off on real patches; on tiny ones the fork/join costs more than the loop.
  const bool par = patch_voxels >= (int64_t{1} << 15);
  std::vector<WorkItem> items;
  items.reserve(static_cast<size_t>(num_tiles * num_mirrors));
  for (int64_t t = 0; t < num_tiles; ++t)
    for (int m = 0; m < num_mirrors; ++m) items.push_back({t, m});

  // Position inside the (possibly mirrored) patch of tile voxel (z, y, x): mirroring is its own
  // inverse, so the same map takes the input into the mirrored frame and the output back out of it.
  auto mirrored = [&](int m, int64_t z, int64_t y, int64_t x) {
    if (m & 4) z = patch[0] - 1 - z;
    if (m & 2) y = patch[1] - 1 - y;
    if (m & 1) x = patch[2] - 1 - x;
    return (z * patch[1] + y) * patch[2] + x;
  };

  int64_t current_tile = -1;
  auto flush_tile = [&](int64_t t) {
    const auto& s = tiles[static_cast<size_t>(t)];
    const float inv = 1.0f / static_cast<float>(num_mirrors);
#pragma omp parallel for if (par)
    for (int64_t z = 0; z < patch[0]; ++z)
      for (int64_t y = 0; y < patch[1]; ++y)
        for (int64_t x = 0; x < patch[2]; ++x) {
          const int64_t p = (z * patch[1] + y) * patch[2] + x;
          const int64_t g = ((s[0] + z) * padded[1] + (s[1] + y)) * padded[2] + (s[2] + x);
          const float w = importance[static_cast<size_t>(p)];
          for (int64_t k = 0; k < K; ++k)
            acc[static_cast<size_t>(g * K + k)] +=
                w * tile_prob[static_cast<size_t>(p * K + k)] * inv;
        }
    std::fill(tile_prob.begin(), tile_prob.end(), 0.0f);
    if (options.progress) options.progress(t + 1, num_tiles);
  };

  Tensor batch, logits;
  for (size_t first = 0; first < items.size(); first += static_cast<size_t>(options.max_batch)) {
    const size_t count = std::min(items.size() - first, static_cast<size_t>(options.max_batch));
    const Shape in_shape{static_cast<int64_t>(count), patch[0], patch[1], patch[2], C};
    const Shape out_shape{static_cast<int64_t>(count), patch[0], patch[1], patch[2], K};
    if (!batch.defined() || batch.shape() != in_shape) batch = Tensor(in_shape);
    if (!logits.defined() || logits.shape() != out_shape || logits.device() != Device::CPU)
      logits = Tensor(out_shape);
    // Gather each item's tile from the image, mirrored, zero outside the data (the padding).
    for (size_t b = 0; b < count; ++b) {
      const WorkItem& it = items[first + b];
      const auto& s = tiles[static_cast<size_t>(it.tile)];
      float* dst = batch.data() + static_cast<int64_t>(b) * patch_voxels * C;
#pragma omp parallel for if (par)
      for (int64_t z = 0; z < patch[0]; ++z)
        for (int64_t y = 0; y < patch[1]; ++y)
          for (int64_t x = 0; x < patch[2]; ++x) {
            const int64_t iz = s[0] + z - pad_before[0], iy = s[1] + y - pad_before[1],
                          ix = s[2] + x - pad_before[2];
            float* d = dst + mirrored(it.mirror, z, y, x) * C;
            if (iz < 0 || iz >= shape[0] || iy < 0 || iy >= shape[1] || ix < 0 || ix >= shape[2]) {
              for (int64_t c = 0; c < C; ++c) d[c] = 0.0f;
            } else {
              const float* src = image + ((iz * shape[1] + iy) * shape[2] + ix) * C;
              for (int64_t c = 0; c < C; ++c) d[c] = src[c];
            }
          }
    }
    forward(batch, logits);
    if (!logits.defined() || logits.shape() != out_shape || logits.device() != Device::CPU) {
      throw ArgumentError("sliding window: the model's forward returned logits of shape " +
                          logits.shape().str() + " on " + device_name(logits.device()) +
                          ", expected " + out_shape.str() + " on cpu");
    }
    for (size_t b = 0; b < count; ++b) {
      const WorkItem& it = items[first + b];
      if (it.tile != current_tile) {
        if (current_tile >= 0) flush_tile(current_tile);
        current_tile = it.tile;
      }
      const float* src = logits.data() + static_cast<int64_t>(b) * patch_voxels * K;
      int64_t bad = -1;
      for (int64_t z = 0; z < patch[0]; ++z)
        for (int64_t y = 0; y < patch[1]; ++y)
          for (int64_t x = 0; x < patch[2]; ++x) {
            const float* l = src + mirrored(it.mirror, z, y, x) * K;
            float* p = tile_prob.data() + ((z * patch[1] + y) * patch[2] + x) * K;
            float mx = l[0];
            for (int64_t k = 1; k < K; ++k) mx = std::max(mx, l[k]);
            float sum = 0.0f;
            for (int64_t k = 0; k < K; ++k) {
              expv[static_cast<size_t>(k)] = std::exp(l[k] - mx);
              sum += expv[static_cast<size_t>(k)];
            }
            if (!std::isfinite(sum) || !std::isfinite(mx)) {
              if (bad < 0) bad = (z * patch[1] + y) * patch[2] + x;
              continue;
            }
            for (int64_t k = 0; k < K; ++k) p[k] += expv[static_cast<size_t>(k)] / sum;
          }
      if (bad >= 0) {
        const auto& s = tiles[static_cast<size_t>(it.tile)];
        throw NumericError("sliding window: non-finite logits in tile starting at (z,y,x) = (" +
                           std::to_string(s[0]) + "," + std::to_string(s[1]) + "," +
                           std::to_string(s[2]) + "), mirror " + std::to_string(it.mirror) +
                           ", patch voxel " + std::to_string(bad));
      }
    }
  }
  if (current_tile >= 0) flush_tile(current_tile);

  // Normalise and crop the padding away, in place in the accumulator: the output index of a voxel
  // is never larger than its padded index, and both grow together in raster order, so a forward
  // pass never overwrites a value it has yet to read. No second K-channel volume: for a
  // 512x512x300 scan with 3 classes that is 0.9 GB less at the peak. Every voxel is covered by at
  // least one tile and the map has no zeros, so the weight is > 0 everywhere.
  const bool cropped = padded != shape;
  const int64_t rows = shape[0] * shape[1];
#pragma omp parallel for if (!cropped && rows * shape[2] >= (int64_t{1} << 15))
  for (int64_t r = 0; r < rows; ++r) {  // cropped: sequential (the forward-copy argument above)
    const int64_t z = r / shape[1], y = r % shape[1];
    for (int64_t x = 0; x < shape[2]; ++x) {
      const int64_t g = ((z + pad_before[0]) * padded[1] + (y + pad_before[1])) * padded[2] +
                        (x + pad_before[2]);
      const int64_t o = (r * shape[2] + x);
      const float inv = static_cast<float>(
          1.0 / (axis_weight[0][static_cast<size_t>(z + pad_before[0])] *
                 axis_weight[1][static_cast<size_t>(y + pad_before[1])] *
                 axis_weight[2][static_cast<size_t>(x + pad_before[2])]));
      for (int64_t k = 0; k < K; ++k)
        acc[static_cast<size_t>(o * K + k)] = acc[static_cast<size_t>(g * K + k)] * inv;
    }
  }
  acc.resize(static_cast<size_t>(rows * shape[2] * K));  // keeps the capacity: no copy
  return acc;
}

}  // namespace medseg::infer
