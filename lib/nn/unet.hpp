// The 3-D U-Net: levels of two conv3x3x3 -> norm -> LeakyReLU blocks, stride-2 conv down, transposed
// conv up, skip concatenation (upsampled first, skip second), a 1x1x1 head. Explicit forward/backward
// through the whole network; every intermediate lives in a buffer of the network's TensorPool,
// held only while it is needed and reused afterwards, so a step allocates nothing after the first
// one of an input shape. Parameters have stable names (enc.0.conv.1.weight, ...).
//
// Memory (the GPU's scarce resource; docs/architecture.md has the count). The backward keeps, per
// conv + norm block, only the conv output z; the LeakyReLU mask comes from z and the norm's cached
// coefficients, a norm's input gradient overwrites its output gradient in place, and a conv's
// input is freed between its weight and data gradients so that the data gradient can take its
// buffer. With recompute_activations() (the default) the norm outputs y are not kept either: the
// backward rebuilds each from z (NormLayer::recompute, the same bits) just before the weight
// gradient that reads it, one extra elementwise pass per block. It costs no measurable time on
// the 2-core CPU (the smaller working set pays for the pass) and saves a third of the memory.
// set_recompute_activations(false) keeps y from the forward instead; both give the same bits.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/rng.hpp"
#include "core/tensor.hpp"
#include "kernels/cpu/norm.hpp"
#include "nn/conv_layer.hpp"
#include "nn/norm_layer.hpp"
#include "nn/tensor_pool.hpp"

namespace medseg::nn {

struct UNetConfig {
  int in_channels = 1;
  int num_classes = 3;
  int levels = 4;            // resolutions; the bottleneck is at level levels-1
  int base_filters = 16;     // level i has min(base * 2^i, max_filters)
  int max_filters = 320;
  int convs_per_stage = 2;
  cpu::NormConfig norm;      // kind, eps, alpha, LeakyReLU slope (leaky is forced on)
  // Deep supervision (nnU-Net's): extra 1x1x1 heads on the decoder outputs at 1/2, 1/4, ... of the
  // resolution (levels 1 .. levels-3; the lowest decoder level would get weight 0), trained against
  // downsampled labels with loss weights 2^-l, normalised to sum 1. Training only: inference uses the
  // full-resolution head.
  bool deep_supervision = false;
  int64_t filters(int level) const;
  // Decoder levels with an auxiliary head (1 .. levels-3), empty without deep supervision.
  std::vector<int> supervised_levels() const;
  // Loss weight of each output: index 0 the main head, then supervised_levels() in order; sum 1.
  std::vector<float> supervision_weights() const;
  // Every spatial size must be divisible by this.
  int64_t size_divisor() const { return int64_t{1} << (levels - 1); }
};

const char* norm_kind_name(cpu::NormKind k);
cpu::NormKind parse_norm_kind(const std::string& s);  // ArgumentError on unknown names

// A named tensor of the model: parameters (with gradient) and buffers (running statistics).
struct NamedTensor {
  std::string name;
  Tensor* value = nullptr;
  Tensor* grad = nullptr;  // null for buffers
  bool weight_decay = true;
};

class UNet {
 public:
  explicit UNet(const UNetConfig& cfg, uint64_t seed = 0);
  const UNetConfig& config() const { return cfg_; }

  // Moves the network (parameters, gradients, running statistics; the tape is rebuilt) to `device`.
  // A CUDA network needs nn::use_cuda_device() first. It accepts inputs on either device: a host
  // input is copied to the device; forward_infer then returns the logits on the input's device, while
  // forward_train's logits (and backward's dlogits) stay on the network's device.
  void to(Device device);
  Device device() const { return device_; }

  // Training forward (batch statistics, running-statistics update). Returns the logits
  // (N, D, H, W, num_classes), valid until the next call. x must stay alive until backward().
  const Tensor& forward_train(const Tensor& x);
  // With deep supervision: the logits of the auxiliary heads of the last forward_train, in
  // supervised_levels() order (shape (N, D/2^l, H/2^l, W/2^l, num_classes)).
  const std::vector<Tensor>& aux_logits() const { return aux_logits_; }
  // Backward from d(loss)/d(logits) (and, with deep supervision, d(loss)/d(aux_logits), same order
  // and shapes; required then); assigns every parameter gradient.
  void backward(const Tensor& dlogits, const std::vector<Tensor>* aux_dlogits = nullptr);
  // Inference forward (running statistics). When folding is on (fold_norms()), batch(re)norm layers are
  // folded into their convolutions.
  void forward_infer(const Tensor& x, Tensor& logits);
  // Training-mode forward for evaluation: the normalization uses this batch's statistics (with the
  // current renorm clips) exactly as a training step would, but the running statistics are left
  // as they were. The train/inference gap of the norm study is measured with it.
  void forward_batch_stats(const Tensor& x, Tensor& logits);
  // Folds every batch(re)norm layer into its convolution for inference (no-op for instance norm).
  // Must be called again after the weights change.
  void fold_norms();
  bool folded() const { return folded_; }

