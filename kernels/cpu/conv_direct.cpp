// Direct backward-weights convolution for AVX2 + FMA CPUs (see conv.hpp).
//
// Why: oneDNN 2.6's AVX2 backward-weights kernel runs at 53-61 GFLOP/s on the U-Net's channels-last
// shapes, half the rate of its forward and backward-data (117-128 GFLOP/s), and was about half the
// training step (docs/benchmarks.md). The pass is a sum over voxels of outer products:
//   dw[co, kz, ky, kx, ci] = sum_{n, od, oh, ow} dy[n, od, oh, ow, co] * x[n, id, ih, iw, ci],
//   (id, ih, iw) = (od, oh, ow) * stride + (kz, ky, kx) - pad (terms outside x are zero padding).
// For one kernel tap, 6 output channels and 16 input channels, the 6 x 16 block of dw lives in 12
// ymm registers (AVX2 has 16: with the two x vectors and the broadcast dy value, 15 are live); each
// voxel adds 6 broadcast dy values times 2 vectors of x: 12 FMAs for 8 loads, FMA-bound, and 12
// independent accumulators cover the FMA latency. 8 input channels: 12 x 8 tiles. Work is split by (tap, Cout block, Cin block), each owned by one thread,
// so no reduction is needed and the result does not depend on the thread count; the voxels are
// walked in blocks of rows small enough for the x and dy rows a block touches to stay in L2 while
// every thread runs its tiles over them.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/error.hpp"
#include "kernels/cpu/avx2_tiles.hpp"
#include "kernels/cpu/conv.hpp"
#include "kernels/cpu/conv_internal.hpp"

namespace medseg::cpu {

namespace {

constexpr int kCoAlign = 8;  // Cout must be a multiple of this (and Cin of 8)

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

struct Tile {
  int kz, ky, kx;
  int nco;  // output channels in this tile (1 .. max_co<CIV>)
  int64_t co0, ci0;
};

// Widest tile of output channels for CIV vectors of 8 input channels: accumulators (CO * CIV), the
// x vectors (CIV) and the broadcast must fit in 16 ymm registers.
template <int CIV>
constexpr int max_co() {
  return CIV == 2 ? 6 : 12;
}

// rows x count voxels: dw tile (CO rows of 8*CIV floats, row stride dw_row) += sum of the outer
// products of dy[co0 .. co0+CO) and x[ci0 .. ci0+8*CIV). The accumulators are locals that stay in
// registers through both loops (no branch inside them: the caller passes only valid rows and
// columns); they are added to dw once at the end.
template <int CO, int CIV>
__attribute__((target("avx2,fma"), always_inline)) inline void tile_kernel(
    const float* xp, const float* dp, int64_t rows, int64_t count, int64_t x_row, int64_t d_row,
    int64_t xstep, int64_t dstep, float* dw, int64_t dw_row) {
  __m256 a[CO][CIV];
#pragma GCC unroll 16
  for (int c = 0; c < CO; ++c)
#pragma GCC unroll 4
    for (int v = 0; v < CIV; ++v) a[c][v] = _mm256_setzero_ps();
  for (int64_t r = 0; r < rows; ++r, xp += x_row, dp += d_row) {
    const float* xq = xp;
    const float* dq = dp;
    for (int64_t i = 0; i < count; ++i, xq += xstep, dq += dstep) {
      __m256 xv[CIV];
#pragma GCC unroll 4
      for (int v = 0; v < CIV; ++v) xv[v] = _mm256_loadu_ps(xq + 8 * v);
#pragma GCC unroll 16
      for (int c = 0; c < CO; ++c) {
        const __m256 d = _mm256_broadcast_ss(dq + c);
#pragma GCC unroll 4
        for (int v = 0; v < CIV; ++v) a[c][v] = _mm256_fmadd_ps(d, xv[v], a[c][v]);
      }
    }
  }
#pragma GCC unroll 16
  for (int c = 0; c < CO; ++c)
#pragma GCC unroll 4
    for (int v = 0; v < CIV; ++v) {
      float* p = dw + c * dw_row + 8 * v;
      _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), a[c][v]));
    }
}

