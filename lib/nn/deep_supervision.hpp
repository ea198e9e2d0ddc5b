// The training loss over every output of the U-Net: the full-resolution head and, with deep
// supervision, the auxiliary heads against labels downsampled to their resolution.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "core/tensor.hpp"
#include "kernels/cpu/ops.hpp"
#include "nn/unet.hpp"

namespace medseg::nn {

// Labels of shape (N, D, H, W) -> (N, D/f, H/f, W/f), nearest neighbour: output voxel i takes input
// voxel floor((i + 0.5) f - 0.5) on each axis (the centre of its f^3 block, rounded down), as a
// resampling with order 0 would. D, H, W must be divisible by f.
std::vector<uint16_t> downsample_labels(const uint16_t* labels, const Shape& full, int64_t f);

// Scratch of supervised_loss, kept between steps (no allocation per step).
struct SupervisionBuffers {
  std::vector<Tensor> aux_dlogits;
  std::vector<std::vector<uint16_t>> aux_labels;
  std::shared_ptr<void> device_labels;  // a GPU network's labels (cuda::DeviceBuffer)
};

// sum_i w_i * (Dice + CE)(head i) with w = net.config().supervision_weights(); writes d(loss)/d(logits)
// to dlogits and the auxiliary gradients to buf.aux_dlogits (allocated here), ready for
// net.backward(dlogits, &buf.aux_dlogits). The result: `loss` the weighted total; `ce`, `soft_dice`
// and `dice_per_class` those of the full-resolution head. Without deep supervision this is exactly
// cpu::dice_ce_loss on the logits. Logits on the GPU: the loss runs there (cuda::dice_ce_loss; the
// host labels are uploaded) and the gradients stay on the device.
cpu::DiceCeResult supervised_loss(const UNet& net, const Tensor& logits, const uint16_t* labels,
                                  Tensor& dlogits, SupervisionBuffers& buf);

}  // namespace medseg::nn
