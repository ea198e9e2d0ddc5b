// CUDA device plumbing for the GPU backend: device query, error checks, the caching device
// allocator behind Tensor(shape, Device::CUDA), and CudaContext (stream + cuDNN handle +
// workspace).
//
// Stream model (why one blocking stream is enough): every kernel and cuDNN call of this backend
// runs on the context's stream, which is created WITHOUT cudaStreamNonBlocking. The Tensor hooks
// (copy, zero) use the legacy default stream, which synchronizes with such blocking streams. So
// host code can mix Tensor copies with backend calls without explicit synchronization, and a block
// the caching allocator hands out again after a free is only touched by work ordered after every
// earlier use. Do not build the backend with --default-stream per-thread: that breaks this implicit
// ordering.
//
// Errors: every CUDA / cuDNN call goes through MEDSEG_CUDA_CHECK / MEDSEG_CUDNN_CHECK, which throw
// medseg::CudaError("<file>:<line>: <call text> failed: <error name>: <error string>"). Destructors
// never throw: they ignore release errors (a failed free at teardown cannot be acted on).
#pragma once
#include <cuda_runtime_api.h>
#include <cudnn.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace medseg::cuda {

// ---- device query ----
// Number of CUDA devices; 0 when there is no driver or no device (never throws).
int device_count();
// True when this process can run the backend: a driver, at least one device, our kernels load on
// the current device (compute capability the build targets) and cuDNN loads. Otherwise false and,
// when `why` is not null, a one-line reason: "no CUDA driver: ...", "no CUDA device" or
// "cuDNN not loadable: ...". The answer is computed once per process.
bool cuda_usable(std::string* why = nullptr);
// One line per device: "cuda:0 NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB, 132 SMs, driver 13.0,
// runtime 13.0"; or the reason no device is usable.
std::string describe_devices();
// Makes `index` the current device of the calling thread; throws CudaError when it does not exist.
void select_device(int index);
// "9.19.0 (compiled against 9.19.0)".
std::string cudnn_version();

namespace detail {
[[noreturn]] void throw_cuda(cudaError_t code, const char* expr, const char* file, int line);
[[noreturn]] void throw_cudnn(cudnnStatus_t status, const char* expr, const char* file, int line);
}  // namespace detail

}  // namespace medseg::cuda

