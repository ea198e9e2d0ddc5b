// Device query, error reporting, the caching allocator and CudaContext (host code only).
#include "kernels/cuda/device.hpp"

#include <algorithm>
#include <cstdio>
#include <map>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <vector>

#include "core/error.hpp"
#include "core/tensor.hpp"

namespace medseg::cuda {

namespace detail {
// Defined in ops.cu: whether this build's kernels can run on the current device.
cudaError_t probe_kernel_image();

void throw_cuda(cudaError_t code, const char* expr, const char* file, int line) {
  std::ostringstream os;
  os << file << ":" << line << ": " << expr << " failed: " << cudaGetErrorName(code) << ": "
     << cudaGetErrorString(code);
  throw CudaError(os.str());
}

void throw_cudnn(cudnnStatus_t status, const char* expr, const char* file, int line) {
  char last[512] = {0};
  cudnnGetLastErrorString(last, sizeof(last));
  std::ostringstream os;
  os << file << ":" << line << ": " << expr << " failed: " << cudnnGetErrorString(status);
  if (last[0] != '\0') os << " (" << last << ")";
  throw CudaError(os.str());
}
}  // namespace detail

// ------------------------------------------------------------------ device query

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

namespace {
struct Usability {
  bool ok = false;
  std::string why;
};

Usability probe_usability() {
  Usability u;
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaErrorInsufficientDriver) {
    u.why = std::string("no CUDA driver: ") + cudaGetErrorString(e);
    return u;
  }
  if (e == cudaErrorNoDevice || (e == cudaSuccess && n == 0)) {
    u.why = "no CUDA device";
    return u;
  }
  if (e != cudaSuccess) {
    u.why =
        std::string("CUDA runtime unusable: ") + cudaGetErrorName(e) + ": " + cudaGetErrorString(e);
    return u;
  }
  e = detail::probe_kernel_image();
  if (e != cudaSuccess) {
    int dev = 0, major = 0, minor = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    u.why = "medseg CUDA kernels cannot run on device " + std::to_string(dev) + " (sm_" +
            std::to_string(major) + std::to_string(minor) +
            "; rebuild with CMAKE_CUDA_ARCHITECTURES including it): " + cudaGetErrorString(e);
    return u;
  }
  cudnnHandle_t h = nullptr;
  cudnnStatus_t s = cudnnCreate(&h);
  if (s != CUDNN_STATUS_SUCCESS) {
    char last[512] = {0};
    cudnnGetLastErrorString(last, sizeof(last));
    u.why =
        std::string("cuDNN not loadable: ") + cudnnGetErrorString(s) + (last[0] ? ": " : "") + last;
    return u;
  }
  cudnnDestroy(h);
  if (cudnnGetVersion() / 10000 != CUDNN_MAJOR) {
    u.why = "cuDNN not loadable: runtime " + std::to_string(cudnnGetVersion()) +
            " has another major version than the build's " + std::to_string(CUDNN_MAJOR);
    return u;
  }
  u.ok = true;
  return u;
}
}  // namespace

bool cuda_usable(std::string* why) {
  static const Usability u = probe_usability();
  if (why) *why = u.why;
  return u.ok;
}

std::string describe_devices() {
  std::string why;
  if (!cuda_usable(&why)) return "CUDA backend not usable: " + why;
  std::ostringstream os;
  int driver = 0, runtime = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  const int n = device_count();
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) {
      os << "cuda:" << i << " (properties unavailable)\n";
      continue;
    }
    char mem[32];
    std::snprintf(mem, sizeof(mem), "%.1f GiB", static_cast<double>(p.totalGlobalMem) / (1 << 30));
    os << "cuda:" << i << " " << p.name << ", sm_" << p.major << p.minor << ", " << mem << ", "
       << p.multiProcessorCount << " SMs, driver " << driver / 1000 << "." << (driver % 1000) / 10
       << ", runtime " << runtime / 1000 << "." << (runtime % 1000) / 10 << ", cuDNN "
       << cudnn_version() << "\n";
  }
  std::string s = os.str();
  if (!s.empty() && s.back() == '\n') s.pop_back();
  return s;
}

