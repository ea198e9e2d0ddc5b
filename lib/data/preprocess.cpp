#include "data/preprocess.hpp"

#include <algorithm>
#include <cmath>
#include <optional>
#include <sstream>

#include "core/error.hpp"
#include "core/log.hpp"
#include "core/rng.hpp"

namespace medseg::data {

namespace {

// Below this many values a loop runs on one thread. A pass costs ~1 ns per value, so 1M values
// (~1 ms) dwarf waking a team on an idle machine; on a loaded 2-core machine a parallel region
// costs milliseconds (a team member waits for a core), which made hippocampus-sized cases
// (60k voxels) 25x slower with 2 threads than with 1 at a lower threshold.
constexpr int64_t kParallelMin = 1 << 20;

// Spacings closer than this (mm) are treated as equal: resampling by a factor of 1 +- 1e-3 would
// only blur the image for a sub-voxel change in extent.
constexpr double kSpacingTolerance = 1e-3;

// Linear interpolation taps of one target index along one axis.
struct Tap {
  int64_t i0 = 0, i1 = 0;
  float w = 0;  // weight of i1; i0 gets 1 - w
};

// The source coordinate of target index i (voxel centres, extent kept), clamped to [0, n-1].
double source_coordinate(int64_t i, int64_t n, int64_t r) {
  const double j = (static_cast<double>(i) + 0.5) * (static_cast<double>(n) / r) - 0.5;
  return std::clamp(j, 0.0, static_cast<double>(n - 1));
}

std::vector<Tap> linear_taps(int64_t n, int64_t r) {
  std::vector<Tap> t(static_cast<size_t>(r));
  for (int64_t i = 0; i < r; ++i) {
    const double j = source_coordinate(i, n, r);
    t[i].i0 = static_cast<int64_t>(std::floor(j));
    t[i].i1 = std::min(t[i].i0 + 1, n - 1);
    t[i].w = static_cast<float>(j - static_cast<double>(t[i].i0));
  }
  return t;
}

std::vector<int64_t> nearest_taps(int64_t n, int64_t r) {
  std::vector<int64_t> t(static_cast<size_t>(r));
  for (int64_t i = 0; i < r; ++i)
    t[i] = std::min<int64_t>(static_cast<int64_t>(std::floor(source_coordinate(i, n, r) + 0.5)),
                             n - 1);
  return t;
}

// Linear resampling of one axis of data laid out as [outer][n][inner] to [outer][r][inner].
std::vector<float> resample_axis(const std::vector<float>& in, int64_t outer, int64_t n,
                                 int64_t inner, int64_t r) {
  std::vector<float> out(static_cast<size_t>(outer * r * inner));
  const std::vector<Tap> taps = linear_taps(n, r);
#pragma omp parallel for schedule(static) if (outer * r * inner > kParallelMin)
  for (int64_t oi = 0; oi < outer * r; ++oi) {
    const int64_t o = oi / r, i = oi % r;
    const Tap& t = taps[i];
    const float* a = in.data() + (o * n + t.i0) * inner;
    const float* b = in.data() + (o * n + t.i1) * inner;
    float* dst = out.data() + oi * inner;
    const float w1 = t.w, w0 = 1.0f - t.w;
    for (int64_t k = 0; k < inner; ++k) dst[k] = w0 * a[k] + w1 * b[k];
  }
  return out;
}

Geometry resampled_geometry(const Geometry& g, const std::array<int64_t, 3>& new_size) {
  Geometry out = g;
  double first[3];
  for (int a = 0; a < 3; ++a) {
    const double f = static_cast<double>(g.size[a]) / static_cast<double>(new_size[a]);
    out.size[a] = new_size[a];
    out.spacing[a] = g.spacing[a] * f;
    first[a] = 0.5 * f - 0.5;  // not clamped: the voxel centre itself, for the geometry
  }
  out.origin = g.index_to_physical(first[0], first[1], first[2]);
  return out;
}

// Gather for reorientation: element offset in the source of canonical voxel (x, y, z).
struct Gather {
  int64_t base = 0;
  std::array<int64_t, 3> step{};
};

Gather reorient_gather(const Geometry& src, const Orientation& o) {
  const std::array<int64_t, 3> stride{1, src.size[0], src.size[0] * src.size[1]};
  Gather g;
  for (int a = 0; a < 3; ++a) {
    const int j = o.perm[a];
    g.step[a] = o.flip[a] ? -stride[j] : stride[j];
    if (o.flip[a]) g.base += (src.size[j] - 1) * stride[j];
  }
  return g;
}

template <typename T>
std::vector<T> reorient_data(const std::vector<T>& in, const Geometry& src, int channels,
                             const Orientation& o) {
  const Gather g = reorient_gather(src, o);
  const int64_t nx = src.size[o.perm[0]], ny = src.size[o.perm[1]], nz = src.size[o.perm[2]];
  std::vector<T> out(in.size());
#pragma omp parallel for schedule(static) if (static_cast <int64_t>(in.size()) > kParallelMin)
  for (int64_t zy = 0; zy < nz * ny; ++zy) {
    const int64_t z = zy / ny, y = zy % ny;
    const int64_t row = g.base + z * g.step[2] + y * g.step[1];
    T* dst = out.data() + zy * nx * channels;
    for (int64_t x = 0; x < nx; ++x) {
      const T* s = in.data() + (row + x * g.step[0]) * channels;
      for (int c = 0; c < channels; ++c) dst[x * channels + c] = s[c];
    }
  }
  return out;
}

nlohmann::json geometry_json(const Geometry& g) {
  return {
      {"size", g.size}, {"spacing", g.spacing}, {"origin", g.origin}, {"direction", g.direction}};
}

[[noreturn]] void bad_map(const std::string& what) {
  throw ArgumentError("case geometry map: " + what);
}

template <typename T, size_t N>
std::array<T, N> json_array(const nlohmann::json& j, const char* key) {
  if (!j.is_object() || !j.contains(key)) bad_map(std::string("field '") + key + "' is missing");
  const auto& v = j[key];
  if (!v.is_array() || v.size() != N)
    bad_map(std::string("field '") + key + "' must be an array of " + std::to_string(N) +
            " values, found " + v.dump());
  std::array<T, N> out{};
  for (size_t i = 0; i < N; ++i) {
    if constexpr (std::is_same_v<T, bool>) {
      if (!v[i].is_boolean()) bad_map(std::string("field '") + key + "' must hold booleans");
    } else if constexpr (std::is_integral_v<T>) {
      if (!v[i].is_number_integer()) bad_map(std::string("field '") + key + "' must hold integers");
    } else {
      if (!v[i].is_number()) bad_map(std::string("field '") + key + "' must hold numbers");
    }
    out[i] = v[i].get<T>();
  }
  return out;
}

Geometry geometry_from_json(const nlohmann::json& j, const char* key) {
  if (!j.contains(key) || !j[key].is_object())
    bad_map(std::string("field '") + key + "' is missing");
  const auto& g = j[key];
  Geometry out;
  out.size = json_array<int64_t, 3>(g, "size");
  out.spacing = json_array<double, 3>(g, "spacing");
  out.origin = json_array<double, 3>(g, "origin");
  out.direction = json_array<double, 9>(g, "direction");
  for (int a = 0; a < 3; ++a)
    if (out.size[a] < 1 || !(out.spacing[a] > 0))
      bad_map(std::string("field '") + key + "' has a non-positive size or spacing");
  return out;
}

// Per source axis: the taps into the cropped preprocessed array (offsets in floats, validity).
struct BackTap {
  int64_t off0 = 0, off1 = 0;
  float w0 = 1, w1 = 0;
  bool in0 = false, in1 = false;
};

// Calls sink(source voxel index, values[k]) for every source voxel; rows run in parallel, so sink
// must only touch data of its own voxel.
template <typename Sink>
void map_back(const CaseGeometryMap& map, const float* probs, int k, Sink sink) {
  MEDSEG_CHECK(k >= 1, "probabilities need at least one class, got k = ", k);
  const Geometry& src = map.source;
  const auto crop = map.crop.shape();  // (z, y, x)
  // Strides in floats of the cropped array along canonical x, y, z.
  const std::array<int64_t, 3> cstride{k, crop[2] * k, crop[1] * crop[2] * k};
  std::array<int, 3> inv{};
  for (int a = 0; a < 3; ++a) inv[map.orientation.perm[a]] = a;
  std::array<std::vector<BackTap>, 3> tabs;
  for (int j = 0; j < 3; ++j) {
    const int a = inv[j];
    const int64_t n = map.canonical.size[a];
    const int64_t r = map.resampled_shape[2 - a];
    const int64_t b = map.crop.begin[2 - a], len = crop[2 - a];
    MEDSEG_CHECK(src.size[j] == n, "geometry map: source axis ", j, " has ", src.size[j],
                 " voxels, canonical axis ", a, " has ", n);
    tabs[j].resize(static_cast<size_t>(n));
    for (int64_t s = 0; s < n; ++s) {
      const int64_t c = map.orientation.flip[a] ? n - 1 - s : s;
      // Inverse of the forward mapping: canonical index c sits at resampled (c + 0.5) * r / n -
      // 0.5.
      const double pos = source_coordinate(c, r, n);
      const int64_t i0 = static_cast<int64_t>(std::floor(pos));
      const int64_t i1 = std::min(i0 + 1, r - 1);
      BackTap t;
      t.w1 = static_cast<float>(pos - static_cast<double>(i0));
      t.w0 = 1.0f - t.w1;
      t.in0 = i0 >= b && i0 < b + len;
      t.in1 = i1 >= b && i1 < b + len;
      t.off0 = (i0 - b) * cstride[a];
      t.off1 = (i1 - b) * cstride[a];
      tabs[j][s] = t;
    }
  }
  const int64_t nx = src.size[0], ny = src.size[1], nz = src.size[2];
#pragma omp parallel if (src.voxels() * k > kParallelMin)
  {
    std::vector<float> acc(static_cast<size_t>(k));
#pragma omp for schedule(static)
    for (int64_t zy = 0; zy < nz * ny; ++zy) {
      const BackTap& tz = tabs[2][zy / ny];
      const BackTap& ty = tabs[1][zy % ny];
      // The (z, y) corners of this row with non-zero weight, in the same order (and so with the
      // same floating-point sums) as a per-voxel loop over all 8 corners.
      struct Corner {
        int64_t off;
        float w;
        bool in;
      };
      Corner corners[4];
      int nc = 0;
      for (int cz = 0; cz < 2; ++cz) {
        const float wz = cz ? tz.w1 : tz.w0;
        if (wz == 0.0f) continue;
        for (int cy = 0; cy < 2; ++cy) {
          const float wzy = wz * (cy ? ty.w1 : ty.w0);
          if (wzy == 0.0f) continue;
          corners[nc++] = {(cz ? tz.off1 : tz.off0) + (cy ? ty.off1 : ty.off0), wzy,
                           (cz ? tz.in1 : tz.in0) && (cy ? ty.in1 : ty.in0)};
        }
      }
      for (int64_t x = 0; x < nx; ++x) {
        const BackTap& tx = tabs[0][x];
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int i = 0; i < nc; ++i) {
          const Corner& c = corners[i];
          for (int cx = 0; cx < 2; ++cx) {
            const float w = c.w * (cx ? tx.w1 : tx.w0);
            if (w == 0.0f) continue;
            if (!(c.in && (cx ? tx.in1 : tx.in0))) {
              acc[0] += w;  // outside the crop: background with probability 1
              continue;
            }
            const float* p = probs + c.off + (cx ? tx.off1 : tx.off0);
            for (int cl = 0; cl < k; ++cl) acc[cl] += w * p[cl];
          }
        }
        sink(zy * nx + x, acc.data());
      }
    }
  }
}

uint16_t argmax_of(const float* v, int k) {
  int best = 0;
  for (int c = 1; c < k; ++c)
    if (v[c] > v[best]) best = c;
  return static_cast<uint16_t>(best);
}

}  // namespace

