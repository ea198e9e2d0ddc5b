// Register-tile building blocks shared by the AVX2 convolution kernels of kernels/cpu (private).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace medseg::cpu::detail {

// For r < R: c(r)[0 .. 8*NV) += sum over `count` rows i of a(i, r)[0] * b(i)[0 .. 8*NV): the outer
// product of R scalars and 8*NV values per row, summed. a(i, r) points at the scalar, b(i) at the
// row of the other factor, c(r) at a row of the result. The R x 8*NV block lives in R*NV ymm
// registers (at most 12 with the NV loads and the broadcast); each row costs NV loads, R broadcasts
// and R*NV FMAs. The weight gradients are such sums over voxels or tiles.
template <int R, int NV, class ARow, class BRow, class CRow>
__attribute__((target("avx2,fma"), always_inline)) inline void outer_accumulate(ARow a, BRow b,
                                                                                int64_t count,
                                                                                CRow c) {
  __m256 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t i = 0; i < count; ++i) {
    const float* bi = b(i);
    __m256 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(bi + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a(i, r));
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      float* q = c(r) + 8 * v;
      _mm256_storeu_ps(q, _mm256_add_ps(_mm256_loadu_ps(q), acc[r][v]));
    }
}

}  // namespace medseg::cpu::detail
