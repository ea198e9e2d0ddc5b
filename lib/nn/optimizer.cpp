#include "nn/optimizer.hpp"

#include <cmath>

#include "core/error.hpp"
#include "nn/device_ops.hpp"
#ifdef MEDSEG_HAVE_CUDA
#include "kernels/cuda/ops.hpp"
#include "nn/device_ops_cuda.hpp"
#endif

namespace medseg::nn {

double poly_lr(double base_lr, int64_t step, int64_t total, double exponent) {
  if (total <= 0) return base_lr;
  const double frac = std::clamp(1.0 - static_cast<double>(step) / static_cast<double>(total), 0.0, 1.0);
  return base_lr * std::pow(frac, exponent);
}

Optimizer::Optimizer(OptimizerConfig cfg, std::vector<NamedTensor> params)
    : cfg_(std::move(cfg)), params_(std::move(params)) {
  MEDSEG_CHECK(cfg_.kind == "sgd" || cfg_.kind == "adamw", "unknown optimizer '", cfg_.kind,
               "' (expected sgd or adamw)");
  for (auto& p : params_) {  // state on the parameters' device
    m_.push_back(Tensor::zeros(p.value->shape(), p.value->device()));
    if (cfg_.kind == "adamw") v_.push_back(Tensor::zeros(p.value->shape(), p.value->device()));
  }
}

double Optimizer::step(double lr) {
  std::vector<const Tensor*> grads;
  for (auto& p : params_) grads.push_back(p.grad);
  const double norm = std::sqrt(sum_of_squares(grads));
  if (!std::isfinite(norm)) return norm;
  const float clip = (cfg_.grad_clip > 0 && norm > cfg_.grad_clip)
                         ? static_cast<float>(cfg_.grad_clip / (norm + 1e-6))
                         : 1.f;
  ++steps_;
  const float flr = static_cast<float>(lr);
  for (size_t k = 0; k < params_.size(); ++k) {
    auto& p = params_[k];
    float* w = p.value->data();
    const float* g = p.grad->data();
    float* m = m_[k].data();
    const int64_t n = p.value->numel();
    const float wd = p.weight_decay ? static_cast<float>(cfg_.weight_decay) : 0.f;
    if (p.value->device() == Device::CUDA) {
#ifdef MEDSEG_HAVE_CUDA
      auto& ctx = cuda_context();
      if (cfg_.kind == "sgd") {
        cuda::sgd_nesterov_update(ctx, n, w, g, m, flr, static_cast<float>(cfg_.momentum), wd, clip);
      } else {
        cuda::AdamWParams ap{};
        ap.lr = flr;
        ap.beta1 = static_cast<float>(cfg_.beta1);
        ap.beta2 = static_cast<float>(cfg_.beta2);
        ap.c1 = static_cast<float>(1.0 / (1.0 - std::pow(cfg_.beta1, static_cast<double>(steps_))));
        ap.c2 = static_cast<float>(1.0 / (1.0 - std::pow(cfg_.beta2, static_cast<double>(steps_))));
        ap.eps = static_cast<float>(cfg_.adam_eps);
        ap.wd = wd;
        ap.grad_scale = clip;
        cuda::adamw_update(ctx, n, w, g, m, v_[k].data(), ap);
      }
#endif
      continue;
    }
    if (cfg_.kind == "sgd") {
      const float mu = static_cast<float>(cfg_.momentum);
#pragma omp parallel for simd schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        const float gi = g[i] * clip + wd * w[i];
        m[i] = mu * m[i] + gi;
        w[i] -= flr * (gi + mu * m[i]);
      }
    } else {
      float* v = v_[k].data();
      const float b1 = static_cast<float>(cfg_.beta1), b2 = static_cast<float>(cfg_.beta2);
      const float c1 = static_cast<float>(1.0 / (1.0 - std::pow(cfg_.beta1, static_cast<double>(steps_))));
      const float c2 = static_cast<float>(1.0 / (1.0 - std::pow(cfg_.beta2, static_cast<double>(steps_))));
      const float eps = static_cast<float>(cfg_.adam_eps);
#pragma omp parallel for simd schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        const float gi = g[i] * clip;
        m[i] = b1 * m[i] + (1.f - b1) * gi;
        v[i] = b2 * v[i] + (1.f - b2) * gi * gi;
        w[i] -= flr * (m[i] * c1 / (std::sqrt(v[i] * c2) + eps) + wd * w[i]);
      }
    }
  }
  return norm;
}

std::vector<NamedTensor> Optimizer::state() {
  std::vector<NamedTensor> out;
  for (size_t k = 0; k < params_.size(); ++k) {
    if (cfg_.kind == "sgd") {
      out.push_back({params_[k].name + ".momentum", &m_[k], nullptr, false});
    } else {
      out.push_back({params_[k].name + ".adam_m", &m_[k], nullptr, false});
      out.push_back({params_[k].name + ".adam_v", &v_[k], nullptr, false});
    }
  }
  return out;
}

}  // namespace medseg::nn