// ------------------------------------------------------------------------------ orientation

Orientation canonical_orientation(const Geometry& geo) {
  static const std::array<std::array<int, 3>, 6> perms{
      {{0, 1, 2}, {0, 2, 1}, {1, 0, 2}, {1, 2, 0}, {2, 0, 1}, {2, 1, 0}}};
  Orientation best;
  double best_score = -1;
  for (const auto& p : perms) {
    double score = 0;
    for (int a = 0; a < 3; ++a) score += std::abs(geo.direction[a * 3 + p[a]]);
    // Strictly greater (with a margin against rounding): the identity wins ties, e.g. at 45 deg.
    if (score > best_score + 1e-9) {
      best_score = score;
      best.perm = p;
    }
  }
  for (int a = 0; a < 3; ++a) best.flip[a] = geo.direction[a * 3 + best.perm[a]] < 0;
  return best;
}

Geometry reoriented_geometry(const Geometry& geo, const Orientation& o) {
  Geometry out;
  std::array<double, 3> corner{0, 0, 0};
  for (int a = 0; a < 3; ++a) {
    const int j = o.perm[a];
    out.size[a] = geo.size[j];
    out.spacing[a] = geo.spacing[j];
    for (int r = 0; r < 3; ++r)
      out.direction[r * 3 + a] = (o.flip[a] ? -1.0 : 1.0) * geo.direction[r * 3 + j];
    if (o.flip[a]) corner[j] = static_cast<double>(geo.size[j] - 1);
  }
  out.origin = geo.index_to_physical(corner[0], corner[1], corner[2]);
  return out;
}

