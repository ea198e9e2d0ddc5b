// Preprocessing of one case into the plan's space, and the way back. Pure computation on
// Volume / LabelVolume; no file IO.
//
// Forward (preprocess_case):
//   source grid --reorient--> canonical grid --resample--> plan spacing --crop--> non-zero box
//   --normalise--> preprocessed case, [z][y][x][c].
// Backward (probabilities_to_source): un-crop, resample linearly back to the canonical grid, undo
// the axis permutation/flips, giving values on the ORIGINAL source voxel grid.
//
// Resampling maps voxel centres so that the extent of the volume is kept (the first and last voxel
// edges coincide): target index i sits at source index (i + 0.5) * n / r - 0.5, where n and r are
// the source and target sizes on that axis; coordinates outside [0, n-1] are clamped to the edge.
#pragma once
#include <array>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/case_view.hpp"
#include "data/plan.hpp"
#include "io/volume.hpp"

namespace medseg::data {

// Canonical orientation: canonical axis a (0=x, 1=y, 2=z) is source axis perm[a], reversed when
// flip[a]; chosen so that the canonical direction matrix is the closest to identity (LPS).
struct Orientation {
  std::array<int, 3> perm{0, 1, 2};
  std::array<bool, 3> flip{false, false, false};
  bool identity() const {
    return perm == std::array<int, 3>{0, 1, 2} && !flip[0] && !flip[1] && !flip[2];
  }
};
Orientation canonical_orientation(const Geometry& geo);
// The geometry of the reoriented grid; it describes the same physical voxels as `geo`.
Geometry reoriented_geometry(const Geometry& geo, const Orientation& o);
Volume reorient(const Volume& v, const Orientation& o);
LabelVolume reorient(const LabelVolume& v, const Orientation& o);

// Size (x, y, z) after resampling a grid of `size` and `spacing` to `target` spacing (rounded, >=
// 1).
std::array<int64_t, 3> resampled_size(const std::array<int64_t, 3>& size,
                                      const std::array<double, 3>& spacing,
                                      const std::array<double, 3>& target);
// Trilinear (separable linear) resampling of every channel to new_size (x, y, z). The geometry
// keeps the physical extent: spacing * size / new_size, origin moved to the new first voxel centre.
Volume resample_linear(const Volume& v, const std::array<int64_t, 3>& new_size);
// Nearest-neighbour resampling with the same voxel mapping.
LabelVolume resample_nearest(const LabelVolume& v, const std::array<int64_t, 3>& new_size);

// Half-open box (z, y, x).
struct CropBox {
  std::array<int64_t, 3> begin{0, 0, 0};
  std::array<int64_t, 3> end{0, 0, 0};
  std::array<int64_t, 3> shape() const {
    return {end[0] - begin[0], end[1] - begin[1], end[2] - begin[2]};
  }
};
// Bounding box of the voxels where any channel is non-zero; the whole volume when all are zero.
CropBox nonzero_box(const Volume& v);

// Everything needed to bring a prediction on the preprocessed grid back to the source grid.
struct CaseGeometryMap {
  Geometry source;          // the grid of the input file(s)
  Orientation orientation;  // source -> canonical
  Geometry canonical;       // reoriented source grid (before resampling)
  bool resampled = false;   // false: canonical grid kept (spacing already equal)
  std::array<int64_t, 3> resampled_shape{0, 0, 0};               // (z, y, x)
  CropBox crop;                                                  // in resampled space, (z, y, x)
  std::array<int64_t, 3> shape() const { return crop.shape(); }  // preprocessed (z, y, x)
  // Physical geometry of the preprocessed grid (useful to write preprocessed volumes to look at).
  Geometry preprocessed_geometry() const;
  nlohmann::json to_json() const;
  // Throws ArgumentError naming the field when malformed.
  static CaseGeometryMap from_json(const nlohmann::json& j);
};

struct PreprocessedCase {
  std::string id;
  std::array<int64_t, 3> shape{0, 0, 0};  // (z, y, x)
  int channels = 1;
  std::vector<float> image;      // [z][y][x][c]
  std::vector<uint16_t> labels;  // [z][y][x]; empty when unlabelled
  // Per class value (index = value, [0] left empty): up to kClassLocationsPerClass voxels (z, y,
  // x).
  std::vector<std::vector<Index3>> class_locations;
  CaseGeometryMap map;
  // Points into this object: valid while it lives and is not modified.
  CaseView view() const;
};

constexpr int kClassLocationsPerClass = 10000;

// Normalises `data` ([voxel][c], `channels` channels) in place per `norm` (one entry per channel).
void normalize_channels(const std::vector<ChannelNorm>& norm, float* data, int64_t voxels,
                        int channels);

// Uniform random sample without replacement (seeded) of at most max_per_class voxels per class
// value 1..num_classes-1, in memory order. Throws ArgumentError on a label >= num_classes.
std::vector<std::vector<Index3>> sample_class_locations(const uint16_t* labels,
                                                        const std::array<int64_t, 3>& shape,
                                                        int num_classes, int max_per_class,
                                                        uint64_t seed);

// Reorient, resample (image trilinear, labels nearest; skipped when the canonical spacing equals
// the plan's within 1e-3 mm), crop to the non-zero image box, normalise, sample class locations.
// `labels` may be null (inference): labels and class_locations stay empty. Throws ArgumentError
// naming the case when the channel count or the label grid does not match, or a label value is not
// a class of the plan.
PreprocessedCase preprocess_case(const Plan& plan, const std::string& id, const Volume& image,
                                 const LabelVolume* labels, uint64_t seed);

// probs: [z][y][x][k] on the preprocessed grid (map.shape()). Returns [z][y][x][k] on the source
// grid (map.source.size): outside the crop class 0 has probability 1 and others 0; linear
// interpolation back to the canonical grid; permutation/flips undone. The result is the only large
// allocation (voxels * k floats).
std::vector<float> probabilities_to_source(const CaseGeometryMap& map, const float* probs, int k);

// argmax over k classes of [voxel][k] probabilities; ties go to the lower class.
LabelVolume argmax_labels(const float* probs, int k, const Geometry& geo);

// argmax_labels(probabilities_to_source(map, probs, k), k, map.source) without materialising the
// source-grid probabilities (memory: the label volume only).
LabelVolume labels_to_source(const CaseGeometryMap& map, const float* probs, int k);

}  // namespace medseg::data
