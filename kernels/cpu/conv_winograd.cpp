// Winograd F(2x2x2, 3x3x3) and F(4x4x4, 3x3x3) convolutions for AVX2 + FMA CPUs (see conv.hpp).
//
// Why: after the direct backward-weights kernel, the forward and backward-data passes of the 3x3x3
// convolutions were most of the training step and of inference, and oneDNN 2.6 already runs them at
// 115-130 GFLOP/s of this class of machine's 157 GFLOP/s fp32 peak (two AVX2 cores): a faster
// direct kernel has little room. Winograd's minimal filtering computes an m x m x m block of
// outputs from an n x n x n block of inputs (n = m + 2) with n^3 multiplications per (input,
// output) channel pair instead of 27 m^3: F(2, 3) 64 for 8 outputs (3.4x fewer), F(4, 3) 216 for
// 64 (8x fewer). The price is three linear transforms (input, weights, output) and larger rounding
// errors, small for F(2, 3) (coefficients 0, +-1, +-1/2) and ~10x that for F(4, 3) (see F4 below
// and the tests). With F(2, 3) the GEMMs ran at ~80% of the AVX2 peak, so F(4, 3) is what made
// the passes faster again (1.5x on the U-Net's 16^3-64^3 layers); F(2, 3) stays for the small
// volumes (where 4^3 tiles are few) and the wide layers (where F(4)'s blocks outgrow L2).
//
// For one output tile t (origin m*t in each axis, inputs m*t - 1 .. m*t + m, pad 1):
//   U[xi][ci][co] = (G (x) G (x) G) w[co, :, :, :, ci]      weights, n x 3 matrix G per axis
//   V[xi][t][ci]  = (B^T (x) B^T (x) B^T) x[tile t, ci]     inputs, n x n matrix B^T per axis
//   M[xi][t][co]  = sum_ci V[xi][t][ci] * U[xi][ci][co]     n^3 independent GEMMs
//   y[tile t, co] = (A^T (x) A^T (x) A^T) M[:, t, co]       outputs, m x n matrix A^T per axis
// with, along one axis for F(2, 3),
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1],
//   A^T = [1 1 1 0; 0 1 -1 -1]
// (checked by hand: A^T [(G g) . (B^T d)] = (g0 d0 + g1 d1 + g2 d2, g0 d1 + g1 d2 + g2 d3)); F(4, 3)'s
// matrices are with its traits (struct F4).
//
// Layout of the work: the tiles are numbered (n, tz, ty, tx) and cut into blocks of T consecutive
// tiles; a thread takes a block, transforms its inputs into V, runs the n^3 GEMMs into M and
// transforms M into the output. T is chosen so that V and M stay in L2 (~128 KB each). V, M and the
// gathered input block of a tile are stored channel-blocked, [row][C/8][n^3 points][8]: every
// access of the transforms is then a constant offset from one pointer (with plain channels-last
// rows, the row pointers and the runtime channel stride spilled and cost 4x the arithmetic), and
// the transforms work on 8 channels per vector. The GEMM micro-kernel holds a 6 tile x 16 channel
// block of M in 12 ymm registers (2 weight vectors + 6 broadcasts per 12 FMAs). Every output
// element is computed by one thread in a fixed order, so the result does not depend on the thread
// count.
//
// Backward-data of a stride-1, pad-1, 3x3x3 convolution is the forward convolution of dy with the
// kernel flipped in space and its channel roles swapped, so it runs through the same code with
// U built from w[co, 2 - kz, 2 - ky, 2 - kx, ci] (input channels co, output channels ci).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "core/error.hpp"
#include "kernels/cpu/avx2_tiles.hpp"
#include "kernels/cpu/conv.hpp"
#include "kernels/cpu/conv_internal.hpp"

