#include "pipelines/data_parallel.hpp"

#include <cstring>
#include <exception>
#include <string>

#include "nn/device_ops.hpp"

namespace medseg::pipelines {

namespace {
// The step's scalars in double, in their own (tiny) allreduce: a float sum of losses would round.
// `bad` stays a count of ranks; the others become means.
void average_scalars(const dist::Comm& comm, StepScalars& scalars) {
  double s[4] = {scalars.bad, scalars.loss, scalars.ce, scalars.soft_dice};
  comm.allreduce_sum(s, 4);
  const double inv = 1.0 / comm.size();
  scalars = {s[0], s[1] * inv, s[2] * inv, s[3] * inv};
}
}  // namespace

void average_gradients(const dist::Comm& comm, const std::vector<nn::NamedTensor>& params,
                       StepScalars& scalars, std::vector<float>& scratch, dist::NcclComm* nccl) {
  if (comm.size() == 1) return;
  if (nccl && !params.empty() && params.front().grad->device() == Device::CUDA) {
    void* stream = nn::cuda_stream();
    nccl->group_start();
    for (const auto& p : params)
      nccl->allreduce_average(p.grad->data(), static_cast<size_t>(p.grad->numel()), stream);
    nccl->group_end();
    average_scalars(comm, scalars);
    return;
  }
  size_t n = 0;
  for (const auto& p : params) n += static_cast<size_t>(p.grad->numel());
  scratch.resize(n);
  size_t off = 0;
  for (const auto& p : params) {
    p.grad->read_to(scratch.data() + off);  // any device: gradients of a GPU network come to the host
    off += static_cast<size_t>(p.grad->numel());
  }
  comm.allreduce_sum(scratch.data(), n);
  average_scalars(comm, scalars);
  const float inv = 1.0f / static_cast<float>(comm.size());
  for (auto& v : scratch) v *= inv;
  off = 0;
  for (const auto& p : params) {
    p.grad->assign_from(scratch.data() + off);
    off += static_cast<size_t>(p.grad->numel());
  }
}

void average_tensors(const dist::Comm& comm, const std::vector<nn::NamedTensor>& tensors) {
  if (comm.size() == 1) return;
  const float inv = 1.0f / static_cast<float>(comm.size());
  for (const auto& t : tensors) {
    auto v = t.value->to_vector();
    comm.allreduce_sum(v.data(), v.size());
    for (auto& x : v) x *= inv;
    t.value->assign_from(v.data());
  }
}

void broadcast_tensors(const dist::Comm& comm, const std::vector<nn::NamedTensor>& tensors) {
  if (comm.size() == 1) return;
  for (const auto& t : tensors) {
    auto v = t.value->to_vector();
    comm.broadcast(v.data(), sizeof(float) * v.size(), 0);
    t.value->assign_from(v.data());
  }
}

std::vector<float> gather_tensors(const dist::Comm& comm, const std::vector<nn::NamedTensor>& tensors) {
  size_t n = 0;
  for (const auto& t : tensors) n += static_cast<size_t>(t.value->numel());
  // Small (running statistics: two floats per channel and layer): a sum of zero-padded slots.
  std::vector<float> all(n * static_cast<size_t>(comm.size()), 0.0f);
  size_t off = n * static_cast<size_t>(comm.rank());
  for (const auto& t : tensors) {
    t.value->read_to(all.data() + off);
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
  for (const auto& t : tensors) {
    const auto v = t.value->to_vector();
    h = fnv1a(v.data(), sizeof(float) * v.size(), h);
  }
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
