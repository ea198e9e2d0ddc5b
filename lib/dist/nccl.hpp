// NCCL for the GPU path of data-parallel training: gradients averaged on the device, on the training
// stream, with no trip through host memory.
//
// Compiled when CMake finds nccl.h next to the CUDA toolkit and MPI is built (MEDSEG_HAVE_NCCL);
// the library itself (libnccl.so.2) is loaded at run time with dlopen, so that the same binary runs
// on machines without NCCL (then the GPU gradients are averaged through MPI on the host, with a
// warning). The communicator is bootstrapped over MPI: rank 0 makes the unique id, MPI broadcasts it,
// every rank joins on its current CUDA device (one GPU per rank).
#pragma once
#include <cstddef>
#include <string>

#include "dist/comm.hpp"

namespace medseg::dist {

// Whether this build has the NCCL path.
bool nccl_compiled();
// Whether libnccl.so.2 loads in this process (and has the symbols used here); `why` says why not.
bool nccl_loadable(std::string* why = nullptr);
// "2.28.3" (the loaded library), or why it is not available.
std::string nccl_version();

class NcclComm {
 public:
  // Collective over every rank of `comm` (all must call it, each with its own CUDA device current).
  // Throws IoError with NCCL's message when the communicator cannot be created.
  explicit NcclComm(const Comm& comm);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  // Average over the ranks of n floats in device memory, in place, enqueued on `stream` (a
  // cudaStream_t). Between group_start() and group_end() several calls become one fused launch.
  void allreduce_average(float* device_data, size_t n, void* stream);
  void group_start();
  void group_end();

 private:
  void* comm_ = nullptr;  // ncclComm_t
};

}  // namespace medseg::dist