Volume reorient(const Volume& v, const Orientation& o) {
  MEDSEG_CHECK(v.data.size() == static_cast<size_t>(v.geo.voxels() * v.channels),
               "reorient: volume has ", v.data.size(), " values for ", v.geo.describe(), " x ",
               v.channels, " channels");
  Volume out;
  out.geo = reoriented_geometry(v.geo, o);
  out.channels = v.channels;
  out.data = reorient_data(v.data, v.geo, v.channels, o);
  return out;
}

LabelVolume reorient(const LabelVolume& v, const Orientation& o) {
  MEDSEG_CHECK(v.data.size() == static_cast<size_t>(v.geo.voxels()), "reorient: label volume has ",
               v.data.size(), " values for ", v.geo.describe());
  LabelVolume out;
  out.geo = reoriented_geometry(v.geo, o);
  out.data = reorient_data(v.data, v.geo, 1, o);
  return out;
}

// ------------------------------------------------------------------------------ resampling

constexpr double kMaxResampledVoxels = 1073741824.0;  // 2^30: 4 GiB per float copy

std::array<int64_t, 3> resampled_size(const std::array<int64_t, 3>& size,
                                      const std::array<double, 3>& spacing,
                                      const std::array<double, 3>& target) {
  std::array<int64_t, 3> out{};
  for (int a = 0; a < 3; ++a) {
    MEDSEG_CHECK(spacing[a] > 0 && target[a] > 0, "resampled_size: spacing ", spacing[a],
                 " target ", target[a], " on axis ", a);
    out[a] =
        std::max<int64_t>(1, std::llround(static_cast<double>(size[a]) * spacing[a] / target[a]));
  }
  return out;
}