namespace medseg::cpu {

namespace {

constexpr int kRows = 6;  // GEMM micro-tile rows (tiles)

// ------------------------------------------------------------------------------- tile kinds
//
// The 1-D transforms of the two tile sizes on 8 lanes, as traits: n = m + 2 transformed points per
// axis for m outputs. bt: n inputs -> n points (B^T), at: n points -> m outputs (A^T), g: 3 taps ->
// n points (G).

// F(2, 3), points 0, 1, -1 and infinity (the matrices in the header comment).
struct F2 {
  static constexpr int m = 2, n = 4, points = n * n * n;
  __attribute__((target("avx2,fma"), always_inline)) static void bt(const __m256* d, __m256* o) {
    o[0] = _mm256_sub_ps(d[0], d[2]);
    o[1] = _mm256_add_ps(d[1], d[2]);
    o[2] = _mm256_sub_ps(d[2], d[1]);
    o[3] = _mm256_sub_ps(d[1], d[3]);
  }
  __attribute__((target("avx2,fma"), always_inline)) static void at(const __m256* t, __m256* o) {
    o[0] = _mm256_add_ps(_mm256_add_ps(t[0], t[1]), t[2]);
    o[1] = _mm256_sub_ps(_mm256_sub_ps(t[1], t[2]), t[3]);
  }
  __attribute__((target("avx2,fma"), always_inline)) static void g(const __m256* w, __m256* u) {
    const __m256 half = _mm256_set1_ps(0.5f);
    const __m256 s = _mm256_add_ps(w[0], w[2]);
    u[0] = w[0];
    u[1] = _mm256_mul_ps(half, _mm256_add_ps(s, w[1]));
    u[2] = _mm256_mul_ps(half, _mm256_sub_ps(s, w[1]));
    u[3] = w[2];
  }
  // Backward-weights: a = A (m dy values -> n points), gt = G^T (n points -> 3 taps).
  __attribute__((target("avx2,fma"), always_inline)) static void a(const __m256* d, __m256* o) {
    o[0] = d[0];
    o[1] = _mm256_add_ps(d[0], d[1]);
    o[2] = _mm256_sub_ps(d[0], d[1]);
    o[3] = _mm256_sub_ps(_mm256_setzero_ps(), d[1]);
  }
  __attribute__((target("avx2,fma"), always_inline)) static void gt(const __m256* u, __m256* g) {
    const __m256 half = _mm256_set1_ps(0.5f);
    const __m256 s = _mm256_mul_ps(half, _mm256_add_ps(u[1], u[2]));
    g[0] = _mm256_add_ps(u[0], s);
    g[1] = _mm256_mul_ps(half, _mm256_sub_ps(u[1], u[2]));
    g[2] = _mm256_add_ps(s, u[3]);
  }
};

// F(4, 3), points 0, 1, -1, 2, -1/2 and infinity: 216 multiplications per 4x4x4 output block and
// channel pair, 3.4 per output instead of F(2, 3)'s 8. The points were chosen for rounding: in a
// float32 simulation of the 3-D algorithm (64 and 128 channels, random and LeakyReLU-like inputs)
// the classic 0, +-1, +-2 set erred by 3-4.5e-5 of max|y|, this set by 0.6-1.1e-5 (F(2, 3): ~5e-7,
// the direct sum ~2e-6). With y_i = sum_k w_k d_(i+k):
//   B^T = [1 3/2 -2 -3/2 1 0; 0 -1 -5/2 -1/2 1 0; 0 1 1/2 -5/2 1 0; 0 -1/2 -1 1/2 1 0;
//          0 2 -1 -2 1 0; 0 1 3/2 -2 -3/2 1]
//   G   = [1 0 0; -1/3 -1/3 -1/3; 1/3 -1/3 1/3; 1/15 2/15 4/15; -16/15 8/15 -4/15; 0 0 1]
//   A^T = [1 1 1 1 1 0; 0 1 -1 2 -1/2 0; 0 1 1 4 1/4 0; 0 1 -1 8 -1/8 1]
// (A^T [(G w) . (B^T d)] = y checked in double precision for every (w, d) basis pair).
struct F4 {
  static constexpr int m = 4, n = 6, points = n * n * n;
  __attribute__((target("avx2,fma"), always_inline)) static void bt(const __m256* d, __m256* o) {
    const __m256 h = _mm256_set1_ps(0.5f), t = _mm256_set1_ps(2.f), f = _mm256_set1_ps(2.5f),
                 one5 = _mm256_set1_ps(1.5f);
    // rows 0 and 5: the same pattern shifted by one input
    o[0] = _mm256_fmadd_ps(one5, _mm256_sub_ps(d[1], d[3]),
                           _mm256_fnmadd_ps(t, d[2], _mm256_add_ps(d[0], d[4])));
    o[5] = _mm256_fmadd_ps(one5, _mm256_sub_ps(d[2], d[4]),
                           _mm256_fnmadd_ps(t, d[3], _mm256_add_ps(d[1], d[5])));
    o[1] = _mm256_fnmadd_ps(h, d[3], _mm256_fnmadd_ps(f, d[2], _mm256_sub_ps(d[4], d[1])));
    o[2] = _mm256_fnmadd_ps(f, d[3], _mm256_fmadd_ps(h, d[2], _mm256_add_ps(d[4], d[1])));
    o[3] = _mm256_fmadd_ps(h, _mm256_sub_ps(d[3], d[1]), _mm256_sub_ps(d[4], d[2]));
    o[4] = _mm256_fmadd_ps(t, _mm256_sub_ps(d[1], d[3]), _mm256_sub_ps(d[4], d[2]));
  }
  __attribute__((target("avx2,fma"), always_inline)) static void at(const __m256* t, __m256* o) {
    const __m256 p = _mm256_add_ps(t[1], t[2]), q = _mm256_sub_ps(t[1], t[2]);
    o[0] = _mm256_add_ps(_mm256_add_ps(t[0], p), _mm256_add_ps(t[3], t[4]));
    o[1] = _mm256_fmadd_ps(_mm256_set1_ps(2.f), t[3],
                           _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), t[4], q));
    o[2] = _mm256_fmadd_ps(_mm256_set1_ps(4.f), t[3],
                           _mm256_fmadd_ps(_mm256_set1_ps(0.25f), t[4], p));
    o[3] = _mm256_add_ps(_mm256_fmadd_ps(_mm256_set1_ps(8.f), t[3],
                                         _mm256_fnmadd_ps(_mm256_set1_ps(0.125f), t[4], q)),
                         t[5]);
  }
  __attribute__((target("avx2,fma"), always_inline)) static void g(const __m256* w, __m256* u) {
    const __m256 s = _mm256_add_ps(w[0], w[2]);
    u[0] = w[0];
    u[1] = _mm256_mul_ps(_mm256_set1_ps(-1.f / 3), _mm256_add_ps(s, w[1]));
    u[2] = _mm256_mul_ps(_mm256_set1_ps(1.f / 3), _mm256_sub_ps(s, w[1]));
    // (w0 + 2 w1 + 4 w2) / 15 and -(16 w0 - 8 w1 + 4 w2) / 15
    u[3] = _mm256_mul_ps(_mm256_set1_ps(1.f / 15),
                         _mm256_fmadd_ps(_mm256_set1_ps(4.f), w[2],
                                         _mm256_fmadd_ps(_mm256_set1_ps(2.f), w[1], w[0])));
    u[4] = _mm256_mul_ps(_mm256_set1_ps(-1.f / 15),
                         _mm256_fmadd_ps(_mm256_set1_ps(4.f), w[2],
                                         _mm256_fmsub_ps(_mm256_set1_ps(16.f), w[0],
                                                         _mm256_mul_ps(_mm256_set1_ps(8.f), w[1]))));
    u[5] = w[2];
  }
  __attribute__((target("avx2,fma"), always_inline)) static void a(const __m256* d, __m256* o) {
    const __m256 e = _mm256_add_ps(d[0], d[2]), f = _mm256_add_ps(d[1], d[3]);
    o[0] = d[0];
    o[1] = _mm256_add_ps(e, f);
    o[2] = _mm256_sub_ps(e, f);
    // d0 + 2 d1 + 4 d2 + 8 d3 and d0 - d1 / 2 + d2 / 4 - d3 / 8
    o[3] = _mm256_fmadd_ps(_mm256_set1_ps(2.f),
                           _mm256_fmadd_ps(_mm256_set1_ps(4.f), d[3], d[1]),
                           _mm256_fmadd_ps(_mm256_set1_ps(4.f), d[2], d[0]));
    o[4] = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f),
                            _mm256_fmadd_ps(_mm256_set1_ps(0.25f), d[3], d[1]),
                            _mm256_fmadd_ps(_mm256_set1_ps(0.25f), d[2], d[0]));
    o[5] = d[3];
  }
  __attribute__((target("avx2,fma"), always_inline)) static void gt(const __m256* u, __m256* g) {
    const __m256 third = _mm256_set1_ps(1.f / 3), fifteenth = _mm256_set1_ps(1.f / 15);
    const __m256 p = _mm256_mul_ps(third, _mm256_sub_ps(u[2], u[1]));
    const __m256 q = _mm256_mul_ps(third, _mm256_add_ps(u[1], u[2]));
    // (u3 - 16 u4) / 15, (2 u3 + 8 u4) / 15, (4 u3 - 4 u4) / 15
    g[0] = _mm256_add_ps(_mm256_add_ps(u[0], p),
                         _mm256_mul_ps(fifteenth, _mm256_fnmadd_ps(_mm256_set1_ps(16.f), u[4], u[3])));
    g[1] = _mm256_fmsub_ps(fifteenth,
                           _mm256_fmadd_ps(_mm256_set1_ps(2.f), u[3],
                                           _mm256_mul_ps(_mm256_set1_ps(8.f), u[4])),
                           q);
    g[2] = _mm256_add_ps(
        _mm256_add_ps(p, u[5]),
        _mm256_mul_ps(_mm256_set1_ps(4.f / 15), _mm256_sub_ps(u[3], u[4])));
  }
};

