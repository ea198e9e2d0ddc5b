// Batch renorm / batch norm / instance norm on the GPU (contract: norm.hpp, spec:
// ../shared/docs/batch-renorm.md).
//
// Training forward, three launches and two passes over x, no host synchronization:
//   1. per (group, channel) double sums of x and x^2 (common.cuh, two stages);
//   2. finalize_train (one block): mu_B, sigma_B = sqrt(var_B + eps) (biased), r and d from the
//      PRE-update running statistics with sigma floored at sqrt(eps), clip counts, the NaN guard
//      (one non-finite statistic in any channel skips the running update of all channels), the
//      running update, the cache, per-(group, channel) scale = gamma r / sigma_B and shift = gamma
//      d + beta, and the counters;
//   3. normalize: y = act((x - mu_B) * scale + shift).
// Why our own normalize kernel and not cudnnBatchNormalizationForwardInference with scale gamma*r
// and shift gamma*d + beta: that call would also read x once and write y once, but cuDNN's legacy
// activation modes have no LeakyReLU, so with leaky = true (every norm of the U-Net) it would need
// a second read-modify-write pass over y; and instance norm (per-(n, c) statistics) does not map
// onto it at all. The fused kernel is one read and one write for all three kinds, the memory-bound
// minimum, and keeps a single code path to test. cuDNN's own statistics are not usable anyway: its
// running variance is Bessel-corrected and its saved statistic is an inverse std of the variance it
// computed, while ours are biased and the running statistic is a std.
//
// Statistics in one pass of double sums: var = E[x^2] - E[x]^2 loses about mean^2/var * 1e-16
// relative precision, negligible for activations (the CPU reference uses two passes; the tests
// compare against it).
//
// Backward, three launches and two passes:
//   1. per (group, channel) sums of dz and dz * x_bn, dz = dy * lrelu'(y) (mask from y > 0);
//   2. finalize_backward (one block): dbeta = sum dz, dgamma = r sum(dz x_bn) + d sum dz
//      (summed over samples for instance norm), and per (group, channel) k = gamma r / sigma_B,
//      mean dz and mean dz x_bn;
//   3. dx = k (dz - mean(dz) - x_bn mean(dz x_bn)).
#include <cuda_runtime.h>

#include <cmath>

#include "core/error.hpp"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/norm.hpp"

