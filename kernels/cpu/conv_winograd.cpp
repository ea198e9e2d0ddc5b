// Winograd F(2x2x2, 3x3x3) convolution for AVX2 + FMA CPUs (see conv.hpp).
//
// Why: after the direct backward-weights kernel, the forward and backward-data passes of the 3x3x3
// convolutions were most of the training step and of inference, and oneDNN 2.6 already runs them at
// 115-130 GFLOP/s of this class of machine's 157 GFLOP/s fp32 peak (two AVX2 cores): a faster direct
// kernel has little room. Winograd's minimal filtering computes a 2x2x2 block of outputs from a
// 4x4x4 block of inputs with 64 multiplications per (input, output) channel pair instead of
// 8 * 27 = 216, 3.4x fewer. The price is three linear transforms (input, weights, output) done with
// additions only, and slightly larger rounding errors (the transforms' coefficients are 0, +-1 and
// +-1/2, so the error stays a small multiple of the direct sum's; see the tests).
//
// For one output tile t (origin 2*t in each axis, inputs 2*t - 1 .. 2*t + 2, pad 1):
//   U[xi][ci][co] = (G (x) G (x) G) w[co, :, :, :, ci]      weights, 4x3 matrix G per axis
//   V[xi][t][ci]  = (B^T (x) B^T (x) B^T) x[tile t, ci]     inputs, 4x4 matrix B^T per axis
//   M[xi][t][co]  = sum_ci V[xi][t][ci] * U[xi][ci][co]     64 independent GEMMs
//   y[tile t, co] = (A^T (x) A^T (x) A^T) M[:, t, co]       outputs, 2x4 matrix A^T per axis
// with, along one axis,
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1],
//   A^T = [1 1 1 0; 0 1 -1 -1]
// (checked by hand: A^T [(G g) . (B^T d)] = (g0 d0 + g1 d1 + g2 d2, g0 d1 + g1 d2 + g2 d3)).
//
// Layout of the work: the tiles are numbered (n, tz, ty, tx) and cut into blocks of T consecutive
// tiles; a thread takes a block, transforms its inputs into V, runs the 64 GEMMs into M and
// transforms M into the output. T is chosen so that V and M stay in L2 (~128 KB each). V, M and the
// gathered 4x4x4 input block of a tile are stored channel-blocked, [row][C/8][64 points][8]: every
// access of the transforms is then a constant offset from one pointer (with plain channels-last
// rows, the 16 row pointers and the runtime channel stride spilled and cost 4x the arithmetic),
// and the transforms work on 8 channels per vector. The GEMM micro-kernel holds a 6 tile x 16
// channel block of M in 12 ymm registers (2 weight vectors + 6 broadcasts per 12 FMAs). Every
// output element is computed by one thread in a fixed order, so the result does not depend on the
// thread count.
//
// Backward-data of a stride-1, pad-1, 3x3x3 convolution is the forward convolution of dy with the
// kernel flipped in space and its channel roles swapped, so it runs through the same code with
// U built from w[co, 2 - kz, 2 - ky, 2 - kx, ci] (input channels co, output channels ci).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>

#include "core/error.hpp"
#include "kernels/cpu/conv.hpp"

