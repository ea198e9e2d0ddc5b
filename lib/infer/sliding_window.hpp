// Sliding-window inference over a whole volume with a patch-sized model (the nnU-Net recipe):
// overlapping tiles, a Gaussian importance map that trusts tile centres more than tile borders, and
// optional mirroring test-time augmentation.
//
// Conventions (all decisions that change results are written here):
//  - Layout: image [z][y][x][c] (channels innermost), output probabilities [z][y][x][k]; this is
//    the medseg::Volume voxel order and the tensor layout (N, D=z, H=y, W=x, C). Shapes and patches
//    are (z, y, x).
//  - An axis shorter than the patch is zero-padded to the patch size, CENTRED (the extra voxel of
//    an odd padding goes after the data), and the result is cropped back. Zero is the normalised
//    mean intensity, so centring keeps the data where the network saw it during training (patches
//    centred on foreground) and spreads the padding artefacts evenly over both borders.
//  - Tile starts along an axis of (padded) length S with patch P: n = ceil((S - P) / (step * P)) +
//    1 tiles, starts round(i * (S - P) / (n - 1)); the first tile starts at 0, the last ends at S,
//    and neighbours overlap by at least (1 - step) * P.
//  - Aggregation: the Gaussian-weighted average of per-tile SOFTMAX PROBABILITIES (not logits). A
//    weighted mean of probability vectors is itself a probability vector, so every output voxel
//    sums to 1 regardless of how many tiles covered it, and a confident tile cannot be outvoted by
//    the sheer logit magnitude of a neighbour.
//  - TTA: each tile is evaluated on all 8 combinations of mirroring the z, y and x axes; each
//    output is mirrored back, turned into probabilities, and the 8 are averaged with equal weight
//    before the Gaussian weighting.
//  - Batching: (tile, mirror) evaluations are packed tile-major into forward calls of at most
//    max_batch items; the last call may be smaller.
#pragma once
#include <array>
#include <cstdint>
#include <functional>
#include <vector>

#include "core/tensor.hpp"

namespace medseg::infer {

// forward(batch (B,D,H,W,C), logits (B,D,H,W,K)) -- the model, supplied by the caller. `logits`
// arrives allocated on the CPU with the expected shape; forward must assign every value (it is not
// cleared between calls) and must leave the shape unchanged.
using PatchForward = std::function<void(const Tensor& batch, Tensor& logits)>;

struct SlidingWindowOptions {
  std::array<int64_t, 3> patch{0, 0, 0};  // (z, y, x)
  double step = 0.5;                      // tile step as a fraction of the patch, in (0, 1]
  bool tta = true;                        // mirroring on all 8 axis combinations
  int max_batch = 2;                      // (tile, mirror) evaluations per forward call
  // Called after each tile whose evaluations (all mirrors) are complete: (tiles done, tiles total).
  std::function<void(int64_t done, int64_t total)> progress;
};

// Gaussian importance map of a patch, [z][y][x]: exp(-d^2 / 2) with d the distance from the patch
// centre ((P - 1) / 2 per axis, so the map is mirror-symmetric) in units of sigma = sigma_scale *
// P. It is the product of one 1-D profile per axis (gaussian_profiles), each with maximum 1 and
// floored at 1e-12, so the maximum is 1 and no value underflows to 0 in float (>= 1e-36): no voxel
// covered by a tile ends with zero total weight.
std::vector<float> gaussian_importance_map(std::array<int64_t, 3> patch,
                                           double sigma_scale = 1.0 / 8);
// The per-axis profiles of that map, in double.
std::array<std::vector<double>, 3> gaussian_profiles(std::array<int64_t, 3> patch,
                                                     double sigma_scale = 1.0 / 8);

// The tile starts along one axis (see the header comment). Requires size >= patch >= 1.
std::vector<int64_t> tile_starts(int64_t size, int64_t patch, double step);

// Softmax probabilities [z][y][x][k] for the whole volume (see the header comment for the rules).
// Throws ArgumentError on bad shapes/options or when forward changes the logits shape.
std::vector<float> sliding_window_probabilities(const float* image, std::array<int64_t, 3> shape,
                                                int channels, int num_classes,
                                                const PatchForward& forward,
                                                const SlidingWindowOptions& options);

}  // namespace medseg::infer