// The problem the core solves: a 3x3x3, stride-1, pad-1 convolution of `in` (n, d, h, w, cin) into
// `out` (n, d, h, w, cout) with transformed weights U, in tiles of T::m^3 outputs.
struct Problem {
  int64_t n, d, h, w, cin, cout;
  int64_t tz, ty, tx, tiles;  // tiles per axis and in total
  int64_t block;              // tiles per block (a multiple of kRows)
  int64_t sv, sm;             // floats per transformed point of a row group in V and in M
};

template <class T>
Problem make_problem(int64_t n, int64_t d, int64_t h, int64_t w, int64_t cin, int64_t cout) {
  constexpr int m = T::m;
  Problem p{n, d, h, w, cin, cout, (d + m - 1) / m, (h + m - 1) / m, (w + m - 1) / m, 0, 0, 0, 0};
  p.tiles = n * p.tz * p.ty * p.tx;
  // V and M of a block ~128 KB each: T * C * points <= 32768 floats, a multiple of the micro-tile's
  // rows, at least one micro-tile.
  const int64_t c = std::max(cin, cout);
  p.block = std::max<int64_t>(kRows, (32768 / T::points / c) / kRows * kRows);
  p.sv = kRows * cin;
  p.sm = kRows * cout;
  return p;
}

// ------------------------------------------------------------------------------------ weights

// U[xi][a][b] (a: the core's input channel, b: its output channel) from KRSC weights w (cout, 3, 3,
// 3, cin). Forward: a = ci, b = co. Backward-data: a = co, b = ci and the taps flipped (flipping
// all three axes reverses the tap order). 8 consecutive b per vector; the forward gathers them
// (stride 27 * cin), the backward loads them.
template <class T>
__attribute__((target("avx2,fma"))) void transform_weights(const float* w, int64_t cout,
                                                           int64_t cin, bool backward, float* U) {
  constexpr int n = T::n;
  const int64_t na = backward ? cout : cin, nb = backward ? cin : cout;
  const __m256i gather_index = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                                  _mm256_set1_epi32(static_cast<int>(27 * cin)));
