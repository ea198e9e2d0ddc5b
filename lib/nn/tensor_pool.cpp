#include "nn/tensor_pool.hpp"

#include <algorithm>

#include "core/error.hpp"

namespace medseg::nn {

void TensorPool::set_device(Device device) {
  clear();
  device_ = device;
}

Tensor& TensorPool::acquire(const Shape& s) {
  MEDSEG_CHECK(s.numel() > 0, "TensorPool: an empty buffer of shape ", s);
  auto& list = slots_[key_of(s)];
  Slot* slot = nullptr;
  for (auto& sl : list)
    if (!sl.busy) {
      slot = &sl;
      break;
    }
  if (!slot) {
    list.push_back(Slot{Tensor(s, device_), false});
    slot = &list.back();
  }
  slot->busy = true;
  in_use_ += slot->t.bytes();
  peak_ = std::max(peak_, in_use_);
  return slot->t;
}

TensorPool::Slot* TensorPool::find(const Tensor& t) {
  auto it = slots_.find(key_of(t.shape()));
  if (it == slots_.end()) return nullptr;
  for (auto& sl : it->second)
    if (&sl.t == &t) return &sl;
  return nullptr;
}

void TensorPool::release(const Tensor& t) {
  Slot* slot = find(t);
  MEDSEG_CHECK(slot != nullptr, "TensorPool: releasing a tensor of shape ", t.shape(),
               " that is not one of the pool's buffers");
  MEDSEG_CHECK(slot->busy, "TensorPool: releasing a free buffer of shape ", t.shape());
  slot->busy = false;
  in_use_ -= slot->t.bytes();
}

void TensorPool::release_all() {
  for (auto& [key, list] : slots_)
    for (auto& sl : list) sl.busy = false;
  in_use_ = 0;
}

void TensorPool::clear() {
  slots_.clear();
  in_use_ = 0;
  peak_ = 0;
}

size_t TensorPool::bytes() const {
  size_t total = 0;
  for (const auto& [key, list] : slots_)
    for (const auto& sl : list) total += sl.t.bytes();
  return total;
}

}  // namespace medseg::nn
