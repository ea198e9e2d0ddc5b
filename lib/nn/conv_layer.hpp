// A convolution layer (regular or transposed) owning its parameters and gradients, over the kernels of
// kernels/cpu/conv.hpp, or of kernels/cuda/conv.hpp (cuDNN) once moved to the GPU with to(). Backward
// assigns dweight and dbias, and dx when asked for. Activations must be on the layer's device.
#pragma once
#include <cstdint>

#include "core/rng.hpp"
#include "core/tensor.hpp"
#include "kernels/cpu/conv.hpp"

namespace medseg::nn {

class ConvLayer {
 public:
  // k in {1, 3} (regular, pad k/2) or transposed (k = stride = 2).
  ConvLayer(int64_t cin, int64_t cout, int k, int stride, bool transposed);

  Tensor weight, bias, dweight, dbias;

  int64_t cin() const { return cin_; }
  int64_t cout() const { return cout_; }
  int kernel() const { return k_; }
  int stride() const { return stride_; }
  bool transposed() const { return transposed_; }
  Shape out_shape(const Shape& in) const { return geometry(in).out_shape(); }
  cpu::ConvGeometry geometry(const Shape& in) const;

  // He (Kaiming) normal initialisation for LeakyReLU networks: std = sqrt(2 / fan_in), bias 0.
  void init_he(Rng& rng);
  // Moves the parameters and gradients to `device` (values kept).
  void to(Device device);
  Device device() const { return weight.device(); }
  void forward(const Tensor& x, Tensor& y) const;
  // y = LeakyReLU(conv(x)) in one pass (regular convolutions; see cpu::conv3d_forward_leaky).
  void forward_leaky(const Tensor& x, Tensor& y, float slope) const;
  // dx may be null (first layer: no input gradient needed). backward_weights then backward_data.
  void backward(const Tensor& dy, const Tensor& x, Tensor* dx);
  // The two halves, for callers that free x between them (its buffer can then hold dx): assigns
  // dweight and dbias from dy and the forward input x; dx (x's shape) from dy.
  void backward_weights(const Tensor& dy, const Tensor& x);
  void backward_data(const Tensor& dy, Tensor& dx);

  bool use_reference = false;  // naive kernels (tests; CPU only)

 private:
  int64_t cin_, cout_;
  int k_, stride_;
  bool transposed_;
};

}  // namespace medseg::nn
