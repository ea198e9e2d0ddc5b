#include "pipelines/progress.hpp"

#include <unistd.h>

#include <cstdio>
#include <iostream>

namespace medseg::pipelines {

std::atomic<bool>& stop_requested() {
  static std::atomic<bool> flag{false};
  return flag;
}

Progress::Progress(double plain_interval_s) : tty_(::isatty(STDERR_FILENO) != 0), interval_(plain_interval_s) {}

void Progress::update(const std::string& text, bool force) {
  const auto now = std::chrono::steady_clock::now();
  if (tty_) {
    std::string line = text;
    if (line.size() < last_len_) line.append(last_len_ - line.size(), ' ');
    std::cerr << "\r" << line << std::flush;
    last_len_ = text.size();
    shown_ = true;
    return;
  }
  if (force || !shown_ ||
      std::chrono::duration<double>(now - last_).count() >= interval_) {
    std::cerr << text << "\n";
    last_ = now;
    shown_ = true;
  }
}

void Progress::finish() {
  if (tty_ && shown_) std::cerr << "\n";
  shown_ = false;
  last_len_ = 0;
}

std::string format_duration(double s) {
  char buf[32];
  if (s < 0) s = 0;
  const long t = static_cast<long>(s + 0.5);
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, (t % 3600) / 60);
  else if (t >= 60)
    std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  else
    std::snprintf(buf, sizeof buf, "%lds", t);
  return buf;
}

}  // namespace medseg::pipelines
