// Register-tile building blocks shared by the AVX2 convolution kernels of kernels/cpu (private).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace medseg::cpu::detail {

// c (R rows x 8*NV columns, row stride ldc) += sum over `count` rows i of the outer product of
// a[i][0 .. R) (rows of a at stride lda) and b(i)[0 .. 8*NV) (b returns row i of the other factor):
// the R x 8*NV block of c lives in R*NV ymm registers (at most 12 with the NV loads and the
// broadcast), each row costs NV loads, R broadcasts and R*NV FMAs. The weight gradients are such
// sums over voxels or tiles.
template <int R, int NV, class RowB>
__attribute__((target("avx2,fma"), always_inline)) inline void outer_accumulate(
    const float* a, int64_t lda, RowB b, int64_t count, float* c, int64_t ldc) {
  __m256 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t i = 0; i < count; ++i, a += lda) {
    const float* bi = b(i);
    __m256 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(bi + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      float* q = c + r * ldc + 8 * v;
      _mm256_storeu_ps(q, _mm256_add_ps(_mm256_loadu_ps(q), acc[r][v]));
    }
}

}  // namespace medseg::cpu::detail
