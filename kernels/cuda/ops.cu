// Element-wise ops, the Dice + cross-entropy loss, the per-channel sum and the optimizer update on
// the GPU (contracts: ops.hpp and kernels/cpu/ops.hpp).
//
// Element-wise kernels are grid-stride loops sized to fill the device once (common.cuh). The loss
// makes three passes over the voxels: (1) softmax into probs (the caller's buffer, or workspace),
// flagging the first out-of-range label; (2) per-(group, class) sums of p, p [label == k],
// [label == k] and -log p [label == k] as a channel reduction of probs (common.cuh: deterministic,
// double); a one-block kernel then derives the loss and the Dice gradient coefficients a, b (the
// algebra of cpu::dice_terms); (3) the gradient from the stored probabilities. The loss scalars are
// copied to the host once per call.
#include <cuda_runtime.h>

#include <cmath>
#include <vector>

#include "core/error.hpp"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/ops.hpp"

namespace medseg::cuda {

namespace detail {
__global__ void probe_kernel() {}
// Whether this build's kernels have an image for the current device (used by cuda_usable()).
cudaError_t probe_kernel_image() {
  cudaFuncAttributes attr{};
  const cudaError_t e = cudaFuncGetAttributes(&attr, probe_kernel);
  if (e != cudaSuccess) cudaGetLastError();
  return e;
}
}  // namespace detail

namespace {
using detail::at_offset;
using detail::elementwise_blocks;
using detail::kThreads;

#define GRID_STRIDE(i, count)                                                                \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (count); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

__global__ void leaky_forward_kernel(int64_t count, const float* x, float slope, float* y) {
  GRID_STRIDE(i, count) {
    const float v = x[i];
    y[i] = v > 0.f ? v : slope * v;
  }
}

__global__ void leaky_backward_kernel(int64_t count, const float* dy, const float* y, float slope,
                                      float* dx) {
  GRID_STRIDE(i, count) {
    const float g = dy[i];
    dx[i] = y[i] > 0.f ? g : slope * g;
  }
}

// One thread per output element; the source is chosen by the channel index.
__global__ void concat_forward_kernel(int64_t count, const float* a, int64_t ca, const float* b,
                                      int64_t cb, float* out) {
  const int64_t c = ca + cb;
  GRID_STRIDE(i, count) {
    const int64_t row = i / c, ch = i % c;
    out[i] = ch < ca ? a[row * ca + ch] : b[row * cb + (ch - ca)];
  }
}

__global__ void concat_backward_kernel(int64_t count, const float* dout, int64_t ca, int64_t cb,
                                       float* da, float* db) {
  const int64_t c = ca + cb;
  GRID_STRIDE(i, count) {
    const int64_t row = i / c, ch = i % c;
    if (ch < ca) {
      if (da) da[row * ca + ch] = dout[i];
    } else if (db) {
      db[row * cb + (ch - ca)] = dout[i];
    }
  }
}

__global__ void softmax_kernel(int64_t rows, int k, const float* logits, float* probs) {
  GRID_STRIDE(r, rows) {
    const float* z = logits + r * k;
    float* p = probs + r * k;
    float m = z[0];
    for (int j = 1; j < k; ++j) m = fmaxf(m, z[j]);
    float s = 0.f;
    for (int j = 0; j < k; ++j) {
      const float e = expf(z[j] - m);
      p[j] = e;
      s += e;
    }
    const float inv = 1.f / s;
    for (int j = 0; j < k; ++j) p[j] *= inv;
  }
}

// ---- Dice + CE ----
constexpr int kLossThreads = 256;  // the finalize block; also the bound on groups * classes

// Softmax into probs (the caller's buffer or workspace), recording the first voxel whose label is
// out of range in *bad_row (initialized to all ones).
__global__ void loss_softmax_kernel(int64_t rows, int k, const float* logits,
                                    const uint16_t* labels, float* probs,
                                    unsigned long long* bad_row) {
  GRID_STRIDE(r, rows) {
    const float* z = logits + r * k;
    float* p = probs + r * k;
    float m = z[0];
    for (int j = 1; j < k; ++j) m = fmaxf(m, z[j]);
    float s = 0.f;
    for (int j = 0; j < k; ++j) {
      const float e = expf(z[j] - m);
      p[j] = e;
      s += e;
    }
    const float inv = 1.f / s;
    for (int j = 0; j < k; ++j) p[j] *= inv;
    if (labels[r] >= k) atomicMin(bad_row, static_cast<unsigned long long>(r));
  }
}

// Per (group, class) sums over the voxels, as a channel reduction of probs (rows, K):
// acc = [sum p, sum p [label == k], sum [label == k], sum -log p [label == k]].
struct LossSumsOp {
  const float* probs;
  const uint16_t* labels;
  __device__ void operator()(int64_t i, int64_t row, int c, int, double (&acc)[4]) const {
    const double p = probs[i];
    acc[0] += p;
    if (labels[row] == c) {
      acc[1] += p;
      acc[2] += 1.0;
      acc[3] -= log(fmax(p, 1e-30));  // the same floor as cpu::dice_ce_loss (float probabilities)
    }
  }
};

// Layout of the result block (doubles): [loss, ce, soft_dice, dice_per_class[K]], then a and b
// (groups * K each).
struct LossFinalizeArgs {
  const double* totals;  // [(group * K + k) * 4 + i], the LossSumsOp sums
  int groups, k;
  double rows, smooth, ce_weight, dice_weight;
  int k0;  // first included class
  double* result;
  double* a;
  double* b;
};

// One block of kLossThreads threads; groups * K <= kLossThreads (checked by the caller).
__global__ void loss_finalize_kernel(LossFinalizeArgs a) {
  __shared__ double inter[kLossThreads], psum[kLossThreads], gsum[kLossThreads], ce[kLossThreads];
  const int n = a.groups * a.k;
  const int t = threadIdx.x;
  if (t < n) {
    const double* tot = a.totals + 4 * t;
    psum[t] = tot[0];
    inter[t] = tot[1];
    gsum[t] = tot[2];
    ce[t] = tot[3];
  }
  __syncthreads();
  if (t != 0) return;
  const double nk = static_cast<double>((a.k - a.k0) * a.groups);
  double ce_sum = 0.0, mean = 0.0;
  for (int c = 0; c < a.k; ++c) a.result[3 + c] = 0.0;
  for (int i = 0; i < n; ++i) {
    const int c = i % a.k;
    ce_sum += ce[i];
    const double den = psum[i] + gsum[i] + a.smooth;
    const double dice = (2.0 * inter[i] + a.smooth) / den;
    a.result[3 + c] += dice / static_cast<double>(a.groups);
    a.a[i] = 0.0;
    a.b[i] = 0.0;
    if (c < a.k0) continue;
    mean += dice / nk;
    a.a[i] = -(1.0 / nk) * 2.0 / den;
    a.b[i] = (1.0 / nk) * (2.0 * inter[i] + a.smooth) / (den * den);
  }
  const double ce_mean = ce_sum / a.rows;
  a.result[0] = a.ce_weight * ce_mean - a.dice_weight * mean;
  a.result[1] = ce_mean;
  a.result[2] = mean;
}

// d(scale * loss)/d logits, one thread per voxel (see cpu::dice_ce_loss_ref for the algebra).
__global__ void loss_grad_kernel(int64_t rows, int k, int64_t per_group, bool batch_dice,
                                 const float* probs, const uint16_t* labels, const double* a,
                                 const double* b, double ce_weight, double dice_weight,
                                 double scale, float* dlogits) {
  GRID_STRIDE(r, rows) {
    const int g = batch_dice ? 0 : static_cast<int>(r / per_group);
    const int lab = labels[r];
    const float* p = probs + r * k;
    const double* ag = a + g * k;
    const double* bg = b + g * k;
    double dot = 0.0;
    for (int j = 0; j < k; ++j) dot += p[j] * dice_weight * ((j == lab ? ag[j] : 0.0) + bg[j]);
    const double inv_rows = 1.0 / static_cast<double>(rows);
    for (int j = 0; j < k; ++j) {
      const double gj = j == lab ? 1.0 : 0.0;
      const double dp = dice_weight * (ag[j] * gj + bg[j]);
      const double dce = ce_weight * (p[j] - gj) * inv_rows;
      dlogits[r * k + j] = static_cast<float>(scale * (dce + p[j] * (dp - dot)));
    }
  }
}

// ---- channel sum / bias ----
struct ValueOp {
  const float* x;
  __device__ void operator()(int64_t i, int64_t, int, int, double (&acc)[1]) const {
    acc[0] += x[i];
  }
};

__global__ void add_bias_kernel(int64_t count, int channels, const float* bias, float* y) {
  GRID_STRIDE(i, count) {
    y[i] += bias[i % channels];
  }
}

__global__ void sgd_nesterov_kernel(int64_t count, float* w, const float* g, float* v, float lr,
                                    float mu, float wd, float grad_scale) {
  GRID_STRIDE(i, count) {
    const float wi = w[i];
    const float gi = fmaf(wd, wi, g[i] * grad_scale);
    const float vi = fmaf(mu, v[i], gi);
    v[i] = vi;
    w[i] = wi - lr * fmaf(mu, vi, gi);
  }
}

__global__ void adamw_kernel(int64_t count, float* w, const float* g, float* m, float* v,
                             AdamWParams p) {
  GRID_STRIDE(i, count) {
    const float gi = g[i] * p.grad_scale;
    const float mi = p.beta1 * m[i] + (1.f - p.beta1) * gi;
    const float vi = p.beta2 * v[i] + (1.f - p.beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float wi = w[i];
    w[i] = wi - p.lr * (mi * p.c1 / (sqrtf(vi * p.c2) + p.eps) + p.wd * wi);
  }
}

__global__ void add_inplace_kernel(int64_t count, float* a, const float* b) {
  GRID_STRIDE(i, count) { a[i] += b[i]; }
}

// Stage 1 of sum_squares: each block writes the double sum of its grid-stride share, combined in
// shared memory in a fixed tree order.
__global__ void sum_squares_partials_kernel(int64_t count, const float* x, double* partials) {
  __shared__ double sh[kThreads];
  double acc = 0.0;
  GRID_STRIDE(i, count) {
    const double v = x[i];
    acc += v * v;
  }
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) sh[threadIdx.x] += sh[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = sh[0];
}

// Stage 2: one thread sums the block partials in order (a few thousand at most).
__global__ void sum_partials_kernel(int n, const double* partials, double* out) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    double s = 0.0;
    for (int i = 0; i < n; ++i) s += partials[i];
    *out = s;
  }
}

}  // namespace

