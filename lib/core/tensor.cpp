#include "core/tensor.hpp"

#include <cstdlib>
#include <cstring>
#include <ostream>
#include <sstream>

#include "core/error.hpp"

namespace medseg {
namespace {
DeviceAllocator& device_alloc() {
  static DeviceAllocator a;
  return a;
}

std::shared_ptr<void> allocate(size_t bytes, Device device) {
  if (bytes == 0) bytes = 64;
  if (device == Device::CPU) {
    size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded);
    if (!p) throw Error("out of host memory allocating " + std::to_string(bytes) + " bytes");
    return std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  }
  auto& a = device_alloc();
  if (!a.allocate) throw CudaError("no CUDA backend is available to allocate device memory");
  void* p = a.allocate(bytes);
  return std::shared_ptr<void>(p, [bytes](void* q) { device_alloc().deallocate(q, bytes); });
}
}  // namespace

std::string Shape::str() const {
  std::ostringstream os;
  os << *this;
  return os.str();
}
std::ostream& operator<<(std::ostream& os, const Shape& s) {
  return os << "(" << s.n << ", " << s.d << ", " << s.h << ", " << s.w << ", " << s.c << ")";
}
const char* device_name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }

void register_device_allocator(DeviceAllocator allocator) { device_alloc() = std::move(allocator); }
bool device_allocator_registered() { return static_cast<bool>(device_alloc().allocate); }

Tensor::Tensor(Shape shape, Device device) : shape_(shape), device_(device) {
  MEDSEG_CHECK(shape.n >= 0 && shape.d >= 0 && shape.h >= 0 && shape.w >= 0 && shape.c >= 0,
               "negative dimension in shape ", shape);
  storage_ = allocate(bytes(), device);
}

Tensor Tensor::zeros(Shape shape, Device device) {
  Tensor t(shape, device);
  t.zero();
  return t;
}

Tensor Tensor::from(Shape shape, const std::vector<float>& values) {
  MEDSEG_CHECK(static_cast<int64_t>(values.size()) == shape.numel(), "shape ", shape, " needs ",
               shape.numel(), " values, got ", values.size());
  Tensor t(shape);
  if (!values.empty()) std::memcpy(t.data(), values.data(), t.bytes());
  return t;
}

void Tensor::zero() {
  if (bytes() == 0) return;
  if (device_ == Device::CPU)
    std::memset(data(), 0, bytes());
  else
    device_alloc().zero(data(), bytes());
}

void Tensor::fill(float v) {
  MEDSEG_CHECK(device_ == Device::CPU, "fill() on a device tensor");
  float* p = data();
  for (int64_t i = 0; i < numel(); ++i) p[i] = v;
}

void Tensor::copy_from(const Tensor& other) {
  MEDSEG_CHECK(other.numel() == numel(), "copy between ", other.shape(), " and ", shape());
  if (bytes() == 0) return;
  if (device_ == Device::CPU && other.device_ == Device::CPU) {
    std::memcpy(data(), other.data(), bytes());
    return;
  }
  int kind = other.device_ == Device::CPU ? 0 : (device_ == Device::CPU ? 1 : 2);
  device_alloc().copy(data(), other.data(), bytes(), kind);
}

Tensor Tensor::clone() const { return to(device_); }

Tensor Tensor::to(Device device) const {
  Tensor t(shape_, device);
  t.copy_from(*this);
  return t;
}

float& Tensor::at(int64_t n, int64_t d, int64_t h, int64_t w, int64_t c) {
  return data()[(((n * shape_.d + d) * shape_.h + h) * shape_.w + w) * shape_.c + c];
}
float Tensor::at(int64_t n, int64_t d, int64_t h, int64_t w, int64_t c) const {
  return data()[(((n * shape_.d + d) * shape_.h + h) * shape_.w + w) * shape_.c + c];
}

void Tensor::reshape(Shape shape) {
  MEDSEG_CHECK(shape.numel() == numel(), "reshape ", shape_, " to ", shape);
  shape_ = shape;
}

std::vector<float> Tensor::to_vector() const {
  std::vector<float> v(static_cast<size_t>(numel()));
  if (v.empty()) return v;
  if (device_ == Device::CPU)
    std::memcpy(v.data(), data(), bytes());
  else
    device_alloc().copy(v.data(), data(), bytes(), 1);
  return v;
}

void Tensor::read_to(float* host) const {
  if (bytes() == 0) return;
  if (device_ == Device::CPU)
    std::memcpy(host, data(), bytes());
  else
    device_alloc().copy(host, data(), bytes(), 1);
}

void Tensor::assign_from(const float* host) {
  if (bytes() == 0) return;
  if (device_ == Device::CPU)
    std::memcpy(data(), host, bytes());
  else
    device_alloc().copy(data(), host, bytes(), 0);
}

void check_same_shape(const Shape& a, const Shape& b, const char* what) {
  if (!(a == b)) {
    std::ostringstream os;
    os << what << ": shapes differ: " << a << " vs " << b;
    throw ArgumentError(os.str());
  }
}

}  // namespace medseg
