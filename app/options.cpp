#include "app/options.hpp"

#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "core/log.hpp"
#include "core/threads.hpp"

namespace medseg::app {

namespace po = boost::program_options;

void add_common(po::options_description& desc, bool device) {
  desc.add_options()("help,h", "show this help")(
      "threads", po::value<int>()->default_value(0), "CPU threads (0: all cores)")(
      "log-level", po::value<std::string>()->default_value("info"), "debug|info|warning|error|quiet");
  if (device)
    desc.add_options()("device", po::value<std::string>()->default_value("auto"),
                       "auto|cpu|cuda[:N] (under mpirun, cuda means one GPU per rank: cuda:<local rank>)")(
        "no-tf32", "GPU: exact fp32 convolutions (default: TF32 tensor cores, ~1e-3 relative error)");
}

std::optional<po::variables_map> parse(const po::options_description& desc,
                                       const std::vector<std::string>& args, const std::string& command) {
  std::ostringstream usage;
  usage << desc;
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(args).options(desc).run(), vm);
    if (vm.count("help")) {
      std::cout << desc;
      return std::nullopt;
    }
    if (desc.find_nothrow("config", false) && vm.count("config")) {
      const std::string file = vm["config"].as<std::string>();
      // Only a regular file: a FIFO would block here for ever, a folder read as empty.
      std::error_code ec;
      if (!std::filesystem::is_regular_file(file, ec))
        throw ArgumentError("--config " + file + ": " +
                            (std::filesystem::exists(file, ec) ? "not a regular file"
                                                               : "no such file"));
      std::ifstream in(file);
      if (!in) throw ArgumentError("--config " + file + ": cannot be read");
      // Command-line values were stored first and take precedence over the file.
      try {
        po::store(po::parse_config_file(in, desc), vm);
      } catch (const po::error& e) {
        throw ArgumentError("--config " + file + ": " + e.what());
      }
    }
    po::notify(vm);
  } catch (const UsageError&) {
    throw;
  } catch (const po::error& e) {
    throw UsageError(e.what(), usage.str());
  }
  (void)command;
  return vm;
}

void apply_common(const po::variables_map& vm) {
  const std::string lvl = vm["log-level"].as<std::string>();
  if (lvl == "debug") set_log_level(LogLevel::Debug);
  else if (lvl == "info") set_log_level(LogLevel::Info);
  else if (lvl == "warning") set_log_level(LogLevel::Warn);
  else if (lvl == "error") set_log_level(LogLevel::Error);
  else if (lvl == "quiet") set_log_level(LogLevel::Quiet);
  else throw ArgumentError("--log-level: unknown level '" + lvl + "'");
  const int t = vm["threads"].as<int>();
  if (t < 0) throw ArgumentError("--threads must be >= 0, got " + std::to_string(t));
  set_num_threads(t);
}

std::array<int64_t, 3> parse_triple(const std::string& text, const std::string& option) {
  std::array<int64_t, 3> v{};
  std::stringstream ss(text);
  std::string part;
  std::vector<int64_t> parts;
  while (std::getline(ss, part, ',')) {
    try {
      size_t pos = 0;
      const long long x = std::stoll(part, &pos);
      if (pos != part.size() || x <= 0) throw std::invalid_argument("");
      parts.push_back(x);
    } catch (...) {
      throw ArgumentError("--" + option + ": expected D,H,W (positive integers), got '" + text + "'");
    }
  }
  if (parts.size() == 1) parts = {parts[0], parts[0], parts[0]};
  if (parts.size() != 3)
    throw ArgumentError("--" + option + ": expected D,H,W (positive integers), got '" + text + "'");
  for (int i = 0; i < 3; ++i) v[i] = parts[i];
  return v;
}

}  // namespace medseg::app
