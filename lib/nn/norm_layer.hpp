// The normalization layer of the U-Net: Batch Renormalization (Ioffe 2017), batch norm or instance
// norm, LeakyReLU optionally fused, on channels-last tensors, over the kernels of
// kernels/cpu/norm.hpp. Specification: ../shared/docs/batch-renorm.md. Also the renorm clip
// schedule and the folding of an inference-mode norm into the preceding convolution.
#pragma once
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "core/tensor.hpp"
#include "kernels/cpu/norm.hpp"

namespace medseg::nn {

// Clip schedule of batch renorm, in fractions of the planned number of steps (the paper's schedule
// is step-based on a 160k-step run; ours are shorter and of varying length). r_max = 1, d_max = 0
// (plain batch norm) during warm-up, then each rises linearly to its final value at its ramp end,
// constant after. The *_step fields, when >= 0, override the corresponding fraction with an
// absolute step.
struct RenormSchedule {
  double warmup_fraction = 0.05, r_ramp_end_fraction = 0.25, d_ramp_end_fraction = 0.15;
  float r_max_final = 3, d_max_final = 5;
  int64_t warmup_steps = -1, r_ramp_end_step = -1,
          d_ramp_end_step = -1;  // absolute overrides when >= 0

  // (r_max, d_max) to use at `step` (0-based) of a run of `planned_steps`. Throws ArgumentError for
  // an inconsistent schedule (a ramp that ends before the warm-up, finals below 1 / 0, bad
  // fractions).
  std::pair<float, float> clips_at(int64_t step, int64_t planned_steps) const;
};

// Of the last training step (per-channel means; zero for instance norm, which has no r and d).
struct NormDiagnostics {
  double r_clipped_fraction = 0, d_clipped_fraction = 0;  // channels whose r / d hit a clip bound
  double mean_abs_log_r = 0, mean_abs_d = 0;
  int64_t skipped_updates = 0;  // cumulative: steps whose batch statistics were non-finite
};

class NormLayer {
 public:
  NormLayer(int64_t channels, cpu::NormConfig cfg);

  Tensor gamma, beta, running_mean,
      running_std;       // each (1,1,1,1,C); init gamma 1, beta 0, mean 0, std 1
  Tensor dgamma, dbeta;  // assigned by backward

  const cpu::NormConfig& config() const { return cfg_; }
  // Moves the parameters, running statistics and gradients to `device` (values kept); on the GPU the
  // layer runs the kernels of kernels/cuda/norm.hpp, with its cache and diagnostics counters on the
  // device (no host synchronization per step).
  void to(Device device);
  Device device() const { return gamma.device(); }
  int64_t channels() const { return channels_; }
  void set_clips(float r_max, float d_max);

  // y allocated by the caller with x's shape. Updates the running statistics (batch kinds) and
  // keeps the cache (sized for x's shape) that backward reads.
  void forward_train(const Tensor& x, Tensor& y);
  void forward_infer(const Tensor& x, Tensor& y) const;
  // x and y: the input and output of the last forward_train. Assigns dx (caller-allocated, x's
  // shape), dgamma and dbeta. y may be null: the LeakyReLU mask is then recomputed from x with the
  // forward's cached coefficients (the same bits; with use_reference, in double). dx may be dy
  // (the gradient overwritten in place).
  void backward(const Tensor& dy, const Tensor& x, const Tensor* y, Tensor& dx);
  void backward(const Tensor& dy, const Tensor& x, const Tensor& y, Tensor& dx);
  // The output of the last forward_train again, from its input x: bit-identical to what that
  // forward wrote (the same kernel on the cached coefficients), so a network can drop y after the
  // forward and rebuild it for the backward. With use_reference the forward computed y in double
  // and this differs from it by float rounding.
  void recompute(const Tensor& x, Tensor& y);

  NormDiagnostics diagnostics() const;
  int64_t skipped_updates() const;
  void set_skipped_updates(int64_t n);

  bool use_reference = false;  // switch to the *_ref kernels (tests, debugging; CPU only)

 private:
  cpu::NormCache cache();
  void check_input(const Tensor& x, const char* what) const;
  void check_cached(const Tensor& x, const char* what) const;  // a training forward of x's shape

  int64_t channels_;
  cpu::NormConfig cfg_;
  // Training cache: mean, inv_std, r, d, scale, shift, `cache_slots_` floats each (C for the batch
  // kinds, N*C for instance norm), in one block on the layer's device.
  static constexpr int kCacheArrays = 6;
  Shape cached_shape_{};
  std::vector<float> cache_host_;
  cpu::NormStepInfo last_info_{};
  int64_t skipped_updates_ = 0;
  // On the GPU: the cache (the same six arrays) on the device, and the device
  // counters (cuda::NormDeviceCounters, type-erased: this header includes no CUDA header), whose
  // skipped updates add to skipped_updates_.
  Tensor cache_dev_;
  int64_t cache_slots_ = 0;
  std::shared_ptr<void> counters_;
  cpu::NormCache device_cache();
  void check_same_device_output(const Tensor& t) const;
};

// Folds an inference-mode batch(re)norm layer (no LeakyReLU folded; the caller applies it after)
// into the preceding conv's weight (Cout,k,k,k,Cin) and bias (Cout values): w' = w * gamma / sigma,
// b' = (b - mu) * gamma / sigma + beta, sigma = max(running_std, sqrt(eps)). Throws ArgumentError
// for instance norm (its statistics depend on the input) and for mismatched sizes.
void fold_norm_into_conv(const NormLayer& norm, Tensor& weight, Tensor& bias);

}  // namespace medseg::nn
