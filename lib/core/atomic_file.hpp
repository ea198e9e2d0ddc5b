// Atomic file writes: the content goes to a temporary file in the destination folder, is flushed and
// closed, then renamed over the destination. A failure removes the temporary file and throws IoError
// naming the destination: readers never see a partial file.
#pragma once
#include <cstddef>
#include <filesystem>
#include <functional>
#include <string>

namespace medseg {

void write_file_atomic(const std::filesystem::path& path, const void* data, size_t size);
inline void write_text_file_atomic(const std::filesystem::path& path, const std::string& text) {
  write_file_atomic(path, text.data(), text.size());
}
// A temporary sibling path that keeps the file's extension(s) (so that extension-sniffing writers
// such as ITK pick the right format): dir/.tmp-<random>-<name>.
std::filesystem::path temporary_sibling(const std::filesystem::path& path);
// Runs write(temp) and renames temp over path; removes temp and rethrows on any failure.
void commit_atomic(const std::filesystem::path& path,
                   const std::function<void(const std::filesystem::path& temp)>& write);
std::string read_file(const std::filesystem::path& path);  // IoError naming the file

}  // namespace medseg