namespace medseg::cpu {

namespace {

constexpr int kXi = 64;    // 4 x 4 x 4 transformed points per tile
constexpr int kRows = 6;   // GEMM micro-tile rows (tiles)
constexpr int kCb = kXi * 8;  // floats of one 8-channel block of a gathered tile

// The problem the core solves: a 3x3x3, stride-1, pad-1 convolution of `in` (n, d, h, w, cin) into
// `out` (n, d, h, w, cout) with transformed weights U.
struct Problem {
  int64_t n, d, h, w, cin, cout;
  int64_t tz, ty, tx, tiles;  // tiles per axis and in total
  int64_t block;              // tiles per block (a multiple of kRows)
  int64_t sv, sm;             // floats per transformed point of a row group in V and in M
};

Problem make_problem(int64_t n, int64_t d, int64_t h, int64_t w, int64_t cin, int64_t cout) {
  Problem p{n, d, h, w, cin, cout, (d + 1) / 2, (h + 1) / 2, (w + 1) / 2, 0, 0, 0, 0};
  p.tiles = n * p.tz * p.ty * p.tx;
  // V and M of a block ~128 KB each: T * C <= 512 floats per transformed point, a multiple of the
  // micro-tile's rows, at least one micro-tile.
  const int64_t c = std::max(cin, cout);
  p.block = std::max<int64_t>(kRows, (512 / c) / kRows * kRows);
  p.sv = kRows * cin;
  p.sm = kRows * cout;
  return p;
}

// ------------------------------------------------------------------------------------ weights

// One axis of the weight transform on 8 lanes: 3 taps -> 4 points (G above).
__attribute__((target("avx2,fma"), always_inline)) inline void g_transform(const __m256* g,
                                                                          int gs, __m256* u,
                                                                          int us) {
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 g0 = g[0], g1 = g[gs], g2 = g[2 * gs];
  const __m256 s = _mm256_add_ps(g0, g2);
  u[0] = g0;
  u[us] = _mm256_mul_ps(half, _mm256_add_ps(s, g1));
  u[2 * us] = _mm256_mul_ps(half, _mm256_sub_ps(s, g1));
  u[3 * us] = g2;
}

// U[xi][a][b] (a: the core's input channel, b: its output channel) from KRSC weights w (cout, 3, 3,
// 3, cin). Forward: a = ci, b = co. Backward-data: a = co, b = ci and the taps flipped (flipping
// all three axes reverses the tap order). 8 consecutive b per vector; the forward gathers them
// (stride 27 * cin), the backward loads them.
__attribute__((target("avx2,fma"))) void transform_weights(const float* w, int64_t cout,
                                                           int64_t cin, bool backward, float* U) {
  const int64_t na = backward ? cout : cin, nb = backward ? cin : cout;
  const __m256i gather_index = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                                  _mm256_set1_epi32(static_cast<int>(27 * cin)));
#pragma omp for schedule(static)
  for (int64_t a = 0; a < na; ++a)
    for (int64_t b = 0; b < nb; b += 8) {
      __m256 g[27], t1[3][3][4], t2[3][4][4], u[4][4][4];
      for (int k = 0; k < 27; ++k)
        g[k] = backward ? _mm256_loadu_ps(w + (a * 27 + 26 - k) * cin + b)
                        : _mm256_i32gather_ps(w + (b * 27 + k) * cin + a, gather_index, 4);
      for (int kz = 0; kz < 3; ++kz)
        for (int ky = 0; ky < 3; ++ky) g_transform(g + (kz * 3 + ky) * 3, 1, &t1[kz][ky][0], 1);
      for (int kz = 0; kz < 3; ++kz)
        for (int j = 0; j < 4; ++j) g_transform(&t1[kz][0][j], 4, &t2[kz][0][j], 4);
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) g_transform(&t2[0][i][j], 16, &u[0][i][j], 16);
      const __m256* uf = &u[0][0][0];
      for (int xi = 0; xi < kXi; ++xi) _mm256_storeu_ps(U + (xi * na + a) * nb + b, uf[xi]);
    }
}

// ---------------------------------------------------------------------------------- transforms

struct TileOrigin {
  int64_t n, z, y, x;  // input origin of the tile: 2 * (tz, ty, tx) - 1
};

TileOrigin tile_origin(const Problem& p, int64_t tile) {
  const int64_t tx = tile % p.tx, ty = (tile / p.tx) % p.ty, tz = (tile / (p.tx * p.ty)) % p.tz,
                n = tile / (p.tx * p.ty * p.tz);
  return {n, 2 * tz - 1, 2 * ty - 1, 2 * tx - 1};
}

bool interior(const Problem& p, const TileOrigin& o) {
  return o.z >= 0 && o.z + 3 < p.d && o.y >= 0 && o.y + 3 < p.h && o.x >= 0 && o.x + 3 < p.w;
}