namespace medseg::cuda {
namespace {
using detail::at_offset;
using detail::kThreads;
using detail::WorkspaceCarver;

enum CounterSlot { kSteps = 0, kSkipped, kRClipped, kDClipped, kLastSkipped, kLastR, kLastD };

struct StatsOp {
  const float* x;
  __device__ void operator()(int64_t i, int64_t, int, int, double (&acc)[2]) const {
    const double v = x[i];
    acc[0] += v;
    acc[1] += v * v;
  }
};

// LeakyReLU mask of the backward: from the forward output (y > 0), or, without y, from the
// pre-activation recomputed with the forward's own expression and coefficients (the same fmaf as
// normalize_kernel, so the same bits); neither when the norm has no LeakyReLU.
struct MaskSource {
  const float* y = nullptr;
  const float* scale = nullptr;  // per (group, channel), with shift: used when y is null
  const float* shift = nullptr;
  float slope = 0.f;
  __device__ __forceinline__ float apply(float dy, int64_t i, float x, float mean, int gc) const {
    if (y) return y[i] > 0.f ? dy : dy * slope;
    if (scale) return fmaf(x - mean, scale[gc], shift[gc]) > 0.f ? dy : dy * slope;
    return dy;
  }
};

struct BackwardSumsOp {
  const float* dy;
  const float* x;
  MaskSource mask;
  const float* mean;
  const float* inv_std;
  int channels;
  __device__ void operator()(int64_t i, int64_t, int c, int g, double (&acc)[2]) const {
    const int gc = g * channels + c;
    const float dz = mask.apply(dy[i], i, x[i], mean[gc], gc);
    const float x_bn = (x[i] - mean[gc]) * inv_std[gc];
    acc[0] += dz;
    acc[1] += static_cast<double>(dz) * x_bn;
  }
};

struct FinalizeTrainArgs {
  const double* totals;  // [(group * C + c) * 2 + i]: sum x, sum x^2
  int groups, channels;
  double m;  // values per statistic
  int kind;  // NormKind as int
  double eps, alpha, r_max, d_max;
  const float *gamma, *beta;
  float *running_mean, *running_std;  // null for instance norm
  float *cache_mean, *cache_inv_std, *cache_r, *cache_d;
  float *scale, *shift;              // per (group, channel), for the normalize pass
  double *batch_mean, *batch_sigma;  // per (group, channel), scratch for the running update
  unsigned long long* counters;      // may be null
};

__global__ void finalize_train_kernel(FinalizeTrainArgs a) {
  __shared__ int r_clipped, d_clipped;
  if (threadIdx.x == 0) r_clipped = d_clipped = 0;
  __syncthreads();
  const bool renorm = a.kind == static_cast<int>(NormKind::BatchRenorm);
  const double sigma_floor = sqrt(a.eps);
  int bad = 0;
  const int total = a.groups * a.channels;
  for (int gc = threadIdx.x; gc < total; gc += blockDim.x) {
    const int c = gc % a.channels;
    const double* tot = a.totals + 2 * gc;
    const double mean = tot[0] / a.m;
    double var = tot[1] / a.m - mean * mean;
    if (var < 0.0) var = 0.0;  // rounding; a NaN stays NaN (the comparison is false)
    const double sigma_b = sqrt(var + a.eps);
    if (!isfinite(mean) || !isfinite(sigma_b)) bad = 1;
    double r = 1.0, d = 0.0;
    if (renorm) {
      const double sigma = fmax(static_cast<double>(a.running_std[c]), sigma_floor);
      const double r_raw = sigma_b / sigma;
      const double d_raw = (mean - a.running_mean[c]) / sigma;
      const double r_lo = 1.0 / a.r_max;
      r = fmin(fmax(r_raw, r_lo), a.r_max);
      d = fmin(fmax(d_raw, -a.d_max), a.d_max);
      if (r_raw < r_lo || r_raw > a.r_max) atomicAdd(&r_clipped, 1);
      if (d_raw < -a.d_max || d_raw > a.d_max) atomicAdd(&d_clipped, 1);
      // fmin/fmax drop a NaN operand; keep NaN statistics visible as NaN r and d like the
      // reference.
      if (isnan(r_raw)) r = r_raw;
      if (isnan(d_raw)) d = d_raw;
    }
    const double gamma = a.gamma[c];
    a.cache_mean[gc] = static_cast<float>(mean);
    a.cache_inv_std[gc] = static_cast<float>(1.0 / sigma_b);
    a.cache_r[gc] = static_cast<float>(r);
    a.cache_d[gc] = static_cast<float>(d);
    a.scale[gc] = static_cast<float>(gamma * r / sigma_b);
    a.shift[gc] = static_cast<float>(gamma * d + a.beta[c]);
    a.batch_mean[gc] = mean;
    a.batch_sigma[gc] = sigma_b;
  }
  const int any_bad = __syncthreads_or(bad);
  const bool batch_kind = a.kind != static_cast<int>(NormKind::InstanceNorm);
  if (batch_kind && !any_bad) {
    for (int c = threadIdx.x; c < a.channels; c += blockDim.x) {
      const double rm = a.running_mean[c], rs = a.running_std[c];
      a.running_mean[c] = static_cast<float>(rm + a.alpha * (a.batch_mean[c] - rm));
      a.running_std[c] = static_cast<float>(rs + a.alpha * (a.batch_sigma[c] - rs));
    }
  }
  if (threadIdx.x == 0 && a.counters) {
    const bool skipped = batch_kind && any_bad;
    a.counters[kSteps] += 1;
    a.counters[kSkipped] += skipped ? 1 : 0;
    a.counters[kRClipped] += static_cast<unsigned long long>(r_clipped);
    a.counters[kDClipped] += static_cast<unsigned long long>(d_clipped);
    a.counters[kLastSkipped] = skipped ? 1 : 0;
    a.counters[kLastR] = static_cast<unsigned long long>(r_clipped);
    a.counters[kLastD] = static_cast<unsigned long long>(d_clipped);
  }
}

// Scale/shift for batch-kind inference: scale = gamma / max(sigma, sqrt eps), shift = beta, with
// the running mean as the centre.
__global__ void infer_params_kernel(int channels, double eps, const float* gamma, const float* beta,
                                    const float* running_mean, const float* running_std,
                                    float* mean, float* scale, float* shift) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  const double sigma = fmax(static_cast<double>(running_std[c]), sqrt(eps));
  mean[c] = running_mean[c];
  scale[c] = static_cast<float>(gamma[c] / sigma);
  shift[c] = beta[c];
}

__device__ __forceinline__ float activate(float z, bool leaky, float slope) {
  return (!leaky || z > 0.f) ? z : slope * z;
}

// Element index -> (channel, group) without 64-bit divisions where the tensor allows: Index is
// uint32_t when the element count fits (every U-Net activation does; a 64-bit division costs as
// much as the memory traffic of the element), and the group division is compiled out for the batch
// kinds.
template <typename Index, bool kGroups>
__device__ __forceinline__ int param_index(Index e, Index channels, Index group_elems) {
  const int c = static_cast<int>(e % channels);
  if constexpr (kGroups) return static_cast<int>(e / group_elems) * static_cast<int>(channels) + c;
  return c;
}

// y = act((x - mean[gc]) * scale[gc] + shift[gc]); `group_elems` = elements per group (instance
// norm: one sample).
template <typename Index, bool kGroups>
__global__ void normalize_kernel(Index count, Index channels, Index group_elems, const float* x,
                                 const float* mean, const float* scale, const float* shift,
                                 bool leaky, float slope, float* y) {
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    const int gc = param_index<Index, kGroups>(i, channels, group_elems);
    y[i] = activate(fmaf(x[i] - mean[gc], scale[gc], shift[gc]), leaky, slope);
  }
}

