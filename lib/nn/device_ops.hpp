// Where the networks of this process compute, and the few tensor operations of lib/nn that dispatch
// on a tensor's device: the CPU kernels (kernels/cpu) for host tensors, the CUDA backend
// (kernels/cuda) for device tensors. This header includes no CUDA header; the CUDA half is compiled
// only when the backend is (MEDSEG_HAVE_CUDA).
//
// One CUDA context (stream, cuDNN handle, workspace, convolution plans) serves every network of the
// process: use_cuda_device() creates it on the chosen device; the layers find it through
// cuda_context() (device_ops_cuda.hpp).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.hpp"

namespace medseg::nn {

// True when this build has the CUDA backend.
bool cuda_compiled();
// Makes CUDA device `index` current for this process (and the threads it starts after this call),
// installs the device allocator and creates the shared context. CudaError with a one-line reason
// when the device is not usable or the backend is not compiled in. Calling it again with the same
// index is a no-op; another index is an error (one device per process).
void use_cuda_device(int index, bool allow_tf32 = true);
// Whether use_cuda_device() has run.
bool cuda_device_active();
// TF32 tensor-core convolutions (on by default in training and inference, off in the comparisons
// with the CPU reference).
void set_cuda_allow_tf32(bool on);
// The shared context's stream as a cudaStream_t (null without an active device): for NCCL, which
// must order its collectives with the training kernels.
void* cuda_stream();
// Waits for the device's queued work (no-op without an active device).
void synchronize_device();
// The active device's name ("" without one) and the caching allocator's peak bytes in use since
// the process started (0 without a device).
std::string cuda_device_name();
size_t cuda_peak_bytes();

// a += b (same shape and device).
void add_inplace(Tensor& a, const Tensor& b);
// out = [a, b] along channels (a's channels first); all on one device.
void concat_channels(const Tensor& a, const Tensor& b, Tensor& out);
// da = dout[..., :ca], db = dout[..., ca:] (the backward of concat_channels).
void split_channels(const Tensor& dout, Tensor& da, Tensor& db);
// y = LeakyReLU(y) in place.
void leaky_relu_inplace(Tensor& y, float slope);
// sum over the tensors of sum(x^2), in double (one host synchronization for device tensors).
double sum_of_squares(const std::vector<const Tensor*>& tensors);

}  // namespace medseg::nn