Volume resample_linear(const Volume& v, const std::array<int64_t, 3>& new_size) {
  const auto& s = v.geo.size;
  for (int a = 0; a < 3; ++a) MEDSEG_CHECK(new_size[a] >= 1, "resample to size ", new_size[a]);
  const int64_t c = v.channels;
  // x, then y, then z; each pass is exact linear interpolation along one axis, so together they are
  // trilinear.
  std::vector<float> d = resample_axis(v.data, s[2] * s[1], s[0], c, new_size[0]);
  d = resample_axis(d, s[2], s[1], new_size[0] * c, new_size[1]);
  d = resample_axis(d, 1, s[2], new_size[1] * new_size[0] * c, new_size[2]);
  Volume out;
  out.geo = resampled_geometry(v.geo, new_size);
  out.channels = v.channels;
  out.data = std::move(d);
  return out;
}

LabelVolume resample_nearest(const LabelVolume& v, const std::array<int64_t, 3>& new_size) {
  const auto& s = v.geo.size;
  const auto tx = nearest_taps(s[0], new_size[0]);
  const auto ty = nearest_taps(s[1], new_size[1]);
  const auto tz = nearest_taps(s[2], new_size[2]);
  LabelVolume out;
  out.geo = resampled_geometry(v.geo, new_size);
  out.data.resize(static_cast<size_t>(out.geo.voxels()));
#pragma omp parallel for schedule(static) if (out.geo.voxels() > kParallelMin)
  for (int64_t zy = 0; zy < new_size[2] * new_size[1]; ++zy) {
    const int64_t z = zy / new_size[1], y = zy % new_size[1];
    const uint16_t* row = v.data.data() + (tz[z] * s[1] + ty[y]) * s[0];
    uint16_t* dst = out.data.data() + zy * new_size[0];
    for (int64_t x = 0; x < new_size[0]; ++x) dst[x] = row[tx[x]];
  }
  return out;
}