// Same, 4 channels per thread (channels % 4 == 0, 16-byte aligned x and y).
template <typename Index, bool kGroups>
__global__ void normalize4_kernel(Index count4, Index channels, Index group_elems, const float4* x,
                                  const float* mean, const float* scale, const float* shift,
                                  bool leaky, float slope, float4* y) {
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < count4;
       i += stride) {
    const int gc = param_index<Index, kGroups>(i * 4, channels, group_elems);
    const float4 v = x[i];
    float4 o;
    o.x = activate(fmaf(v.x - mean[gc + 0], scale[gc + 0], shift[gc + 0]), leaky, slope);
    o.y = activate(fmaf(v.y - mean[gc + 1], scale[gc + 1], shift[gc + 1]), leaky, slope);
    o.z = activate(fmaf(v.z - mean[gc + 2], scale[gc + 2], shift[gc + 2]), leaky, slope);
    o.w = activate(fmaf(v.w - mean[gc + 3], scale[gc + 3], shift[gc + 3]), leaky, slope);
    y[i] = o;
  }
}

struct FinalizeBackwardArgs {
  const double* totals;  // [(group * C + c) * 2 + i]: sum dz, sum dz x_bn
  int groups, channels;
  double m;
  const float* gamma;
  const float *cache_inv_std, *cache_r, *cache_d;
  float *dgamma, *dbeta;
  float *k, *mean_dz, *mean_dz_xbn;  // per (group, channel)
};

__global__ void finalize_backward_kernel(FinalizeBackwardArgs a) {
  for (int c = threadIdx.x; c < a.channels; c += blockDim.x) {
    double dgamma = 0.0, dbeta = 0.0;
    for (int g = 0; g < a.groups; ++g) {
      const int gc = g * a.channels + c;
      const double* tot = a.totals + 2 * gc;
      const double r = a.cache_r[gc], d = a.cache_d[gc];
      dbeta += tot[0];
      dgamma += r * tot[1] + d * tot[0];
      a.k[gc] = static_cast<float>(static_cast<double>(a.gamma[c]) * r * a.cache_inv_std[gc]);
      a.mean_dz[gc] = static_cast<float>(tot[0] / a.m);
      a.mean_dz_xbn[gc] = static_cast<float>(tot[1] / a.m);
    }
    a.dgamma[c] = static_cast<float>(dgamma);
    a.dbeta[c] = static_cast<float>(dbeta);
  }
}