#pragma omp for schedule(static)
  for (int64_t a = 0; a < na; ++a)
    for (int64_t b = 0; b < nb; b += 8) {
      __m256 g[3][3][3], t1[3][3][n], t2[3][n][n], u[n][n][n], in[3], out[n];
      __m256* gf = &g[0][0][0];
      for (int k = 0; k < 27; ++k)
        gf[k] = backward ? _mm256_loadu_ps(w + (a * 27 + 26 - k) * cin + b)
                         : _mm256_i32gather_ps(w + (b * 27 + k) * cin + a, gather_index, 4);
      for (int kz = 0; kz < 3; ++kz)  // x
        for (int ky = 0; ky < 3; ++ky) T::g(g[kz][ky], t1[kz][ky]);
      for (int kz = 0; kz < 3; ++kz)  // y
        for (int j = 0; j < n; ++j) {
          for (int k = 0; k < 3; ++k) in[k] = t1[kz][k][j];
          T::g(in, out);
          for (int i = 0; i < n; ++i) t2[kz][i][j] = out[i];
        }
      for (int i = 0; i < n; ++i)  // z
        for (int j = 0; j < n; ++j) {
          for (int k = 0; k < 3; ++k) in[k] = t2[k][i][j];
          T::g(in, out);
          for (int k = 0; k < n; ++k) u[k][i][j] = out[k];
        }
      const __m256* uf = &u[0][0][0];
      for (int xi = 0; xi < T::points; ++xi) _mm256_storeu_ps(U + (xi * na + a) * nb + b, uf[xi]);
    }
}

// ---------------------------------------------------------------------------------- transforms

struct TileOrigin {
  int64_t n, z, y, x;  // input origin of the tile: m * (tz, ty, tx) - 1
};

template <class T>
TileOrigin tile_origin(const Problem& p, int64_t tile) {
  const int64_t tx = tile % p.tx, ty = (tile / p.tx) % p.ty, tz = (tile / (p.tx * p.ty)) % p.tz,
                n = tile / (p.tx * p.ty * p.tz);
  return {n, T::m * tz - 1, T::m * ty - 1, T::m * tx - 1};
}

// The next tile in (n, tz, ty, tx) order.
template <class T>
void advance(const Problem& p, TileOrigin& o) {
  if ((o.x += T::m) < T::m * p.tx - 1) return;
  o.x = -1;
  if ((o.y += T::m) < T::m * p.ty - 1) return;
  o.y = -1;
  if ((o.z += T::m) < T::m * p.tz - 1) return;
  o.z = -1;
  ++o.n;
}

template <class T>
bool interior(const Problem& p, const TileOrigin& o) {
  constexpr int e = T::n - 1;
  return o.z >= 0 && o.z + e < p.d && o.y >= 0 && o.y + e < p.h && o.x >= 0 && o.x + e < p.w;
}

// The x step of the input transform of one tile: for each (z, y) row of its n^3 input block (zeros
// outside the volume when kBorder) and each 8-channel block, B^T along x, stored as
// L[cin/8][J][z][y][8] so that the y and z steps read constant offsets.
template <class T, bool kBorder>
__attribute__((target("avx2,fma"))) void gather_tile(const Problem& p, const float* in,
                                                     const TileOrigin& o, float* L) {
  constexpr int n = T::n, cb_floats = T::points * 8;
  const int64_t cin = p.cin;
  const __m256 zero = _mm256_setzero_ps();
  bool xin[n];
  for (int c = 0; c < n; ++c) xin[c] = !kBorder || (o.x + c >= 0 && o.x + c < p.w);
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) {
      const int64_t z = o.z + a, y = o.y + b;
      const bool row_in = !kBorder || (z >= 0 && z < p.d && y >= 0 && y < p.h);
      const float* row = in + (((o.n * p.d + z) * p.h + y) * p.w + o.x) * cin;
      if constexpr (!kBorder) {
        // The n^2 rows are interleaved streams that advance m voxels per tile, more than the
        // hardware prefetchers follow: fetch the m voxels that the tile 8 voxels ahead adds
        // (prefetches beyond the row are harmless hints).
        const char* ahead = reinterpret_cast<const char*>(row + (8 + n - T::m) * cin);
        for (int64_t off = 0; off < T::m * cin * 4; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
      }
      float* dst = L + (a * n + b) * 8;
      for (int64_t cb = 0; cb < cin / 8; ++cb, dst += cb_floats, row += 8) {
        __m256 d[n], e[n];
        for (int c = 0; c < n; ++c)
          d[c] = (!kBorder || (row_in && xin[c])) ? _mm256_loadu_ps(row + c * cin) : zero;
        T::bt(d, e);
        for (int j = 0; j < n; ++j) _mm256_storeu_ps(dst + j * n * n * 8, e[j]);
      }
    }
}

template <class T>
void gather(const Problem& p, const float* in, const TileOrigin& o, float* L) {
  if (interior<T>(p, o))
    gather_tile<T, false>(p, in, o, L);
  else
    gather_tile<T, true>(p, in, o, L);
}

// The transformed inputs of one tile from its x-transformed block L, the y and z steps for one x
// index J at a time: channel block cb of point xi = (zi * n + yi) * n + J goes to
// v + xi * xs + cb * cs. Forward: v = V + group * points * sv + slot * 8 (slot = the tile's row in
// its group of kRows), xs = sv, cs = 8 * kRows; backward-weights: v = V + tile * cin,
// xs = tiles * cin, cs = 8.
template <class T>
__attribute__((target("avx2,fma"))) void input_transform(const Problem& p, const float* L, float* v,
                                                         int64_t xs, int64_t cs) {
  constexpr int n = T::n;
  for (int64_t cb = 0; cb < p.cin / 8; ++cb) {
    const float* l = L + cb * T::points * 8;
    float* vc = v + cb * cs;
#pragma GCC unroll 6
    for (int J = 0; J < n; ++J) {
      __m256 t[n][n], col[n], r[n];
      for (int a = 0; a < n; ++a) {  // y
        for (int b = 0; b < n; ++b) col[b] = _mm256_loadu_ps(l + ((J * n + a) * n + b) * 8);
        T::bt(col, t[a]);
      }
      for (int i = 0; i < n; ++i) {  // z
        for (int a = 0; a < n; ++a) col[a] = t[a][i];
        T::bt(col, r);
        for (int k = 0; k < n; ++k) _mm256_storeu_ps(vc + ((k * n + i) * n + J) * xs, r[k]);
      }
    }
  }
}

