// Resolving --device auto|cpu|cuda[:N] for the commands that compute.
#pragma once
#include <string>

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
DeviceChoice resolve_device(const std::string& spec, bool network_on_cuda);

// Build facts for `medseg info`.
std::string build_info();

}  // namespace medseg::pipelines
