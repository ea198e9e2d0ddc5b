// Private helpers shared by the convolution implementations of kernels/cpu.
#pragma once
#include <cstdint>

namespace medseg::cpu {

namespace detail {
// db[co] = sum over `voxels` rows of dy[row * cout + co], accumulated in double (assigned).
void bias_gradient(const float* dy, int64_t voxels, int64_t cout, float* db);
}  // namespace detail

}  // namespace medseg::cpu
