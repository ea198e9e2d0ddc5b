// Direct transposed convolution (kernel 2, stride 2) for AVX2 + FMA CPUs (see conv.hpp).
//
// Why: the U-Net's up-convolutions have no oneDNN 2.6 JIT kernel on AVX2 for channels-last data.
// They ran as one GEMM into a temporary (N*D*H*W x 8*Cout) followed by a scatter of the 8 taps into
// the 2x2x2 output blocks (forward), and a gather of those blocks followed by a GEMM (backward-
// weights): 31 and 26 GFLOP/s, the temporary as large as the output, about 6% of a training step.
// Since k = stride = 2 the taps never overlap: output (2d+a, 2h+b, 2w+c) is x[d, h, w] times the
// tap's Cin x Cout matrix. The kernels below compute it in registers and read or write the output
// blocks in place:
//   forward           6 input voxels x 16 output channels of one tap in 12 ymm registers; the sum
//                     over Cin broadcasts 6 x values per weight row (2 vectors); the result goes
//                     straight to the 6 output voxels of that tap.
//   backward-weights  dw[ci][tap][co] = sum over input voxels of x[v][ci] * dy[tap position of
//   v][co]:
//                     6 input channels x 16 output channels of one tap in registers while a run of
//                     input voxels streams through; the voxels are cut into a fixed number of
//                     chunks with one partial dw each, summed in chunk order (the result does not
//                     depend on the thread count).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "core/error.hpp"
#include "kernels/cpu/avx2_tiles.hpp"
#include "kernels/cpu/conv.hpp"
#include "kernels/cpu/conv_internal.hpp"

namespace medseg::cpu {

namespace {

constexpr int kR = 6;  // register tile rows: input voxels (forward) or input channels (weights)

// Offsets (in floats) of the output voxels: input voxel v's tap 0 at base(v), tap t = (a*2 + b)*2
// + c at base(v) + tap[t].
struct OutIndex {
  int64_t h, w, cout;
  int64_t tap[8];
  OutIndex(const ConvGeometry& g) : h(g.ih), w(g.iw), cout(g.cout) {
    for (int t = 0; t < 8; ++t)
      tap[t] = (((t >> 2) * 2 * h + ((t >> 1) & 1)) * 2 * w + (t & 1)) * cout;
  }
  int64_t base(int64_t v) const {
    const int64_t iw = v % w, ih = (v / w) % h, idn = v / (w * h);  // idn = n * depth + d
    return ((2 * idn * 2 * h + 2 * ih) * 2 * w + 2 * iw) * cout;
  }
};

// y[out[r] + co0 .. +8*NV) = bias + sum_ci x[r][ci] * wt[ci][co0 ..] for R input voxels; x rows
// are consecutive (stride cin), wt rows have stride ldw (= 8 * cout).
template <int R, int NV>
__attribute__((target("avx2,fma"))) void forward_tile(const float* x, int64_t cin, const float* wt,
                                                      int64_t ldw, const float* bias,
                                                      float* const* out) {
  __m256 acc[R][NV];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) {
    const __m256 b0 = bias ? _mm256_loadu_ps(bias + 8 * v) : _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][v] = b0;
  }
  for (int64_t ci = 0; ci < cin; ++ci, wt += ldw) {
    __m256 wv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) wv[v] = _mm256_loadu_ps(wt + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * cin + ci);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(xv, wv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out[r] + 8 * v, acc[r][v]);
}

template <int NV>
constexpr auto forward_fns = detail::row_kernels<kR>([]<int R>() { return &forward_tile<R, NV>; });

// dw[r][co0 ..] (row stride ldw) += sum over `count` voxels of x[v][ci0 + r] * dy[out(v)][co0 ..]
// for R input channels; x rows have stride cin, the output voxel of each input voxel is given.
template <int R, int NV>
__attribute__((target("avx2,fma"))) void weights_tile(const float* x, int64_t cin,
                                                      const int64_t* outs, const float* dy,
                                                      int64_t count, float* dw, int64_t ldw) {
  detail::outer_accumulate<R, NV>([x, cin](int64_t i, int r) { return x + i * cin + r; },
                                  [outs, dy](int64_t i) { return dy + outs[i]; }, count,
                                  [dw, ldw](int r) { return dw + r * ldw; });
}

template <int NV>
constexpr auto weights_fns = detail::row_kernels<kR>([]<int R>() { return &weights_tile<R, NV>; });

constexpr int64_t kRun = 256;    // input voxels streamed per register tile (x and dy rows in L2)
constexpr int64_t kChunks = 16;  // fixed chunks of input voxels for backward-weights

}  // namespace

