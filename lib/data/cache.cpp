#include "data/cache.hpp"

#include <fcntl.h>
#include <omp.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <exception>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "core/error.hpp"
#include "core/log.hpp"
#include "core/threads.hpp"
#include "io/image_io.hpp"

namespace medseg::data {

namespace {

constexpr int kCacheVersion = 1;

std::string errno_text() {
  return std::strerror(errno);
}

nlohmann::json source_stamp(const fs::path& p) {
  std::error_code ec;
  const auto size = fs::file_size(p, ec);
  if (ec) throw IoError(p.string() + ": cannot stat the source file (" + ec.message() + ")");
  const auto mtime = fs::last_write_time(p, ec);
  if (ec) throw IoError(p.string() + ": cannot read the modification time (" + ec.message() + ")");
  return {{"path", p.string()},
          {"size", static_cast<uint64_t>(size)},
          {"mtime_ns", static_cast<int64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                                mtime.time_since_epoch())
                                                .count())}};
}

nlohmann::json source_stamps(const io::CaseEntry& e) {
  nlohmann::json s = nlohmann::json::array();
  for (const auto& p : e.images) s.push_back(source_stamp(p));
  if (!e.label.empty()) s.push_back(source_stamp(e.label));
  return s;
}

nlohmann::json read_json_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) throw IoError(p.string() + ": cannot open the cache meta file");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::exception& e) {
    throw IoError(p.string() + ": cache meta is not valid JSON (" + e.what() + ")");
  }
}

uint64_t id_seed(const std::string& id) {
  uint64_t h = 1469598103934665603ULL;  // FNV-1a 64
  for (unsigned char c : id) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

void check_id(const std::string& id) {
  if (id.empty() || id.find('/') != std::string::npos || id == "." || id == "..")
    throw ArgumentError("case id '" + id + "' cannot name a cache file");
}

struct Meta {
  std::array<int64_t, 3> shape{};
  int channels = 1;
  bool has_labels = false;
  std::vector<int64_t> location_counts;  // per class value, [0] = 0
  uint64_t image_bytes = 0, label_bytes = 0, location_bytes = 0;
};

// Parses and checks the fields the reader needs; throws IoError naming the meta file.
Meta parse_meta(const nlohmann::json& j, const fs::path& file, const std::string& id) {
  auto bad = [&](const std::string& what) -> IoError {
    return IoError(file.string() + ": malformed cache meta: " + what);
  };
  try {
    if (!j.is_object() || j.value("format", "") != "medseg-preprocessed")
      throw bad("format is not medseg-preprocessed");
    if (j.at("version").get<int>() != kCacheVersion) throw bad("unknown version");
    if (j.at("id").get<std::string>() != id) throw bad("id is not '" + id + "'");
    Meta m;
    m.shape = j.at("shape").get<std::array<int64_t, 3>>();
    m.channels = j.at("channels").get<int>();
    m.has_labels = j.at("has_labels").get<bool>();
    m.location_counts = j.at("location_counts").get<std::vector<int64_t>>();
    for (int64_t s : m.shape)
      if (s < 1) throw bad("non-positive shape");
    if (m.channels < 1) throw bad("non-positive channel count");
    const uint64_t vox = static_cast<uint64_t>(m.shape[0] * m.shape[1] * m.shape[2]);
    m.image_bytes = vox * static_cast<uint64_t>(m.channels) * sizeof(float);
    m.label_bytes = m.has_labels ? vox * sizeof(uint16_t) : 0;
    uint64_t locs = 0;
    for (int64_t c : m.location_counts) {
      if (c < 0) throw bad("negative class location count");
      locs += static_cast<uint64_t>(c);
    }
    m.location_bytes = locs * 3 * sizeof(int32_t);
    return m;
  } catch (const nlohmann::json::exception& e) {
    throw bad(e.what());
  }
}

uint64_t size_or_max(const fs::path& p) {
  std::error_code ec;
  const auto s = fs::file_size(p, ec);
  return ec ? UINT64_MAX : static_cast<uint64_t>(s);
}

}  // namespace

// ------------------------------------------------------------------------------ MappedFile

MappedFile::MappedFile(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError(path.string() + ": cannot open for mapping (" + errno_text() + ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const std::string err = errno_text();
    ::close(fd);
    throw IoError(path.string() + ": cannot stat (" + err + ")");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      const std::string err = errno_text();
      ::close(fd);
      size_ = 0;
      throw IoError(path.string() + ": cannot memory-map " + std::to_string(st.st_size) +
                    " bytes (" + err + ")");
    }
    data_ = p;
  }
  ::close(fd);  // the mapping keeps the file alive
}

MappedFile::~MappedFile() {
  release();
}

