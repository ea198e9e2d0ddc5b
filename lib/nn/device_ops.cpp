#include "nn/device_ops.hpp"

#include <memory>
#include <mutex>

#include "core/error.hpp"
#include "kernels/cpu/ops.hpp"
#ifdef MEDSEG_HAVE_CUDA
#include "kernels/cuda/ops.hpp"
#include "nn/device_ops_cuda.hpp"
#endif

namespace medseg::nn {

namespace {
void check_same_device(const Tensor& a, const Tensor& b, const char* what) {
  MEDSEG_CHECK(a.device() == b.device(), what, ": tensors on ", device_name(a.device()), " and ",
               device_name(b.device()));
}
#ifdef MEDSEG_HAVE_CUDA
struct CudaState {
  std::mutex mutex;
  int index = -1;
  std::unique_ptr<cuda::CudaContext> ctx;
};
// Never destroyed: the CUDA runtime may start after this object (use_cuda_device can be a process's
// first CUDA call) and then tears down before it; destroying the context's stream and cuDNN handle
// after that can crash at exit. Like the caching allocator, the state lives until the process ends.
CudaState& cuda_state() {
  static CudaState* s = new CudaState;
  return *s;
}
#endif
}  // namespace

bool cuda_compiled() {
#ifdef MEDSEG_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

#ifdef MEDSEG_HAVE_CUDA
void use_cuda_device(int index, bool allow_tf32) {
  auto& s = cuda_state();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (s.ctx) {
    MEDSEG_CHECK(s.index == index, "this process already computes on cuda:", s.index,
                 "; one device per process (asked for cuda:", index, ")");
    s.ctx->set_allow_tf32(allow_tf32);
    return;
  }
  std::string why;
  if (!cuda::cuda_usable(&why)) throw CudaError(why);
  const int count = cuda::device_count();
  if (index < 0 || index >= count)
    throw CudaError("no device cuda:" + std::to_string(index) + " (this machine has " +
                    std::to_string(count) + ")");
  cuda::select_device(index);
  cuda::register_cuda_allocator();
  s.ctx = std::make_unique<cuda::CudaContext>(allow_tf32);
  s.index = index;
}

bool cuda_device_active() { return static_cast<bool>(cuda_state().ctx); }

cuda::CudaContext& cuda_context() {
  auto& s = cuda_state();
  if (!s.ctx) throw CudaError("no CUDA device chosen for this process (use_cuda_device was not called)");
  // Threads started before the choice (OpenMP workers, the loader) may have another current
  // device; the calling thread follows the context's.
  int current = -1;
  MEDSEG_CUDA_CHECK(cudaGetDevice(&current));
  if (current != s.index) cuda::select_device(s.index);
  return *s.ctx;
}

void set_cuda_allow_tf32(bool on) {
  if (cuda_device_active()) cuda_context().set_allow_tf32(on);
}

void synchronize_device() {
  if (cuda_device_active()) cuda_context().synchronize();
}

void* cuda_stream() { return cuda_device_active() ? static_cast<void*>(cuda_context().stream()) : nullptr; }

std::string cuda_device_name() {
  if (!cuda_device_active()) return "";
  cudaDeviceProp prop{};
  MEDSEG_CUDA_CHECK(cudaGetDeviceProperties(&prop, cuda_state().index));
  return prop.name;
}

size_t cuda_peak_bytes() { return cuda::allocator_stats().peak_bytes_in_use; }
#else
void use_cuda_device(int index, bool) {
  throw CudaError("cuda:" + std::to_string(index) +
                  ": medseg was built without the CUDA backend (MEDSEG_CUDA=OFF or nvcc/cuDNN missing)");
}
bool cuda_device_active() { return false; }
void set_cuda_allow_tf32(bool) {}
void* cuda_stream() { return nullptr; }
void synchronize_device() {}
std::string cuda_device_name() { return ""; }
size_t cuda_peak_bytes() { return 0; }
#endif

void add_inplace(Tensor& a, const Tensor& b) {
  check_same_shape(a.shape(), b.shape(), "add_inplace");
  check_same_device(a, b, "add_inplace");
  const int64_t n = a.numel();
  if (a.device() == Device::CUDA) {
#ifdef MEDSEG_HAVE_CUDA
    cuda::add_inplace(cuda_context(), n, a.data(), b.data());
#endif
    return;
  }
  float* pa = a.data();
  const float* pb = b.data();
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) pa[i] += pb[i];
}

void concat_channels(const Tensor& a, const Tensor& b, Tensor& out) {
  const Shape& sa = a.shape();
  MEDSEG_CHECK(sa.per_channel() == b.shape().per_channel() &&
                   out.shape().per_channel() == sa.per_channel() &&
                   out.shape().c == sa.c + b.shape().c,
               "concat_channels: ", sa, " + ", b.shape(), " -> ", out.shape());
  check_same_device(a, b, "concat_channels");
  check_same_device(a, out, "concat_channels");
  if (a.device() == Device::CUDA) {
#ifdef MEDSEG_HAVE_CUDA
    cuda::concat_channels_forward(cuda_context(), sa.per_channel(), a.data(), sa.c, b.data(),
                                  b.shape().c, out.data());
#endif
    return;
  }
  cpu::concat_channels_forward(sa.per_channel(), a.data(), sa.c, b.data(), b.shape().c, out.data());
}

void split_channels(const Tensor& dout, Tensor& da, Tensor& db) {
  const Shape& s = dout.shape();
  MEDSEG_CHECK(da.shape().per_channel() == s.per_channel() &&
                   db.shape().per_channel() == s.per_channel() && s.c == da.shape().c + db.shape().c,
               "split_channels: ", s, " -> ", da.shape(), " + ", db.shape());
  check_same_device(dout, da, "split_channels");
  check_same_device(dout, db, "split_channels");
  if (dout.device() == Device::CUDA) {
#ifdef MEDSEG_HAVE_CUDA
    cuda::concat_channels_backward(cuda_context(), s.per_channel(), dout.data(), da.shape().c,
                                   db.shape().c, da.data(), db.data());
#endif
    return;
  }
  cpu::concat_channels_backward(s.per_channel(), dout.data(), da.shape().c, db.shape().c, da.data(),
                                db.data());
}

void leaky_relu_inplace(Tensor& y, float slope) {
  if (y.device() == Device::CUDA) {
#ifdef MEDSEG_HAVE_CUDA
    cuda::leaky_relu_forward(cuda_context(), y.numel(), y.data(), slope, y.data());
#endif
    return;
  }
  cpu::leaky_relu_forward(y.numel(), y.data(), slope, y.data());
}

double sum_of_squares(const std::vector<const Tensor*>& tensors) {
  double total = 0;
#ifdef MEDSEG_HAVE_CUDA
  std::vector<const Tensor*> dev;
  for (const Tensor* t : tensors)
    if (t->device() == Device::CUDA) dev.push_back(t);
  if (!dev.empty()) {
    auto& ctx = cuda_context();
    cuda::DeviceBuffer sums(sizeof(double) * dev.size());
    for (size_t i = 0; i < dev.size(); ++i)
      cuda::sum_squares(ctx, dev[i]->numel(), dev[i]->data(), sums.as<double>() + i);
    std::vector<double> host(dev.size());
    MEDSEG_CUDA_CHECK(cudaMemcpyAsync(host.data(), sums.get(), sizeof(double) * dev.size(),
                                      cudaMemcpyDeviceToHost, ctx.stream()));
    ctx.synchronize();
    for (double v : host) total += v;
  }
#endif
  for (const Tensor* t : tensors) {
    if (t->device() != Device::CPU) continue;
    const float* g = t->data();
    const int64_t n = t->numel();
    double s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static)
    for (int64_t i = 0; i < n; ++i) s += static_cast<double>(g[i]) * g[i];
    total += s;
  }
  return total;
}

}  // namespace medseg::nn
