// Levelled logging to stderr. The level is process-wide and set once by app/.
#pragma once
#include <sstream>
#include <string>

namespace medseg {

enum class LogLevel { Debug = 0, Info = 1, Warn = 2, Error = 3, Quiet = 4 };

void set_log_level(LogLevel level);
LogLevel log_level();
void log_line(LogLevel level, const std::string& text);
// Text put before every line (e.g. "rank 1: " in a multi-process run); empty by default.
void set_log_prefix(const std::string& prefix);

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

template <typename... Args>
void log_debug(const Args&... a) { if (log_level() <= LogLevel::Debug) log_line(LogLevel::Debug, detail::concat(a...)); }
template <typename... Args>
void log_info(const Args&... a) { if (log_level() <= LogLevel::Info) log_line(LogLevel::Info, detail::concat(a...)); }
template <typename... Args>
void log_warn(const Args&... a) { if (log_level() <= LogLevel::Warn) log_line(LogLevel::Warn, detail::concat(a...)); }
template <typename... Args>
void log_error(const Args&... a) { log_line(LogLevel::Error, detail::concat(a...)); }

}  // namespace medseg