// ------------------------------------------------------------------ entry points

void leaky_relu_forward(CudaContext& ctx, int64_t count, const float* x, float slope, float* y) {
  if (count <= 0) return;
  leaky_forward_kernel<<<elementwise_blocks(count), kThreads, 0, ctx.stream()>>>(count, x, slope,
                                                                                 y);
  MEDSEG_CUDA_CHECK_LAUNCH();
}

void leaky_relu_backward(CudaContext& ctx, int64_t count, const float* dy, const float* y,
                         float slope, float* dx) {
  if (count <= 0) return;
  leaky_backward_kernel<<<elementwise_blocks(count), kThreads, 0, ctx.stream()>>>(count, dy, y,
                                                                                  slope, dx);
  MEDSEG_CUDA_CHECK_LAUNCH();
}

void concat_channels_forward(CudaContext& ctx, int64_t rows, const float* a, int64_t ca,
                             const float* b, int64_t cb, float* out) {
  MEDSEG_CHECK(ca >= 0 && cb >= 0 && rows >= 0, "concat: bad sizes rows ", rows, " ca ", ca, " cb ",
               cb);
  const int64_t count = rows * (ca + cb);
  if (count == 0) return;
  concat_forward_kernel<<<elementwise_blocks(count), kThreads, 0, ctx.stream()>>>(count, a, ca, b,
                                                                                  cb, out);
  MEDSEG_CUDA_CHECK_LAUNCH();
}

