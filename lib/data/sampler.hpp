// Training patch sampling: where a patch is taken (random or forced onto foreground), and the patch
// itself, resampled through the drawn spatial augmentation in the same step.
//
// Coordinates are voxel indices (z, y, x) of the preprocessed case. A patch of size P has its
// centre voxel at offset h = P / 2 (integer division) from its origin: origin = centre - h.
// Everything beyond the case's border reads as 0 in the image and 0 (background) in the labels.
#pragma once
#include <array>
#include <cstdint>
#include <vector>

#include "core/rng.hpp"
#include "data/augment.hpp"
#include "data/case_view.hpp"

namespace medseg::data {

struct SamplerConfig {
  std::array<int64_t, 3> patch{0, 0, 0};  // (z, y, x)
  // Share of each batch whose patches are forced to contain foreground (see
  // forced_foreground_plan).
  double foreground_fraction = 0.33;
  // How far a random patch may hang over the case's border, as a fraction of the patch per axis, in
  // [0, 0.5]. 0.5 (default): the patch centre is uniform over the whole case, so border regions are
  // seen as often as the interior. 0: nnU-Net v2's rule, the patch stays inside a case at least as
  // large as the patch, and is centred (padded on both sides) on an axis where the case is smaller.
  double max_overhang = 0.5;
};

// For each sample of a batch: whether its patch is forced to contain foreground. nnU-Net's rule:
// the last N - round(N * (1 - fraction)) samples (batch 2 at 0.33: the second one; batch 3: the
// third). Where that count rounds to 0 although fraction > 0 (batch 1, or fraction < 0.5 / N), each
// sample is forced with probability `fraction` instead, so that batch-1 training still sees
// foreground at the requested rate instead of never (a deterministic "at least one" would force
// every batch-1 patch). Consumes one uniform draw per sample in that case only.
std::vector<bool> forced_foreground_plan(int batch_size, double fraction, Rng& rng);

// The patch's centre voxel. Random: uniform over the range max_overhang allows. Forced (and the
// case has foreground in class_locations): a uniformly chosen present class, a uniformly chosen
// voxel of it, plus a jitter uniform in [-P/8, P/8] per axis, which keeps the voxel in the patch's
// central quarter: it stays inside the patch after any zoom-in (scale >= 0.7) and rotation as long
// as the rotated axes' patch edges differ by less than about 2.4x (|jitter| / 0.7 < min edge / 2);
// a thin anisotropic patch rotates in-plane only. Without foreground, a forced draw falls back to a
// random one. Throws ArgumentError when a class location lies outside the case.
std::array<int64_t, 3> choose_patch_centre(const CaseView& cs, const SamplerConfig& cfg,
                                           bool force_fg, Rng& rng);

// Fast path: copies the patch at `origin` (may lie partly or wholly outside the case) and
// zero-fills the rest. label_out may be null; an unlabelled case gives all-zero labels.
void extract_patch(const CaseView& cs, const std::array<int64_t, 3>& origin,
                   const std::array<int64_t, 3>& patch, float* image_out, uint16_t* label_out);

// Spatial path: output voxel p reads the case at centre + draw.matrix * (p - P/2), image trilinear,
// labels nearest, 0 outside. Mirroring is not applied here (mirror_patch).
void resample_patch(const CaseView& cs, const std::array<int64_t, 3>& centre,
                    const std::array<int64_t, 3>& patch, const SpatialDraw& draw, float* image_out,
                    uint16_t* label_out);

// Exact flip of a finished patch along the marked axes (image and labels together).
void mirror_patch(const std::array<bool, 3>& axes, const std::array<int64_t, 3>& patch,
                  int channels, float* image, uint16_t* labels);

// One training patch: centre, spatial draw, then the copy (identity) or the resampling (rotation or
// scaling drawn), then mirroring. image_out: (D, H, W, C) channels-last; label_out: (D, H, W).
// Intensity augmentation is separate (augment_intensity). Throws ArgumentError for a malformed case
// (no image, empty shape, channels < 1) or a patch size < 1.
void sample_augmented_patch(const CaseView& cs, const SamplerConfig& sampler,
                            const AugmentConfig& augment, bool force_fg, Rng& rng, float* image_out,
                            uint16_t* label_out);

}  // namespace medseg::data