struct Epilogue {
  const float* bias = nullptr;  // per output channel, or null
  bool leaky = false;
  float slope = 0.f;
};

// The output block of one tile from M (m: M + group * points * sm + slot * 8, channel block cb of
// point xi at m + xi * sm + cb * 8 * kRows), with the bias and the LeakyReLU applied; outputs
// beyond the volume are not written. The x step for every (z, y) row first, then the y and z steps
// one output column (x index) at a time, so that the intermediates stay in registers or L1.
template <class T>
__attribute__((target("avx2,fma"))) void output_transform(const Problem& p, const float* m,
                                                          const TileOrigin& o, const Epilogue& ep,
                                                          float* out) {
  constexpr int n = T::n, mo = T::m;
  const int64_t cout = p.cout;
  const int64_t z0 = o.z + 1, y0 = o.y + 1, x0 = o.x + 1;  // first output of the tile
  const int nz = static_cast<int>(std::min<int64_t>(mo, p.d - z0)),
            ny = static_cast<int>(std::min<int64_t>(mo, p.h - y0)),
            nx = static_cast<int>(std::min<int64_t>(mo, p.w - x0));
  const __m256 slope = _mm256_set1_ps(ep.slope);
  const __m256 zero = _mm256_setzero_ps();
  float* base = out + (((o.n * p.d + z0) * p.h + y0) * p.w + x0) * cout;
  const int64_t zs = p.h * p.w * cout, ys = p.w * cout, sm = p.sm;
  for (int64_t cb = 0; cb < cout / 8; ++cb) {
    const float* mb = m + cb * 8 * kRows;
    const __m256 bias = ep.bias ? _mm256_loadu_ps(ep.bias + cb * 8) : zero;
    __m256 xs[mo][n][n];  // [x output][z point][y point]
    for (int a = 0; a < n; ++a)
      for (int b = 0; b < n; ++b) {
        __m256 col[n], r[mo];
        for (int c = 0; c < n; ++c) col[c] = _mm256_loadu_ps(mb + ((a * n + b) * n + c) * sm);
        T::at(col, r);
        for (int j = 0; j < mo; ++j) xs[j][a][b] = r[j];
      }
    for (int j = 0; j < nx; ++j) {
      __m256 s[n][mo], col[n], r[mo];
      for (int a = 0; a < n; ++a) T::at(xs[j][a], s[a]);  // y
      for (int i = 0; i < ny; ++i) {
        for (int a = 0; a < n; ++a) col[a] = s[a][i];
        T::at(col, r);  // z
        for (int k = 0; k < nz; ++k) {
          __m256 v = _mm256_add_ps(r[k], bias);
          if (ep.leaky)  // max(v, 0) + slope * min(v, 0): LeakyReLU for any slope
            v = _mm256_fmadd_ps(slope, _mm256_min_ps(v, zero), _mm256_max_ps(v, zero));
          _mm256_storeu_ps(base + k * zs + i * ys + j * cout + cb * 8, v);
        }
      }
    }
  }
}


// ------------------------------------------------------------------------------------- GEMM

// One transformed point, `count` groups of R <= kRows tiles, 8*NV output channels: M (R x 8*NV) =
// V (R x cin) * U[xi] (cin x 8*NV) for each group. a: the first group's V at this point (tile r,
// channel k at a + (k/8)*8*kRows + r*8 + k%8); b: U[xi] + co0 (row k at b + k*ldb); c: the first
// group's M at this point + (co0/8)*8*kRows (vector v of tile r at c + v*8*kRows + r*8); a and c
// advance by `step` and `cstep` per group. The 6 broadcasts of a step come from 192 contiguous
// bytes and the results go to 12 contiguous vectors.
template <int R, int NV>
__attribute__((target("avx2,fma"))) void gemm_tile(const float* a, int64_t step, const float* b,
                                                   int64_t ldb, float* c, int64_t cstep,
                                                   int64_t cin, int64_t count) {
  for (int64_t g = 0; g < count; ++g, a += step, c += cstep) {
    __m256 acc[R][NV];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
    const float* ak = a;
    const float* bk = b;
    for (int64_t k0 = 0; k0 < cin; k0 += 8, ak += 8 * kRows, bk += 8 * ldb) {
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        __m256 bv[NV];
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(bk + k * ldb + 8 * v);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m256 av = _mm256_broadcast_ss(ak + r * 8 + k);
#pragma GCC unroll 2
          for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + v * 8 * kRows + r * 8, acc[r][v]);
  }
}

template <int NV>
constexpr auto gemm_fns = detail::row_kernels<kRows>([]<int R>() { return &gemm_tile<R, NV>; });

// M = V * U[xi] for every point xi and the block's tiles: point-major, so that U[xi] is reused by
// every group of the block while V and M of the block stay in L2.
template <class T>
void block_gemms(const Problem& p, const float* V, const float* U, float* M, int64_t rows) {
  const int64_t full = rows / kRows;
  const int tail = static_cast<int>(rows % kRows);
  const int64_t vstep = T::points * p.sv, mstep = T::points * p.sm;
  for (int xi = 0; xi < T::points; ++xi) {
    const float* u = U + xi * p.cin * p.cout;
    const float* a = V + xi * p.sv;
    float* c = M + xi * p.sm;
    for (int64_t co = 0; co < p.cout; co += 16) {
      const bool two = co + 16 <= p.cout;
      float* cc = c + (co / 8) * 8 * kRows;
      if (full > 0)
        (two ? gemm_fns<2>[kRows] : gemm_fns<1>[kRows])(a, vstep, u + co, p.cout, cc, mstep, p.cin,
                                                        full);
      if (tail > 0)
        (two ? gemm_fns<2>[tail] : gemm_fns<1>[tail])(a + full * vstep, vstep, u + co, p.cout,
                                                      cc + full * mstep, mstep, p.cin, 1);
    }
  }
}