  std::vector<NamedTensor> parameters();   // trainable, with gradients
  std::vector<NamedTensor> buffers();      // running statistics
  // Copies of every buffer, in buffers() order, and their restoration (a skipped step, a
  // training-mode evaluation must leave the running statistics as they were).
  std::vector<std::vector<float>> snapshot_buffers();
  void restore_buffers(const std::vector<std::vector<float>>& saved);
  int64_t parameter_count();
  void set_renorm_clips(float r_max, float d_max);
  NormDiagnostics diagnostics() const;     // mean over layers; skipped updates summed
  void set_use_reference(bool on);         // naive kernels everywhere (tests)
  // Bytes of activation and gradient buffers the network holds for the current input shape (the
  // pool's buffers, the logits), and the most of them in use at once.
  size_t activation_bytes() const;
  size_t peak_activation_bytes() const;
  // Whether the backward rebuilds the norm outputs instead of keeping them (see the top of this
  // file; on by default).
  bool recompute_activations() const { return recompute_; }
  void set_recompute_activations(bool on) { recompute_ = on; }

 private:
  struct Block {
    ConvLayer conv;
    NormLayer norm;
    // conv output and norm output while held: buffers of pool_, null when not held.
    Tensor* z = nullptr;
    Tensor* y = nullptr;
    // Folded inference copy of the conv (weight * gamma / sigma ...).
    std::unique_ptr<ConvLayer> folded;
  };
  struct Stage {
    std::vector<Block> blocks;
  };
  void allocate(const Shape& in);
  void ensure(Tensor& t, const Shape& s) const;  // (re)allocates t on the network's device
  Shape out_shape(const Stage& st) const;         // of its last block, for the current input
  // The output y of block b of the last training forward: the held buffer, or a pool buffer it is
  // rebuilt into (and then held) from b's conv output.
  Tensor& output_of(Block& b);
  void release(Tensor*& t);  // back to the pool (when held), then null
  // x itself when on the network's device, else its copy in input_dev_.
  const Tensor& on_device(const Tensor& x);
  // train: batch statistics (and running-statistics updates); aux: also the auxiliary heads (a
  // training step only).
  void run_forward(const Tensor& x, bool train, bool aux, Tensor& logits);
  // forward_infer / forward_batch_stats: x on either device, logits on x's.
  void forward_to(const Tensor& x, bool train, Tensor& logits);
  // Runs the stage's blocks on x; the last block's y stays held (the stage output). `release_x`:
  // x is a pool buffer this stage is its last reader of in the forward.
  void stage_forward(Stage& st, const Tensor& x, bool train, bool release_x);
  // g: a pool buffer holding the gradient w.r.t. the stage output; consumed (released or reused).
  // `input`: the stage's forward input (the network input, or a held pool buffer, which is
  // released after use when `release_input`). Returns the pool buffer of the gradient w.r.t. the
  // stage input, or null when `need_dx` is false.
  Tensor* stage_backward(Stage& st, const Tensor& input, bool release_input, Tensor* g, bool need_dx);
  bool keep_outputs(bool train) const { return train && !recompute_activations(); }

  UNetConfig cfg_;
  std::vector<Stage> enc_;  // enc_[l], l = 0..levels-1
  std::vector<ConvLayer> up_;   // up_[l]: filters(l+1) -> filters(l), l = 0..levels-2
  std::vector<Stage> dec_;  // dec_[l], l = 0..levels-2
  ConvLayer head_;
  std::vector<int> aux_levels_;       // cfg_.supervised_levels(), once
  std::vector<ConvLayer> aux_heads_;  // one per supervised level
  std::vector<Tensor> aux_logits_;
  bool folded_ = false;
  Device device_ = Device::CPU;

  Shape in_shape_{};
  Tensor input_dev_;  // a host input copied to the device
  const Tensor* input_ = nullptr;  // the input of the last forward_train
  TensorPool pool_;
  bool recompute_ = true;
  std::vector<Tensor*> cat_, dskip_;  // per decoder level, pool buffers while held
  Tensor logits_;
};

}  // namespace medseg::nn