// The x step of the input transform of one tile: for each (z, y) row of its 4x4x4 input block
// (zeros outside the volume when kBorder) and each 8-channel block, B^T along x, stored as
// L[cin/8][J][z][y][8] so that the y and z steps read constant offsets.
template <bool kBorder>
__attribute__((target("avx2,fma"))) void gather_tile(const Problem& p, const float* in,
                                                     const TileOrigin& o, float* L) {
  const int64_t cin = p.cin;
  const __m256 zero = _mm256_setzero_ps();
  bool xin[4];
  for (int c = 0; c < 4; ++c) xin[c] = !kBorder || (o.x + c >= 0 && o.x + c < p.w);
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) {
      const int64_t z = o.z + a, y = o.y + b;
      const bool row_in = !kBorder || (z >= 0 && z < p.d && y >= 0 && y < p.h);
      const float* row = in + (((o.n * p.d + z) * p.h + y) * p.w + o.x) * cin;
      float* dst = L + (a * 4 + b) * 8;
      for (int64_t cb = 0; cb < cin / 8; ++cb, dst += kCb, row += 8) {
        __m256 d[4];
        for (int c = 0; c < 4; ++c)
          d[c] = (!kBorder || (row_in && xin[c])) ? _mm256_loadu_ps(row + c * cin) : zero;
        _mm256_storeu_ps(dst + 0 * 128, _mm256_sub_ps(d[0], d[2]));
        _mm256_storeu_ps(dst + 1 * 128, _mm256_add_ps(d[1], d[2]));
        _mm256_storeu_ps(dst + 2 * 128, _mm256_sub_ps(d[2], d[1]));
        _mm256_storeu_ps(dst + 3 * 128, _mm256_sub_ps(d[1], d[3]));
      }
    }
}

// The y and z steps of the input transform for x index J of an 8-channel block: the 16 values of
// l[J] stay in registers; point xi = (zi*4 + yi)*4 + J goes to v + xi * sv.
template <int J>
__attribute__((target("avx2,fma"), always_inline)) inline void input_column(const float* l,
                                                                           float* v, int64_t sv) {
  __m256 t[4][4];
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) t[a][b] = _mm256_loadu_ps(l + ((J * 4 + a) * 4 + b) * 8);
  for (int a = 0; a < 4; ++a) {
    const __m256 e0 = t[a][0], e1 = t[a][1], e2 = t[a][2], e3 = t[a][3];
    t[a][0] = _mm256_sub_ps(e0, e2);
    t[a][1] = _mm256_add_ps(e1, e2);
    t[a][2] = _mm256_sub_ps(e2, e1);
    t[a][3] = _mm256_sub_ps(e1, e3);
  }
  for (int i = 0; i < 4; ++i) {
    const __m256 e0 = t[0][i], e1 = t[1][i], e2 = t[2][i], e3 = t[3][i];
    const int xi = i * 4 + J;
    _mm256_storeu_ps(v + (0 * 16 + xi) * sv, _mm256_sub_ps(e0, e2));
    _mm256_storeu_ps(v + (1 * 16 + xi) * sv, _mm256_add_ps(e1, e2));
    _mm256_storeu_ps(v + (2 * 16 + xi) * sv, _mm256_sub_ps(e2, e1));
    _mm256_storeu_ps(v + (3 * 16 + xi) * sv, _mm256_sub_ps(e1, e3));
  }
}

// The V entries of one tile from its x-transformed block L; v: V + group * 64 * sv + slot * 8
// (slot = the tile's row in its group of kRows). Channel block cb of point xi is at
// v + xi * sv + cb * 8 * kRows.
__attribute__((target("avx2,fma"))) void input_transform(const Problem& p, const float* L,
                                                         float* v) {
  for (int64_t cb = 0; cb < p.cin / 8; ++cb) {
    float* vc = v + cb * 8 * kRows;
    input_column<0>(L + cb * kCb, vc, p.sv);
    input_column<1>(L + cb * kCb, vc, p.sv);
    input_column<2>(L + cb * kCb, vc, p.sv);
    input_column<3>(L + cb * kCb, vc, p.sv);
  }
}

struct Epilogue {
  const float* bias = nullptr;  // per output channel, or null
  bool leaky = false;
  float slope = 0.f;
};