// Per-thread V, M (or Z) and gathered tile.
float* thread_buffer(size_t floats) {
  thread_local detail::GrowingBuffer<float> buf;
  return buf.get(floats);
}

// U (or the chunks' partial dU) for the calling thread, shared by the parallel region it opens.
float* weights_buffer(size_t floats) {
  thread_local detail::GrowingBuffer<float> buf;
  return buf.get(floats);
}

template <class T>
void run(const Problem& p, const float* in, const float* w, bool backward, const Epilogue& ep,
         float* out) {
  constexpr int points = T::points;
  float* U = weights_buffer(static_cast<size_t>(points * p.cin * p.cout));
  const int64_t blocks = (p.tiles + p.block - 1) / p.block;
  // Weight cout/cin in KRSC terms: forward (cout, .., cin) = (p.cout, .., p.cin); backward-data
  // (p.cin, .., p.cout).
  const int64_t w_cout = backward ? p.cin : p.cout, w_cin = backward ? p.cout : p.cin;
  const int64_t group_v = points * p.sv, group_m = points * p.sm;  // floats per group of kRows tiles
  const int64_t groups = p.block / kRows;
#pragma omp parallel
  {
    transform_weights<T>(w, w_cout, w_cin, backward, U);  // omp for: ends with a barrier
    float* V = thread_buffer(static_cast<size_t>(groups * (group_v + group_m) + points * p.cin));
    float* M = V + groups * group_v;
    float* L = M + groups * group_m;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t t0 = b * p.block, rows = std::min(p.block, p.tiles - t0);
      const TileOrigin first = tile_origin<T>(p, t0);
      TileOrigin o = first;
      for (int64_t r = 0; r < rows; ++r, advance<T>(p, o)) {
        gather<T>(p, in, o, L);
        input_transform<T>(p, L, V + (r / kRows) * group_v + (r % kRows) * 8, p.sv, 8 * kRows);
      }
      block_gemms<T>(p, V, U, M, rows);
      o = first;
      for (int64_t r = 0; r < rows; ++r, advance<T>(p, o))
        output_transform<T>(p, M + (r / kRows) * group_m + (r % kRows) * 8, o, ep, out);
    }
  }
}

// ------------------------------------------------------------------------- backward-weights
//
// The forward per tile is y_t = A^T [U . V_t] (Kronecker products over the three axes implied), so
// the weight gradient is dU[xi][ci][co] = sum_t V_t[xi][ci] * Z_t[xi][co] with Z_t = (A (x) A (x)
// A) dy_t, the tile's m^3 output gradient spread to n^3 points (A = the transpose of A^T; for
// F(2, 3) z = (d0, d0 + d1, d0 - d1, -d1) per axis), and dw = (G^T (x) G^T (x) G^T) dU. Per block
// of tiles: V (points x T x cin, the forward's input transform) and Z (points x T x cout), then one
// GEMM per point, dU[xi] += V[xi]^T Z[xi], reducing over the block's tiles. The tiles are cut into a
// fixed number of chunks (not one per thread) with one partial dU each, summed in chunk order: the
// result does not depend on the thread count.

// Z entries of one tile (z: Z + tile * cout, point xi of channel block cb at z + xi * xs + cb * 8)
// from the tile's m^3 block of dy (zeros for outputs beyond the volume).
template <class T>
__attribute__((target("avx2,fma"))) void dy_transform(const Problem& p, const float* dy,
                                                      const TileOrigin& o, float* z, int64_t xs) {
  constexpr int n = T::n, mo = T::m;
  const int64_t cout = p.cout;
  const int64_t z0 = o.z + 1, y0 = o.y + 1, x0 = o.x + 1;
  const int64_t nz = std::min<int64_t>(mo, p.d - z0), ny = std::min<int64_t>(mo, p.h - y0),
                nx = std::min<int64_t>(mo, p.w - x0);
  const float* base = dy + (((o.n * p.d + z0) * p.h + y0) * p.w + x0) * cout;
  const int64_t zs = p.h * p.w * cout, ys = p.w * cout;
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t cb = 0; cb < cout / 8; ++cb) {
    __m256 e[mo][mo][n];  // x step: [z][y][point]
    for (int a = 0; a < mo; ++a)
      for (int b = 0; b < mo; ++b) {
        __m256 d[mo];
        for (int c = 0; c < mo; ++c)
          d[c] = a < nz && b < ny && c < nx
                     ? _mm256_loadu_ps(base + a * zs + b * ys + c * cout + cb * 8)
                     : zero;
        T::a(d, e[a][b]);
      }
    float* zc = z + cb * 8;
    for (int j = 0; j < n; ++j) {
      __m256 f[mo][n], col[mo], r[n];  // y step: [z][point]
      for (int a = 0; a < mo; ++a) {
        for (int b = 0; b < mo; ++b) col[b] = e[a][b][j];
        T::a(col, f[a]);
      }
      for (int i = 0; i < n; ++i) {  // z step
        for (int a = 0; a < mo; ++a) col[a] = f[a][i];
        T::a(col, r);
        for (int k = 0; k < n; ++k) _mm256_storeu_ps(zc + ((k * n + i) * n + j) * xs, r[k]);
      }
    }
  }
}

