// Resolving --device auto|cpu|cuda[:N] for the commands that compute.
#pragma once
#include <string>

#include "nn/unet.hpp"

namespace medseg::pipelines {

struct DeviceChoice {
  bool cuda = false;
  int index = 0;
  std::string description;  // what was chosen and why, printed once
};

// "cpu": the CPU. "cuda[:N]": a usable CUDA device or CudaError with a one-line reason (no driver, no
// device, no cuDNN, backend not compiled in). "auto": CUDA when usable, else the CPU.
// `network_on_cuda` tells whether the caller can run its network on CUDA; when it cannot, "auto"
// falls back to the CPU with a note and "cuda" is an ArgumentError naming the missing piece.
// `default_index`: the device that "cuda" and "auto" mean (a rank's local rank under mpirun).
DeviceChoice resolve_device(const std::string& spec, bool network_on_cuda, int default_index = 0);
// Moves `net` to the chosen device (creating the process's CUDA context first); no-op for the CPU.
void place_network(const DeviceChoice& choice, nn::UNet& net, bool allow_tf32);

// Build facts for `medseg info`.
std::string build_info();

}  // namespace medseg::pipelines
