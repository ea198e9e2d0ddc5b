// Optimisers over the U-Net's named parameters.
// SGD with Nesterov momentum (PyTorch's formulation, so that recipes transfer):
//   g = grad + wd * w;  v = mu * v + g;  w -= lr * (g + mu * v)
// AdamW (decoupled weight decay): m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
//   w -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * w)
// Gradient-norm clipping scales all gradients so that their global L2 norm is <= max_norm.
// Weight decay applies only to parameters flagged weight_decay (conv weights), not biases or norm
// affine parameters.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "nn/unet.hpp"

namespace medseg::nn {

struct OptimizerConfig {
  std::string kind = "sgd";  // sgd | adamw
  double lr = 1e-2;
  double momentum = 0.99;
  double weight_decay = 3e-5;
  double grad_clip = 12.0;   // <= 0 disables
  double beta1 = 0.9, beta2 = 0.999, adam_eps = 1e-8;
  double poly_exponent = 0.9;
};

// lr * (1 - step / total)^exponent
double poly_lr(double base_lr, int64_t step, int64_t total, double exponent);

class Optimizer {
 public:
  Optimizer(OptimizerConfig cfg, std::vector<NamedTensor> params);
  // Returns the gradient norm before clipping. Non-finite gradients: nothing is changed and the norm
  // (non-finite) is returned so the caller can skip the step.
  double step(double lr);
  const OptimizerConfig& config() const { return cfg_; }
  int64_t steps() const { return steps_; }
  void set_steps(int64_t s) { steps_ = s; }
  // Optimiser state tensors with stable names ("<param>.momentum", ".adam_m", ".adam_v").
  std::vector<NamedTensor> state();

 private:
  OptimizerConfig cfg_;
  std::vector<NamedTensor> params_;
  std::vector<Tensor> m_, v_;
  int64_t steps_ = 0;
};

}  // namespace medseg::nn
