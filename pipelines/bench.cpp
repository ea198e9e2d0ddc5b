#include "pipelines/bench.hpp"

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.hpp"
#include "core/log.hpp"
#include "core/rng.hpp"
#include "core/threads.hpp"
#include "kernels/cpu/conv.hpp"
#include "nn/deep_supervision.hpp"
#include "nn/device_ops.hpp"
#include "nn/optimizer.hpp"
#include "nn/unet.hpp"
#include "pipelines/device.hpp"

namespace medseg::pipelines {

namespace {
using json = nlohmann::json;
namespace fs = std::filesystem;

double peak_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;
}

std::string capture(const std::string& cmd, int* status) {
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) {
    *status = -1;
    return {};
  }
  std::string out;
  char buf[4096];
  while (fgets(buf, sizeof buf, p)) out += buf;
  *status = ::pclose(p);
  return out;
}

const char* peer_norm(const std::string& n) {
  return n == "batchrenorm" ? "brn" : n == "batchnorm" ? "bn" : "in";
}

fs::path find_peer(const BenchConfig& cfg) {
  if (!cfg.peer_script.empty()) return cfg.peer_script;
  fs::path dir = fs::current_path();
  for (int i = 0; i < 4; ++i) {
    const fs::path p = dir / ".." / "shared" / "peers" / "torch_unet_peer.py";
    if (fs::exists(p)) return fs::weakly_canonical(p);
    if (!dir.has_parent_path() || dir == dir.parent_path()) break;
    dir = dir.parent_path();
  }
  return {};
}

// One configuration, timed in this process.
json bench_one(const BenchConfig& cfg, const std::string& norm, int batch, int patch, bool infer) {
  set_num_threads(cfg.threads);
  nn::UNetConfig u;
  u.in_channels = 1;
  u.num_classes = 3;
  u.levels = cfg.levels;
  u.base_filters = cfg.base_filters;
  u.norm.kind = nn::parse_norm_kind(norm);
  u.norm.r_max = 3;
  u.norm.d_max = 5;
  nn::UNet net(u, 0);
  const DeviceChoice dev = resolve_device(cfg.device, true);
  place_network(dev, net, cfg.tf32);
  Tensor x(Shape{batch, patch, patch, patch, 1});
  Rng rng(1);
  for (int64_t i = 0; i < x.numel(); ++i) x.data()[i] = static_cast<float>(rng.normal());
  if (dev.cuda) x = x.to(Device::CUDA);  // the batch already on the device, as in the peer
  std::vector<uint16_t> labels(static_cast<size_t>(x.shape().per_channel()));
  for (auto& l : labels) l = static_cast<uint16_t>(rng.below(3));
  nn::Optimizer opt(nn::OptimizerConfig{}, net.parameters());
  Tensor dlogits, logits;
  nn::SupervisionBuffers sup;
  if (infer) net.fold_norms();
  std::vector<double> times;
  for (int i = 0; i < cfg.warmup + cfg.steps; ++i) {
    nn::synchronize_device();
    const auto t = std::chrono::steady_clock::now();
    if (infer) {
      net.forward_infer(x, logits);
    } else {
      const Tensor& lg = net.forward_train(x);
      nn::supervised_loss(net, lg, labels.data(), dlogits, sup);
      net.backward(dlogits);
      opt.step(1e-2);
    }
    nn::synchronize_device();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    if (i >= cfg.warmup) times.push_back(s);
  }
  std::sort(times.begin(), times.end());
  const double med = times[times.size() / 2];
  const double voxels = static_cast<double>(batch) * patch * patch * patch;
  json r = {{"name", std::string(infer ? "infer" : "train") + "_" + norm + "_b" + std::to_string(batch) +
                       "_p" + std::to_string(patch) + (dev.cuda ? "_cuda" : "")},
          {"mode", infer ? "infer" : "train"},
          {"device", dev.cuda ? "cuda" : "cpu"},
          {"norm", norm},
          {"batch", batch},
          {"patch", patch},
          {"threads", cfg.threads},
          {"median_s", med},
          {"voxels_per_s", voxels / med},
          {"peak_rss_mb", peak_rss_mb()},
          // The network's activation and gradient buffers at their peak (the rest of the device
          // peak is parameters, optimizer state, loss buffers and the cuDNN workspace).
          {"activation_peak_mb", static_cast<double>(net.peak_activation_bytes()) / (1 << 20)},
          // What the network's buffer pool holds (each shape at its own largest live count): this,
          // not the peak above, is what the device allocator counts as in use.
          {"activation_held_mb", static_cast<double>(net.activation_bytes()) / (1 << 20)},
          {"isa", cpu::onednn_isa()}};
  if (dev.cuda) {
    r["gpu"] = nn::cuda_device_name();
    r["peak_gpu_mb"] = static_cast<double>(nn::cuda_peak_bytes()) / (1 << 20);
    r["tf32"] = cfg.tf32;
  }
  return r;
}

}  // namespace

