// Option-parsing helpers shared by the subcommands.
#pragma once
#include <array>
#include <optional>
#include <string>
#include <vector>

#include <boost/program_options.hpp>

#include "core/error.hpp"

namespace medseg::app {

// A usage problem: printed with the command's usage text, exit 2.
struct UsageError : ArgumentError {
  UsageError(const std::string& what, std::string u) : ArgumentError(what), usage(std::move(u)) {}
  std::string usage;
};

// --help, --threads, --log-level (and --device when `device`).
void add_common(boost::program_options::options_description& desc, bool device);
// Parses args (and the INI file named by --config when the description has it). Returns nullopt after
// printing --help. Unknown options and bad values: UsageError.
std::optional<boost::program_options::variables_map> parse(
    const boost::program_options::options_description& desc, const std::vector<std::string>& args,
    const std::string& command);
// Applies --threads and --log-level.
void apply_common(const boost::program_options::variables_map& vm);
// "D,H,W" or "N" (cubic) -> (z, y, x).
std::array<int64_t, 3> parse_triple(const std::string& text, const std::string& option);

}  // namespace medseg::app
