#include "pipelines/device.hpp"

#include <sstream>

#include "core/error.hpp"
#include "core/log.hpp"
#include "core/threads.hpp"
#include "dist/comm.hpp"
#include "dist/nccl.hpp"
#include "kernels/cpu/conv.hpp"
#include "nn/device_ops.hpp"
#ifdef MEDSEG_HAVE_CUDA
#include "kernels/cuda/device.hpp"
#endif

namespace medseg::pipelines {

namespace {
bool cuda_ok(std::string* why) {
#ifdef MEDSEG_HAVE_CUDA
  return cuda::cuda_usable(why);
#else
  if (why) *why = "medseg was built without the CUDA backend (MEDSEG_CUDA=OFF or nvcc/cuDNN missing)";
  return false;
#endif
}
}  // namespace

DeviceChoice resolve_device(const std::string& spec, bool network_on_cuda, int default_index) {
  DeviceChoice c;
  if (spec == "cpu") {
    c.description = "device: cpu (" + std::to_string(num_threads()) + " threads, oneDNN " +
                    cpu::onednn_isa() + ")";
    return c;
  }
  int index = default_index;
  const bool want_cuda = spec.rfind("cuda", 0) == 0;
  if (!want_cuda && spec != "auto")
    throw ArgumentError("unknown device '" + spec + "' (expected auto, cpu, cuda or cuda:N)");
  if (want_cuda && spec.size() > 4) {
    if (spec[4] != ':') throw ArgumentError("unknown device '" + spec + "' (expected cuda:N)");
    try {
      index = std::stoi(spec.substr(5));
    } catch (...) {
      throw ArgumentError("bad CUDA device index in '" + spec + "'");
    }
  }
  std::string why;
  const bool usable = cuda_ok(&why);
  if (want_cuda) {
    if (!usable) throw CudaError("--device " + spec + ": " + why);
    if (!network_on_cuda)
      throw ArgumentError("--device " + spec +
                          ": this command's network path runs on the CPU in this version (the CUDA "
                          "kernels are tested per op; see docs/gpu.md); use --device cpu");
    c.cuda = true;
    c.index = index;
    c.description = "device: cuda:" + std::to_string(index);
    return c;
  }
  // auto
  if (usable && network_on_cuda) {
    c.cuda = true;
    c.index = index;
    c.description = "device: cuda:" + std::to_string(index) + " (auto)";
    return c;
  }
  c.description = "device: cpu (auto; " +
                  (usable ? std::string("a CUDA device is present but this command runs on the CPU")
                          : why) +
                  "), " + std::to_string(num_threads()) + " threads, oneDNN " + cpu::onednn_isa();
  return c;
}

void place_network(const DeviceChoice& choice, nn::UNet& net, bool allow_tf32) {
  if (!choice.cuda) return;
  nn::use_cuda_device(choice.index, allow_tf32);
  net.to(Device::CUDA);
  static bool warned = false;
  if (!warned) {
    // Remove once gpu-bundle/run-gpu-checks.sh has passed on a GPU (docs/gpu.md).
    log_warn("the CUDA path of this version is compile-checked but has not yet run on a GPU in testing "
             "(docs/gpu.md); --device cpu is the validated path");
    warned = true;
  }
}

std::string build_info() {
  std::ostringstream os;
  os << "medseg " << MEDSEG_VERSION << "\n";
  os << "oneDNN: " << cpu::onednn_version() << ", CPU ISA " << cpu::onednn_isa() << "\n";
  os << "threads: " << num_threads() << "\n";
  os << "multi-process training: "
     << (dist::built_with_mpi() ? "MPI (" + dist::mpi_version() + "; mpirun -np P medseg train ...)"
                                : std::string("not built with MPI"))
     << "\n";
  if (dist::nccl_compiled())
    os << "NCCL (multi-GPU gradients): " << dist::nccl_version() << "\n";
#ifdef MEDSEG_HAVE_CUDA
  os << "CUDA backend: compiled in (cuDNN " << cuda::cudnn_version() << ")\n";
  std::string why;
  if (cuda::cuda_usable(&why))
    os << "CUDA devices:\n" << cuda::describe_devices();
  else
    os << "CUDA devices: none usable (" << why << ")\n";
#else
  os << "CUDA backend: not compiled in\n";
#endif
  return os.str();
}

}  // namespace medseg::pipelines
