// Tensor: 5-D float32, channels-last (N, D, H, W, C). The one activation layout of medseg.
// Storage is RAII and move-only; it lives on the host (64-byte aligned) or on a CUDA device through an
// allocator that the CUDA backend registers (lib/core never includes CUDA headers).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace medseg {

struct Shape {
  int64_t n = 0, d = 0, h = 0, w = 0, c = 0;
  int64_t numel() const { return n * d * h * w * c; }
  int64_t spatial() const { return d * h * w; }
  // values per channel over the batch: N*D*H*W
  int64_t per_channel() const { return n * d * h * w; }
  bool operator==(const Shape& o) const = default;
  std::string str() const;
};
std::ostream& operator<<(std::ostream& os, const Shape& s);

enum class Device { CPU, CUDA };
const char* device_name(Device d);

// Hooks the CUDA backend installs so that Tensor can own device memory.
struct DeviceAllocator {
  std::function<void*(size_t bytes)> allocate;
  std::function<void(void* ptr, size_t bytes)> deallocate;
  std::function<void(void* dst, const void* src, size_t bytes, int kind)> copy;  // kind: 0 h2d 1 d2h 2 d2d
  std::function<void(void* dst, size_t bytes)> zero;
};
void register_device_allocator(DeviceAllocator allocator);
bool device_allocator_registered();

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(Shape shape, Device device = Device::CPU);
  // A 1-D parameter vector is stored as shape (1,1,1,1,C); weights use (n=Cout, d,h,w=k, c=Cin).
  static Tensor zeros(Shape shape, Device device = Device::CPU);
  static Tensor vector(int64_t c, Device device = Device::CPU) { return zeros(Shape{1, 1, 1, 1, c}, device); }
  static Tensor from(Shape shape, const std::vector<float>& values);

  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;

  Tensor clone() const;
  Tensor to(Device device) const;
  void copy_from(const Tensor& other);  // same numel; any devices
  void fill(float v);                   // CPU only
  void zero();

  const Shape& shape() const { return shape_; }
  int64_t numel() const { return shape_.numel(); }
  size_t bytes() const { return static_cast<size_t>(numel()) * sizeof(float); }
  Device device() const { return device_; }
  bool empty() const { return numel() == 0; }
  bool defined() const { return static_cast<bool>(storage_); }
  float* data() { return static_cast<float*>(storage_.get()); }
  const float* data() const { return static_cast<const float*>(storage_.get()); }
  float& at(int64_t n, int64_t d, int64_t h, int64_t w, int64_t c);
  float at(int64_t n, int64_t d, int64_t h, int64_t w, int64_t c) const;
  // Reinterprets the same storage with a new shape of equal numel.
  void reshape(Shape shape);
  std::vector<float> to_vector() const;
  // numel() floats between this tensor (on any device) and host memory.
  void read_to(float* host) const;
  void assign_from(const float* host);

 private:
  Shape shape_{};
  Device device_ = Device::CPU;
  std::shared_ptr<void> storage_;  // unique owner in practice; shared_ptr for the type-erased deleter
};

// Throws ArgumentError naming both shapes when they differ.
void check_same_shape(const Shape& a, const Shape& b, const char* what);

}  // namespace medseg
