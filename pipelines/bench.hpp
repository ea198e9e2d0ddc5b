// `medseg bench`: the reference U-Net configuration of ../shared/peers/README.md (1 input channel, 3
// classes, 4 levels, 16 base filters, batch 2, patch 64^3, 2 threads), a training step with each norm
// kind and an inference pass, side by side with the PyTorch peer when Debian's python3-torch is there.
#pragma once
#include <filesystem>
#include <string>
#include <vector>

namespace medseg::pipelines {

struct BenchConfig {
  std::vector<int> patches{64};
  std::vector<int> batches{2};
  std::vector<std::string> norms{"batchrenorm", "batchnorm", "instancenorm"};
  bool infer = true, train = true;
  int base_filters = 16, levels = 4, threads = 2;
  int steps = 5, warmup = 1;
  bool json = false;
  bool peer = true;
  std::string device = "auto";  // --device: auto|cpu|cuda[:N]
  bool tf32 = true;
  std::string python;           // interpreter for the peer; empty: /usr/bin/python3, else python3
  std::filesystem::path peer_script;  // empty: ../shared/peers/torch_unet_peer.py searched upwards
  // Internal: run exactly one configuration in this process and print its JSON line (the parent runs
  // each configuration in a child so that peak RSS is per configuration).
  bool single = false;
};

int run_bench(const BenchConfig& cfg, const std::string& self_exe);

}  // namespace medseg::pipelines
