#include <unistd.h>

#include <climits>
#include <sstream>

#include "app/options.hpp"
#include "pipelines/bench.hpp"

namespace medseg::app {

namespace po = boost::program_options;

namespace {
std::vector<int> int_list(const std::string& s, const char* what) {
  std::vector<int> v;
  std::stringstream ss(s);
  std::string part;
  while (std::getline(ss, part, ',')) {
    try {
      v.push_back(std::stoi(part));
    } catch (...) {
      throw ArgumentError(std::string("--") + what + ": expected integers separated by commas, got '" + s + "'");
    }
    if (v.back() <= 0) throw ArgumentError(std::string("--") + what + ": values must be positive");
  }
  return v;
}
}  // namespace

int run_bench_cmd(const std::vector<std::string>& args) {
  po::options_description desc(
      "medseg bench [--json] [--patch 48,64,96] [--batch 1,2] [--norm ...]\n"
      "Times a U-Net training step (each norm kind) and an inference pass at the reference configuration "
      "(batch 2, 64^3, 16 base filters, 4 levels, 2 threads), each in its own process for its peak RSS, "
      "next to the PyTorch peer (../shared/peers/torch_unet_peer.py) when python3-torch is installed");
  pipelines::BenchConfig c;
  std::string patches = "64", batches = "2", norm;
  desc.add_options()
      ("json", po::bool_switch(&c.json), "one JSON object per line")
      ("patch", po::value<std::string>(&patches)->default_value("64"), "cubic patch sizes, e.g. 48,64,96")
      ("batch", po::value<std::string>(&batches)->default_value("2"), "batch sizes, e.g. 1,2")
      ("norm", po::value<std::string>(&norm), "one norm kind only (default: all three)")
      ("steps", po::value<int>(&c.steps)->default_value(c.steps), "timed steps (median reported)")
      ("levels", po::value<int>(&c.levels)->default_value(c.levels), "U-Net levels")
      ("base-filters", po::value<int>(&c.base_filters)->default_value(c.base_filters), "filters at level 0")
      ("no-peer", "do not run the PyTorch peer")
      ("peer-script", po::value<std::string>(), "path of torch_unet_peer.py")
      ("train-only", "training steps only")
      ("infer-only", "inference only")
      ("python", po::value<std::string>(&c.python), "Python interpreter with torch for the peer "
                                                    "(default /usr/bin/python3, else python3 on PATH)")
      ("single", "internal: one configuration in this process");
  add_common(desc, true);
  auto vm = parse(desc, args, "bench");
  if (!vm) return 0;
  apply_common(*vm);
  c.threads = (*vm)["threads"].as<int>() > 0 ? (*vm)["threads"].as<int>() : 2;
  c.patches = int_list(patches, "patch");
  c.batches = int_list(batches, "batch");
  if (!norm.empty()) c.norms = {norm};
  c.peer = !vm->count("no-peer");
  if (vm->count("peer-script")) c.peer_script = (*vm)["peer-script"].as<std::string>();
  c.train = !vm->count("infer-only");
  c.infer = !vm->count("train-only");
  c.single = vm->count("single") > 0;
  c.device = (*vm)["device"].as<std::string>();
  c.tf32 = !vm->count("no-tf32");
  char self[PATH_MAX] = {};
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
  if (n <= 0) throw Error("cannot locate the medseg executable (/proc/self/exe)");
  return pipelines::run_bench(c, std::string(self, static_cast<size_t>(n)));
}

}  // namespace medseg::app