// dx may be dy itself: each thread reads its element before writing it.
template <typename Index, bool kGroups>
__global__ void norm_dx_kernel(Index count, Index channels, Index group_elems, const float* dy,
                               const float* x, MaskSource mask, const float* mean,
                               const float* inv_std, const float* k, const float* mean_dz,
                               const float* mean_dz_xbn, float* dx) {
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    const int gc = param_index<Index, kGroups>(i, channels, group_elems);
    const float dz = mask.apply(dy[i], i, x[i], mean[gc], gc);
    const float x_bn = (x[i] - mean[gc]) * inv_std[gc];
    dx[i] = k[gc] * (dz - mean_dz[gc] - x_bn * mean_dz_xbn[gc]);
  }
}

// Calls fn.template operator()<Index, kGroups>() with the cheapest index type and group mode for s.
template <typename Fn>
void dispatch_index(const Shape& s, bool groups, Fn&& fn) {
  // Below 2^31 elements a 32-bit grid-stride index cannot wrap: i + stride < 2^31 + 2^24 < 2^32.
  const bool small = s.numel() < (int64_t{1} << 31);
  if (small && groups)
    fn.template operator()<uint32_t, true>();
  else if (small)
    fn.template operator()<uint32_t, false>();
  else if (groups)
    fn.template operator()<int64_t, true>();
  else
    fn.template operator()<int64_t, false>();
}

void check_args(const NormConfig& cfg, const Shape& s, const void* x, const void* gamma,
                const void* beta) {
  MEDSEG_CHECK(s.numel() > 0, "normalization of an empty tensor ", s);
  MEDSEG_CHECK(cfg.eps > 0.f, "eps must be positive, got ", cfg.eps);
  MEDSEG_CHECK(cfg.r_max >= 1.f && cfg.d_max >= 0.f,
               "clips need r_max >= 1 and d_max >= 0, got r_max ", cfg.r_max, " d_max ", cfg.d_max);
  MEDSEG_CHECK(!cfg.leaky || cfg.slope > 0.f,
               "the LeakyReLU mask is recovered from y, needs slope > 0, got ", cfg.slope);
  MEDSEG_CHECK(x && gamma && beta, "null input to a CUDA norm kernel");
  MEDSEG_CHECK(s.c <= (1 << 20) && s.n <= 65535, "unsupported norm shape ", s);
}

struct GroupLayout {
  int groups;
  int64_t rows_per_group;
  int64_t group_elems;
};
GroupLayout layout(const NormConfig& cfg, const Shape& s) {
  const bool inst = cfg.kind == NormKind::InstanceNorm;
  return GroupLayout{inst ? static_cast<int>(s.n) : 1, inst ? s.spatial() : s.per_channel(),
                     inst ? s.spatial() * s.c : s.numel()};
}

void launch_normalize(CudaContext& ctx, const Shape& s, const GroupLayout& gl, const float* x,
                      const float* mean, const float* scale, const float* shift,
                      const NormConfig& cfg, float* y) {
  const int64_t count = s.numel();
  const bool vec4 = s.c % 4 == 0 && detail::aligned16(x) && detail::aligned16(y);
  dispatch_index(s, gl.groups > 1, [&]<typename Index, bool kGroups>() {
    if (vec4) {
      normalize4_kernel<Index, kGroups>
          <<<detail::elementwise_blocks(count / 4), kThreads, 0, ctx.stream()>>>(
              static_cast<Index>(count / 4), static_cast<Index>(s.c),
              static_cast<Index>(gl.group_elems), reinterpret_cast<const float4*>(x), mean, scale,
              shift, cfg.leaky, cfg.slope, reinterpret_cast<float4*>(y));
    } else {
      normalize_kernel<Index, kGroups>
          <<<detail::elementwise_blocks(count), kThreads, 0, ctx.stream()>>>(
              static_cast<Index>(count), static_cast<Index>(s.c),
              static_cast<Index>(gl.group_elems), x, mean, scale, shift, cfg.leaky, cfg.slope, y);
    }
  });
  MEDSEG_CUDA_CHECK_LAUNCH();
}

// Workspace pieces of the statistics pass.
struct StatsOffsets {
  size_t partials, totals, batch_mean, batch_sigma;
};
StatsOffsets add_stats_scratch(WorkspaceCarver& wc, const detail::ReduceGrid& rg, int64_t gcs) {
  StatsOffsets o{};
  o.partials = wc.add<double>(static_cast<int64_t>(rg.row_blocks) * gcs * 2);
  o.totals = wc.add<double>(gcs * 2);
  o.batch_mean = wc.add<double>(gcs);
  o.batch_sigma = wc.add<double>(gcs);
  return o;
}

