// Element-wise and loss kernels on channels-last tensors: LeakyReLU, channel concat, softmax with
// cross-entropy, soft Dice. Each has a naive reference beside the fast version only where the fast
// version differs. Gradients are ASSIGNED (never accumulated).
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.hpp"

namespace medseg::cpu {

// y = x > 0 ? x : slope * x   (y may alias x)
void leaky_relu_forward(int64_t count, const float* x, float slope, float* y);
// dx = y > 0 ? dy : slope * dy   (uses the output y; valid since slope > 0; dx may alias dy)
void leaky_relu_backward(int64_t count, const float* dy, const float* y, float slope, float* dx);

// out (.., ca + cb) = [a (.., ca), b (.., cb)] along the channel axis; `rows` = N*D*H*W.
void concat_channels_forward(int64_t rows, const float* a, int64_t ca, const float* b, int64_t cb,
                             float* out);
// da = dout[.., :ca], db = dout[.., ca:]; either may be null to skip it.
void concat_channels_backward(int64_t rows, const float* dout, int64_t ca, int64_t cb, float* da,
                              float* db);

struct DiceCeOptions {
  double smooth = 1e-5;           // added to numerator and denominator of each class's Dice
  bool include_background = false;
  double ce_weight = 1.0;
  double dice_weight = 1.0;
  // Batch Dice (sums over the whole batch, nnU-Net's choice for small batches) or per-sample Dice.
  bool batch_dice = true;
};

struct DiceCeResult {
  double loss = 0;                 // ce_weight * ce + dice_weight * (-mean soft Dice)
  double ce = 0;                   // mean cross-entropy per voxel
  double soft_dice = 0;            // mean soft Dice over the included classes
  std::vector<double> dice_per_class;  // soft Dice of every class (background included, index = class)
};

// logits (N, D, H, W, K); labels: N*D*H*W class indices < K. Writes softmax probabilities to `probs`
// (may be null) and the gradient of `scale * loss` w.r.t. the logits to dlogits (may be null).
DiceCeResult dice_ce_loss(const Shape& s, const float* logits, const uint16_t* labels,
                          const DiceCeOptions& opt, float scale, float* dlogits, float* probs);
// Reference in double precision, straightforward loops (ground truth for the fast version and for the
// CUDA kernel).
DiceCeResult dice_ce_loss_ref(const Shape& s, const float* logits, const uint16_t* labels,
                              const DiceCeOptions& opt, float scale, float* dlogits);

// Softmax over the channel axis, rows = N*D*H*W.
void softmax_channels(int64_t rows, int64_t k, const float* logits, float* probs);

}  // namespace medseg::cpu
