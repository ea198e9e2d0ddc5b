// Progress output and the stop request shared by long-running pipelines. On a terminal: one
// self-overwriting line; otherwise plain lines at most every `plain_interval_s` seconds.
#pragma once
#include <atomic>
#include <chrono>
#include <string>

namespace medseg::pipelines {

// Set by app/ from SIGINT/SIGTERM; pipelines poll it and finish cleanly (save, exit 0).
std::atomic<bool>& stop_requested();

class Progress {
 public:
  explicit Progress(double plain_interval_s = 30.0);
  // Shows `text`; on a terminal always, otherwise when the interval has passed or force is set.
  void update(const std::string& text, bool force = false);
  void finish();  // ends the terminal line
  bool terminal() const { return tty_; }

 private:
  bool tty_;
  double interval_;
  std::chrono::steady_clock::time_point last_{};
  bool shown_ = false;
  size_t last_len_ = 0;
};

std::string format_duration(double seconds);  // "1h02m", "3m05s", "12s"

}  // namespace medseg::pipelines