// Statistics + finalize for training (and instance-norm inference). Fills cache, scale and shift.
void compute_train_statistics(CudaContext& ctx, const NormConfig& cfg, const Shape& s,
                              const GroupLayout& gl, const float* x, const float* gamma,
                              const float* beta, float* running_mean, float* running_std,
                              NormCache cache, float* scale, float* shift, void* ws,
                              const StatsOffsets& so, const detail::ReduceGrid& rg,
                              unsigned long long* counters) {
  double* partials = at_offset<double>(ws, so.partials);
  double* totals = at_offset<double>(ws, so.totals);
  detail::channel_partials_kernel<2, StatsOp><<<rg.grid, rg.block, 0, ctx.stream()>>>(
      gl.rows_per_group, static_cast<int>(s.c), StatsOp{x}, partials);
  MEDSEG_CUDA_CHECK_LAUNCH();
  detail::reduce_partials<2>(ctx.stream(), partials, rg.row_blocks, gl.groups * s.c, totals);
  FinalizeTrainArgs a{};
  a.totals = totals;
  a.groups = gl.groups;
  a.channels = static_cast<int>(s.c);
  a.m = static_cast<double>(gl.rows_per_group);
  a.kind = static_cast<int>(cfg.kind);
  a.eps = cfg.eps;
  a.alpha = cfg.alpha;
  a.r_max = cfg.r_max;
  a.d_max = cfg.d_max;
  a.gamma = gamma;
  a.beta = beta;
  a.running_mean = running_mean;
  a.running_std = running_std;
  a.cache_mean = cache.mean;
  a.cache_inv_std = cache.inv_std;
  a.cache_r = cache.r;
  a.cache_d = cache.d;
  a.scale = scale;
  a.shift = shift;
  a.batch_mean = at_offset<double>(ws, so.batch_mean);
  a.batch_sigma = at_offset<double>(ws, so.batch_sigma);
  a.counters = counters;
  finalize_train_kernel<<<1, kThreads, 0, ctx.stream()>>>(a);
  MEDSEG_CUDA_CHECK_LAUNCH();
}

}  // namespace

// ------------------------------------------------------------------ counters

NormDeviceCounters::NormDeviceCounters(CudaContext& ctx)
    : buffer_(kSlots * sizeof(unsigned long long)) {
  reset(ctx);
}

void NormDeviceCounters::reset(CudaContext& ctx) {
  MEDSEG_CUDA_CHECK(cudaMemsetAsync(buffer_.get(), 0, buffer_.bytes(), ctx.stream()));
}