// Adds the contribution of output rows [oh0, oh1) of (n, od) to one tile of dw (CO x 8*CIV).
template <int CO, int CIV>
__attribute__((target("avx2,fma"))) void accumulate_tile(const ConvGeometry& g, const float* dy,
                                                         const float* x, int64_t n, int64_t od,
                                                         int64_t oh0, int64_t oh1, const Tile& t,
                                                         float* dw) {
  const int64_t s = g.stride, p = g.pad, K = g.k;
  const int64_t id = od * s + t.kz - p;
  if (id < 0 || id >= g.id) return;
  // Output columns / rows whose input column iw = ow * s + kx - p (row ih = oh * s + ky - p) lies
  // inside x.
  const int64_t ow_lo = std::max<int64_t>(0, ceil_div(p - t.kx, s));
  const int64_t ow_hi = std::min<int64_t>(g.ow - 1, floor_div(g.iw - 1 + p - t.kx, s));
  const int64_t oh_lo = std::max<int64_t>(oh0, ceil_div(p - t.ky, s));
  const int64_t oh_hi = std::min<int64_t>(oh1 - 1, floor_div(g.ih - 1 + p - t.ky, s));
  if (ow_lo > ow_hi || oh_lo > oh_hi) return;
  const int64_t cin = g.cin, cout = g.cout;
  const int64_t ih = oh_lo * s + t.ky - p;
  const float* xp = x + (((n * g.id + id) * g.ih + ih) * g.iw + ow_lo * s + t.kx - p) * cin + t.ci0;
  const float* dp = dy + (((n * g.od + od) * g.oh + oh_lo) * g.ow + ow_lo) * cout + t.co0;
  float* out = dw + (((t.co0 * K + t.kz) * K + t.ky) * K + t.kx) * cin + t.ci0;
  tile_kernel<CO, CIV>(xp, dp, oh_hi - oh_lo + 1, ow_hi - ow_lo + 1, s * g.iw * cin, g.ow * cout,
                       s * cin, cout, out, K * K * K * cin);
}

template <int CIV>
void run_tiles(const ConvGeometry& g, const float* dy, const float* x, float* dw) {
  constexpr int kMaxCo = max_co<CIV>();
  static constexpr auto fns =
      detail::row_kernels<kMaxCo>([]<int CO>() { return &accumulate_tile<CO, CIV>; });
  const int K = g.k;
  const int64_t cib = g.cin / (8 * CIV);
  std::vector<Tile> tiles;
  for (int kz = 0; kz < K; ++kz)
    for (int ky = 0; ky < K; ++ky)
      for (int kx = 0; kx < K; ++kx)
        for (int64_t co = 0; co < g.cout; co += kMaxCo)
          for (int64_t ci = 0; ci < cib; ++ci)
            tiles.push_back({kz, ky, kx, static_cast<int>(std::min<int64_t>(kMaxCo, g.cout - co)), co,
                             ci * 8 * CIV});
  // Output rows per block: about 512 voxels, so that a block's dy rows (and the x rows its taps
  // read) stay in L2 while each thread runs all its tiles over them.
  const int64_t rows = std::clamp<int64_t>(1024 / std::max<int64_t>(g.ow, 1), 1, g.oh);
  const int64_t ntiles = static_cast<int64_t>(tiles.size());
#pragma omp parallel
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    // Contiguous tile ranges: each tile of dw belongs to one thread.
    const int64_t lo = ntiles * t / nt, hi = ntiles * (t + 1) / nt;
    for (int64_t n = 0; n < g.n; ++n)
      for (int64_t od = 0; od < g.od; ++od)
        for (int64_t oh0 = 0; oh0 < g.oh; oh0 += rows) {
          const int64_t oh1 = std::min(g.oh, oh0 + rows);
          for (int64_t i = lo; i < hi; ++i) {
            const Tile& tile = tiles[static_cast<size_t>(i)];
            fns[static_cast<size_t>(tile.nco)](g, dy, x, n, od, oh0, oh1, tile, dw);
          }
        }
  }
}

// ---- few input channels (the first layer: Cin = the number of modalities) ----
// With Cin < 8 the tiles above have no input-channel vector to fill. Here the rows of a tile are
// 6 (tap, input channel) pairs and its columns 16 output channels: per output voxel 2 dy vectors
// and 6 broadcast x values, 12 FMAs. x is copied once with its zero padding made explicit, so every
// tap is valid everywhere and a pair is a constant offset. Output rows are cut into fixed chunks
// with one partial dw each, summed in chunk order (no dependence on the thread count).

constexpr int kPairs = 6;

bool small_cin_covers(const ConvGeometry& g) {
  return !g.transposed && g.k == 3 && g.stride == 1 && g.pad == 1 && g.cin % 8 != 0 &&
         g.cout % kCoAlign == 0;
}

// dw rows (R pairs, at dw + dw_off[r]) += sum over `count` voxels of one output row of
// x[pair r] (xp + off[r], advancing by xstep) outer dy (dp, advancing by dstep; 8*NV channels).
template <int R, int NV>
__attribute__((target("avx2,fma"))) void pair_tile(const float* xp, const int64_t* off,
                                                   int64_t xstep, const float* dp, int64_t dstep,
                                                   int64_t count, float* dw,
                                                   const int64_t* dw_off) {
  const float* src[R];  // the pairs' rows, hoisted out of the voxel loop
  for (int r = 0; r < R; ++r) src[r] = xp + off[r];
  detail::outer_accumulate<R, NV>(
      [&src, xstep](int64_t i, int r) { return src[r] + i * xstep; },
      [dp, dstep](int64_t i) { return dp + i * dstep; }, count,
      [dw, dw_off](int r) { return dw + dw_off[r]; });
}

