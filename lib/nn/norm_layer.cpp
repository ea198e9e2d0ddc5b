#include "nn/norm_layer.hpp"

#include <algorithm>
#include <cmath>

#include "core/error.hpp"
#ifdef MEDSEG_HAVE_CUDA
#include "kernels/cuda/norm.hpp"
#include "nn/device_ops_cuda.hpp"
#endif

namespace medseg::nn {

namespace {
// A fraction of the planned steps, or the absolute override when it is >= 0.
int64_t resolve_step(double fraction, int64_t override_step, int64_t planned_steps,
                     const char* name) {
  if (override_step >= 0) return override_step;
  MEDSEG_CHECK(fraction >= 0.0 && fraction <= 1.0, "renorm schedule: ", name,
               " must be a fraction in [0, 1], got ", fraction);
  MEDSEG_CHECK(planned_steps > 0, "renorm schedule: ", name,
               " is a fraction of the planned steps, which must be > 0, got ", planned_steps);
  return std::llround(fraction * static_cast<double>(planned_steps));
}

// Linear from `from` at step `begin` to `to` at step `end`, constant outside.
float ramp(int64_t step, int64_t begin, int64_t end, float from, float to) {
  if (step <= begin) return from;
  if (step >= end) return to;
  const double t = static_cast<double>(step - begin) / static_cast<double>(end - begin);
  return static_cast<float>(from + t * (to - from));
}
}  // namespace

std::pair<float, float> RenormSchedule::clips_at(int64_t step, int64_t planned_steps) const {
  MEDSEG_CHECK(step >= 0, "renorm schedule: negative step ", step);
  MEDSEG_CHECK(r_max_final >= 1.f && d_max_final >= 0.f,
               "renorm schedule: needs r_max_final >= 1 and d_max_final >= 0, got ", r_max_final,
               ", ", d_max_final);
  const int64_t warmup = resolve_step(warmup_fraction, warmup_steps, planned_steps, "warm-up");
  const int64_t r_end =
      resolve_step(r_ramp_end_fraction, r_ramp_end_step, planned_steps, "r ramp end");
  const int64_t d_end =
      resolve_step(d_ramp_end_fraction, d_ramp_end_step, planned_steps, "d ramp end");
  MEDSEG_CHECK(r_end >= warmup && d_end >= warmup,
               "renorm schedule: ramps must end after the warm-up (", warmup,
               " steps), got r ramp end ", r_end, ", d ramp end ", d_end);
  if (step < warmup) return {1.f, 0.f};
  return {ramp(step, warmup, r_end, 1.f, r_max_final), ramp(step, warmup, d_end, 0.f, d_max_final)};
}

NormLayer::NormLayer(int64_t channels, cpu::NormConfig cfg) : channels_(channels), cfg_(cfg) {
  MEDSEG_CHECK(channels > 0, "NormLayer needs at least one channel, got ", channels);
  MEDSEG_CHECK(cfg.eps > 0.f && cfg.alpha >= 0.f && cfg.alpha <= 1.f && cfg.slope > 0.f,
               "NormLayer: needs eps > 0, alpha in [0, 1], slope > 0; got eps ", cfg.eps, " alpha ",
               cfg.alpha, " slope ", cfg.slope);
  set_clips(cfg.r_max, cfg.d_max);
  gamma = Tensor::vector(channels);
  gamma.fill(1.f);
  beta = Tensor::vector(channels);
  running_mean = Tensor::vector(channels);
  running_std = Tensor::vector(channels);
  running_std.fill(1.f);
  dgamma = Tensor::vector(channels);
  dbeta = Tensor::vector(channels);
}

void NormLayer::set_clips(float r_max, float d_max) {
  MEDSEG_CHECK(r_max >= 1.f && d_max >= 0.f,
               "NormLayer: clips need r_max >= 1 and d_max >= 0, got ", r_max, ", ", d_max);
  cfg_.r_max = r_max;
  cfg_.d_max = d_max;
}

void NormLayer::to(Device device) {
  if (device == this->device()) return;
  if (counters_) {  // leaving the GPU: its count of skipped updates comes along
    skipped_updates_ = skipped_updates();
    counters_.reset();
  }
  for (Tensor* t : {&gamma, &beta, &running_mean, &running_std, &dgamma, &dbeta})
    if (t->device() != device) *t = t->to(device);
  cache_host_.clear();
  last_info_ = {};
  cache_dev_ = Tensor();
  cache_slots_ = 0;
  cached_shape_ = Shape{};
#ifdef MEDSEG_HAVE_CUDA
  if (device == Device::CUDA) counters_ = std::make_shared<cuda::NormDeviceCounters>(cuda_context());
#endif
}

void NormLayer::check_same_device_output(const Tensor& t) const {
  MEDSEG_CHECK(t.device() == device(), "NormLayer: a tensor on ", device_name(t.device()),
               ", the layer on ", device_name(device()));
}

namespace {
// The six arrays of the cache, `slots` floats each, in one block: mean, inv_std, r, d, scale, shift.
cpu::NormCache cache_view(float* p, int64_t slots) {
  cpu::NormCache c{p, p + slots, p + 2 * slots, p + 3 * slots};
  c.scale = p + 4 * slots;
  c.shift = p + 5 * slots;
  return c;
}
}  // namespace

cpu::NormCache NormLayer::device_cache() {
  return cache_view(cache_dev_.data(), cache_slots_);
}

void NormLayer::check_input(const Tensor& x, const char* what) const {
  MEDSEG_CHECK(x.device() == device(), "NormLayer: ", what, " is on ", device_name(x.device()),
               ", the layer on ", device_name(device()));
  MEDSEG_CHECK(x.shape().c == channels_, "NormLayer: ", what, " has ", x.shape().c,
               " channels, the layer ", channels_, " (shape ", x.shape(), ")");
  MEDSEG_CHECK(x.numel() > 0, "NormLayer: ", what, " is empty ", x.shape());
}

cpu::NormCache NormLayer::cache() {
  return cache_view(cache_host_.data(), cache_slots_);
}

void NormLayer::forward_train(const Tensor& x, Tensor& y) {
  check_input(x, "input x");
  check_same_shape(x.shape(), y.shape(), "NormLayer::forward_train (x, y)");
  MEDSEG_CHECK(x.data() != y.data(), "NormLayer::forward_train: y may not alias x");
  const size_t slots = static_cast<size_t>(
      cfg_.kind == cpu::NormKind::InstanceNorm ? x.shape().n * channels_ : channels_);
  const bool batch_kind = cfg_.kind != cpu::NormKind::InstanceNorm;
  float* rm = batch_kind ? running_mean.data() : nullptr;
  float* rs = batch_kind ? running_std.data() : nullptr;
  if (device() == Device::CUDA) {
#ifdef MEDSEG_HAVE_CUDA
    check_same_device_output(y);
    if (cache_slots_ != static_cast<int64_t>(slots)) {  // (re)allocate: mean 0, inv_std 0, r 1, d 0
      cache_slots_ = static_cast<int64_t>(slots);
      cache_dev_ = Tensor(Shape{1, 1, 1, kCacheArrays, cache_slots_}, Device::CUDA);
      std::vector<float> init(kCacheArrays * slots, 0.f);
      std::fill(init.begin() + 2 * static_cast<std::ptrdiff_t>(slots),
                init.begin() + 3 * static_cast<std::ptrdiff_t>(slots), 1.f);
      cache_dev_.assign_from(init.data());
    }
    cached_shape_ = x.shape();
    cuda::norm_forward_train(cuda_context(), cfg_, x.shape(), x.data(), gamma.data(), beta.data(),
                             rm, rs, y.data(), device_cache(),
                             static_cast<cuda::NormDeviceCounters*>(counters_.get()));
#endif
    return;
  }
  cache_slots_ = static_cast<int64_t>(slots);
  cache_host_.assign(kCacheArrays * slots, 0.f);
  std::fill(cache_host_.begin() + 2 * static_cast<std::ptrdiff_t>(slots),
            cache_host_.begin() + 3 * static_cast<std::ptrdiff_t>(slots), 1.f);  // r = 1
  cached_shape_ = x.shape();
  last_info_ = use_reference ? cpu::norm_forward_train_ref(cfg_, x.shape(), x.data(), gamma.data(),
                                                           beta.data(), rm, rs, y.data(), cache())
                             : cpu::norm_forward_train(cfg_, x.shape(), x.data(), gamma.data(),
                                                       beta.data(), rm, rs, y.data(), cache());
  if (last_info_.update_skipped) ++skipped_updates_;
}

void NormLayer::forward_infer(const Tensor& x, Tensor& y) const {
  check_input(x, "input x");
  check_same_shape(x.shape(), y.shape(), "NormLayer::forward_infer (x, y)");
  if (device() == Device::CUDA) {
#ifdef MEDSEG_HAVE_CUDA
    check_same_device_output(y);
    cuda::norm_forward_infer(cuda_context(), cfg_, x.shape(), x.data(), gamma.data(), beta.data(),
                             running_mean.data(), running_std.data(), y.data());
#endif
    return;
  }
  auto fn = use_reference ? cpu::norm_forward_infer_ref : cpu::norm_forward_infer;
  fn(cfg_, x.shape(), x.data(), gamma.data(), beta.data(), running_mean.data(), running_std.data(),
     y.data());
}

void NormLayer::check_cached(const Tensor& x, const char* what) const {
  check_input(x, "input x");
  MEDSEG_CHECK(cache_slots_ > 0 && cached_shape_ == x.shape(), "NormLayer::", what,
               ": no training forward cached for shape ", x.shape(), " (cached: ", cached_shape_,
               ")");
}

void NormLayer::backward(const Tensor& dy, const Tensor& x, const Tensor* y, Tensor& dx) {
  check_cached(x, "backward");
  check_same_shape(x.shape(), dy.shape(), "NormLayer::backward (x, dy)");
  if (y) check_same_shape(x.shape(), y->shape(), "NormLayer::backward (x, y)");
  check_same_shape(x.shape(), dx.shape(), "NormLayer::backward (x, dx)");
  MEDSEG_CHECK(dx.data() != x.data() && (!y || dx.data() != y->data()),
               "NormLayer::backward: dx may alias dy only");
  const float* yp = y ? y->data() : nullptr;
  if (device() == Device::CUDA) {
#ifdef MEDSEG_HAVE_CUDA
    check_same_device_output(dy);
    check_same_device_output(dx);
    if (y) check_same_device_output(*y);
    cuda::norm_backward(cuda_context(), cfg_, x.shape(), dy.data(), x.data(), yp, gamma.data(),
                        device_cache(), dx.data(), dgamma.data(), dbeta.data());
#endif
    return;
  }
  auto fn = use_reference ? cpu::norm_backward_ref : cpu::norm_backward;
  fn(cfg_, x.shape(), dy.data(), x.data(), yp, gamma.data(), cache(), dx.data(), dgamma.data(),
     dbeta.data());
}

void NormLayer::backward(const Tensor& dy, const Tensor& x, const Tensor& y, Tensor& dx) {
  backward(dy, x, &y, dx);
}

void NormLayer::recompute(const Tensor& x, Tensor& y) {
  check_cached(x, "recompute");
  check_same_shape(x.shape(), y.shape(), "NormLayer::recompute (x, y)");
  MEDSEG_CHECK(x.data() != y.data(), "NormLayer::recompute: y may not alias x");
  if (device() == Device::CUDA) {
#ifdef MEDSEG_HAVE_CUDA
    check_same_device_output(y);
    cuda::norm_forward_apply(cuda_context(), cfg_, x.shape(), x.data(), device_cache(), y.data());
#endif
    return;
  }
  cpu::norm_forward_apply(cfg_, x.shape(), x.data(), cache(), y.data());
}

int64_t NormLayer::skipped_updates() const {
#ifdef MEDSEG_HAVE_CUDA
  if (counters_)
    return skipped_updates_ +
           static_cast<const cuda::NormDeviceCounters*>(counters_.get())->read(cuda_context()).skipped_updates;
#endif
  return skipped_updates_;
}

void NormLayer::set_skipped_updates(int64_t n) {
#ifdef MEDSEG_HAVE_CUDA
  if (counters_) static_cast<cuda::NormDeviceCounters*>(counters_.get())->reset(cuda_context());
#endif
  skipped_updates_ = n;
}

NormDiagnostics NormLayer::diagnostics() const {
  NormDiagnostics diag;
  diag.skipped_updates = skipped_updates_;
  const float* r = cache_host_.data() + 2 * cache_slots_;
  const float* d = cache_host_.data() + 3 * cache_slots_;
  int64_t r_clipped = last_info_.r_clipped, d_clipped = last_info_.d_clipped;
  std::vector<float> host;
  if (device() == Device::CUDA) {
#ifdef MEDSEG_HAVE_CUDA
    const auto counts = static_cast<const cuda::NormDeviceCounters*>(counters_.get())->read(cuda_context());
    diag.skipped_updates += counts.skipped_updates;  // one read (one synchronization) for both
    if (cfg_.kind == cpu::NormKind::InstanceNorm || cache_slots_ == 0) return diag;
    r_clipped = counts.last_r_clipped;
    d_clipped = counts.last_d_clipped;
    host = cache_dev_.to_vector();
    r = host.data() + 2 * cache_slots_;
    d = host.data() + 3 * cache_slots_;
#endif
  } else if (cfg_.kind == cpu::NormKind::InstanceNorm || cache_host_.empty()) {
    return diag;
  }
  const double c = static_cast<double>(channels_);
  diag.r_clipped_fraction = static_cast<double>(r_clipped) / c;
  diag.d_clipped_fraction = static_cast<double>(d_clipped) / c;
  double log_r = 0.0, abs_d = 0.0;
  for (int64_t i = 0; i < channels_; ++i) {
    log_r += std::abs(std::log(static_cast<double>(r[i])));
    abs_d += std::abs(static_cast<double>(d[i]));
  }
  diag.mean_abs_log_r = log_r / c;
  diag.mean_abs_d = abs_d / c;
  return diag;
}

void fold_norm_into_conv(const NormLayer& norm, Tensor& weight, Tensor& bias) {
  const cpu::NormConfig& cfg = norm.config();
  MEDSEG_CHECK(
      cfg.kind != cpu::NormKind::InstanceNorm,
      "fold_norm_into_conv: instance norm uses per-sample statistics and cannot be folded");
  const int64_t cout = weight.shape().n;
  MEDSEG_CHECK(cout == norm.channels(), "fold_norm_into_conv: weight ", weight.shape(), " has ",
               cout, " output channels, the norm ", norm.channels());
  MEDSEG_CHECK(bias.numel() == cout, "fold_norm_into_conv: bias has ", bias.numel(),
               " values, needs ", cout);
  const int64_t per_out = weight.numel() / cout;
  const double sigma_floor = std::sqrt(static_cast<double>(cfg.eps));
  // On the host (a GPU layer's tensors are copied there and back: folding runs once per model).
  const auto rstd = norm.running_std.to_vector(), rmean = norm.running_mean.to_vector();
  const auto g = norm.gamma.to_vector(), be = norm.beta.to_vector();
  auto wv = weight.to_vector(), bv = bias.to_vector();
  for (int64_t o = 0; o < cout; ++o) {
    const double sigma = std::max(static_cast<double>(rstd[o]), sigma_floor);
    const double scale = g[o] / sigma;
    float* w = wv.data() + o * per_out;
    for (int64_t i = 0; i < per_out; ++i) w[i] = static_cast<float>(w[i] * scale);
    bv[o] = static_cast<float>((bv[o] - rmean[o]) * scale + be[o]);
  }
  weight.assign_from(wv.data());
  bias.assign_from(bv.data());
}

}  // namespace medseg::nn