NormCounters NormDeviceCounters::read(CudaContext& ctx) const {
  unsigned long long h[kSlots] = {0};
  MEDSEG_CUDA_CHECK(
      cudaMemcpyAsync(h, buffer_.get(), sizeof(h), cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.synchronize();
  NormCounters n;
  n.steps = static_cast<int64_t>(h[kSteps]);
  n.skipped_updates = static_cast<int64_t>(h[kSkipped]);
  n.r_clipped = static_cast<int64_t>(h[kRClipped]);
  n.d_clipped = static_cast<int64_t>(h[kDClipped]);
  n.last_update_skipped = h[kLastSkipped] != 0;
  n.last_r_clipped = static_cast<int64_t>(h[kLastR]);
  n.last_d_clipped = static_cast<int64_t>(h[kLastD]);
  return n;
}

// ------------------------------------------------------------------ entry points

void norm_forward_train(CudaContext& ctx, const NormConfig& cfg, const Shape& s, const float* x,
                        const float* gamma, const float* beta, float* running_mean,
                        float* running_std, float* y, NormCache cache,
                        NormDeviceCounters* counters) {
  check_args(cfg, s, x, gamma, beta);
  const bool batch_kind = cfg.kind != NormKind::InstanceNorm;
  MEDSEG_CHECK(!batch_kind || (running_mean && running_std),
               "batch (re)norm training needs running statistics");
  MEDSEG_CHECK(y && y != x, "norm_forward_train needs an output distinct from its input");
  MEDSEG_CHECK(cache.mean && cache.inv_std && cache.r && cache.d, "norm_forward_train: null cache");
  const GroupLayout gl = layout(cfg, s);
  const detail::ReduceGrid rg = detail::reduce_grid(gl.rows_per_group, s.c, gl.groups);
  const int64_t gcs = gl.groups * s.c;
  WorkspaceCarver wc;
  const StatsOffsets so = add_stats_scratch(wc, rg, gcs);
  const size_t off_scale = wc.add<float>(gcs);
  const size_t off_shift = wc.add<float>(gcs);
  void* ws = ctx.workspace(wc.total());
  // The coefficients go to the cache when it has room for them (norm_forward_apply and the
  // backward's mask read them there), else to the workspace.
  const bool keep = cache.scale && cache.shift;
  float* scale = keep ? cache.scale : at_offset<float>(ws, off_scale);
  float* shift = keep ? cache.shift : at_offset<float>(ws, off_shift);
  compute_train_statistics(ctx, cfg, s, gl, x, gamma, beta, batch_kind ? running_mean : nullptr,
                           batch_kind ? running_std : nullptr, cache, scale, shift, ws, so, rg,
                           counters ? counters->device_slots() : nullptr);
  launch_normalize(ctx, s, gl, x, cache.mean, scale, shift, cfg, y);
}

void norm_backward(CudaContext& ctx, const NormConfig& cfg, const Shape& s, const float* dy,
                   const float* x, const float* y, const float* gamma, NormCache cache, float* dx,
                   float* dgamma, float* dbeta) {
  MEDSEG_CHECK(s.numel() > 0, "normalization of an empty tensor ", s);
  MEDSEG_CHECK(dy && x && gamma && dx && dgamma && dbeta, "null argument to cuda::norm_backward");
  MEDSEG_CHECK(!cfg.leaky || y || (cache.scale && cache.shift),
               "the LeakyReLU mask needs the forward output y or the cached scale and shift");
  MEDSEG_CHECK(dx != x && (!y || dx != y), "cuda::norm_backward: dx may alias dy only");
  MEDSEG_CHECK(cache.mean && cache.inv_std && cache.r && cache.d, "norm_backward: null cache");
  MEDSEG_CHECK(s.c <= (1 << 20) && s.n <= 65535, "unsupported norm shape ", s);
  const GroupLayout gl = layout(cfg, s);
  const detail::ReduceGrid rg = detail::reduce_grid(gl.rows_per_group, s.c, gl.groups);
  const int64_t gcs = gl.groups * s.c;
  WorkspaceCarver wc;
  const size_t off_partials = wc.add<double>(static_cast<int64_t>(rg.row_blocks) * gcs * 2);
  const size_t off_totals = wc.add<double>(gcs * 2);
  const size_t off_k = wc.add<float>(gcs);
  const size_t off_mdz = wc.add<float>(gcs);
  const size_t off_mdzx = wc.add<float>(gcs);
  void* ws = ctx.workspace(wc.total());
  double* partials = at_offset<double>(ws, off_partials);
  MaskSource mask;
  if (cfg.leaky) {
    mask.y = y;
    if (!y) mask.scale = cache.scale, mask.shift = cache.shift;
    mask.slope = cfg.slope;
  }
  BackwardSumsOp op{dy, x, mask, cache.mean, cache.inv_std, static_cast<int>(s.c)};
  detail::channel_partials_kernel<2, BackwardSumsOp><<<rg.grid, rg.block, 0, ctx.stream()>>>(
      gl.rows_per_group, static_cast<int>(s.c), op, partials);
  MEDSEG_CUDA_CHECK_LAUNCH();
  double* totals = at_offset<double>(ws, off_totals);
  detail::reduce_partials<2>(ctx.stream(), partials, rg.row_blocks, gcs, totals);
  FinalizeBackwardArgs a{};
  a.totals = totals;
  a.groups = gl.groups;
  a.channels = static_cast<int>(s.c);
  a.m = static_cast<double>(gl.rows_per_group);
  a.gamma = gamma;
  a.cache_inv_std = cache.inv_std;
  a.cache_r = cache.r;
  a.cache_d = cache.d;
  a.dgamma = dgamma;
  a.dbeta = dbeta;
  a.k = at_offset<float>(ws, off_k);
  a.mean_dz = at_offset<float>(ws, off_mdz);
  a.mean_dz_xbn = at_offset<float>(ws, off_mdzx);
  finalize_backward_kernel<<<1, kThreads, 0, ctx.stream()>>>(a);
  MEDSEG_CUDA_CHECK_LAUNCH();
  const int64_t count = s.numel();
  dispatch_index(s, gl.groups > 1, [&]<typename Index, bool kGroups>() {
    norm_dx_kernel<Index, kGroups>
        <<<detail::elementwise_blocks(count), kThreads, 0, ctx.stream()>>>(
            static_cast<Index>(count), static_cast<Index>(s.c), static_cast<Index>(gl.group_elems),
            dy, x, mask, cache.mean, cache.inv_std, a.k, a.mean_dz, a.mean_dz_xbn, dx);
  });
  MEDSEG_CUDA_CHECK_LAUNCH();
}

void norm_forward_infer(CudaContext& ctx, const NormConfig& cfg, const Shape& s, const float* x,
                        const float* gamma, const float* beta, const float* running_mean,
                        const float* running_std, float* y) {
  check_args(cfg, s, x, gamma, beta);
  MEDSEG_CHECK(y, "norm_forward_infer: null output");
  const GroupLayout gl = layout(cfg, s);
  const int64_t gcs = gl.groups * s.c;
  if (cfg.kind == NormKind::InstanceNorm) {
    // Per-sample statistics as in training; the cache lives in the workspace and is dropped.
    const detail::ReduceGrid rg = detail::reduce_grid(gl.rows_per_group, s.c, gl.groups);
    WorkspaceCarver wc;
    const StatsOffsets so = add_stats_scratch(wc, rg, gcs);
    const size_t off_mean = wc.add<float>(gcs);
    const size_t off_inv = wc.add<float>(gcs);
    const size_t off_r = wc.add<float>(gcs);
    const size_t off_d = wc.add<float>(gcs);
    const size_t off_scale = wc.add<float>(gcs);
    const size_t off_shift = wc.add<float>(gcs);
    void* ws = ctx.workspace(wc.total());
    NormCache cache{at_offset<float>(ws, off_mean), at_offset<float>(ws, off_inv),
                    at_offset<float>(ws, off_r), at_offset<float>(ws, off_d)};
    float* scale = at_offset<float>(ws, off_scale);
    float* shift = at_offset<float>(ws, off_shift);
    compute_train_statistics(ctx, cfg, s, gl, x, gamma, beta, nullptr, nullptr, cache, scale, shift,
                             ws, so, rg, nullptr);
    launch_normalize(ctx, s, gl, x, cache.mean, scale, shift, cfg, y);
    return;
  }
  MEDSEG_CHECK(running_mean && running_std, "batch (re)norm inference needs running statistics");
  WorkspaceCarver wc;
  const size_t off_mean = wc.add<float>(gcs);
  const size_t off_scale = wc.add<float>(gcs);
  const size_t off_shift = wc.add<float>(gcs);
  void* ws = ctx.workspace(wc.total());
  float* mean = at_offset<float>(ws, off_mean);
  float* scale = at_offset<float>(ws, off_scale);
  float* shift = at_offset<float>(ws, off_shift);
  const int c = static_cast<int>(s.c);
  infer_params_kernel<<<(c + kThreads - 1) / kThreads, kThreads, 0, ctx.stream()>>>(
      c, cfg.eps, gamma, beta, running_mean, running_std, mean, scale, shift);
  MEDSEG_CUDA_CHECK_LAUNCH();
  launch_normalize(ctx, s, gl, x, mean, scale, shift, cfg, y);
}

void norm_forward_apply(CudaContext& ctx, const NormConfig& cfg, const Shape& s, const float* x,
                        NormCache cache, float* y) {
  MEDSEG_CHECK(s.numel() > 0, "normalization of an empty tensor ", s);
  MEDSEG_CHECK(x && y && x != y, "cuda::norm_forward_apply needs distinct input and output");
  MEDSEG_CHECK(cache.mean && cache.scale && cache.shift,
               "norm_forward_apply needs the cached mean, scale and shift of a training forward");
  MEDSEG_CHECK(s.c <= (1 << 20) && s.n <= 65535, "unsupported norm shape ", s);
  launch_normalize(ctx, s, layout(cfg, s), x, cache.mean, cache.scale, cache.shift, cfg, y);
}

}  // namespace medseg::cuda
