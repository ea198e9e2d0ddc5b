// Private helpers shared by the .cu files of the CUDA backend: launch sizing, workspace carving and
// the per-channel partial reduction used by the norm statistics, the norm backward and the bias
// gradient.
//
// Channel reduction scheme (channels-last data, `rows` rows of C channels, optionally split into
// `groups` consecutive blocks of rows, one per sample for instance norm):
//   stage 1  channel_partials_kernel: a (32 x 8) thread block covers 32 consecutive channels
//            (one warp reads one row's 32 channels: 128 coalesced bytes) and strides over rows;
//            each thread accumulates NV double sums, the 8 rows of the block are combined in
//            shared memory in a fixed order, and one partial per (group, row block, channel) is
//            written.
//   stage 2  a small kernel sums the row-block partials of each (group, channel) in order.
// Everything is deterministic (no atomics on floating-point values): the same input gives the same
// bits on every run, which keeps training reruns reproducible on one GPU.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/device.hpp"

namespace medseg::cuda::detail {

constexpr int kThreads = 256;
constexpr int kTileC = 32;  // channels per reduction block (one warp's width)
constexpr int kTileR = 8;   // rows per reduction block step
constexpr int kUnroll = 4;  // independent loads in flight per thread

// Streaming multiprocessors of the current device (cached per device).
inline int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  MEDSEG_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 64) dev = 0;
  if (cached[dev] == 0)
    MEDSEG_CUDA_CHECK(cudaDeviceGetAttribute(&cached[dev], cudaDevAttrMultiProcessorCount, dev));
  return cached[dev];
}

// Blocks for a grid-stride elementwise kernel over `count` items: enough to fill the device, at
// most one item per thread.
inline unsigned elementwise_blocks(int64_t count) {
  const int64_t want = (count + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sm_count()) * 16;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(want, cap)));
}

// Carves 256-byte aligned pieces out of one workspace allocation.
class WorkspaceCarver {
 public:
  // Adds a piece of `count` elements of T; returns its byte offset.
  template <typename T>
  size_t add(int64_t count) {
    const size_t off = total_;
    total_ += (static_cast<size_t>(count) * sizeof(T) + 255) / 256 * 256;
    return off;
  }
  size_t total() const { return total_; }

 private:
  size_t total_ = 0;
};
template <typename T>
T* at_offset(void* base, size_t off) {
  return reinterpret_cast<T*>(static_cast<char*>(base) + off);
}

// Launch geometry of channel_partials_kernel.
struct ReduceGrid {
  dim3 grid, block;
  int row_blocks = 1;
};
inline ReduceGrid reduce_grid(int64_t rows_per_group, int64_t channels, int64_t groups) {
  ReduceGrid r;
  const int64_t tiles = (channels + kTileC - 1) / kTileC;
  const int64_t target = static_cast<int64_t>(sm_count()) * 8;  // blocks to keep every SM busy
  int64_t rb = (target + tiles * groups - 1) / (tiles * groups);
  rb = std::min<int64_t>(rb, (rows_per_group + kTileR - 1) / kTileR);
  rb = std::clamp<int64_t>(rb, 1, 65535);
  r.row_blocks = static_cast<int>(rb);
  r.grid =
      dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(rb), static_cast<unsigned>(groups));
  r.block = dim3(kTileC, kTileR, 1);
  return r;
}

// Stage 1 of the channel reduction. `Op` provides
//   __device__ void operator()(int64_t index, int64_t row, int channel, int group,
//                              double (&acc)[NV]) const
// which adds the contributions of element `index` = row * C + channel (global row) to acc.
// partials[((group * C + c) * row_blocks + row_block) * NV + i]: the row blocks of one (group,
// channel) are contiguous, so that stage 2 reads them coalesced.
template <int NV, typename Op>
__global__ void channel_partials_kernel(int64_t rows_per_group, int channels, Op op,
                                        double* partials) {
  __shared__ double sh[NV][kTileR][kTileC];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * kTileC + tx;
  const int g = blockIdx.z;
  double acc[NV];
#pragma unroll
  for (int i = 0; i < NV; ++i) acc[i] = 0.0;
  if (c < channels) {
    const int64_t step = static_cast<int64_t>(gridDim.y) * kTileR;
    const int64_t base = static_cast<int64_t>(g) * rows_per_group;
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * kTileR + ty; row < rows_per_group;
         row += step * kUnroll) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t rr = row + u * step;
        if (rr < rows_per_group) op((base + rr) * channels + c, base + rr, c, g, acc);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < NV; ++i) sh[i][ty][tx] = acc[i];
  __syncthreads();
  if (ty == 0 && c < channels) {
    double* out =
        partials + ((static_cast<int64_t>(g) * channels + c) * gridDim.y + blockIdx.y) * NV;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      double s = 0.0;
      for (int k = 0; k < kTileR; ++k) s += sh[i][k][tx];
      out[i] = s;
    }
  }
}

// Stage 2: one warp per (group, channel) sums its row-block partials (lane-strided, coalesced),
// then combines the lanes with a fixed shuffle tree: deterministic, and parallel enough that the
// hundreds of partials per channel cost a few microseconds rather than a serial loop's hundreds.
// totals[(group * C + c) * NV + i]; when out0 is not null it also receives component 0 as float.
template <int NV>
__global__ void reduce_partials_kernel(const double* partials, int row_blocks, int group_channels,
                                       double* totals, float* out0) {
  const int warp =
      static_cast<int>((static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32);
  const int lane = threadIdx.x % 32;
  if (warp >= group_channels) return;  // warp-uniform: whole warps leave together
  double acc[NV];
#pragma unroll
  for (int i = 0; i < NV; ++i) acc[i] = 0.0;
  const double* p = partials + static_cast<int64_t>(warp) * row_blocks * NV;
  for (int b = lane; b < row_blocks; b += 32) {
#pragma unroll
    for (int i = 0; i < NV; ++i) acc[i] += p[static_cast<int64_t>(b) * NV + i];
  }
#pragma unroll
  for (int i = 0; i < NV; ++i)
    for (int off = 16; off > 0; off /= 2) acc[i] += __shfl_down_sync(0xffffffffu, acc[i], off);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) totals[static_cast<int64_t>(warp) * NV + i] = acc[i];
    if (out0) out0[warp] = static_cast<float>(acc[0]);
  }
}

template <int NV>
inline void reduce_partials(cudaStream_t stream, const double* partials, int row_blocks,
                            int64_t group_channels, double* totals, float* out0 = nullptr) {
  const int64_t threads = group_channels * 32;
  const unsigned blocks = static_cast<unsigned>((threads + kThreads - 1) / kThreads);
  reduce_partials_kernel<NV><<<blocks, kThreads, 0, stream>>>(
      partials, row_blocks, static_cast<int>(group_channels), totals, out0);
  MEDSEG_CUDA_CHECK_LAUNCH();
}

inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

}  // namespace medseg::cuda::detail
