// Running the medseg binary from tests: its exit code and everything it printed.
#pragma once
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

namespace medseg::test {

struct Run {
  int code;
  std::string output;
};
// Runs `command` through the shell with stderr folded into the output.
inline Run run_shell(const std::string& command) {
  const std::string cmd = command + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  while (p && fgets(buf, sizeof buf, p)) out += buf;
  const int status = p ? ::pclose(p) : -1;
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}
// `medseg ARGS`: the binary of this build, or $MEDSEG_BINARY (the GPU bundle runs the tests on another
// machine, where the build path does not exist).
inline Run run(const std::string& args) {
  const char* env = std::getenv("MEDSEG_BINARY");
  std::string cmd = "'";
  cmd += env && *env ? env : MEDSEG_BINARY;
  cmd += "' ";
  cmd += args;
  return run_shell(cmd);
}
// An empty folder in the temp dir, unique to this process.
inline std::filesystem::path scratch(const std::string& name) {
  namespace fs = std::filesystem;
  fs::path p = fs::temp_directory_path() / ("medseg_cli_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

}  // namespace medseg::test
