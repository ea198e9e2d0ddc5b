// Direct backward-data of the stride-2 convolution (k = 3, pad = 1: the U-Net's down-sampling) for
// AVX2 + FMA CPUs (see conv.hpp).
//
// Why: oneDNN 2.6's AVX2 kernel runs it at 44-49 GFLOP/s (it scatters every dy value to a stride-2
// pattern of dx), under half the rate of the same convolution's forward.
//
// dx[i] = sum over the taps k with 2o + k - 1 = i of dy[o] . w[:, k, :] (a Cout x Cin matrix per
// tap). Per axis, a dx coordinate receives 1 tap where it is even (k = 1) and 2 where it is odd
// (k = 0 and 2), so dx is walked per x-parity and every voxel of a run of R = 6 along x has the
// same taps: 6 voxels x 16 input channels in 12 ymm registers, each step broadcasting one dy value
// per voxel against 2 weight vectors (12 FMAs for 8 loads). Each voxel's dy row per tap is given by
// a pointer (a row of zeros where the tap reaches beyond dy), so borders need no branches in the
// loop. (A forward kernel of the same form measured slower than oneDNN's forward, 21-24 against 16
// ms on 16->32 at 64^3, and was dropped.) Each dx element is written once, by one thread: no
// dependence on the thread count.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "core/error.hpp"
#include "kernels/cpu/conv.hpp"
#include "kernels/cpu/conv_internal.hpp"

namespace medseg::cpu {

namespace {

constexpr int kR = 6;

struct TapList {
  int count = 0;
  const float* src[27][kR];  // per tap, the source row of each voxel of the run
  const float* w[27];        // per tap, the weight matrix (K rows, row stride ldw)
};

// out[r][c0 .. c0 + 8*NV) = sum over taps t, k < K of src[t][r][k] * w[t][k][c0 ..].
template <int R, int NV>
__attribute__((target("avx2,fma"))) void tap_tile(const TapList& taps, int64_t K, int64_t ldw,
                                                  int64_t c0, float* const* out) {
  __m256 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int t = 0; t < taps.count; ++t) {
    const float* src[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) src[r] = taps.src[t][r];
    const float* wk = taps.w[t] + c0;
    for (int64_t k = 0; k < K; ++k, wk += ldw) {
      __m256 wv[NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) wv[v] = _mm256_loadu_ps(wk + 8 * v);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 a = _mm256_broadcast_ss(src[r] + k);
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(a, wv[v], acc[r][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out[r] + c0 + 8 * v, acc[r][v]);
}

template <int NV>
constexpr auto tap_fns = detail::row_kernels<kR>([]<int R>() { return &tap_tile<R, NV>; });

// Runs the tile over all output channels (blocks of 16, then 8).
void tap_tiles(const TapList& taps, int nr, int64_t K, int64_t ldw, int64_t channels,
               float* const* out) {
  for (int64_t c = 0; c < channels; c += 16) {
    const bool two = c + 16 <= channels;
    (two ? tap_fns<2>[nr] : tap_fns<1>[nr])(taps, K, ldw, c, out);
  }
}

const float* zeros(int64_t count) {
  thread_local std::vector<float> z;
  if (static_cast<int64_t>(z.size()) < count) z.assign(static_cast<size_t>(count), 0.f);
  return z.data();
}

// Up to Cin x Cout = 2048: each run of 6 voxels streams its taps' weight rows (Cout x Cin per tap),
// which stay in cache only while they are small. Measured against oneDNN (2 threads): 16 -> 32 at
// 64^3 15.7-16.5 against 28.5-33.0 ms; 32 -> 64 at 32^3 7.7-11.0 against 8.7-10.5 ms; 64 -> 128 at
// 16^3 4.6-5.6 against 3.2-4.2 ms; 128 -> 256 at 32^3 193 against 103 ms.
constexpr int64_t kMaxChannelProduct = 2048;

bool covered(const ConvGeometry& g) {
  return detail::cpu_has_avx2_fma() && !g.transposed && g.k == 3 && g.stride == 2 && g.pad == 1 &&
         g.cin * g.cout <= kMaxChannelProduct && g.n > 0 && g.od > 0 && g.oh > 0 && g.ow > 0;
}

}  // namespace

bool conv3d_stride2_backward_data_direct(const ConvGeometry& g, const float* dy, const float* w,
                                         float* dx) {
  validate(g);
  if (!covered(g) || g.cin % 8 != 0) return false;
  MEDSEG_CHECK(dy && w && dx, "conv3d_stride2_backward_data_direct: null dy, w or dx for ",
               g.str());
  const int64_t cin = g.cin, cout = g.cout;
  const int64_t rows = g.n * g.id * g.ih;
  // Taps reaching input coordinate i along one axis: k with i + 1 - k even, o = (i + 1 - k) / 2
  // inside [0, o_size).
  auto axis_taps = [](int64_t i, int64_t o_size, int* ks, int64_t* os) {
    int count = 0;
    for (int k = 0; k < 3; ++k) {
      const int64_t s = i + 1 - k;
      if (s < 0 || s % 2 != 0 || s / 2 >= o_size) continue;
      ks[count] = k;
      os[count++] = s / 2;
    }
    return count;
  };
#pragma omp parallel
  {
    const float* zero = zeros(cout);
    TapList taps;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t iy = row % g.ih, iz = (row / g.ih) % g.id, n = row / (g.ih * g.id);
      int kz[3], ky[3];
      int64_t oz[3], oy[3];
      const int nz = axis_taps(iz, g.od, kz, oz), ny = axis_taps(iy, g.oh, ky, oy);
      for (int px = 0; px < 2; ++px) {
        const int64_t count_x = (g.iw - px + 1) / 2;  // voxels of this x-parity
        for (int64_t m0 = 0; m0 < count_x; m0 += kR) {
          const int nr = static_cast<int>(std::min<int64_t>(kR, count_x - m0));
          taps.count = 0;
          for (int a = 0; a < nz; ++a)
            for (int c = 0; c < ny; ++c) {
              const float* dyrow = dy + ((n * g.od + oz[a]) * g.oh + oy[c]) * g.ow * cout;
              for (int kx = px == 0 ? 1 : 0; kx < 3; kx += 2) {
                const int t = taps.count++;
                for (int r = 0; r < nr; ++r) {
                  const int64_t s = 2 * (m0 + r) + px + 1 - kx;  // even by construction
                  const int64_t ox = s / 2;
                  taps.src[t][r] = (s >= 0 && ox < g.ow) ? dyrow + ox * cout : zero;
                }
                // w[co][k][ci] for this tap: rows co (stride 27 * cin), columns ci.
                taps.w[t] = w + ((kz[a] * 3 + ky[c]) * 3 + kx) * cin;
              }
            }
          float* out[kR];
          for (int r = 0; r < nr; ++r)
            out[r] = dx + (((n * g.id + iz) * g.ih + iy) * g.iw + 2 * (m0 + r) + px) * cin;
          if (taps.count == 0) {
            for (int r = 0; r < nr; ++r) std::fill(out[r], out[r] + cin, 0.f);
            continue;
          }
          tap_tiles(taps, nr, cout, 27 * cin, cin, out);
        }
      }
    }
  }
  return true;
}

}  // namespace medseg::cpu
