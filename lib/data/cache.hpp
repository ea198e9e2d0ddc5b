// The preprocessing cache: one folder (e.g. MODEL_DIR/cache) holding, per case,
//   ID.image.f32      raw float32 [z][y][x][c], native byte order (little-endian on x86-64)
//   ID.labels.u16     raw uint16 [z][y][x] (labelled cases only)
//   ID.locations.i32  raw int32 (z, y, x) triplets of the sampled class locations, class 1 first
//                     (labelled cases only; the counts per class are in the meta)
//   ID.json           meta: shape, channels, geometry map, class location counts, the plan's
//                     preprocessing hash, and the source files' paths, sizes and mtimes.
// A cached case is reused only when its meta parses, the plan's preprocessing hash and every source
// file's size and mtime match, and the raw files have the sizes the meta implies; otherwise it is
// redone. Every file is written atomically (temp + rename); the meta is removed first and written
// last, so a meta on disk always describes complete raw files.
// Reading memory-maps the raw files read-only, so that a patch touches only the pages it needs.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "data/case_view.hpp"
#include "data/plan.hpp"
#include "data/preprocess.hpp"
#include "io/dataset.hpp"

namespace medseg::data {

namespace fs = std::filesystem;

// A read-only memory map of a whole file (RAII: munmap on destruction). Move-only.
class MappedFile {
 public:
  MappedFile() = default;
  // Throws IoError naming the file when it cannot be opened or mapped. An empty file maps to
  // data() == nullptr, size() == 0.
  explicit MappedFile(const fs::path& path);
  ~MappedFile();
  MappedFile(MappedFile&& o) noexcept;
  MappedFile& operator=(MappedFile&& o) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const void* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  void release() noexcept;
  void* data_ = nullptr;
  size_t size_ = 0;
};

struct CachePaths {
  fs::path image, labels, locations, meta;
};
CachePaths cache_paths(const fs::path& cache_dir, const std::string& id);

// One case opened from the cache. view() points into the maps: valid while this object lives.
class CachedCase {
 public:
  // Throws IoError naming the file when the meta is missing or malformed or a raw file does not
  // have the size the meta implies.
  static CachedCase open(const fs::path& cache_dir, const std::string& id);
  CaseView view() const;
  const std::string& id() const { return id_; }
  const std::array<int64_t, 3>& shape() const { return shape_; }  // (z, y, x)
  int channels() const { return channels_; }
  const CaseGeometryMap& map() const { return map_; }
  const std::vector<std::vector<Index3>>& class_locations() const { return *locations_; }

 private:
  std::string id_;
  std::array<int64_t, 3> shape_{0, 0, 0};
  int channels_ = 1;
  CaseGeometryMap map_;
  MappedFile image_, labels_;
  // Held by pointer so that the address in CaseView survives moves of the CachedCase.
  std::unique_ptr<std::vector<std::vector<Index3>>> locations_;
};

// Whether the cache holds an up-to-date copy of `entry` for `plan` (see the rules above).
bool cache_is_fresh(const Plan& plan, const io::CaseEntry& entry, const fs::path& cache_dir);

// Writes `pc` (preprocessed from `entry` with `plan`) to the cache.
void write_cached_case(const fs::path& cache_dir, const Plan& plan, const io::CaseEntry& entry,
                       const PreprocessedCase& pc);

// Reads and preprocesses one case from its files (labels when entry.label is set). The class
// location seed is derived from the case id, so results do not depend on the order of cases.
PreprocessedCase preprocess_entry(const Plan& plan, const io::CaseEntry& entry);

struct CacheProgress {
  size_t done = 0;  // cases finished so far, this one included
  size_t total = 0;
  std::string id;       // the case just finished
  bool reused = false;  // true: up to date in the cache; false: preprocessed now
};
using CacheProgressFn = std::function<void(const CacheProgress&)>;

// Preprocesses the cases of `cases` that are missing or stale in cache_dir (created if needed),
// `threads` cases at a time (<= 0: medseg::num_threads()), then opens all, in the order of `cases`.
// The callback runs on worker threads, one call at a time. The first error (IoError for a bad file,
// ArgumentError for a case that does not fit the plan) stops the work and is rethrown.
std::vector<CachedCase> prepare_cache(const Plan& plan, const io::Dataset& ds,
                                      const std::vector<io::CaseEntry>& cases,
                                      const fs::path& cache_dir, int threads,
                                      const CacheProgressFn& progress = {});

}  // namespace medseg::data