// ------------------------------------------------------------------------------ cropping

CropBox nonzero_box(const Volume& v) {
  const auto& s = v.geo.size;
  const int c = v.channels;
  std::array<int64_t, 3> lo{s[2], s[1], s[0]}, hi{-1, -1, -1};
  for (int64_t z = 0; z < s[2]; ++z)
    for (int64_t y = 0; y < s[1]; ++y) {
      const float* row = v.data.data() + (z * s[1] + y) * s[0] * c;
      int64_t first = -1, last = -1;
      for (int64_t i = 0; i < s[0] * c; ++i)
        if (row[i] != 0.0f) {
          first = i / c;
          break;
        }
      if (first < 0) continue;
      for (int64_t i = s[0] * c - 1; i >= 0; --i)
        if (row[i] != 0.0f) {
          last = i / c;
          break;
        }
      lo = {std::min(lo[0], z), std::min(lo[1], y), std::min(lo[2], first)};
      hi = {std::max(hi[0], z), std::max(hi[1], y), std::max(hi[2], last)};
    }
  CropBox box;
  if (hi[0] < 0) {  // all zero: keep everything rather than produce an empty case
    box.end = {s[2], s[1], s[0]};
    return box;
  }
  box.begin = lo;
  box.end = {hi[0] + 1, hi[1] + 1, hi[2] + 1};
  return box;
}

// ------------------------------------------------------------------------------ normalisation

void normalize_channels(const std::vector<ChannelNorm>& norm, float* data, int64_t voxels,
                        int channels) {
  MEDSEG_CHECK(static_cast<int>(norm.size()) == channels, "normalisation has ", norm.size(),
               " entries for ", channels, " channels");
  for (int c = 0; c < channels; ++c) {
    const ChannelNorm& n = norm[c];
    double mean = n.mean, std = n.std;
    if (n.scheme == "zscore") {
      // Serial sums: a parallel reduction would make the result depend on the thread count.
      double sum = 0;
      for (int64_t v = 0; v < voxels; ++v) sum += data[v * channels + c];
      mean = voxels ? sum / static_cast<double>(voxels) : 0.0;
      double sq = 0;
      for (int64_t v = 0; v < voxels; ++v) {
        const double d = data[v * channels + c] - mean;
        sq += d * d;
      }
      std = voxels ? std::sqrt(sq / static_cast<double>(voxels)) : 1.0;
    } else if (n.scheme == "ct") {
      const float lo = static_cast<float>(n.clip_lo), hi = static_cast<float>(n.clip_hi);
#pragma omp parallel for if (voxels > kParallelMin)
      for (int64_t v = 0; v < voxels; ++v)
        data[v * channels + c] = std::clamp(data[v * channels + c], lo, hi);
    } else {
      throw ArgumentError("unknown normalisation scheme '" + n.scheme + "' for channel " +
                          std::to_string(c));
    }
    // A constant image has std 0; dividing by 1 instead maps it to 0 rather than to NaN/Inf.
    const double inv = std > 1e-8 ? 1.0 / std : 1.0;
    const float m = static_cast<float>(mean), s = static_cast<float>(inv);
#pragma omp parallel for if (voxels > kParallelMin)
    for (int64_t v = 0; v < voxels; ++v) data[v * channels + c] = (data[v * channels + c] - m) * s;
  }
}

