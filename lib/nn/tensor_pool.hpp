// Reusable activation and gradient buffers of a network, keyed by shape.
//
// acquire() hands out a free buffer of the requested shape (making one when every buffer of that
// shape is in use); release() gives it back. Buffers live as long as the pool, so a training loop
// that repeats the same sequence of acquires and releases allocates only during its first step (no
// cudaMalloc afterwards on the GPU, no page faults afterwards on the host), and the memory the pool
// holds is, per shape, the largest number of its buffers that were live at once. Which free buffer
// an acquire returns depends only on the sequence of calls, so runs are reproducible.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>

#include "core/tensor.hpp"

namespace medseg::nn {

class TensorPool {
 public:
  explicit TensorPool(Device device = Device::CPU) : device_(device) {}
  TensorPool(const TensorPool&) = delete;
  TensorPool& operator=(const TensorPool&) = delete;

  Device device() const { return device_; }
  // Drops every buffer and allocates on `device` from now on.
  void set_device(Device device);
  // A buffer of shape s, uninitialised, not in use by anyone else until released. The reference
  // stays valid until clear() or the pool's destruction.
  Tensor& acquire(const Shape& s);
  // Gives back a buffer acquire() returned; throws (an internal error) for anything else or for a
  // buffer already free.
  void release(const Tensor& t);
  // Every buffer free again (a new forward pass abandons the previous one's tape).
  void release_all();
  // Drops every buffer (the memory goes back to the allocator).
  void clear();

  size_t bytes() const;  // all buffers, in use or free
  size_t peak_bytes_in_use() const { return peak_; }  // since construction or clear()

 private:
  struct Slot {
    Tensor t;
    bool busy = false;
  };
  using Key = std::array<int64_t, 5>;
  static Key key_of(const Shape& s) { return {s.n, s.d, s.h, s.w, s.c}; }
  Slot* find(const Tensor& t);

  Device device_;
  std::map<Key, std::deque<Slot>> slots_;  // deque: stable references
  size_t in_use_ = 0, peak_ = 0;
};

}  // namespace medseg::nn
