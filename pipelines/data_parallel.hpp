// Synchronous data-parallel training over a dist::Comm (MPI across processes; a group of one otherwise).
//
// Every rank holds the whole model and samples its own patches; after each backward the gradients are
// averaged across ranks in one allreduce, so the optimizer sees the same averaged gradient everywhere
// and the weights, which start identical (broadcast from rank 0), stay identical. Batch
// Renormalization statistics stay per rank during training - each rank normalizes with its own batch
// of 1-2 volumes, which is what Batch Renormalization is for - and the running statistics are averaged
// before validation and checkpoints, so that the model written is one model.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "dist/comm.hpp"
#include "dist/nccl.hpp"
#include "nn/unet.hpp"

namespace medseg::pipelines {

// Scalars that travel with the gradients (summed across ranks, then divided by the rank count).
struct StepScalars {
  double bad = 0;  // 1 when this rank's loss was not finite (after the sum: the number of such ranks)
  double loss = 0, ce = 0, soft_dice = 0;
};

// Averages every parameter gradient and the scalars across ranks (one allreduce). After it, `bad` is
// the number of ranks whose loss was not finite; the other scalars are means over the ranks.
// With `nccl` (gradients on the GPU): one fused group of ncclAllReduce(avg) on the training stream,
// the gradients never leave the device; otherwise they go through host memory and MPI.
void average_gradients(const dist::Comm& comm, const std::vector<nn::NamedTensor>& params,
                       StepScalars& scalars, std::vector<float>& scratch,
                       dist::NcclComm* nccl = nullptr);
// Averages tensors (running statistics) across ranks in place.
void average_tensors(const dist::Comm& comm, const std::vector<nn::NamedTensor>& tensors);
// Copies rank 0's tensors to every rank.
void broadcast_tensors(const dist::Comm& comm, const std::vector<nn::NamedTensor>& tensors);
// Every rank's values of the tensors, concatenated in order, rank after rank (size x total floats),
// on rank 0; the other ranks get an empty vector. Collective.
std::vector<float> gather_tensors(const dist::Comm& comm, const std::vector<nn::NamedTensor>& tensors);
// FNV-1a over bytes, continuing from h (its offset basis by default).
uint64_t fnv1a(const void* data, size_t bytes, uint64_t h = 1469598103934665603ULL);
// FNV-1a over the bytes of the tensors: equal on all ranks when their weights are identical.
uint64_t tensors_checksum(const std::vector<nn::NamedTensor>& tensors);

// Runs `phase` on every rank. One process: exceptions pass through unchanged. Several: when `phase`
// throws on any rank, every rank throws a dist::GroupError with the message of the lowest failing
// rank ("rank R: ...") and code 2 for an ArgumentError, 1 otherwise, instead of one rank leaving the
// others waiting in the next collective.
void collectively(const dist::Comm& comm, const std::function<void()>& phase);

}  // namespace medseg::pipelines
