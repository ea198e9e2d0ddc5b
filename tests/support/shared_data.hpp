// Locating ../shared/data for tests that use real scans; they skip loudly when it is absent.
#pragma once
#include <cstdlib>
#include <filesystem>
#include <string>

namespace medseg::test {

inline std::filesystem::path shared_dir() {
  if (const char* env = std::getenv("MEDSEG_SHARED_DIR")) return env;
  return std::filesystem::path(MEDSEG_SOURCE_DIR) / ".." / "shared";
}

// Returns "" when present, else the skip message.
inline std::string missing_shared(const std::string& relative) {
  auto p = shared_dir() / relative;
  if (std::filesystem::exists(p)) return "";
  return "shared data not found at " + p.string() + " (set MEDSEG_SHARED_DIR); skipping";
}

}  // namespace medseg::test

#define MEDSEG_REQUIRE_SHARED(rel)                                               \
  do {                                                                           \
    auto _msg = ::medseg::test::missing_shared(rel);                             \
    if (!_msg.empty()) GTEST_SKIP() << _msg;                                     \
  } while (0)
