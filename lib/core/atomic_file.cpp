#include "core/atomic_file.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/error.hpp"

namespace medseg {
namespace fs = std::filesystem;

fs::path temporary_sibling(const fs::path& path) {
  static std::atomic<uint64_t> counter{0};
  const uint64_t tag = static_cast<uint64_t>(::getpid()) * 1000003ULL +
                       static_cast<uint64_t>(
                           std::chrono::steady_clock::now().time_since_epoch().count()) +
                       counter++;
  std::ostringstream name;
  name << ".tmp-" << std::hex << tag << "-" << path.filename().string();
  return path.parent_path() / name.str();
}

void commit_atomic(const fs::path& path, const std::function<void(const fs::path&)>& write) {
  const fs::path tmp = temporary_sibling(path);
  try {
    write(tmp);
    std::error_code ec;
    fs::rename(tmp, path, ec);
    if (ec) throw IoError("cannot write " + path.string() + ": rename failed: " + ec.message());
  } catch (...) {
    std::error_code ec;
    fs::remove(tmp, ec);
    throw;
  }
}

void write_file_atomic(const fs::path& path, const void* data, size_t size) {
  commit_atomic(path, [&](const fs::path& tmp) {
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
      throw IoError("cannot write " + path.string() + ": " + std::strerror(errno));
    const char* p = static_cast<const char*>(data);
    size_t left = size;
    while (left > 0) {
      ssize_t n = ::write(fd, p, left);
      if (n < 0) {
        if (errno == EINTR) continue;
        const std::string why = std::strerror(errno);
        ::close(fd);
        throw IoError("cannot write " + path.string() + ": " + why);
      }
      p += n;
      left -= static_cast<size_t>(n);
    }
    // fsync so that a crash after the rename cannot leave an empty file under the final name.
    if (::fsync(fd) != 0 || ::close(fd) != 0)
      throw IoError("cannot write " + path.string() + ": " + std::strerror(errno));
  });
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError("cannot read " + path.string() + ": " + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace medseg