// ------------------------------------------------------------------------------ class locations

std::vector<std::vector<Index3>> sample_class_locations(const uint16_t* labels,
                                                        const std::array<int64_t, 3>& shape,
                                                        int num_classes, int max_per_class,
                                                        uint64_t seed) {
  const int64_t n = shape[0] * shape[1] * shape[2];
  std::vector<int64_t> count(static_cast<size_t>(std::max(num_classes, 1)), 0);
  for (int64_t v = 0; v < n; ++v) {
    if (labels[v] >= num_classes) {
      const int64_t x = v % shape[2], y = (v / shape[2]) % shape[1], z = v / (shape[1] * shape[2]);
      throw ArgumentError("label value " + std::to_string(labels[v]) + " at (z, y, x) = (" +
                          std::to_string(z) + ", " + std::to_string(y) + ", " + std::to_string(x) +
                          ") is not a class of the plan (" + std::to_string(num_classes) +
                          " classes)");
    }
    ++count[labels[v]];
  }
  std::vector<std::vector<Index3>> out(static_cast<size_t>(num_classes));
  std::vector<int64_t> want(count.size()), left = count;
  for (int c = 1; c < num_classes; ++c) {
    want[c] = std::min<int64_t>(count[c], max_per_class);
    out[c].reserve(static_cast<size_t>(want[c]));
  }
  // Selection sampling (Knuth's algorithm S) for every class in one pass.
  Rng rng(seed);
  for (int64_t v = 0; v < n; ++v) {
    const uint16_t c = labels[v];
    if (c == 0 || want[c] == 0) continue;
    if (static_cast<double>(left[c]) * rng.uniform() < static_cast<double>(want[c])) {
      out[c].push_back({static_cast<int32_t>(v / (shape[1] * shape[2])),
                        static_cast<int32_t>((v / shape[2]) % shape[1]),
                        static_cast<int32_t>(v % shape[2])});
      --want[c];
    }
    --left[c];
  }
  return out;
}

// ------------------------------------------------------------------------------ the case

CaseView PreprocessedCase::view() const {
  CaseView v;
  v.id = id;
  v.shape = shape;
  v.channels = channels;
  v.image = image.data();
  v.labels = labels.empty() ? nullptr : labels.data();
  v.class_locations = &class_locations;
  return v;
}