void concat_channels_backward(CudaContext& ctx, int64_t rows, const float* dout, int64_t ca,
                              int64_t cb, float* da, float* db) {
  MEDSEG_CHECK(ca >= 0 && cb >= 0 && rows >= 0, "concat: bad sizes rows ", rows, " ca ", ca, " cb ",
               cb);
  const int64_t count = rows * (ca + cb);
  if (count == 0 || (!da && !db)) return;
  concat_backward_kernel<<<elementwise_blocks(count), kThreads, 0, ctx.stream()>>>(count, dout, ca,
                                                                                   cb, da, db);
  MEDSEG_CUDA_CHECK_LAUNCH();
}

void softmax_channels(CudaContext& ctx, int64_t rows, int64_t k, const float* logits,
                      float* probs) {
  MEDSEG_CHECK(k >= 1 && k <= (1 << 20), "softmax over ", k, " channels");
  if (rows <= 0) return;
  softmax_kernel<<<elementwise_blocks(rows), kThreads, 0, ctx.stream()>>>(rows, static_cast<int>(k),
                                                                          logits, probs);
  MEDSEG_CUDA_CHECK_LAUNCH();
}

DiceCeResult dice_ce_loss(CudaContext& ctx, const Shape& s, const float* logits,
                          const uint16_t* labels, const DiceCeOptions& opt, float scale,
                          float* dlogits, float* probs) {
  MEDSEG_CHECK(s.c >= 2, "dice_ce_loss needs at least 2 classes, logits shape ", s);
  MEDSEG_CHECK(s.numel() > 0, "dice_ce_loss on an empty tensor ", s);
  MEDSEG_CHECK(labels != nullptr && logits != nullptr, "dice_ce_loss: null input");
  const int k = static_cast<int>(s.c);
  const int groups = opt.batch_dice ? 1 : static_cast<int>(s.n);
  MEDSEG_CHECK(groups * k <= kLossThreads,
               "dice_ce_loss on the GPU supports groups * classes <= ", kLossThreads, ", got ",
               groups, " * ", k);
  const int64_t rows = s.per_channel(), per = s.spatial();
  const int64_t groups_rows = opt.batch_dice ? rows : per;
  const detail::ReduceGrid rg = detail::reduce_grid(groups_rows, k, groups);

  detail::WorkspaceCarver wc;
  const size_t off_probs = probs ? 0 : wc.add<float>(rows * k);
  const size_t off_partials = wc.add<double>(static_cast<int64_t>(rg.row_blocks) * groups * k * 4);
  const size_t off_totals = wc.add<double>(groups * k * 4);
  const size_t off_result = wc.add<double>(3 + k);
  const size_t off_a = wc.add<double>(groups * k);
  const size_t off_b = wc.add<double>(groups * k);
  const size_t off_bad = wc.add<unsigned long long>(1);
  void* ws = ctx.workspace(wc.total());
  float* p = probs ? probs : at_offset<float>(ws, off_probs);
  auto* bad_row = at_offset<unsigned long long>(ws, off_bad);
  double* result = at_offset<double>(ws, off_result);

  MEDSEG_CUDA_CHECK(cudaMemsetAsync(bad_row, 0xFF, sizeof(unsigned long long), ctx.stream()));
  loss_softmax_kernel<<<elementwise_blocks(rows), kThreads, 0, ctx.stream()>>>(rows, k, logits,
                                                                               labels, p, bad_row);
  MEDSEG_CUDA_CHECK_LAUNCH();
  double* partials = at_offset<double>(ws, off_partials);
  detail::channel_partials_kernel<4, LossSumsOp>
      <<<rg.grid, rg.block, 0, ctx.stream()>>>(groups_rows, k, LossSumsOp{p, labels}, partials);
  MEDSEG_CUDA_CHECK_LAUNCH();
  double* totals = at_offset<double>(ws, off_totals);
  detail::reduce_partials<4>(ctx.stream(), partials, rg.row_blocks, groups * k, totals);
  LossFinalizeArgs fa{};
  fa.totals = totals;
  fa.groups = groups;
  fa.k = k;
  fa.rows = static_cast<double>(rows);
  fa.smooth = opt.smooth;
  fa.ce_weight = opt.ce_weight;
  fa.dice_weight = opt.dice_weight;
  fa.k0 = opt.include_background ? 0 : 1;
  fa.result = result;
  fa.a = at_offset<double>(ws, off_a);
  fa.b = at_offset<double>(ws, off_b);
  loss_finalize_kernel<<<1, kLossThreads, 0, ctx.stream()>>>(fa);
  MEDSEG_CUDA_CHECK_LAUNCH();
  if (dlogits) {
    loss_grad_kernel<<<elementwise_blocks(rows), kThreads, 0, ctx.stream()>>>(
        rows, k, per, opt.batch_dice, p, labels, fa.a, fa.b, opt.ce_weight, opt.dice_weight, scale,
        dlogits);
    MEDSEG_CUDA_CHECK_LAUNCH();
  }
  std::vector<double> host(3 + k);
  unsigned long long bad = 0;
  MEDSEG_CUDA_CHECK(cudaMemcpyAsync(host.data(), result, host.size() * sizeof(double),
                                    cudaMemcpyDeviceToHost, ctx.stream()));
  MEDSEG_CUDA_CHECK(
      cudaMemcpyAsync(&bad, bad_row, sizeof(bad), cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.synchronize();
  if (bad != ~0ull) {
    uint16_t lab = 0;
    MEDSEG_CUDA_CHECK(cudaMemcpy(&lab, labels + bad, sizeof(lab), cudaMemcpyDeviceToHost));
    throw ArgumentError(check_message(__FILE__, __LINE__, "labels[voxel] < K", "label ", lab,
                                      " at voxel ", bad, " is >= the class count ", k));
  }
  DiceCeResult res;
  res.loss = host[0];
  res.ce = host[1];
  res.soft_dice = host[2];
  res.dice_per_class.assign(host.begin() + 3, host.end());
  return res;
}

void channel_sum(CudaContext& ctx, int64_t rows, int64_t channels, const float* x, float* out) {
  MEDSEG_CHECK(channels >= 1 && channels <= (1 << 20) && rows >= 0, "channel_sum over rows ", rows,
               " channels ", channels);
  const int c = static_cast<int>(channels);
  const detail::ReduceGrid rg = detail::reduce_grid(std::max<int64_t>(rows, 1), c, 1);
  detail::WorkspaceCarver wc;
  const size_t off_partials = wc.add<double>(static_cast<int64_t>(rg.row_blocks) * c);
  const size_t off_totals = wc.add<double>(c);
  void* ws = ctx.workspace(wc.total());
  double* partials = at_offset<double>(ws, off_partials);
  detail::channel_partials_kernel<1, ValueOp>
      <<<rg.grid, rg.block, 0, ctx.stream()>>>(rows, c, ValueOp{x}, partials);
  MEDSEG_CUDA_CHECK_LAUNCH();
  detail::reduce_partials<1>(ctx.stream(), partials, rg.row_blocks, c,
                             at_offset<double>(ws, off_totals), out);
}

void add_channel_bias(CudaContext& ctx, int64_t rows, int64_t channels, const float* bias,
                      float* y) {
  const int64_t count = rows * channels;
  if (count <= 0) return;
  add_bias_kernel<<<elementwise_blocks(count), kThreads, 0, ctx.stream()>>>(
      count, static_cast<int>(channels), bias, y);
  MEDSEG_CUDA_CHECK_LAUNCH();
}

void sgd_nesterov_update(CudaContext& ctx, int64_t count, float* w, const float* g, float* v,
                         float lr, float mu, float wd, float grad_scale) {
  if (count <= 0) return;
  sgd_nesterov_kernel<<<elementwise_blocks(count), kThreads, 0, ctx.stream()>>>(
      count, w, g, v, lr, mu, wd, grad_scale);
  MEDSEG_CUDA_CHECK_LAUNCH();
}

void adamw_update(CudaContext& ctx, int64_t count, float* w, const float* g, float* m, float* v,
                  const AdamWParams& p) {
  if (count <= 0) return;
  adamw_kernel<<<elementwise_blocks(count), kThreads, 0, ctx.stream()>>>(count, w, g, m, v, p);
  MEDSEG_CUDA_CHECK_LAUNCH();
}

void add_inplace(CudaContext& ctx, int64_t count, float* a, const float* b) {
  if (count <= 0) return;
  add_inplace_kernel<<<elementwise_blocks(count), kThreads, 0, ctx.stream()>>>(count, a, b);
  MEDSEG_CUDA_CHECK_LAUNCH();
}

void sum_squares(CudaContext& ctx, int64_t count, const float* x, double* out) {
  const unsigned blocks = elementwise_blocks(std::max<int64_t>(count, 1));
  double* partials = static_cast<double*>(ctx.workspace(sizeof(double) * blocks));
  sum_squares_partials_kernel<<<blocks, kThreads, 0, ctx.stream()>>>(count, x, partials);
  MEDSEG_CUDA_CHECK_LAUNCH();
  sum_partials_kernel<<<1, 32, 0, ctx.stream()>>>(static_cast<int>(blocks), partials, out);
  MEDSEG_CUDA_CHECK_LAUNCH();
}

}  // namespace medseg::cuda
