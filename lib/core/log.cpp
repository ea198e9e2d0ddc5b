#include "core/log.hpp"

#include <atomic>
#include <iostream>
#include <mutex>

namespace medseg {
namespace {
std::atomic<int> g_level{static_cast<int>(LogLevel::Info)};
std::mutex g_mutex;
}  // namespace

void set_log_level(LogLevel level) { g_level = static_cast<int>(level); }
LogLevel log_level() { return static_cast<LogLevel>(g_level.load()); }

void log_line(LogLevel level, const std::string& text) {
  static const char* names[] = {"debug", "info", "warning", "error", ""};
  std::lock_guard<std::mutex> lock(g_mutex);
  if (level == LogLevel::Info)
    std::cerr << text << "\n";
  else
    std::cerr << names[static_cast<int>(level)] << ": " << text << "\n";
}

}  // namespace medseg