PreprocessedCase preprocess_case(const Plan& plan, const std::string& id, const Volume& image,
                                 const LabelVolume* labels, uint64_t seed) {
  if (image.channels != plan.in_channels)
    throw ArgumentError("case '" + id + "' has " + std::to_string(image.channels) +
                        " channels, the plan expects " + std::to_string(plan.in_channels));
  MEDSEG_CHECK(image.data.size() == static_cast<size_t>(image.geo.voxels() * image.channels),
               "case '", id, "': ", image.data.size(), " values for ", image.geo.describe());
  if (labels) {
    if (labels->geo.size != image.geo.size)
      throw ArgumentError("case '" + id + "': labels " + labels->geo.describe() +
                          " do not match the image " + image.geo.describe());
    if (!labels->geo.same_grid(image.geo))
      log_warn("case '", id, "': label geometry differs slightly from the image's (",
               labels->geo.describe(), " vs ", image.geo.describe(), "); using the image's");
  }

  CaseGeometryMap map;
  map.source = image.geo;
  map.orientation = canonical_orientation(image.geo);
  map.canonical = reoriented_geometry(image.geo, map.orientation);

  // Intermediates are dropped as soon as the next stage has them, to keep large CTs to ~2 copies.
  std::optional<Volume> img;
  std::optional<LabelVolume> lab;
  if (!map.orientation.identity()) {
    img = reorient(image, map.orientation);
    if (labels) lab = reorient(*labels, map.orientation);
  }
  const Volume& canon = img ? *img : image;

  std::array<int64_t, 3> size = map.canonical.size;
  for (int a = 0; a < 3; ++a)
    map.resampled |=
        std::abs(map.canonical.spacing[a] - plan.target_spacing[a]) > kSpacingTolerance;
  if (map.resampled) {
    size = resampled_size(map.canonical.size, map.canonical.spacing, plan.target_spacing);
    // A scan at an absurd spacing for the plan (1000 mm voxels, or a plan edited to 1e-4 mm)
    // would otherwise end in an allocation failure naming nothing.
    const double voxels = static_cast<double>(size[0]) * static_cast<double>(size[1]) *
                          static_cast<double>(size[2]) * static_cast<double>(image.channels);
    if (voxels > kMaxResampledVoxels) {
      std::ostringstream os;
      os << "case '" << id << "': resampling " << map.canonical.describe() << " to the plan's "
         << plan.target_spacing[0] << " x " << plan.target_spacing[1] << " x "
         << plan.target_spacing[2] << " mm spacing gives " << size[0] << " x " << size[1] << " x "
         << size[2] << " voxels, more than medseg handles (2^30); the scan's voxel spacing (or "
         << "the plan's target spacing) is implausible";
      throw ArgumentError(os.str());
    }
    img = resample_linear(canon, size);
    if (labels) lab = resample_nearest(lab ? *lab : *labels, size);
  }
  const Volume& res = img ? *img : image;
  const LabelVolume* res_lab = lab ? &*lab : labels;
  map.resampled_shape = {size[2], size[1], size[0]};
  map.crop = nonzero_box(res);

  PreprocessedCase out;
  out.id = id;
  out.shape = map.crop.shape();
  out.channels = image.channels;
  const int64_t C = image.channels;
  const auto& b = map.crop.begin;
  const auto& sh = out.shape;
  out.image.resize(static_cast<size_t>(sh[0] * sh[1] * sh[2] * C));
  for (int64_t z = 0; z < sh[0]; ++z)
    for (int64_t y = 0; y < sh[1]; ++y) {
      const float* src = res.data.data() + (((z + b[0]) * size[1] + y + b[1]) * size[0] + b[2]) * C;
      std::copy(src, src + sh[2] * C, out.image.data() + (z * sh[1] + y) * sh[2] * C);
    }
  if (res_lab) {
    out.labels.resize(static_cast<size_t>(sh[0] * sh[1] * sh[2]));
    for (int64_t z = 0; z < sh[0]; ++z)
      for (int64_t y = 0; y < sh[1]; ++y) {
        const uint16_t* src =
            res_lab->data.data() + ((z + b[0]) * size[1] + y + b[1]) * size[0] + b[2];
        std::copy(src, src + sh[2], out.labels.data() + (z * sh[1] + y) * sh[2]);
      }
  }
  img.reset();
  lab.reset();

  normalize_channels(plan.normalization, out.image.data(), sh[0] * sh[1] * sh[2], out.channels);
  if (!out.labels.empty()) {
    try {
      out.class_locations = sample_class_locations(out.labels.data(), sh, plan.num_classes(),
                                                   kClassLocationsPerClass, seed);
    } catch (const ArgumentError& e) {
      throw ArgumentError("case '" + id + "' (preprocessed grid): " + e.what());
    }
  }
  out.map = std::move(map);
  return out;
}

// ------------------------------------------------------------------------------ geometry map

