// CUDA versions of kernels/cpu/ops.hpp (same contracts, device pointers, one CudaContext whose
// stream orders everything) plus the optimizer update and a per-channel sum used by the conv bias
// gradient. Gradients are ASSIGNED, never accumulated. Nothing here synchronizes with the host
// except dice_ce_loss, which returns the loss values (one stream synchronization per call).
#pragma once
#include <cstdint>

#include "core/tensor.hpp"
#include "kernels/cpu/ops.hpp"
#include "kernels/cuda/device.hpp"

namespace medseg::cuda {

using cpu::DiceCeOptions;
using cpu::DiceCeResult;

// y = x > 0 ? x : slope * x   (y may alias x)
void leaky_relu_forward(CudaContext& ctx, int64_t count, const float* x, float slope, float* y);
// dx = y > 0 ? dy : slope * dy   (dx may alias dy)
void leaky_relu_backward(CudaContext& ctx, int64_t count, const float* dy, const float* y,
                         float slope, float* dx);

// out (.., ca + cb) = [a (.., ca), b (.., cb)]; rows = N*D*H*W.
void concat_channels_forward(CudaContext& ctx, int64_t rows, const float* a, int64_t ca,
                             const float* b, int64_t cb, float* out);
// da = dout[.., :ca], db = dout[.., ca:]; either may be null.
void concat_channels_backward(CudaContext& ctx, int64_t rows, const float* dout, int64_t ca,
                              int64_t cb, float* da, float* db);

// Softmax over the channel axis.
void softmax_channels(CudaContext& ctx, int64_t rows, int64_t k, const float* logits, float* probs);

// Same definition as cpu::dice_ce_loss (see kernels/cpu/ops.hpp); labels is a DEVICE array of
// N*D*H*W class indices. probs and dlogits (device, may be null) are written like the CPU version.
// Reductions run in double. Synchronizes the stream once to return the scalars; throws
// ArgumentError when a label is >= K.
DiceCeResult dice_ce_loss(CudaContext& ctx, const Shape& s, const float* logits,
                          const uint16_t* labels, const DiceCeOptions& opt, float scale,
                          float* dlogits, float* probs);

// out[c] = sum over rows of x[row * channels + c] (assigned), reduced in double in a fixed order
// (deterministic). Used for the convolution bias gradient.
void channel_sum(CudaContext& ctx, int64_t rows, int64_t channels, const float* x, float* out);
// y[row, c] += bias[c]
void add_channel_bias(CudaContext& ctx, int64_t rows, int64_t channels, const float* bias,
                      float* y);

// SGD with Nesterov momentum and L2 weight decay, PyTorch's formulation (torch.optim.SGD with
// nesterov=True, dampening 0):
//   g' = g + wd * w
//   v  = mu * v + g'
//   w  = w - lr * (g' + mu * v)        (v is the UPDATED velocity)
// Element-wise over `count` values; w and v are updated in place, g is read only.
// g is first multiplied by grad_scale (gradient-norm clipping), as in nn::Optimizer on the CPU.
void sgd_nesterov_update(CudaContext& ctx, int64_t count, float* w, const float* g, float* v,
                         float lr, float mu, float wd, float grad_scale = 1.f);
// AdamW, nn::Optimizer's formulation (c1 = 1 / (1 - b1^t), c2 = 1 / (1 - b2^t) from the host):
//   g' = g * grad_scale;  m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g'^2;
//   w -= lr * (m c1 / (sqrt(v c2) + eps) + wd w)
struct AdamWParams {
  float lr, beta1, beta2, c1, c2, eps, wd, grad_scale;
};
void adamw_update(CudaContext& ctx, int64_t count, float* w, const float* g, float* m, float* v,
                  const AdamWParams& p);

// a += b, element-wise (gradient sums of the skip connections).
void add_inplace(CudaContext& ctx, int64_t count, float* a, const float* b);
// *out = sum of x[i]^2 in double, written to DEVICE memory (no host synchronization; the caller
// reads many of them at once). Deterministic (fixed reduction order).
void sum_squares(CudaContext& ctx, int64_t count, const float* x, double* out);

}  // namespace medseg::cuda
