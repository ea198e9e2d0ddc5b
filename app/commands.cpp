// Subcommands of `medseg`. Each parses its options (command line, then an optional INI --config file)
// into a pipelines/ config struct. Errors: usage problems exit 2 with a one-line message and the usage;
// invalid input (ArgumentError) exits 2; runtime failures (IO, numeric, CUDA) exit 1.
#include "app/commands.hpp"

#include <csignal>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>

#include <boost/program_options.hpp>

#include "app/options.hpp"
#include "core/error.hpp"
#include "core/log.hpp"
#include "core/threads.hpp"
#include "pipelines/device.hpp"
#include "pipelines/progress.hpp"

namespace medseg::app {

namespace po = boost::program_options;

namespace {

struct Command {
  std::string summary;
  std::function<int(const std::vector<std::string>& args)> run;
};

const std::map<std::string, Command>& commands();

void print_overview(std::ostream& os) {
  os << "medseg " << MEDSEG_VERSION
     << ": 3-D medical image segmentation (U-Net with Batch Renormalization)\n\n"
        "usage: medseg <command> [options]     (medseg <command> --help for its options)\n\n"
        "commands:\n";
  for (const auto& [name, c] : commands()) os << "  " << name << std::string(14 - name.size(), ' ') << c.summary << "\n";
  os << "\nglobal options: --help, --version\n";
}

void on_signal(int) { pipelines::stop_requested() = true; }

}  // namespace

int run_info(const std::vector<std::string>& args);
int run_plan_cmd(const std::vector<std::string>& args);
int run_train_cmd(const std::vector<std::string>& args);
int run_predict_cmd(const std::vector<std::string>& args);
int run_export_cmd(const std::vector<std::string>& args);
int run_evaluate_cmd(const std::vector<std::string>& args);
int run_sample_data_cmd(const std::vector<std::string>& args);
int run_bench_cmd(const std::vector<std::string>& args);

namespace {
const std::map<std::string, Command>& commands() {
  static const std::map<std::string, Command> c = {
      {"info", {"build and device information", run_info}},
      {"plan", {"fingerprint a dataset and print/write its plan", run_plan_cmd}},
      {"train", {"train a model on a labelled dataset folder", run_train_cmd}},
      {"predict", {"segment new scans with a trained model", run_predict_cmd}},
      {"export", {"write a review package for a scan and its mask", run_export_cmd}},
      {"evaluate", {"Dice, IoU, HD95 and surface distance of predictions", run_evaluate_cmd}},
      {"sample-data", {"generate the synthetic sample dataset", run_sample_data_cmd}},
      {"bench", {"U-Net step and inference timings against the PyTorch peer", run_bench_cmd}},
  };
  return c;
}
}  // namespace

int run(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    print_overview(std::cout);
    return args.empty() ? 2 : 0;
  }
  if (args[0] == "--version") {
    std::cout << "medseg " << MEDSEG_VERSION << "\n";
    return 0;
  }
  const auto it = commands().find(args[0]);
  if (it == commands().end()) {
    std::cerr << "medseg: unknown command '" << args[0] << "'\n\n";
    print_overview(std::cerr);
    return 2;
  }
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  const std::vector<std::string> rest(args.begin() + 1, args.end());
  try {
    return it->second.run(rest);
  } catch (const UsageError& e) {
    std::cerr << "medseg " << args[0] << ": " << e.what() << "\n\n" << e.usage;
    return 2;
  } catch (const po::error& e) {
    std::cerr << "medseg " << args[0] << ": " << e.what() << " (see medseg " << args[0]
              << " --help)\n";
    return 2;
  } catch (const ArgumentError& e) {
    std::cerr << "medseg " << args[0] << ": error: " << e.what() << "\n";
    return 2;
  } catch (const Error& e) {
    std::cerr << "medseg " << args[0] << ": error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "medseg " << args[0] << ": internal error: " << e.what() << "\n";
    return 1;
  }
}

int run_info(const std::vector<std::string>& args) {
  po::options_description desc("medseg info: print the build and the devices medseg can use");
  add_common(desc, false);
  auto vm = parse(desc, args, "info");
  if (!vm) return 0;
  apply_common(*vm);
  std::cout << pipelines::build_info();
  return 0;
}

}  // namespace medseg::app