#define MEDSEG_CUDA_CHECK(expr)                                                           \
  do {                                                                                    \
    const cudaError_t medseg_cuda_status_ = (expr);                                       \
    if (medseg_cuda_status_ != cudaSuccess)                                               \
      ::medseg::cuda::detail::throw_cuda(medseg_cuda_status_, #expr, __FILE__, __LINE__); \
  } while (0)

#define MEDSEG_CUDNN_CHECK(expr)                                                            \
  do {                                                                                      \
    const cudnnStatus_t medseg_cudnn_status_ = (expr);                                      \
    if (medseg_cudnn_status_ != CUDNN_STATUS_SUCCESS)                                       \
      ::medseg::cuda::detail::throw_cudnn(medseg_cudnn_status_, #expr, __FILE__, __LINE__); \
  } while (0)

// After a kernel launch: reports launch-configuration errors at the launch site (execution errors
// surface at the next synchronizing call, itself checked).
#define MEDSEG_CUDA_CHECK_LAUNCH() MEDSEG_CUDA_CHECK(cudaGetLastError())

namespace medseg::cuda {

// ---- caching allocator ----
// Blocks are rounded up to a size class and kept on per-class free lists when released, so a
// training loop that allocates the same shapes every step calls cudaMalloc only during its first
// step. Size classes: multiples of 512 B up to 1 MiB, then 4 steps per power of two (at most 19%
// waste). When cudaMalloc runs out of memory the cached free blocks are returned to the driver and
// the call retried. Thread-safe (one mutex); blocks are per device, the device being the current
// one at allocation.
struct AllocatorStats {
  size_t bytes_in_use = 0;  // handed out and not yet released (size-class bytes)
  size_t peak_bytes_in_use = 0;
  size_t bytes_cached = 0;  // on the free lists
  int64_t cuda_malloc_count = 0;
  int64_t cuda_free_count = 0;
  int64_t allocations = 0;  // calls to allocate()
};
void* device_allocate(size_t bytes);
void device_release(void* ptr) noexcept;
AllocatorStats allocator_stats();
void reset_peak_bytes();
// Returns every cached free block to the driver (not the blocks in use).
void release_cached_blocks() noexcept;
// The size class `bytes` is rounded up to (exposed for tests).
size_t allocation_size_class(size_t bytes);
// Installs the allocator and cudaMemcpy / cudaMemset into lib/core's Tensor hooks, so that
// Tensor(shape, Device::CUDA) works. Idempotent.
void register_cuda_allocator();

// RAII device buffer from the caching allocator; move-only.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes)
      : ptr_(bytes ? device_allocate(bytes) : nullptr), bytes_(bytes) {}
  ~DeviceBuffer() { device_release(ptr_); }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) {
    o.ptr_ = nullptr, o.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      device_release(ptr_);
      ptr_ = o.ptr_, bytes_ = o.bytes_;
      o.ptr_ = nullptr, o.bytes_ = 0;
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// ---- context ----
// One compute stream, one cuDNN handle bound to it, a growable workspace shared by the cuDNN calls
// and our multi-stage reductions (valid only within one backend call: each call may reuse it), the
// TF32 switch, and the cache of convolution plans (descriptors + chosen algorithms, see
// conv_cudnn.hpp). Move-only; the destructor synchronizes the stream and releases everything
// without throwing.
class CudaContext {
 public:
  // Uses the current device (select_device() first to choose); throws CudaError when the backend is
  // not usable (see cuda_usable()).
  explicit CudaContext(bool allow_tf32 = false);
  ~CudaContext();
  CudaContext(CudaContext&& o) noexcept;
  CudaContext& operator=(CudaContext&& o) noexcept;
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;

  cudaStream_t stream() const { return stream_; }
  cudnnHandle_t cudnn() const { return cudnn_; }
  int device() const { return device_; }
  // TF32 tensor-core math for fp32 convolutions (faster, ~1e-3 relative error). Off by default.
  bool allow_tf32() const { return allow_tf32_; }
  void set_allow_tf32(bool on) { allow_tf32_ = on; }
  // Upper bound on the workspace an algorithm may use (algorithms needing more are not chosen).
  size_t workspace_limit() const { return workspace_limit_; }
  void set_workspace_limit(size_t bytes) { workspace_limit_ = bytes; }
  // At least `bytes` of device scratch, 256-byte aligned; grows (never shrinks) on demand.
  void* workspace(size_t bytes);
  size_t workspace_bytes() const { return workspace_.bytes(); }
  // After an algorithm search: the workspace shrinks back to the largest amount any chosen
  // algorithm needs (the search may have grown it to its budget, up to the limit, which would
  // otherwise stay held for the life of the context). That amount only grows, so once every
  // shape has been planned no call reallocates.
  void settle_workspace(size_t chosen_bytes);
  void synchronize() const;
  // Opaque slot owned by conv_cudnn (plans hold cuDNN descriptors bound to this context's choices).
  std::shared_ptr<void>& conv_plan_slot() { return conv_plans_; }

 private:
  void release() noexcept;
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  cudnnHandle_t cudnn_ = nullptr;
  bool allow_tf32_ = false;
  // 4 GiB: on an H200 cuDNN 9's only NDHWC fp32 algorithm for the 32-channel 2 x 128^3 layers
  // needs 1.07 GB, and a 1 GiB limit left no algorithm at all (a search takes at most half
  // of the free memory).
  size_t workspace_limit_ = size_t{4} << 30;
  DeviceBuffer workspace_;
  size_t workspace_needed_ = 0;  // the largest workspace of a chosen algorithm so far
  std::shared_ptr<void> conv_plans_;
};

}  // namespace medseg::cuda
