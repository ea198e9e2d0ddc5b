// CUDA batch renormalization / batch norm / instance norm with LeakyReLU fused: the contract of
// kernels/cpu/norm.hpp (NormConfig, NormCache, the spec in ../shared/docs/batch-renorm.md) on
// device pointers: x, y, dy, dx, gamma, beta, running_mean, running_std and every NormCache array
// live on the device. Nothing here synchronizes with the host: r, d, the clipping, the NaN guard
// and the running update run in a device kernel, and the per-step diagnostics (update skipped, clip
// counts) go to a NormDeviceCounters block that the caller reads only when it wants them.
#pragma once
#include <cstdint>

#include "core/tensor.hpp"
#include "kernels/cpu/norm.hpp"
#include "kernels/cuda/device.hpp"

namespace medseg::cuda {

using cpu::NormCache;
using cpu::NormConfig;
using cpu::NormKind;

// Host view of the device counters.
struct NormCounters {
  int64_t steps = 0;  // training forwards recorded since the last reset
  int64_t skipped_updates =
      0;                  // of which had non-finite batch statistics (running stats untouched)
  int64_t r_clipped = 0;  // sum over steps of the channels whose r hit a clip bound
  int64_t d_clipped = 0;
  bool last_update_skipped = false;  // the most recent step, as cpu::NormStepInfo reports it
  int64_t last_r_clipped = 0;
  int64_t last_d_clipped = 0;
};

// Device-resident diagnostics of one norm layer; RAII, move-only. Zeroed on construction.
class NormDeviceCounters {
 public:
  static constexpr int kSlots =
      8;  // layout: steps, skipped, r, d, last_skipped, last_r, last_d, spare
  explicit NormDeviceCounters(CudaContext& ctx);
  unsigned long long* device_slots() { return static_cast<unsigned long long*>(buffer_.get()); }
  // Copies the counters to the host (synchronizes with ctx's stream).
  NormCounters read(CudaContext& ctx) const;
  void reset(CudaContext& ctx);

 private:
  DeviceBuffer buffer_;
};

// Training forward; running statistics (null for instance norm) are read before and updated after,
// in place, unless a batch statistic is non-finite. counters may be null. y must not alias x.
void norm_forward_train(CudaContext& ctx, const NormConfig& cfg, const Shape& s, const float* x,
                        const float* gamma, const float* beta, float* running_mean,
                        float* running_std, float* y, NormCache cache,
                        NormDeviceCounters* counters);
// Backward; y (forward output) is needed only when cfg.leaky, and may then be null when the cache
// holds the forward's scale and shift (the mask is recomputed from x, the same bits). dx may alias
// dy. Assigns dx, dgamma, dbeta.
void norm_backward(CudaContext& ctx, const NormConfig& cfg, const Shape& s, const float* dy,
                   const float* x, const float* y, const float* gamma, NormCache cache, float* dx,
                   float* dgamma, float* dbeta);
// Inference with the running statistics (instance norm: per-sample statistics). y may alias x.
void norm_forward_infer(CudaContext& ctx, const NormConfig& cfg, const Shape& s, const float* x,
                        const float* gamma, const float* beta, const float* running_mean,
                        const float* running_std, float* y);

// The training forward's y again from x and that forward's cache (scale and shift set): the same
// kernel on the same coefficients, so the same bits. y may not alias x.
void norm_forward_apply(CudaContext& ctx, const NormConfig& cfg, const Shape& s, const float* x,
                        NormCache cache, float* y);

}  // namespace medseg::cuda
