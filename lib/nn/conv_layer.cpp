#include "nn/conv_layer.hpp"

#include <cmath>

#include "core/error.hpp"
#include "kernels/cpu/ops.hpp"
#include "nn/device_ops.hpp"
#ifdef MEDSEG_HAVE_CUDA
#include "kernels/cuda/conv.hpp"
#include "nn/device_ops_cuda.hpp"
#endif

namespace medseg::nn {

ConvLayer::ConvLayer(int64_t cin, int64_t cout, int k, int stride, bool transposed)
    : cin_(cin), cout_(cout), k_(k), stride_(stride), transposed_(transposed) {
  MEDSEG_CHECK(cin > 0 && cout > 0, "conv channels ", cin, " -> ", cout);
  MEDSEG_CHECK(!transposed || (k == 2 && stride == 2), "transposed conv must be k 2 stride 2, got k ",
               k, " stride ", stride);
  Shape ws = transposed ? Shape{cin, 2, 2, 2, cout} : Shape{cout, k, k, k, cin};
  weight = Tensor::zeros(ws);
  dweight = Tensor::zeros(ws);
  bias = Tensor::vector(cout);
  dbias = Tensor::vector(cout);
}

cpu::ConvGeometry ConvLayer::geometry(const Shape& in) const {
  MEDSEG_CHECK(in.c == cin_, "conv expects ", cin_, " input channels, input shape ", in);
  return transposed_ ? cpu::ConvGeometry::transpose2(in, cout_)
                     : cpu::ConvGeometry::conv(in, cout_, k_, stride_, k_ / 2);
}

void ConvLayer::init_he(Rng& rng) {
  const double fan_in = transposed_ ? static_cast<double>(cin_) : static_cast<double>(cin_) * k_ * k_ * k_;
  const double std = std::sqrt(2.0 / fan_in);
  float* w = weight.data();
  for (int64_t i = 0; i < weight.numel(); ++i) w[i] = static_cast<float>(rng.normal() * std);
  bias.zero();
}

namespace {
void check_device(const Tensor& t, Device d, const char* what) {
  MEDSEG_CHECK(t.device() == d, "conv ", what, " is on ", device_name(t.device()), ", the layer on ",
               device_name(d));
}
}  // namespace

void ConvLayer::to(Device device) {
  for (Tensor* t : {&weight, &bias, &dweight, &dbias})
    if (t->device() != device) *t = t->to(device);
}

void ConvLayer::forward(const Tensor& x, Tensor& y) const {
  const auto g = geometry(x.shape());
  check_same_shape(y.shape(), g.out_shape(), "conv output");
  check_device(x, device(), "input");
  check_device(y, device(), "output");
  if (device() == Device::CUDA) {
#ifdef MEDSEG_HAVE_CUDA
    cuda::conv3d_forward(cuda_context(), g, x.data(), weight.data(), bias.data(), y.data());
#endif
    return;
  }
  if (use_reference)
    cpu::conv3d_forward_ref(g, x.data(), weight.data(), bias.data(), y.data());
  else
    cpu::conv3d_forward(g, x.data(), weight.data(), bias.data(), y.data());
}

void ConvLayer::forward_leaky(const Tensor& x, Tensor& y, float slope) const {
  const auto g = geometry(x.shape());
  check_same_shape(y.shape(), g.out_shape(), "conv output");
  if (device() == Device::CUDA) {  // cuDNN's conv, then the activation in place
    forward(x, y);
    leaky_relu_inplace(y, slope);
    return;
  }
  if (use_reference) {
    cpu::conv3d_forward_ref(g, x.data(), weight.data(), bias.data(), y.data());
    cpu::leaky_relu_forward(y.numel(), y.data(), slope, y.data());
  } else {
    cpu::conv3d_forward_leaky(g, x.data(), weight.data(), bias.data(), y.data(), slope);
  }
}

void ConvLayer::backward_weights(const Tensor& dy, const Tensor& x) {
  const auto g = geometry(x.shape());
  check_same_shape(dy.shape(), g.out_shape(), "conv output gradient");
  check_device(dy, device(), "output gradient");
  check_device(x, device(), "input");
  if (device() == Device::CUDA) {
#ifdef MEDSEG_HAVE_CUDA
    cuda::conv3d_backward_weights(cuda_context(), g, dy.data(), x.data(), dweight.data(),
                                  dbias.data());
#endif
    return;
  }
  if (use_reference)
    cpu::conv3d_backward_weights_ref(g, dy.data(), x.data(), dweight.data(), dbias.data());
  else
    cpu::conv3d_backward_weights(g, dy.data(), x.data(), dweight.data(), dbias.data());
}

void ConvLayer::backward_data(const Tensor& dy, Tensor& dx) {
  const auto g = geometry(dx.shape());
  check_same_shape(dy.shape(), g.out_shape(), "conv output gradient");
  check_device(dy, device(), "output gradient");
  check_device(dx, device(), "input gradient");
  if (device() == Device::CUDA) {
#ifdef MEDSEG_HAVE_CUDA
    cuda::conv3d_backward_data(cuda_context(), g, dy.data(), weight.data(), dx.data());
#endif
    return;
  }
  if (use_reference)
    cpu::conv3d_backward_data_ref(g, dy.data(), weight.data(), dx.data());
  else
    cpu::conv3d_backward_data(g, dy.data(), weight.data(), dx.data());
}

void ConvLayer::backward(const Tensor& dy, const Tensor& x, Tensor* dx) {
  if (dx) check_same_shape(dx->shape(), x.shape(), "conv input gradient");
  backward_weights(dy, x);
  if (dx) backward_data(dy, *dx);
}

}  // namespace medseg::nn
