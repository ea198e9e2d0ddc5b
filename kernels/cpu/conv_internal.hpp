// Private helpers shared by the convolution implementations of kernels/cpu.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <utility>

namespace medseg::cpu {

namespace detail {
// db[co] = sum over `voxels` rows of dy[row * cout + co], accumulated in double (assigned).
void bias_gradient(const float* dy, int64_t voxels, int64_t cout, float* db);

// Whether this CPU has AVX2 and FMA (our own kernels need both).
bool cpu_has_avx2_fma();

// Register-tile kernels indexed by their row count: {nullptr, make<1>(), ..., make<Max>()}, where
// `make` is a lambda template returning the kernel instance for R rows, e.g.
//   row_kernels<6>([]<int R>() { return &tile<R, 2>; })
template <int Max, class Make>
constexpr auto row_kernels(Make make) {
  using Fn = decltype(make.template operator()<1>());
  return [&]<int... R>(std::integer_sequence<int, R...>) {
    return std::array<Fn, Max + 1>{Fn{nullptr}, make.template operator()<R + 1>()...};
  }
  (std::make_integer_sequence<int, Max>{});
}

// A scratch array that grows to the largest request it meets and is then reused, so that
// steady-state training steps allocate nothing. 64-byte aligned like the Tensors (a plain new[] of
// a large array sits 16 bytes past a page boundary, and then half of the 32-byte vector accesses
// would straddle two cache lines). Declared thread_local at each use: one buffer per thread and
// purpose (contents are not kept across a reallocation). For trivial element types.
template <class T>
class GrowingBuffer {
 public:
  T* get(size_t count) {
    if (size_ < count) {
      data_.reset();
      data_.reset(static_cast<T*>(::operator new[](count * sizeof(T), std::align_val_t{64})));
      size_ = count;
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t{64}); }
  };
  std::unique_ptr<T[], Free> data_;
  size_t size_ = 0;
};
}  // namespace detail

}  // namespace medseg::cpu