// du (R rows of input channels x 8*NV output channels, row stride ldu) += sum over `rows` tiles of
// v[t][0..R) (row stride ldv) outer z[t][0..8*NV) (row stride ldz), for one point.
template <int R, int NV>
__attribute__((target("avx2,fma"))) void wgrad_tile(const float* v, int64_t ldv, const float* z,
                                                    int64_t ldz, int64_t rows, float* du,
                                                    int64_t ldu) {
  detail::outer_accumulate<R, NV>([v, ldv](int64_t t, int r) { return v + t * ldv + r; },
                                  [z, ldz](int64_t t) { return z + t * ldz; }, rows,
                                  [du, ldu](int r) { return du + r * ldu; });
}

template <int NV>
constexpr auto wgrad_fns = detail::row_kernels<kRows>([]<int R>() { return &wgrad_tile<R, NV>; });

// dU[xi] += V[xi]^T Z[xi] for every point and the block's `rows` tiles (V, Z: [xi][T][channels]).
template <class T>
void block_wgrad(const Problem& p, const float* V, const float* Z, int64_t rows, float* dU) {
  const int64_t cin = p.cin, cout = p.cout;
  for (int xi = 0; xi < T::points; ++xi) {
    const float* v = V + xi * p.block * cin;
    const float* z = Z + xi * p.block * cout;
    float* du = dU + xi * cin * cout;
    for (int64_t ci = 0; ci < cin; ci += kRows) {
      const int nr = static_cast<int>(std::min<int64_t>(kRows, cin - ci));
      for (int64_t co = 0; co < cout; co += 16) {
        const auto fn = co + 16 <= cout ? wgrad_fns<2>[nr] : wgrad_fns<1>[nr];
        fn(v + ci, cin, z + co, cout, rows, du + ci * cout + co, cout);
      }
    }
  }
}

// dw (cout, 3, 3, 3, cin) = (G^T (x) G^T (x) G^T) dU[:, ci, co], 8 output channels per vector.
template <class T>
__attribute__((target("avx2,fma"))) void untransform_weights(const float* dU, int64_t cin,
                                                             int64_t cout, float* dw) {
  constexpr int n = T::n;
#pragma omp for schedule(static)
  for (int64_t ci = 0; ci < cin; ++ci)
    for (int64_t co = 0; co < cout; co += 8) {
      __m256 u[n][n][n], t1[n][n][3], t2[n][3][3], g[3][3][3], col[n], out[3];
      __m256* uf = &u[0][0][0];
      for (int xi = 0; xi < T::points; ++xi)
        uf[xi] = _mm256_loadu_ps(dU + (xi * cin + ci) * cout + co);
      for (int a = 0; a < n; ++a)  // x
        for (int b = 0; b < n; ++b) T::gt(u[a][b], t1[a][b]);
      for (int a = 0; a < n; ++a)  // y
        for (int kx = 0; kx < 3; ++kx) {
          for (int b = 0; b < n; ++b) col[b] = t1[a][b][kx];
          T::gt(col, out);
          for (int ky = 0; ky < 3; ++ky) t2[a][ky][kx] = out[ky];
        }
      for (int ky = 0; ky < 3; ++ky)  // z
        for (int kx = 0; kx < 3; ++kx) {
          for (int a = 0; a < n; ++a) col[a] = t2[a][ky][kx];
          T::gt(col, out);
          for (int kz = 0; kz < 3; ++kz) g[kz][ky][kx] = out[kz];
        }
      alignas(32) float lanes[8];
      const __m256* gf = &g[0][0][0];
      for (int k = 0; k < 27; ++k) {
        _mm256_store_ps(lanes, gf[k]);
        for (int j = 0; j < 8; ++j) dw[((co + j) * 27 + k) * cin + ci] = lanes[j];
      }
    }
}

// Chunks of tiles with their own partial dU: fixed (not per thread) so that the sum's order does
// not depend on the thread count; at most 8, and their partials at most 16 MB.
template <class T>
int64_t wgrad_chunks(const Problem& p, int64_t blocks) {
  const int64_t u_bytes = T::points * p.cin * p.cout * 4;
  return std::clamp<int64_t>(std::min<int64_t>(8, (16 << 20) / u_bytes), 1, blocks);
}

template <class T>
void run_wgrad(const Problem& p, const float* x, const float* dy, float* dw) {
  constexpr int points = T::points;
  const int64_t blocks = (p.tiles + p.block - 1) / p.block;
  const int64_t chunks = wgrad_chunks<T>(p, blocks);
  const int64_t u_floats = points * p.cin * p.cout;
  float* partial = weights_buffer(static_cast<size_t>(chunks * u_floats));
#pragma omp parallel
  {
    float* V =
        thread_buffer(static_cast<size_t>(points * p.block * (p.cin + p.cout) + points * p.cin));
    float* Z = V + points * p.block * p.cin;
    float* L = Z + points * p.block * p.cout;
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      float* dU = partial + c * u_floats;
      std::memset(dU, 0, static_cast<size_t>(u_floats) * sizeof(float));
      for (int64_t b = blocks * c / chunks; b < blocks * (c + 1) / chunks; ++b) {
        const int64_t t0 = b * p.block, rows = std::min(p.block, p.tiles - t0);
        TileOrigin o = tile_origin<T>(p, t0);
        for (int64_t r = 0; r < rows; ++r, advance<T>(p, o)) {
          gather<T>(p, x, o, L);
          input_transform<T>(p, L, V + r * p.cin, p.block * p.cin, 8);
          dy_transform<T>(p, dy, o, Z + r * p.cout, p.block * p.cout);
        }
        block_wgrad<T>(p, V, Z, rows, dU);
      }
    }
    // Sum the partials into the first, in chunk order (an implicit barrier ends the loop above).
#pragma omp for schedule(static)
    for (int64_t i = 0; i < u_floats; i += 8) {
      __m256 s = _mm256_loadu_ps(partial + i);
      for (int64_t c = 1; c < chunks; ++c)
        s = _mm256_add_ps(s, _mm256_loadu_ps(partial + c * u_floats + i));
      _mm256_storeu_ps(partial + i, s);
    }
    untransform_weights<T>(partial, p.cin, p.cout, dw);
  }
}

}  // namespace