MappedFile::MappedFile(MappedFile&& o) noexcept : data_(o.data_), size_(o.size_) {
  o.data_ = nullptr;
  o.size_ = 0;
}

MappedFile& MappedFile::operator=(MappedFile&& o) noexcept {
  if (this != &o) {
    release();
    data_ = o.data_;
    size_ = o.size_;
    o.data_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

void MappedFile::release() noexcept {
  if (data_) ::munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
}

// ------------------------------------------------------------------------------ files

CachePaths cache_paths(const fs::path& cache_dir, const std::string& id) {
  check_id(id);
  return {cache_dir / (id + ".image.f32"), cache_dir / (id + ".labels.u16"),
          cache_dir / (id + ".locations.i32"), cache_dir / (id + ".json")};
}

bool cache_is_fresh(const Plan& plan, const io::CaseEntry& entry, const fs::path& cache_dir) {
  const CachePaths paths = cache_paths(cache_dir, entry.id);
  if (!fs::exists(paths.meta)) return false;
  try {
    const nlohmann::json j = read_json_file(paths.meta);
    const Meta m = parse_meta(j, paths.meta, entry.id);
    if (j.at("plan_hash").get<std::string>() != plan.preprocessing_hash()) return false;
    if (j.at("sources") != source_stamps(entry)) return false;
    if (m.has_labels == entry.label.empty()) return false;
    if (m.channels != plan.in_channels) return false;
    if (size_or_max(paths.image) != m.image_bytes) return false;
    if (m.has_labels && (size_or_max(paths.labels) != m.label_bytes ||
                         size_or_max(paths.locations) != m.location_bytes))
      return false;
    return true;
  } catch (const Error& e) {
    log_debug("cache entry of '", entry.id, "' will be redone: ", e.what());
    return false;
  } catch (const nlohmann::json::exception& e) {
    log_debug("cache entry of '", entry.id, "' will be redone: ", e.what());
    return false;
  }
}

void write_cached_case(const fs::path& cache_dir, const Plan& plan, const io::CaseEntry& entry,
                       const PreprocessedCase& pc) {
  MEDSEG_CHECK(pc.id == entry.id, "write_cached_case: case '", pc.id, "' for entry '", entry.id,
               "'");
  const CachePaths paths = cache_paths(cache_dir, entry.id);
  // Stamps first: if a source changes while we write, the next run sees the new mtime and redoes.
  const nlohmann::json sources = source_stamps(entry);
  std::error_code ec;
  fs::remove(paths.meta, ec);  // from here until the new meta lands, the entry reads as missing
  io::write_bytes_atomic(paths.image, pc.image.data(), pc.image.size() * sizeof(float));
  std::vector<int64_t> counts(pc.class_locations.size(), 0);
  if (!pc.labels.empty()) {
    io::write_bytes_atomic(paths.labels, pc.labels.data(), pc.labels.size() * sizeof(uint16_t));
    std::vector<int32_t> flat;
    for (size_t c = 0; c < pc.class_locations.size(); ++c) {
      counts[c] = static_cast<int64_t>(pc.class_locations[c].size());
      for (const Index3& p : pc.class_locations[c]) flat.insert(flat.end(), p.begin(), p.end());
    }
    io::write_bytes_atomic(paths.locations, flat.data(), flat.size() * sizeof(int32_t));
  } else {
    fs::remove(paths.labels, ec);
    fs::remove(paths.locations, ec);
  }
  nlohmann::json j;
  j["format"] = "medseg-preprocessed";
  j["version"] = kCacheVersion;
  j["id"] = pc.id;
  j["plan_hash"] = plan.preprocessing_hash();
  j["shape"] = pc.shape;
  j["channels"] = pc.channels;
  j["has_labels"] = !pc.labels.empty();
  j["location_counts"] = counts;
  j["map"] = pc.map.to_json();
  j["sources"] = sources;
  io::write_text_atomic(paths.meta, j.dump(1) + "\n");
}

// ------------------------------------------------------------------------------ CachedCase

CachedCase CachedCase::open(const fs::path& cache_dir, const std::string& id) {
  const CachePaths paths = cache_paths(cache_dir, id);
  const nlohmann::json j = read_json_file(paths.meta);
  const Meta m = parse_meta(j, paths.meta, id);
  CachedCase c;
  c.id_ = id;
  c.shape_ = m.shape;
  c.channels_ = m.channels;
  try {
    c.map_ = CaseGeometryMap::from_json(j.at("map"));
  } catch (const std::exception& e) {
    throw IoError(paths.meta.string() + ": malformed cache meta: " + e.what());
  }
  if (c.map_.shape() != m.shape)
    throw IoError(paths.meta.string() + ": malformed cache meta: crop box and shape disagree");
  c.image_ = MappedFile(paths.image);
  if (c.image_.size() != m.image_bytes)
    throw IoError(paths.image.string() + ": has " + std::to_string(c.image_.size()) +
                  " bytes, the meta implies " + std::to_string(m.image_bytes));
  c.locations_ = std::make_unique<std::vector<std::vector<Index3>>>(m.location_counts.size());
  if (m.has_labels) {
    c.labels_ = MappedFile(paths.labels);
    if (c.labels_.size() != m.label_bytes)
      throw IoError(paths.labels.string() + ": has " + std::to_string(c.labels_.size()) +
                    " bytes, the meta implies " + std::to_string(m.label_bytes));
    const MappedFile locs(paths.locations);
    if (locs.size() != m.location_bytes)
      throw IoError(paths.locations.string() + ": has " + std::to_string(locs.size()) +
                    " bytes, the meta implies " + std::to_string(m.location_bytes));
    const int32_t* p = static_cast<const int32_t*>(locs.data());
    for (size_t cl = 0; cl < m.location_counts.size(); ++cl) {
      auto& v = (*c.locations_)[cl];
      v.resize(static_cast<size_t>(m.location_counts[cl]));
      for (auto& idx : v) {
        for (int a = 0; a < 3; ++a) {
          if (p[a] < 0 || p[a] >= m.shape[a])
            throw IoError(paths.locations.string() + ": class " + std::to_string(cl) +
                          " location outside the shape");
          idx[a] = p[a];
        }
        p += 3;
      }
    }
  }
  return c;
}

CaseView CachedCase::view() const {
  CaseView v;
  v.id = id_;
  v.shape = shape_;
  v.channels = channels_;
  v.image = static_cast<const float*>(image_.data());
  v.labels = static_cast<const uint16_t*>(labels_.data());
  v.class_locations = locations_.get();
  return v;
}

// ------------------------------------------------------------------------------ preparing

PreprocessedCase preprocess_entry(const Plan& plan, const io::CaseEntry& entry) {
  const Volume image = io::read_image_channels(entry.images, plan.in_channels);
  if (entry.label.empty())
    return preprocess_case(plan, entry.id, image, nullptr, id_seed(entry.id));
  const LabelVolume labels = io::read_labels(entry.label);
  return preprocess_case(plan, entry.id, image, &labels, id_seed(entry.id));
}

std::vector<CachedCase> prepare_cache(const Plan& plan, const io::Dataset& ds,
                                      const std::vector<io::CaseEntry>& cases,
                                      const fs::path& cache_dir, int threads,
                                      const CacheProgressFn& progress) {
  for (const auto& c : cases) check_id(c.id);
  std::error_code ec;
  fs::create_directories(cache_dir, ec);
  if (ec)
    throw IoError(cache_dir.string() + ": cannot create the cache folder (" + ec.message() + ")");

  const int total_threads = num_threads();
  if (threads <= 0) threads = total_threads;
  threads = std::max(1, std::min<int>(threads, static_cast<int>(cases.size())));
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  size_t done = 0, redone = 0;
  std::exception_ptr error;

  auto worker = [&]() {
    // Cases run side by side; each gets its share of the OpenMP threads for its own loops.
    omp_set_num_threads(std::max(1, total_threads / threads));
    while (!failed) {
      const size_t i = next++;
      if (i >= cases.size()) break;
      const io::CaseEntry& e = cases[i];
      try {
        const bool fresh = cache_is_fresh(plan, e, cache_dir);
        if (!fresh) write_cached_case(cache_dir, plan, e, preprocess_entry(plan, e));
        std::lock_guard<std::mutex> lock(mu);
        ++done;
        redone += !fresh;
        if (progress) progress({done, cases.size(), e.id, fresh});
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!error) error = std::current_exception();
        failed = true;
      }
    }
  };
  if (threads > 1 && !cases.empty() && !cases.front().images.empty()) {
    // One header read on this thread first: it runs ITK's lazy IO-factory registration before
    // several threads could race into it.
    try {
      io::read_geometry(cases.front().images.front());
    } catch (const Error&) {
      // A bad file is reported by the worker that reads it, with the case it belongs to.
    }
  }
  if (threads == 1) {
    const int saved = total_threads;
    worker();
    omp_set_num_threads(saved);
  } else {
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back(worker);
    for (auto& t : pool) t.join();
  }
  if (error) std::rethrow_exception(error);
  log_info("preprocessing cache ", cache_dir.string(), " for '", ds.name, "': ", cases.size(),
           " cases, ", redone, " preprocessed, ", cases.size() - redone, " reused");

  std::vector<CachedCase> out;
  out.reserve(cases.size());
  for (const auto& c : cases) out.push_back(CachedCase::open(cache_dir, c.id));
  return out;
}

}  // namespace medseg::data
