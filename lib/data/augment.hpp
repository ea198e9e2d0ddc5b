// Data augmentation for training patches: the nnU-Net v2 default recipe (see
// docs/field-reference.md), every transform switchable, probabilities and ranges as data.
//
// Spatial transforms (mirroring, rotation, scaling) are not applied to a finished patch: the
// sampler draws them (draw_spatial) and resamples the case directly, so that rotating or zooming
// out never shows the patch's own border (sampler.hpp). Intensity transforms (noise, blur,
// brightness, contrast, low resolution, gamma) run on the finished patch in place
// (augment_intensity); labels are never touched by them.
//
// Pure computation: all randomness comes from the caller's Rng, so a patch is a function of
// (case, configuration, Rng state).
#pragma once
#include <array>
#include <cstdint>
#include <string>

#include "core/rng.hpp"

namespace medseg::data {

enum class RotationAxes {
  // All three axes, unless the patch is strongly anisotropic (largest in-plane edge more than 3x
  // the
  // z edge, nnU-Net's threshold), where rotating about y or x would tilt a thin slab through the
  // few
  // slices there are: then only about z (in-plane), as nnU-Net does for such data.
  Auto,
  All,
  InPlane,  // about z only: rotates the (y, x) plane
};

struct AugmentConfig {
  bool enabled = true;  // master switch: false = plain patches, no transform drawn at all

  // ---- spatial (applied while sampling)
  bool mirror = true;
  std::array<bool, 3> mirror_axes{true, true, true};  // (z, y, x)
  double p_mirror_per_axis = 0.5;

  bool rotation = true;
  double p_rotation = 0.2;
  double rotation_max_deg = 30.0;  // each drawn angle is uniform in [-max, +max]
  RotationAxes rotation_axes = RotationAxes::Auto;

  bool scaling = true;
  double p_scaling = 0.2;
  // Factor applied to source coordinates (nnU-Net convention): < 1 zooms in, > 1 zooms out. One
  // factor for all axes (nnU-Net v2 synchronises scaling across axes).
  double scale_min = 0.7, scale_max = 1.4;

  // ---- intensity (applied to the finished patch, in this order)
  bool noise = true;
  double p_noise = 0.1;
  double noise_variance_max = 0.1;  // variance ~ U(0, max), one draw per patch

  bool blur = true;
  double p_blur = 0.2;
  double p_blur_per_channel = 0.5;
  double blur_sigma_min = 0.5, blur_sigma_max = 1.0;  // voxels, drawn per axis; separable Gaussian

  bool brightness = true;
  double p_brightness = 0.15;
  double brightness_min = 0.75, brightness_max = 1.25;  // multiplier, drawn per channel

  bool contrast = true;
  double p_contrast = 0.15;
  double contrast_min = 0.75,
         contrast_max = 1.25;  // about the channel mean, clipped to the old range

  bool low_resolution = true;
  double p_low_resolution = 0.25;
  double p_low_resolution_per_channel = 0.5;
  // Zoom per axis ~ U(min, max): 0.5 = downsample 2x (nearest), then back up (trilinear).
  double low_resolution_zoom_min = 0.5, low_resolution_zoom_max = 1.0;

  bool gamma_inverted = true;  // gamma on the negated image (brightens dark structures instead)
  double p_gamma_inverted = 0.1;
  bool gamma = true;
  double p_gamma = 0.3;
  double gamma_min = 0.7, gamma_max = 1.5;  // range-renormalised, mean and std restored

  // Every transform off (validation patches, tests).
  static AugmentConfig none() {
    AugmentConfig c;
    c.enabled = false;
    return c;
  }
  // Mirroring only (exact flips, no resampling, no intensity change).
  static AugmentConfig mirror_only();
  // "full" (every transform above, nnU-Net's set), "mirror" or "none"; ArgumentError otherwise.
  static AugmentConfig preset(const std::string& name);
};

// One draw of the spatial transforms for a patch. An output voxel at integer offset o = p - pc from
// the patch's centre voxel pc reads the case at (centre + matrix * o), (z, y, x) order; mirroring
// is an exact flip of the finished patch along the marked axes.
struct SpatialDraw {
  std::array<bool, 3> mirror{false, false, false};
  bool affine = false;  // a rotation or scaling was drawn; false = the identity (exact copy)
  std::array<double, 9> matrix{1, 0, 0, 0, 1, 0, 0, 0, 1};  // row-major 3x3
  double scale = 1.0;
  std::array<double, 3> angles_rad{0, 0, 0};  // about z, y, x
};

// True when the patch is thin in z compared with its in-plane size (nnU-Net's ratio 3).
bool is_anisotropic_patch(const std::array<int64_t, 3>& patch);

// Draws mirroring, rotation and scaling. Consumes a fixed number of random values per call whatever
// is switched on, so that switching one transform off does not reshuffle the others' draws.
SpatialDraw draw_spatial(const AugmentConfig& cfg, const std::array<int64_t, 3>& patch, Rng& rng);

// The intensity transforms on one patch, in place. image: (D, H, W, C) channels-last, shape (D, H,
// W). Keeps values finite for finite input. Does nothing when cfg.enabled is false.
void augment_intensity(const AugmentConfig& cfg, Rng& rng, float* image,
                       std::array<int64_t, 3> shape, int channels);

// The single transforms, exposed for tests; each works on every channel of the patch.
void add_gaussian_noise(float* image, int64_t count, double stddev, Rng& rng);
// Separable Gaussian along z, y, x of one channel (edge values repeated beyond the border).
void gaussian_blur_channel(float* image, std::array<int64_t, 3> shape, int channels, int channel,
                           const std::array<double, 3>& sigma);
// Nearest-neighbour downsample to round(shape * zoom) per axis, then trilinear back, one channel.
void simulate_low_resolution_channel(float* image, std::array<int64_t, 3> shape, int channels,
                                     int channel, const std::array<double, 3>& zoom);
// x -> ((x - min) / range)^gamma * range + min, then mean and standard deviation restored; with
// invert, applied to -x. One channel.
void gamma_channel(float* image, int64_t voxels, int channels, int channel, double gamma,
                   bool invert);
// (x - mean) * factor + mean, clipped to the channel's original [min, max]. One channel.
void contrast_channel(float* image, int64_t voxels, int channels, int channel, double factor);

}  // namespace medseg::data