// Up to Cin x Cout = 128 x 128: the transformed weights (64 x Cin x Cout floats, 4 MB there) are
// streamed once per block of tiles, and beyond that they come from L3 or memory for every block: at
// 256 and 320 channels the kernels measured 2.5-5x slower than oneDNN's (8^3, 320 -> 320: 104
// against 32 ms forward), and larger blocks only brought them level with it.
constexpr int64_t kMaxChannelProduct = 128 * 128;

bool conv3d_winograd_covers(const ConvGeometry& g) {
  return detail::cpu_has_avx2_fma() && !g.transposed && g.k == 3 && g.stride == 1 && g.pad == 1 &&
         g.cin * g.cout <= kMaxChannelProduct && g.cin % 8 == 0 && g.cout % 8 == 0 && g.n > 0 &&
         g.id > 0 && g.ih > 0 && g.iw > 0;
}

namespace {
// Auto: F(4, 3) where the volume has enough 4^3 tiles to keep the threads busy and to waste little
// on partial tiles (every axis >= 16) and the channels are few enough for a block's V and M
// (6 tiles x 216 points x (Cin + Cout) floats) to stay near L2 (Cin x Cout <= 64 x 64), else
// F(2, 3). bench_conv, 2 threads: at 8^3 x 128 -> 128 F(4) took 1.7-2x F(2)'s time, at 16^3 x
// 128 -> 128 1.6-1.8x, at 16^3 x 128 -> 64 0.8-1.6x (unstable), at 16^3 x 64 -> 64 0.8x.
// MEDSEG_CONV_WINOGRAD_TILE=2 or 4 forces one size (A/B runs).
WinogradTile pick_tile(WinogradTile tile, const ConvGeometry& g) {
  if (tile != WinogradTile::Auto) return tile;
  static const int forced = [] {
    const char* v = std::getenv("MEDSEG_CONV_WINOGRAD_TILE");
    return v ? std::atoi(v) : 0;
  }();
  if (forced == 2) return WinogradTile::F2;
  if (forced == 4) return WinogradTile::F4;
  return std::min({g.id, g.ih, g.iw}) >= 16 && g.cin * g.cout <= 64 * 64 ? WinogradTile::F4
                                                                           : WinogradTile::F2;
}

// The forward core (input channels a, output channels b) with the chosen tile size.
void run_tile(WinogradTile tile, const ConvGeometry& g, int64_t a, int64_t b, const float* in,
              const float* w, bool backward, const Epilogue& ep, float* out) {
  if (pick_tile(tile, g) == WinogradTile::F4)
    run<F4>(make_problem<F4>(g.n, g.id, g.ih, g.iw, a, b), in, w, backward, ep, out);
  else
    run<F2>(make_problem<F2>(g.n, g.id, g.ih, g.iw, a, b), in, w, backward, ep, out);
}
}  // namespace

bool conv3d_forward_winograd(const ConvGeometry& g, const float* x, const float* w, const float* b,
                             float* y, std::optional<float> leaky_slope, WinogradTile tile) {
  validate(g);
  if (!conv3d_winograd_covers(g)) return false;
  MEDSEG_CHECK(x && w && y, "conv3d_forward_winograd: null x, w or y for ", g.str());
  Epilogue ep;
  ep.bias = b;
  ep.leaky = leaky_slope.has_value();
  ep.slope = leaky_slope.value_or(0.f);
  run_tile(tile, g, g.cin, g.cout, x, w, /*backward=*/false, ep, y);
  return true;
}

bool conv3d_backward_data_winograd(const ConvGeometry& g, const float* dy, const float* w,
                                   float* dx, WinogradTile tile) {
  validate(g);
  if (!conv3d_winograd_covers(g)) return false;
  MEDSEG_CHECK(dy && w && dx, "conv3d_backward_data_winograd: null dy, w or dx for ", g.str());
  run_tile(tile, g, g.cout, g.cin, dy, w, /*backward=*/true, Epilogue{}, dx);
  return true;
}

bool conv3d_backward_weights_winograd(const ConvGeometry& g, const float* dy, const float* x,
                                      float* dw, float* db, WinogradTile tile) {
  validate(g);
  if (!conv3d_winograd_covers(g)) return false;
  MEDSEG_CHECK(dy && x && dw, "conv3d_backward_weights_winograd: null dy, x or dw for ", g.str());
  if (pick_tile(tile, g) == WinogradTile::F4)
    run_wgrad<F4>(make_problem<F4>(g.n, g.id, g.ih, g.iw, g.cin, g.cout), x, dy, dw);
  else
    run_wgrad<F2>(make_problem<F2>(g.n, g.id, g.ih, g.iw, g.cin, g.cout), x, dy, dw);
  if (db) detail::bias_gradient(dy, g.n * g.od * g.oh * g.ow, g.cout, db);
  return true;
}

}  // namespace medseg::cpu