// Up to Cin x Cout = 2048: every run of 6 voxels streams the tap's whole weight matrix, which stays
// in L1/L2 only while it is small. Measured against the GEMM path (2 threads): 32 -> 16 at 32^3
// forward 4.9-6.3 against 9.3-13.0 ms; 64 -> 32 1.8-2.6 against 2.4-4.4 ms; 128 -> 64 at 8^3
// 1.3 against 1.0 ms, and at 256 -> 128 44 against 32 ms.
constexpr int64_t kMaxChannelProduct = 2048;

bool conv_transpose2_direct_covers(const ConvGeometry& g) {
  return detail::cpu_has_avx2_fma() && g.transposed && g.cout % 8 == 0 &&
         g.cin * g.cout <= kMaxChannelProduct && g.n > 0 && g.id > 0 && g.ih > 0 && g.iw > 0;
}

bool conv_transpose2_forward_direct(const ConvGeometry& g, const float* x, const float* w,
                                    const float* b, float* y) {
  validate(g);
  if (!conv_transpose2_direct_covers(g)) return false;
  MEDSEG_CHECK(x && w && y, "conv_transpose2_forward_direct: null x, w or y for ", g.str());
  const int64_t voxels = g.n * g.id * g.ih * g.iw, cin = g.cin, cout = g.cout;
  const OutIndex out_index(g);
  const int64_t groups = (voxels + kR - 1) / kR;
#pragma omp parallel for schedule(static)
  for (int64_t gi = 0; gi < groups; ++gi) {
    const int64_t v0 = gi * kR;
    const int nr = static_cast<int>(std::min<int64_t>(kR, voxels - v0));
    int64_t base[kR];
    for (int r = 0; r < nr; ++r) base[r] = out_index.base(v0 + r);
    for (int t = 0; t < 8; ++t) {
      float* out[kR];
      for (int r = 0; r < nr; ++r) out[r] = y + base[r] + out_index.tap[t];
      for (int64_t co = 0; co < cout; co += 16) {
        const bool two = co + 16 <= cout;
        float* shifted[kR];
        for (int r = 0; r < nr; ++r) shifted[r] = out[r] + co;
        (two ? forward_fns<2>[nr] : forward_fns<1>[nr])(x + v0 * cin, cin, w + t * cout + co,
                                                        8 * cout, b ? b + co : nullptr, shifted);
      }
    }
  }
  return true;
}

bool conv_transpose2_backward_weights_direct(const ConvGeometry& g, const float* dy, const float* x,
                                             float* dw, float* db) {
  validate(g);
  if (!conv_transpose2_direct_covers(g)) return false;
  MEDSEG_CHECK(dy && x && dw, "conv_transpose2_backward_weights_direct: null dy, x or dw for ",
               g.str());
  const int64_t voxels = g.n * g.id * g.ih * g.iw, cin = g.cin, cout = g.cout;
  const OutIndex out_index(g);
  const int64_t wsize = cin * 8 * cout;
  const int64_t chunks = std::min<int64_t>(kChunks, (voxels + kRun - 1) / kRun);
  thread_local detail::GrowingBuffer<float> partials;  // the calling thread's, shared by its team
  float* partial = partials.get(static_cast<size_t>(chunks * wsize));
#pragma omp parallel
  {
    thread_local detail::GrowingBuffer<int64_t> offsets;  // output offsets of a run of voxels
    int64_t* outs = offsets.get(static_cast<size_t>(kRun));
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      float* pw = partial + c * wsize;
      std::memset(pw, 0, static_cast<size_t>(wsize) * sizeof(float));
      const int64_t lo = voxels * c / chunks, hi = voxels * (c + 1) / chunks;
      for (int64_t v0 = lo; v0 < hi; v0 += kRun) {
        const int64_t count = std::min(kRun, hi - v0);
        for (int64_t i = 0; i < count; ++i) outs[i] = out_index.base(v0 + i);
        for (int t = 0; t < 8; ++t) {
          const float* dyt = dy + out_index.tap[t];
          for (int64_t ci = 0; ci < cin; ci += kR) {
            const int nr = static_cast<int>(std::min<int64_t>(kR, cin - ci));
            for (int64_t co = 0; co < cout; co += 16) {
              const bool two = co + 16 <= cout;
              (two ? weights_fns<2>[nr] : weights_fns<1>[nr])(
                  x + v0 * cin + ci, cin, outs, dyt + co, count, pw + (ci * 8 + t) * cout + co,
                  8 * cout);
            }
          }
        }
      }
    }
    // Sum the partials in chunk order (the loop above ends with a barrier).
#pragma omp for schedule(static)
    for (int64_t i = 0; i < wsize; ++i) {
      float s = partial[i];
      for (int64_t c = 1; c < chunks; ++c) s += partial[c * wsize + i];
      dw[i] = s;
    }
  }
  if (db) detail::bias_gradient(dy, g.n * g.od * g.oh * g.ow, cout, db);
  return true;
}

}  // namespace medseg::cpu
