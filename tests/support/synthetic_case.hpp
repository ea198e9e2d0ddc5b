// Synthetic preprocessed cases for the data tests: owned voxel buffers plus a CaseView over them.
#pragma once
#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "data/case_view.hpp"

namespace medseg::test {

struct OwnedCase {
  std::string id;
  std::array<int64_t, 3> shape{0, 0, 0};
  int channels = 1;
  std::vector<float> image;
  std::vector<uint16_t> labels;
  std::vector<std::vector<data::Index3>> locations;

  // Points into this object: take views only once the owning container has stopped growing.
  data::CaseView view() const {
    data::CaseView v;
    v.id = id;
    v.shape = shape;
    v.channels = channels;
    v.image = image.data();
    v.labels = labels.empty() ? nullptr : labels.data();
    v.class_locations = &locations;
    return v;
  }
};

using ImageFn = std::function<float(int64_t z, int64_t y, int64_t x, int c)>;
using LabelFn = std::function<uint16_t(int64_t z, int64_t y, int64_t x)>;

// Every labelled voxel is listed in `locations` (the real preprocessing subsamples; the sampler
// only needs some).
inline OwnedCase make_case(const std::string& id, std::array<int64_t, 3> shape, int channels,
                           const ImageFn& image_fn, const LabelFn& label_fn) {
  OwnedCase c;
  c.id = id;
  c.shape = shape;
  c.channels = channels;
  const int64_t n = shape[0] * shape[1] * shape[2];
  c.image.resize(static_cast<size_t>(n * channels));
  c.labels.resize(static_cast<size_t>(n));
  for (int64_t z = 0; z < shape[0]; ++z)
    for (int64_t y = 0; y < shape[1]; ++y)
      for (int64_t x = 0; x < shape[2]; ++x) {
        const int64_t i = (z * shape[1] + y) * shape[2] + x;
        for (int ch = 0; ch < channels; ++ch)
          c.image[static_cast<size_t>(i * channels + ch)] = image_fn(z, y, x, ch);
        const uint16_t l = label_fn(z, y, x);
        c.labels[static_cast<size_t>(i)] = l;
        if (l > 0) {
          if (c.locations.size() <= l) c.locations.resize(l + 1u);
          c.locations[l].push_back(
              {static_cast<int32_t>(z), static_cast<int32_t>(y), static_cast<int32_t>(x)});
        }
      }
  return c;
}

// Axis-aligned box [lo, hi) test.
inline bool in_box(int64_t z, int64_t y, int64_t x, std::array<int64_t, 3> lo,
                   std::array<int64_t, 3> hi) {
  return z >= lo[0] && z < hi[0] && y >= lo[1] && y < hi[1] && x >= lo[2] && x < hi[2];
}

}  // namespace medseg::test
