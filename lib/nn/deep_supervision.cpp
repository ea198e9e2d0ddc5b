#include "nn/deep_supervision.hpp"

#include "core/error.hpp"

namespace medseg::nn {

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
  if (!dlogits.defined() || !(dlogits.shape() == logits.shape())) dlogits = Tensor(logits.shape());
  cpu::DiceCeResult main = cpu::dice_ce_loss(logits.shape(), logits.data(), labels, {}, weights[0],
                                             dlogits.data(), nullptr);
  if (levels.empty()) return main;
  const auto& aux = net.aux_logits();
  MEDSEG_CHECK(aux.size() == levels.size(), "supervised_loss: the network has ", aux.size(),
               " auxiliary outputs, expected ", levels.size(), " (call after forward_train)");
  buf.aux_dlogits.resize(aux.size());
  buf.aux_labels.resize(aux.size());
  double total = weights[0] * main.loss;
  for (size_t i = 0; i < aux.size(); ++i) {
    Tensor& g = buf.aux_dlogits[i];
    if (!g.defined() || !(g.shape() == aux[i].shape())) g = Tensor(aux[i].shape());
    buf.aux_labels[i] = downsample_labels(labels, logits.shape(), int64_t{1} << levels[i]);
    const auto r = cpu::dice_ce_loss(aux[i].shape(), aux[i].data(), buf.aux_labels[i].data(), {},
                                     weights[i + 1], g.data(), nullptr);
    total += weights[i + 1] * r.loss;
  }
  main.loss = total;
  return main;
}

}  // namespace medseg::nn