int run_bench(const BenchConfig& cfg, const std::string& self_exe) {
  if (cfg.single) {
    const bool infer = !cfg.train;
    std::cout << bench_one(cfg, cfg.norms.at(0), cfg.batches.at(0), cfg.patches.at(0), infer).dump()
              << "\n";
    return 0;
  }
  const fs::path peer = cfg.peer ? find_peer(cfg) : fs::path();
  const std::string python = !cfg.python.empty()                  ? cfg.python
                             : fs::exists("/usr/bin/python3") ? std::string("/usr/bin/python3")
                                                              : std::string("python3");
  bool have_torch = false;
  if (!peer.empty()) {
    int st = 0;
    capture("'" + python + "' -c 'import torch' 2>/dev/null", &st);
    have_torch = st == 0;
  }
  if (cfg.peer && (peer.empty() || !have_torch))
    log_warn("PyTorch peer missing (", peer.empty() ? "torch_unet_peer.py not found" : "python3-torch not installed",
             "): ours only; install with scripts/install-deps.sh --with-torch");
  if (!cfg.json)
    std::cout << std::left << std::setw(34) << "name" << std::right << std::setw(10) << "s/step"
              << std::setw(14) << "voxels/s" << std::setw(10) << "RSS MB" << std::setw(10) << "peer s"
              << std::setw(10) << "peer MB" << std::setw(9) << "speedup" << "\n";
  for (const int patch : cfg.patches)
    for (const int batch : cfg.batches)
      for (const bool infer : {false, true}) {
        if ((infer && !cfg.infer) || (!infer && !cfg.train)) continue;
        for (const auto& norm : cfg.norms) {
          if (infer && norm != cfg.norms.front()) continue;  // inference: folded, norm-independent
          std::ostringstream cmd;
          cmd << "'" << self_exe << "' bench --single --threads " << cfg.threads << " --norm " << norm
              << " --batch " << batch << " --patch " << patch << " --steps " << cfg.steps
              << " --levels " << cfg.levels << " --base-filters " << cfg.base_filters
              << " --device " << cfg.device << (cfg.tf32 ? "" : " --no-tf32")
              << (infer ? " --infer-only" : " --train-only");
          int st = 0;
          const std::string out = capture(cmd.str(), &st);
          json r;
          try {
            r = json::parse(out.substr(out.find('{')));
          } catch (const std::exception&) {
            throw Error("benchmark child failed: " + cmd.str() + "\n" + out);
          }
          if (have_torch) {
            std::ostringstream pc;
            const bool cuda = r.value("device", "cpu") == "cuda";
            pc << "'" << python << "' '" << peer.string() << "' --norm " << peer_norm(norm) << " --batch "
               << batch << " --patch " << patch << " --base " << cfg.base_filters << " --levels "
               << cfg.levels << " --threads " << cfg.threads << " --steps " << std::max(3, cfg.steps)
               << (cuda ? " --device cuda" : "") << (infer ? " --infer" : "") << " 2>/dev/null";
            const std::string po = capture(pc.str(), &st);
            try {
              const json p = json::parse(po.substr(po.find('{')));
              r["peer_median_s"] = p["median_s"];
              r["peer_peak_rss_mb"] = p["peak_rss_mb"];
              r["peer"] = p["peer"];
              if (p.contains("peak_gpu_mb")) r["peer_peak_gpu_mb"] = p["peak_gpu_mb"];
              r["speedup"] = p["median_s"].get<double>() / r["median_s"].get<double>();
            } catch (const std::exception&) {
              r["peer_error"] = po.substr(0, 200);
            }
          }
          if (cfg.json) {
            std::cout << r.dump() << "\n" << std::flush;
          } else {
            std::cout << std::left << std::setw(34) << r["name"].get<std::string>() << std::right
                      << std::fixed << std::setprecision(3) << std::setw(10) << r["median_s"].get<double>()
                      << std::setprecision(0) << std::setw(14) << r["voxels_per_s"].get<double>()
                      << std::setw(10) << r["peak_rss_mb"].get<double>();
            if (r.contains("speedup"))
              std::cout << std::setprecision(3) << std::setw(10) << r["peer_median_s"].get<double>()
                        << std::setprecision(0) << std::setw(10) << r["peer_peak_rss_mb"].get<double>()
                        << std::setprecision(2) << std::setw(8) << r["speedup"].get<double>() << "x";
            std::cout << "\n" << std::flush;
          }
        }
      }
  return 0;
}

}  // namespace medseg::pipelines
