// Subcommands of `medseg`. Each parses its options (command line, then an optional INI --config file)
// into a pipelines/ config struct. Errors: usage problems exit 2 with a one-line message and the usage;
// invalid input (ArgumentError) exits 2; runtime failures (IO, numeric, CUDA) exit 1.
#include "app/commands.hpp"

#include <filesystem>
#include <new>

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
#include "dist/comm.hpp"
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

namespace {
// Runs one command and turns its exceptions into messages and exit codes. In a multi-process run, an
// error only this rank has seen stops every rank (MPI_Abort) with this rank's message; an error all
// ranks share (dist::GroupError) is printed once and each rank exits with its code.
int run_command(const std::string& name, const Command& cmd, const std::vector<std::string>& rest,
                dist::Comm& comm) {
  const std::string who = comm.size() > 1 ? "medseg " + name + " (rank " + std::to_string(comm.rank()) + ")"
                                          : "medseg " + name;
  auto fail = [&](const std::string& text, int code) {
    std::cerr << who << ": " << text << "\n";
    if (comm.size() > 1) comm.abort(code);
    return code;
  };
  try {
    if (comm.size() > 1 && name != "train")
      throw dist::GroupError("only 'train' runs on several processes (started by mpirun with " +
                             std::to_string(comm.size()) + ")", 2);
    return cmd.run(rest);
  } catch (const dist::GroupError& e) {
    if (comm.root()) std::cerr << "medseg " << name << ": error: " << e.what() << "\n";
    return e.code();
  } catch (const UsageError& e) {
    if (comm.size() > 1) return fail(std::string(e.what()), 2);
    std::cerr << who << ": " << e.what() << "\n\n" << e.usage;
    return 2;
  } catch (const po::error& e) {
    return fail(std::string(e.what()) + " (see medseg " + name + " --help)", 2);
  } catch (const ArgumentError& e) {
    return fail(std::string("error: ") + e.what(), 2);
  } catch (const Error& e) {
    return fail(std::string("error: ") + e.what(), 1);
  } catch (const std::filesystem::filesystem_error& e) {
    // A path the command was given (or derived) that the file system refuses: a symlink loop, a
    // file where a folder is needed, no permission. Named with the system's reason.
    std::string paths = e.path1().string();
    if (!e.path2().empty()) paths += ", " + e.path2().string();
    return fail("error: " + paths + ": " + e.code().message() + " (" + e.what() + ")", 1);
  } catch (const std::bad_alloc&) {
    return fail("error: out of memory (an input or option asks for more memory than this machine "
                "has)", 1);
  } catch (const std::exception& e) {
    return fail(std::string("internal error: ") + e.what(), 1);
  }
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
  // Under mpirun the process joins the group here (a group of one otherwise).
  dist::Comm* comm = nullptr;
  try {
    comm = &dist::Comm::world();
  } catch (const std::exception& e) {
    std::cerr << "medseg " << args[0] << ": error: " << e.what() << "\n";
    return 2;
  }
  const int code = run_command(args[0], it->second, rest, *comm);
  comm->finalize();
  return code;
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