Geometry CaseGeometryMap::preprocessed_geometry() const {
  Geometry g;
  const auto s = shape();
  double first[3];
  for (int a = 0; a < 3; ++a) {
    const double f =
        static_cast<double>(canonical.size[a]) / static_cast<double>(resampled_shape[2 - a]);
    g.size[a] = s[2 - a];
    g.spacing[a] = canonical.spacing[a] * f;
    first[a] = (static_cast<double>(crop.begin[2 - a]) + 0.5) * f - 0.5;
  }
  g.direction = canonical.direction;
  g.origin = canonical.index_to_physical(first[0], first[1], first[2]);
  return g;
}

nlohmann::json CaseGeometryMap::to_json() const {
  return {{"source", geometry_json(source)}, {"perm", orientation.perm},
          {"flip", orientation.flip},        {"canonical", geometry_json(canonical)},
          {"resampled", resampled},          {"resampled_shape", resampled_shape},
          {"crop_begin", crop.begin},        {"crop_end", crop.end}};
}

CaseGeometryMap CaseGeometryMap::from_json(const nlohmann::json& j) {
  if (!j.is_object()) bad_map("expected a JSON object, found " + j.dump());
  CaseGeometryMap m;
  m.source = geometry_from_json(j, "source");
  m.canonical = geometry_from_json(j, "canonical");
  m.orientation.perm = json_array<int, 3>(j, "perm");
  m.orientation.flip = json_array<bool, 3>(j, "flip");
  std::array<int, 3> seen{};
  for (int p : m.orientation.perm) {
    if (p < 0 || p > 2 || seen[p]++) bad_map("field 'perm' is not a permutation of 0, 1, 2");
  }
  if (!j.contains("resampled") || !j["resampled"].is_boolean())
    bad_map("field 'resampled' must be a boolean");
  m.resampled = j["resampled"].get<bool>();
  m.resampled_shape = json_array<int64_t, 3>(j, "resampled_shape");
  m.crop.begin = json_array<int64_t, 3>(j, "crop_begin");
  m.crop.end = json_array<int64_t, 3>(j, "crop_end");
  for (int a = 0; a < 3; ++a) {
    if (m.canonical.size[a] != m.source.size[m.orientation.perm[a]])
      bad_map("canonical size does not match the permuted source size");
    if (m.resampled_shape[a] < 1 || m.crop.begin[a] < 0 || m.crop.end[a] <= m.crop.begin[a] ||
        m.crop.end[a] > m.resampled_shape[a])
      bad_map("crop box (" + j["crop_begin"].dump() + " .. " + j["crop_end"].dump() +
              ") does not fit the resampled shape " + j["resampled_shape"].dump());
  }
  return m;
}

// ------------------------------------------------------------------------------ back to source

std::vector<float> probabilities_to_source(const CaseGeometryMap& map, const float* probs, int k) {
  std::vector<float> out(static_cast<size_t>(map.source.voxels() * k));
  map_back(map, probs, k,
           [&](int64_t v, const float* vals) { std::copy(vals, vals + k, out.data() + v * k); });
  return out;
}

LabelVolume argmax_labels(const float* probs, int k, const Geometry& geo) {
  MEDSEG_CHECK(k >= 1 && k <= 65536, "argmax over ", k, " classes");
  LabelVolume out;
  out.geo = geo;
  out.data.resize(static_cast<size_t>(geo.voxels()));
#pragma omp parallel for schedule(static) if (geo.voxels() > kParallelMin)
  for (int64_t v = 0; v < geo.voxels(); ++v) out.data[v] = argmax_of(probs + v * k, k);
  return out;
}

LabelVolume labels_to_source(const CaseGeometryMap& map, const float* probs, int k) {
  MEDSEG_CHECK(k >= 1 && k <= 65536, "argmax over ", k, " classes");
  LabelVolume out;
  out.geo = map.source;
  out.data.resize(static_cast<size_t>(map.source.voxels()));
  map_back(map, probs, k, [&](int64_t v, const float* vals) { out.data[v] = argmax_of(vals, k); });
  return out;
}

}  // namespace medseg::data