void select_device(int index) {
  const int n = device_count();
  if (index < 0 || index >= n)
    throw CudaError("select_device(" + std::to_string(index) + "): there are " + std::to_string(n) +
                    " CUDA devices");
  MEDSEG_CUDA_CHECK(cudaSetDevice(index));
}

std::string cudnn_version() {
  const size_t v = cudnnGetVersion();  // major*10000 + minor*100 + patch since cuDNN 9
  std::ostringstream os;
  os << v / 10000 << "." << (v % 10000) / 100 << "." << v % 100 << " (compiled against "
     << CUDNN_MAJOR << "." << CUDNN_MINOR << "." << CUDNN_PATCHLEVEL << ")";
  return os.str();
}

// ------------------------------------------------------------------ caching allocator

namespace {
class CachingAllocator {
 public:
  void* allocate(size_t bytes) {
    const size_t cls = allocation_size_class(bytes);
    int dev = 0;
    MEDSEG_CUDA_CHECK(cudaGetDevice(&dev));
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.allocations;
    auto& list = free_[{dev, cls}];
    void* p = nullptr;
    if (!list.empty()) {
      p = list.back();
      list.pop_back();
      stats_.bytes_cached -= cls;
    } else {
      cudaError_t e = cudaMalloc(&p, cls);
      if (e == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        release_cached_locked();
        e = cudaMalloc(&p, cls);
      }
      if (e != cudaSuccess) {
        cudaGetLastError();
        throw CudaError("cudaMalloc of " + std::to_string(cls) + " bytes (for a request of " +
                        std::to_string(bytes) + ") failed on device " + std::to_string(dev) + ": " +
                        cudaGetErrorString(e) + "; in use " + std::to_string(stats_.bytes_in_use) +
                        " bytes");
      }
      ++stats_.cuda_malloc_count;
    }
    live_[p] = Block{dev, cls};
    stats_.bytes_in_use += cls;
    stats_.peak_bytes_in_use = std::max(stats_.peak_bytes_in_use, stats_.bytes_in_use);
    return p;
  }

  void release(void* p) noexcept {
    if (!p) return;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) return;  // not ours: nothing sensible to do in a noexcept path
    const Block b = it->second;
    live_.erase(it);
    stats_.bytes_in_use -= b.size;
    stats_.bytes_cached += b.size;
    try {
      free_[{b.device, b.size}].push_back(p);
    } catch (...) {  // out of host memory for the list: give the block back to the driver instead
      stats_.bytes_cached -= b.size;
      cudaFree(p);
      ++stats_.cuda_free_count;
    }
  }

  void release_cached() noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    release_cached_locked();
  }

  AllocatorStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }
  void reset_peak() {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.peak_bytes_in_use = stats_.bytes_in_use;
  }

 private:
  struct Block {
    int device;
    size_t size;
  };
  void release_cached_locked() noexcept {
    int current = 0;
    cudaGetDevice(&current);
    for (auto& [key, list] : free_) {
      if (list.empty()) continue;
      cudaSetDevice(key.first);
      for (void* p : list) {
        cudaFree(p);  // errors ignored: nothing to recover at this point
        ++stats_.cuda_free_count;
        stats_.bytes_cached -= key.second;
      }
      list.clear();
    }
    cudaSetDevice(current);
    cudaGetLastError();
  }

  std::mutex mu_;
  std::map<std::pair<int, size_t>, std::vector<void*>> free_;
  std::unordered_map<void*, Block> live_;
  AllocatorStats stats_;
};

// Never destroyed: Tensors with static storage duration may release blocks after main() returns,
// and freeing device memory during static destruction races the CUDA runtime's own teardown.
CachingAllocator& allocator() {
  static CachingAllocator* a = new CachingAllocator();
  return *a;
}
}  // namespace

size_t allocation_size_class(size_t bytes) {
  if (bytes == 0) bytes = 1;
  constexpr size_t kSmall = size_t{1} << 20;
  if (bytes <= kSmall) return (bytes + 511) / 512 * 512;
  // Four classes per power of two: [2^k, 1.25, 1.5, 1.75 * 2^k].
  size_t p = kSmall;
  while (p * 2 < bytes) p *= 2;  // p < bytes <= 2p
  const size_t step = p / 4;
  return (bytes + step - 1) / step * step;
}

