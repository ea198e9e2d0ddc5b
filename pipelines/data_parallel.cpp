#include "pipelines/data_parallel.hpp"

#include <cstring>
#include <exception>
#include <string>

namespace medseg::pipelines {

void average_gradients(const dist::Comm& comm, const std::vector<nn::NamedTensor>& params,
                       StepScalars& scalars, std::vector<float>& scratch) {
  if (comm.size() == 1) return;
  size_t n = 0;
  for (const auto& p : params) n += static_cast<size_t>(p.grad->numel());
  scratch.resize(n);
  size_t off = 0;
  for (const auto& p : params) {
    std::memcpy(scratch.data() + off, p.grad->data(), sizeof(float) * static_cast<size_t>(p.grad->numel()));
    off += static_cast<size_t>(p.grad->numel());
  }
  comm.allreduce_sum(scratch.data(), n);
  // The scalars in double, in a second (tiny) allreduce: a float sum of losses would round.
  double s[4] = {scalars.bad, scalars.loss, scalars.ce, scalars.soft_dice};
  comm.allreduce_sum(s, 4);
  const float inv = 1.0f / static_cast<float>(comm.size());
  off = 0;
  for (const auto& p : params) {
    float* g = p.grad->data();
    const int64_t m = p.grad->numel();
    for (int64_t i = 0; i < m; ++i) g[i] = scratch[off + static_cast<size_t>(i)] * inv;
    off += static_cast<size_t>(m);
  }
  const double invd = 1.0 / comm.size();
  scalars = {s[0], s[1] * invd, s[2] * invd, s[3] * invd};
}

void average_tensors(const dist::Comm& comm, const std::vector<nn::NamedTensor>& tensors) {
  if (comm.size() == 1) return;
  const float inv = 1.0f / static_cast<float>(comm.size());
  for (const auto& t : tensors) {
    comm.allreduce_sum(t.value->data(), static_cast<size_t>(t.value->numel()));
    float* v = t.value->data();
    for (int64_t i = 0; i < t.value->numel(); ++i) v[i] *= inv;
  }
}

void broadcast_tensors(const dist::Comm& comm, const std::vector<nn::NamedTensor>& tensors) {
  for (const auto& t : tensors)
    comm.broadcast(t.value->data(), sizeof(float) * static_cast<size_t>(t.value->numel()), 0);
}

std::vector<float> gather_tensors(const dist::Comm& comm, const std::vector<nn::NamedTensor>& tensors) {
  size_t n = 0;
  for (const auto& t : tensors) n += static_cast<size_t>(t.value->numel());
  // Small (running statistics: two floats per channel and layer): a sum of zero-padded slots.
  std::vector<float> all(n * static_cast<size_t>(comm.size()), 0.0f);
  size_t off = n * static_cast<size_t>(comm.rank());
  for (const auto& t : tensors) {
    std::memcpy(all.data() + off, t.value->data(), sizeof(float) * static_cast<size_t>(t.value->numel()));
    off += static_cast<size_t>(t.value->numel());
  }
  comm.allreduce_sum(all.data(), all.size());
  if (!comm.root()) all.clear();
  return all;
}

uint64_t fnv1a(const void* data, size_t bytes, uint64_t h) {
  const auto* b = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < bytes; ++i) h = (h ^ b[i]) * 1099511628211ULL;
  return h;
}

uint64_t tensors_checksum(const std::vector<nn::NamedTensor>& tensors) {
  uint64_t h = fnv1a(nullptr, 0);
  for (const auto& t : tensors) h = fnv1a(t.value->data(), sizeof(float) * static_cast<size_t>(t.value->numel()), h);
  return h;
}

void collectively(const dist::Comm& comm, const std::function<void()>& phase) {
  if (comm.size() == 1) {
    phase();
    return;
  }
  std::string error;  // first character: '2' for invalid input, '1' for a runtime failure
  try {
    phase();
  } catch (const ArgumentError& e) {
    error = std::string("2") + e.what();
  } catch (const std::exception& e) {
    error = std::string("1") + e.what();
  }
  const auto f = comm.first_failure(error);
  if (f.rank < 0) return;
  throw dist::GroupError("rank " + std::to_string(f.rank) + ": " + f.message.substr(1),
                         f.message[0] == '2' ? 2 : 1);
}

}  // namespace medseg::pipelines
