#include "core/log.hpp"

#include <atomic>
#include <iostream>
#include <mutex>

namespace medseg {
namespace {
std::atomic<int> g_level{static_cast<int>(LogLevel::Info)};
std::mutex g_mutex;
std::string g_prefix;
}  // namespace

void set_log_level(LogLevel level) { g_level = static_cast<int>(level); }
LogLevel log_level() { return static_cast<LogLevel>(g_level.load()); }

void set_log_prefix(const std::string& prefix) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_prefix = prefix;
}

void log_line(LogLevel level, const std::string& text) {
  static const char* names[] = {"debug", "info", "warning", "error", ""};
  std::lock_guard<std::mutex> lock(g_mutex);
  if (level == LogLevel::Info)
    std::cerr << g_prefix << text << "\n";
  else
    std::cerr << g_prefix << names[static_cast<int>(level)] << ": " << text << "\n";
}

}  // namespace medseg