void* device_allocate(size_t bytes) {
  return allocator().allocate(bytes);
}
void device_release(void* ptr) noexcept {
  allocator().release(ptr);
}
AllocatorStats allocator_stats() {
  return allocator().stats();
}
void reset_peak_bytes() {
  allocator().reset_peak();
}
void release_cached_blocks() noexcept {
  allocator().release_cached();
}

void register_cuda_allocator() {
  DeviceAllocator a;
  a.allocate = [](size_t bytes) { return device_allocate(bytes); };
  a.deallocate = [](void* p, size_t) { device_release(p); };
  a.copy = [](void* dst, const void* src, size_t bytes, int kind) {
    const cudaMemcpyKind k = kind == 0   ? cudaMemcpyHostToDevice
                             : kind == 1 ? cudaMemcpyDeviceToHost
                                         : cudaMemcpyDeviceToDevice;
    // Legacy default stream: ordered after all work on the backend's blocking streams (see header).
    MEDSEG_CUDA_CHECK(cudaMemcpy(dst, src, bytes, k));
  };
  a.zero = [](void* dst, size_t bytes) { MEDSEG_CUDA_CHECK(cudaMemset(dst, 0, bytes)); };
  register_device_allocator(std::move(a));
}

// ------------------------------------------------------------------ context

CudaContext::CudaContext(bool allow_tf32) : allow_tf32_(allow_tf32) {
  std::string why;
  if (!cuda_usable(&why)) throw CudaError("cannot create a CUDA context: " + why);
  MEDSEG_CUDA_CHECK(cudaGetDevice(&device_));
  try {
    MEDSEG_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamDefault));
    MEDSEG_CUDNN_CHECK(cudnnCreate(&cudnn_));
    MEDSEG_CUDNN_CHECK(cudnnSetStream(cudnn_, stream_));
  } catch (...) {
    release();
    throw;
  }
}

CudaContext::~CudaContext() {
  release();
}

void CudaContext::release() noexcept {
  if (stream_) cudaStreamSynchronize(stream_);  // queued work may still use the workspace
  conv_plans_.reset();
  workspace_ = DeviceBuffer();
  if (cudnn_) cudnnDestroy(cudnn_);
  if (stream_) cudaStreamDestroy(stream_);
  cudnn_ = nullptr;
  stream_ = nullptr;
}

CudaContext::CudaContext(CudaContext&& o) noexcept
    : device_(o.device_),
      stream_(o.stream_),
      cudnn_(o.cudnn_),
      allow_tf32_(o.allow_tf32_),
      workspace_limit_(o.workspace_limit_),
      workspace_(std::move(o.workspace_)),
      workspace_needed_(o.workspace_needed_),
      conv_plans_(std::move(o.conv_plans_)) {
  o.stream_ = nullptr;
  o.cudnn_ = nullptr;
}

CudaContext& CudaContext::operator=(CudaContext&& o) noexcept {
  if (this != &o) {
    release();
    device_ = o.device_;
    stream_ = o.stream_;
    cudnn_ = o.cudnn_;
    allow_tf32_ = o.allow_tf32_;
    workspace_limit_ = o.workspace_limit_;
    workspace_ = std::move(o.workspace_);
    workspace_needed_ = o.workspace_needed_;
    conv_plans_ = std::move(o.conv_plans_);
    o.stream_ = nullptr;
    o.cudnn_ = nullptr;
  }
  return *this;
}

void* CudaContext::workspace(size_t bytes) {
  if (bytes == 0) bytes = 256;
  if (workspace_.bytes() < bytes) {
    workspace_ = DeviceBuffer();  // release first so the cache can reuse the memory
    workspace_ = DeviceBuffer(bytes);
  }
  return workspace_.get();
}

void CudaContext::settle_workspace(size_t chosen_bytes) {
  workspace_needed_ = std::max(workspace_needed_, std::max<size_t>(chosen_bytes, 256));
  if (workspace_.bytes() > workspace_needed_) {
    workspace_ = DeviceBuffer();  // back to the allocator's cache first
    workspace_ = DeviceBuffer(workspace_needed_);
  }
}

void CudaContext::synchronize() const {
  MEDSEG_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

}  // namespace medseg::cuda