// The output block of one tile from M (m: M + group * 64 * sm + slot * 8, channel block cb of
// point xi at m + xi * sm + cb * 8 * kRows), with the bias and the LeakyReLU
// applied; outputs beyond the volume's last odd row, column or plane are not written. Like the
// input transform, one output column (x index) at a time, so that the intermediates stay in
// registers.
__attribute__((target("avx2,fma"))) void output_transform(const Problem& p, const float* m,
                                                          const TileOrigin& o,
                                                          const Epilogue& ep, float* out) {
  const int64_t cout = p.cout;
  const int64_t z0 = o.z + 1, y0 = o.y + 1, x0 = o.x + 1;  // first output of the tile
  const int nz = z0 + 1 < p.d ? 2 : 1, ny = y0 + 1 < p.h ? 2 : 1, nx = x0 + 1 < p.w ? 2 : 1;
  const __m256 slope = _mm256_set1_ps(ep.slope);
  const __m256 zero = _mm256_setzero_ps();
  float* base = out + (((o.n * p.d + z0) * p.h + y0) * p.w + x0) * cout;
  const int64_t zs = p.h * p.w * cout, ys = p.w * cout;
  for (int64_t cb = 0; cb < cout / 8; ++cb) {
    const float* mb = m + cb * 8 * kRows;
    const int64_t sm = p.sm;
    auto at = [mb, sm](int a, int b, int c) {
      return _mm256_loadu_ps(mb + ((a * 4 + b) * 4 + c) * sm);
    };
    const __m256 bias = ep.bias ? _mm256_loadu_ps(ep.bias + cb * 8) : zero;
    for (int j = 0; j < nx; ++j) {
      __m256 t[4][4];
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b)
          t[a][b] = j == 0 ? _mm256_add_ps(_mm256_add_ps(at(a, b, 0), at(a, b, 1)), at(a, b, 2))
                           : _mm256_sub_ps(_mm256_sub_ps(at(a, b, 1), at(a, b, 2)), at(a, b, 3));
      __m256 s[4][2];
      for (int a = 0; a < 4; ++a) {
        s[a][0] = _mm256_add_ps(_mm256_add_ps(t[a][0], t[a][1]), t[a][2]);
        s[a][1] = _mm256_sub_ps(_mm256_sub_ps(t[a][1], t[a][2]), t[a][3]);
      }
      for (int i = 0; i < ny; ++i) {
        __m256 r[2];
        r[0] = _mm256_add_ps(_mm256_add_ps(s[0][i], s[1][i]), s[2][i]);
        r[1] = _mm256_sub_ps(_mm256_sub_ps(s[1][i], s[2][i]), s[3][i]);
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

// One transformed point, one group of R <= kRows tiles, 8*NV output channels: M (R x 8*NV) =
// V (R x cin) * U[xi] (cin x 8*NV). a: the group's V at this point (tile r, channel k at
// a + (k/8)*8*kRows + r*8 + k%8); b: U[xi] + co0 (row k at b + k*ldb); c: the group's M at this
// point + (co0/8)*8*kRows (vector v of tile r at c + v*8*kRows + r*8). The 6 broadcasts of a step
// come from 192 contiguous bytes and the results go to 12 contiguous vectors.
template <int R, int NV>
__attribute__((target("avx2,fma"))) void gemm_tile(const float* a, const float* b, int64_t ldb,
                                                   float* c, int64_t cin) {
  __m256 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < cin; k0 += 8, a += 8 * kRows, b += 8 * ldb) {
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      __m256 bv[NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(b + k * ldb + 8 * v);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 av = _mm256_broadcast_ss(a + r * 8 + k);
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

using GemmFn = void (*)(const float*, const float*, int64_t, float*, int64_t);

template <int NV>
constexpr GemmFn gemm_fns[kRows + 1] = {nullptr,           &gemm_tile<1, NV>, &gemm_tile<2, NV>,
                                        &gemm_tile<3, NV>, &gemm_tile<4, NV>, &gemm_tile<5, NV>,
                                        &gemm_tile<6, NV>};

// M = V * U[xi] for every point xi and the block's tiles: point-major, so that U[xi] is reused by
// every group of the block while V and M of the block stay in L2.
void block_gemms(const Problem& p, const float* V, const float* U, float* M, int64_t rows) {
  const int64_t groups = (rows + kRows - 1) / kRows;
  for (int xi = 0; xi < kXi; ++xi) {
    const float* u = U + xi * p.cin * p.cout;
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int nr = static_cast<int>(std::min<int64_t>(kRows, rows - gi * kRows));
      const float* a = V + (gi * kXi + xi) * p.sv;
      float* c = M + (gi * kXi + xi) * p.sm;
      for (int64_t co = 0; co < p.cout; co += 16) {
        const GemmFn fn = co + 16 <= p.cout ? gemm_fns<2>[nr] : gemm_fns<1>[nr];
        fn(a, u + co, p.cout, c + (co / 8) * 8 * kRows, p.cin);
      }
    }
  }
}

// Per-thread V, M and gathered tile, grown to the largest problem a thread meets and then reused.
float* thread_buffer(size_t floats) {
  struct Buffer {
    std::unique_ptr<float[]> data;
    size_t size = 0;
  };
  thread_local Buffer buf;
  if (buf.size < floats) {
    buf.data.reset();
    buf.data.reset(new float[floats]);
    buf.size = floats;
  }
  return buf.data.get();
}

// U for the calling thread (shared by the parallel region it opens).
float* weights_buffer(size_t floats) {
  thread_local std::unique_ptr<float[]> data;
  thread_local size_t size = 0;
  if (size < floats) {
    data.reset();
    data.reset(new float[floats]);
    size = floats;
  }
  return data.get();
}

// The next tile in (n, tz, ty, tx) order.
void advance(const Problem& p, TileOrigin& o) {
  if ((o.x += 2) < 2 * p.tx - 1) return;
  o.x = -1;
  if ((o.y += 2) < 2 * p.ty - 1) return;
  o.y = -1;
  if ((o.z += 2) < 2 * p.tz - 1) return;
  o.z = -1;
  ++o.n;
}

void run(const Problem& p, const float* in, const float* w, bool backward, const Epilogue& ep,
         float* out) {
  float* U = weights_buffer(static_cast<size_t>(kXi * p.cin * p.cout));
  const int64_t blocks = (p.tiles + p.block - 1) / p.block;
  // Weight cout/cin in KRSC terms: forward (cout, .., cin) = (p.cout, .., p.cin); backward-data
  // (p.cin, .., p.cout).
  const int64_t w_cout = backward ? p.cin : p.cout, w_cin = backward ? p.cout : p.cin;
  const int64_t group_v = kXi * p.sv, group_m = kXi * p.sm;  // floats per group of kRows tiles
  const int64_t groups = p.block / kRows;
#pragma omp parallel
  {
    transform_weights(w, w_cout, w_cin, backward, U);  // omp for: ends with a barrier
    float* V = thread_buffer(static_cast<size_t>(groups * (group_v + group_m) + kXi * p.cin));
    float* M = V + groups * group_v;
    float* L = M + groups * group_m;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t t0 = b * p.block, rows = std::min(p.block, p.tiles - t0);
      const TileOrigin first = tile_origin(p, t0);
      TileOrigin o = first;
      for (int64_t r = 0; r < rows; ++r, advance(p, o)) {
        if (interior(p, o))
          gather_tile<false>(p, in, o, L);
        else
          gather_tile<true>(p, in, o, L);
        input_transform(p, L, V + (r / kRows) * group_v + (r % kRows) * 8);
      }
      block_gemms(p, V, U, M, rows);
      o = first;
      for (int64_t r = 0; r < rows; ++r, advance(p, o))
        output_transform(p, M + (r / kRows) * group_m + (r % kRows) * 8, o, ep, out);
    }
  }
}

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

}  // namespace

bool conv3d_winograd_covers(const ConvGeometry& g) {
  return cpu_has_avx2_fma() && !g.transposed && g.k == 3 && g.stride == 1 && g.pad == 1 &&
         g.cin % 8 == 0 && g.cout % 8 == 0 && g.n > 0 && g.id > 0 && g.ih > 0 && g.iw > 0;
}

bool conv3d_forward_winograd(const ConvGeometry& g, const float* x, const float* w, const float* b,
                             float* y, std::optional<float> leaky_slope) {
  validate(g);
  if (!conv3d_winograd_covers(g)) return false;
  MEDSEG_CHECK(x && w && y, "conv3d_forward_winograd: null x, w or y for ", g.str());
  const Problem p = make_problem(g.n, g.id, g.ih, g.iw, g.cin, g.cout);
  Epilogue ep;
  ep.bias = b;
  ep.leaky = leaky_slope.has_value();
  ep.slope = leaky_slope.value_or(0.f);
  run(p, x, w, /*backward=*/false, ep, y);
  return true;
}

bool conv3d_backward_data_winograd(const ConvGeometry& g, const float* dy, const float* w,
                                   float* dx) {
  validate(g);
  if (!conv3d_winograd_covers(g)) return false;
  MEDSEG_CHECK(dy && w && dx, "conv3d_backward_data_winograd: null dy, w or dx for ", g.str());
  const Problem p = make_problem(g.n, g.id, g.ih, g.iw, g.cout, g.cin);
  run(p, dy, w, /*backward=*/true, Epilogue{}, dx);
  return true;
}

}  // namespace medseg::cpu
