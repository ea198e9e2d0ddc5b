#include "nn/deep_supervision.hpp"

#include "core/error.hpp"
#ifdef MEDSEG_HAVE_CUDA
#include "kernels/cuda/ops.hpp"
#include "nn/device_ops_cuda.hpp"
#endif

namespace medseg::nn {

namespace {
// (Dice + CE) of one head, scaled by `weight` into dlogits (allocated on the logits' device).
cpu::DiceCeResult head_loss(const Tensor& logits, const uint16_t* labels, float weight, Tensor& dlogits,
                            std::shared_ptr<void>& device_labels) {
  if (!dlogits.defined() || !(dlogits.shape() == logits.shape()) || dlogits.device() != logits.device())
    dlogits = Tensor(logits.shape(), logits.device());
  if (logits.device() == Device::CUDA) {
#ifdef MEDSEG_HAVE_CUDA
    const size_t bytes = sizeof(uint16_t) * static_cast<size_t>(logits.shape().per_channel());
    auto* buf = static_cast<cuda::DeviceBuffer*>(device_labels.get());
    if (!buf || buf->bytes() < bytes) {
      device_labels = std::make_shared<cuda::DeviceBuffer>(bytes);
      buf = static_cast<cuda::DeviceBuffer*>(device_labels.get());
    }
    auto& ctx = cuda_context();
    // Ordered on the stream; the previous head's loss has returned (it synchronizes), so the buffer
    // is free.
    MEDSEG_CUDA_CHECK(cudaMemcpyAsync(buf->get(), labels, bytes, cudaMemcpyHostToDevice, ctx.stream()));
    return cuda::dice_ce_loss(ctx, logits.shape(), logits.data(), buf->as<uint16_t>(), {}, weight,
                              dlogits.data(), nullptr);
#endif
  }
  return cpu::dice_ce_loss(logits.shape(), logits.data(), labels, {}, weight, dlogits.data(), nullptr);
}
}  // namespace

std::vector<uint16_t> downsample_labels(const uint16_t* labels, const Shape& full, int64_t f) {
  MEDSEG_CHECK(f >= 1 && full.d % f == 0 && full.h % f == 0 && full.w % f == 0,
               "downsample_labels: ", full, " is not divisible by ", f);
  const int64_t d = full.d / f, h = full.h / f, w = full.w / f;
  const int64_t o = (f - 1) / 2;  // floor((i + 0.5) f - 0.5) = i f + floor((f - 1) / 2)
  std::vector<uint16_t> out(static_cast<size_t>(full.n * d * h * w));
  size_t q = 0;
  for (int64_t n = 0; n < full.n; ++n)
    for (int64_t z = 0; z < d; ++z)
      for (int64_t y = 0; y < h; ++y)
        for (int64_t x = 0; x < w; ++x)
          out[q++] = labels[((n * full.d + z * f + o) * full.h + y * f + o) * full.w + x * f + o];
  return out;
}

cpu::DiceCeResult supervised_loss(const UNet& net, const Tensor& logits, const uint16_t* labels,
                                  Tensor& dlogits, SupervisionBuffers& buf) {
  const auto weights = net.config().supervision_weights();
  const auto levels = net.config().supervised_levels();
  cpu::DiceCeResult main = head_loss(logits, labels, weights[0], dlogits, buf.device_labels);
  if (levels.empty()) return main;
  const auto& aux = net.aux_logits();
  MEDSEG_CHECK(aux.size() == levels.size(), "supervised_loss: the network has ", aux.size(),
               " auxiliary outputs, expected ", levels.size(), " (call after forward_train)");
  buf.aux_dlogits.resize(aux.size());
  buf.aux_labels.resize(aux.size());
  double total = weights[0] * main.loss;
  for (size_t i = 0; i < aux.size(); ++i) {
    buf.aux_labels[i] = downsample_labels(labels, logits.shape(), int64_t{1} << levels[i]);
    const auto r = head_loss(aux[i], buf.aux_labels[i].data(), weights[i + 1], buf.aux_dlogits[i],
                             buf.device_labels);
    total += weights[i + 1] * r.loss;
  }
  main.loss = total;
  return main;
}

}  // namespace medseg::nn