template <int NV>
constexpr auto pair_fns = detail::row_kernels<kPairs>([]<int R>() { return &pair_tile<R, NV>; });

void small_cin_backward_weights(const ConvGeometry& g, const float* dy, const float* x, float* dw) {
  const int64_t cin = g.cin, cout = g.cout;
  const int64_t pd = g.id + 2, ph = g.ih + 2, pw = g.iw + 2;  // padded input
  thread_local detail::GrowingBuffer<float> xpad_buffer, partial_buffer;
  float* xp = xpad_buffer.get(static_cast<size_t>(g.n * pd * ph * pw * cin));
  const int64_t pairs = 27 * cin;
  const int64_t rows = g.n * g.od * g.oh;
  const int64_t chunks = std::min<int64_t>(64, rows);
  float* partial = partial_buffer.get(static_cast<size_t>(chunks * pairs * cout));
  // Pair p = k * cin + ci: offset of x[o + tap k - 1][ci] from x at o in the padded copy.
  std::vector<int64_t> off(static_cast<size_t>(pairs)), dw_off(static_cast<size_t>(pairs));
  for (int k = 0; k < 27; ++k)
    for (int64_t ci = 0; ci < cin; ++ci) {
      const int kz = k / 9, ky = (k / 3) % 3, kx = k % 3;
      off[static_cast<size_t>(k * cin + ci)] = ((kz * ph + ky) * pw + kx) * cin + ci;
      dw_off[static_cast<size_t>(k * cin + ci)] = (k * cin + ci) * cout;
    }
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < g.n * pd * ph; ++i) {  // padded copy, one padded row at a time
      const int64_t y = i % ph - 1, z = (i / ph) % pd - 1, n = i / (ph * pd);
      float* dst = xp + i * pw * cin;
      std::fill(dst, dst + pw * cin, 0.f);
      if (z >= 0 && z < g.id && y >= 0 && y < g.ih)
        std::copy_n(x + ((n * g.id + z) * g.ih + y) * g.iw * cin, g.iw * cin, dst + cin);
    }
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      float* pw_c = partial + c * pairs * cout;
      std::fill(pw_c, pw_c + pairs * cout, 0.f);
      for (int64_t row = rows * c / chunks; row < rows * (c + 1) / chunks; ++row) {
        const int64_t oy = row % g.oh, oz = (row / g.oh) % g.od, n = row / (g.oh * g.od);
        // Output (oz, oy, 0) reads the padded input at (oz, oy, 0) + tap offset.
        const float* xrow = xp + ((n * pd + oz) * ph + oy) * pw * cin;
        const float* drow = dy + row * g.ow * cout;
        for (int64_t p0 = 0; p0 < pairs; p0 += kPairs) {
          const int nr = static_cast<int>(std::min<int64_t>(kPairs, pairs - p0));
          for (int64_t co = 0; co < cout; co += 16) {
            const bool two = co + 16 <= cout;
            (two ? pair_fns<2>[nr] : pair_fns<1>[nr])(xrow, off.data() + p0, cin, drow + co, cout,
                                                      g.ow, pw_c + co, dw_off.data() + p0);
          }
        }
      }
    }
    // dw[co][k][ci] = sum over chunks (in order) of partial[c][k * cin + ci][co].
#pragma omp for schedule(static)
    for (int64_t co = 0; co < cout; ++co)
      for (int64_t p = 0; p < pairs; ++p) {
        float s = 0.f;
        for (int64_t c = 0; c < chunks; ++c) s += partial[(c * pairs + p) * cout + co];
        dw[co * pairs + p] = s;
      }
  }
}

}  // namespace

bool conv3d_backward_weights_direct_covers(const ConvGeometry& g) {
  return detail::cpu_has_avx2_fma() && !g.transposed && g.n > 0 && g.od > 0 && g.oh > 0 &&
         g.ow > 0 && ((g.cin % 8 == 0 && g.cout % kCoAlign == 0) || small_cin_covers(g));
}

bool conv3d_backward_weights_direct(const ConvGeometry& g, const float* dy, const float* x,
                                    float* dw, float* db) {
  validate(g);
  if (!conv3d_backward_weights_direct_covers(g)) return false;
  MEDSEG_CHECK(dy && x && dw, "conv3d_backward_weights_direct: null dy, x or dw for ", g.str());
  if (g.cin % 8 != 0) {
    small_cin_backward_weights(g, dy, x, dw);
    if (db) detail::bias_gradient(dy, g.n * g.od * g.oh * g.ow, g.cout, db);
    return true;
  }
  std::memset(dw, 0, static_cast<size_t>(g.weight_shape().numel()) * sizeof(float));
  if (g.cin % 16 == 0)
    run_tiles<2>(g, dy, x, dw);
  else
    run_tiles<1>(g, dy, x, dw);
  if (db) detail::bias_gradient(dy, g.n * g.od * g.oh * g.ow, g.cout, db);
  return true;
}

namespace detail {
bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
}  // namespace detail

}  // namespace medseg::cpu
