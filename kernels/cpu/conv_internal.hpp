// Private helpers shared by the convolution implementations of kernels/cpu.
#pragma once
#include <omp.h>

#include <cstdint>

namespace medseg::cpu {

inline int64_t omp_threads() { return omp_get_num_threads(); }
inline int64_t omp_thread() { return omp_get_thread_num(); }

namespace detail {
// db[co] = sum over `voxels` rows of dy[row * cout + co], accumulated in double (assigned).
void bias_gradient(const float* dy, int64_t voxels, int64_t cout, float* db);
}  // namespace detail

}  // namespace medseg::cpu
