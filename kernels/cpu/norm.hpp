// Normalization kernels: Batch Renormalization (Ioffe 2017), batch norm and instance norm, on
// channels-last tensors, with LeakyReLU optionally fused. Specification: ../shared/docs/batch-renorm.md.
//
// Statistics: per channel over m = N*D*H*W values (instance norm: per (n, c) over D*H*W). Biased
// variance, eps inside the sqrt: sigma_B = sqrt(var_B + eps). Running statistics are mean and STANDARD
// DEVIATION. r = clip(sigma_B / max(sigma, sqrt eps), 1/r_max, r_max),
// d = clip((mu_B - mu) / max(sigma, sqrt eps), -d_max, d_max), computed from the PRE-update running
// statistics and treated as constants in the backward pass.
// Forward: z = gamma * ((x - mu_B) / sigma_B * r + d) + beta; y = leaky ? lrelu(z) : z.
// Running update (training, batchrenorm and batchnorm): mu += alpha (mu_B - mu),
// sigma += alpha (sigma_B - sigma), skipped entirely (all channels) when any batch statistic is non-finite.
// Batch norm is batch renorm with r = 1, d = 0. Instance norm has no running statistics; it uses
// per-sample statistics in training and inference alike.
#pragma once
#include <cstdint>

#include "core/tensor.hpp"

namespace medseg::cpu {

enum class NormKind { BatchRenorm, BatchNorm, InstanceNorm };

struct NormConfig {
  NormKind kind = NormKind::BatchRenorm;
  float eps = 1e-5f;
  float alpha = 0.01f;   // moving-average rate
  float r_max = 1.0f;    // current clip values (the schedule lives in lib/nn)
  float d_max = 0.0f;
  bool leaky = true;     // fuse LeakyReLU after the affine transform
  float slope = 0.01f;
};

// Saved by the training forward, read by the backward. Sizes: C (batch kinds) or N*C (instance norm),
// index n*C + c.
struct NormCache {
  float* mean = nullptr;     // mu_B
  float* inv_std = nullptr;  // 1 / sigma_B
  float* r = nullptr;
  float* d = nullptr;
  // Optional (may be null): the affine coefficients the forward applied, pre-activation =
  // (x - mean) * scale + shift with scale = gamma r / sigma_B, shift = gamma d + beta, rounded to
  // float exactly as the forward used them. With them, norm_forward_apply rebuilds the forward's y
  // bit for bit, and the fast backward recovers the LeakyReLU mask from x without y.
  float* scale = nullptr;
  float* shift = nullptr;
};

struct NormStepInfo {
  bool update_skipped = false;  // non-finite batch statistics: running stats untouched
  int64_t r_clipped = 0;        // channels whose r hit a clip bound
  int64_t d_clipped = 0;
};

// Training forward. running_mean / running_std are read (pre-update) and then updated in place (not
// for instance norm, where they may be null). Writes y (may not alias x) and the cache.
// ---- reference (double accumulation) ----
NormStepInfo norm_forward_train_ref(const NormConfig& cfg, const Shape& s, const float* x,
                                    const float* gamma, const float* beta, float* running_mean,
                                    float* running_std, float* y, NormCache cache);
// Backward. y is the forward output (needed only when cfg.leaky, to recover the LeakyReLU mask);
// it may be null, and the mask is then the sign of the pre-activation recomputed in double from
// the cache's mean, inv_std, r and shift. Assigns dx, dgamma, dbeta.
void norm_backward_ref(const NormConfig& cfg, const Shape& s, const float* dy, const float* x,
                       const float* y, const float* gamma, NormCache cache, float* dx, float* dgamma,
                       float* dbeta);
// Inference: y = gamma (x - mu) / max(sigma, sqrt eps) + beta (+ LeakyReLU); instance norm uses
// per-sample statistics.
void norm_forward_infer_ref(const NormConfig& cfg, const Shape& s, const float* x, const float* gamma,
                            const float* beta, const float* running_mean, const float* running_std,
                            float* y);

// ---- fast (vectorized, OpenMP, fewest passes); same contract ----
NormStepInfo norm_forward_train(const NormConfig& cfg, const Shape& s, const float* x, const float* gamma,
                                const float* beta, float* running_mean, float* running_std, float* y,
                                NormCache cache);
// y, when null with cfg.leaky: the mask comes from x and the cache's scale and shift (which must
// be set), the same bits as from the forward's y. dx may alias dy (the same buffer; partial
// overlap is not allowed), which saves a gradient buffer in the network.
void norm_backward(const NormConfig& cfg, const Shape& s, const float* dy, const float* x, const float* y,
                   const float* gamma, NormCache cache, float* dx, float* dgamma, float* dbeta);
void norm_forward_infer(const NormConfig& cfg, const Shape& s, const float* x, const float* gamma,
                        const float* beta, const float* running_mean, const float* running_std,
                        float* y);
// The forward's output again, from its input x and the cache of that forward (scale and shift
// must be set): bit-identical to the y that norm_forward_train wrote (the same normalize pass on
// the same coefficients), so a network may drop y after the forward and rebuild it for the
// backward. Touches no statistics. y may not alias x.
void norm_forward_apply(const NormConfig& cfg, const Shape& s, const float* x, NormCache cache,
                        float* y);

}  // namespace medseg::cpu
