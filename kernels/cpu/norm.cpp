// Fast normalization kernels (contract: norm.hpp; ground truth: norm_ref.cpp).
//
// Data are channels-last, so a tensor is `rows` = N*D*H*W rows of C contiguous floats. Every pass
// splits the rows into one contiguous chunk per OpenMP thread and runs an inner loop over the C
// channels of a row, which the compiler vectorises (-march=native). Per-channel sums go into
// thread-private partial buffers (one cache-line-padded slot per thread), combined afterwards in
// thread order, so a result depends only on the thread count, never on scheduling.
//
// Passes (the fewest the math allows: the statistics must be complete before any output is known):
//   forward : 1. statistics (read x);  2. normalize + affine + LeakyReLU (read x, write y)
//   backward: 1. reduction (read dy, x, y);  2. dx (read dy, x, y; write dx). Without y the
//             LeakyReLU mask is recomputed from x and the forward's scale and shift: one stream
//             less per pass, and the network need not keep y.
//
// Statistics: shifted sums in double. Each group (channel, or (n, c) for instance norm) is shifted
// by its first value K, and sum(x - K), sum((x - K)^2) are accumulated in double. Why this and not
// plain sums or Welford: x - K and its square are EXACT in double (a float difference has at most
// ~25 significant bits, its square at most ~50 < 53), so the only rounding is the accumulation
// itself, and the shift removes the catastrophic cancellation of E[x^2] - E[x]^2 when |mean| >> std
// (K is a sample of the same channel, so |mean - K| is of the order of the std). Welford needs a
// division per element and does not vectorise across a row; shifted sums cost a subtraction, an add
// and an FMA per value.
//
// The inner loops live in block functions whose pointers are __restrict PARAMETERS (g++ honours
// __restrict on parameters, not on local variables), so they vectorise without aliasing checks.
#include "kernels/cpu/norm.hpp"

#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/error.hpp"

namespace medseg::cpu {
namespace {

// Below this many values per thread the fork/join costs more than the work saves.
constexpr int64_t kValuesPerThread = 1 << 15;

int threads_for(int64_t values) {
  const int64_t useful = std::max<int64_t>(1, values / kValuesPerThread);
  return static_cast<int>(std::min<int64_t>(omp_get_max_threads(), useful));
}

// The layout of the statistic groups: `groups` runs of `rows_per_group` consecutive rows (instance
// norm: one run per sample; batch kinds: one run of all rows). A statistic slot is g * C + c.
struct Layout {
  int64_t rows = 0, c = 0, groups = 1, rows_per_group = 0;
  int64_t slots() const { return groups * c; }
};

Layout layout_of(const NormConfig& cfg, const Shape& s) {
  Layout l;
  l.rows = s.per_channel();
  l.c = s.c;
  const bool instance = cfg.kind == NormKind::InstanceNorm;
  l.groups = instance ? s.n : 1;
  l.rows_per_group = instance ? s.spatial() : l.rows;
  return l;
}

// Calls body(g, row_begin, row_end) for the rows of this thread's chunk, split at group boundaries.
template <typename Body>
void for_my_rows(const Layout& l, Body&& body) {
  const int t = omp_get_thread_num(), nt = omp_get_num_threads();
  int64_t row = l.rows * t / nt;
  const int64_t end = l.rows * (t + 1) / nt;
  while (row < end) {
    const int64_t g = row / l.rows_per_group;
    const int64_t stop = std::min(end, (g + 1) * l.rows_per_group);
    body(g, row, stop);
    row = stop;
  }
}

// Thread-private partial sums: `arrays` arrays of `slots` doubles per thread, each thread's block
// padded to a whole number of cache lines so that threads never write the same line.
class Partials {
 public:
  Partials(int threads, int64_t slots, int arrays)
      : slots_(slots), stride_((arrays * slots + 7) / 8 * 8), data_(threads * stride_, 0.0) {}
  double* of_thread(int t, int array) { return data_.data() + t * stride_ + array * slots_; }
  // Sum over threads, in thread order (deterministic for a given thread count).
  std::vector<double> total(int threads, int array) const {
    std::vector<double> out(slots_, 0.0);
    for (int t = 0; t < threads; ++t) {
      const double* p = data_.data() + t * stride_ + array * slots_;
      for (int64_t i = 0; i < slots_; ++i) out[i] += p[i];
    }
    return out;
  }

 private:
  int64_t slots_, stride_;
  std::vector<double> data_;
};

void check_args(const NormConfig& cfg, const Shape& s) {
  MEDSEG_CHECK(s.numel() > 0, "normalization of an empty tensor ", s);
  MEDSEG_CHECK(cfg.eps > 0.f, "eps must be positive, got ", cfg.eps);
  MEDSEG_CHECK(cfg.r_max >= 1.f && cfg.d_max >= 0.f,
               "clips need r_max >= 1 and d_max >= 0, got r_max ", cfg.r_max, " d_max ", cfg.d_max);
}

// LeakyReLU's select, branch-free: g++ with its default -ftrapping-math will not if-convert
// `positive ? a : slope * a` (the product could trap), so such a loop stays scalar and mispredicts
// on random signs. The same choice as a bit mask vectorises; the result is bit-identical.
inline float select(bool positive, float if_positive, float otherwise) {
  const uint32_t mask = 0u - static_cast<uint32_t>(positive);
  return std::bit_cast<float>((std::bit_cast<uint32_t>(if_positive) & mask) |
                              (std::bit_cast<uint32_t>(otherwise) & ~mask));
}

// ---- block kernels: `rows` consecutive rows of C channels; per-channel arrays have C entries ----

// Statistics: s1 += x - k, s2 += (x - k)^2 (in double, exact terms).
void stats_block(int64_t rows, int64_t C, const float* __restrict x, const float* __restrict k,
                 double* __restrict s1, double* __restrict s2) {
  for (int64_t row = 0; row < rows; ++row, x += C) {
    for (int64_t c = 0; c < C; ++c) {
      const double v = static_cast<double>(x[c]) - static_cast<double>(k[c]);
      s1[c] += v;
      s2[c] += v * v;
    }
  }
}

// The pre-activation (x - mu) * a + b. One function for the forward and for the backward's mask
// recovery, so both compile to the same arithmetic (the same contraction into an FMA or not) and
// the mask recomputed from x matches the forward's y > 0 bit for bit.
inline float pre_activation(float x, float mu, float a, float b) { return (x - mu) * a + b; }

// y = (x - mu) * a + b, then LeakyReLU when kLeaky.
template <bool kLeaky>
void normalize_block(int64_t rows, int64_t C, const float* __restrict x, const float* __restrict mu,
                     const float* __restrict a, const float* __restrict b, float slope,
                     float* __restrict y) {
  for (int64_t row = 0; row < rows; ++row, x += C, y += C) {
    for (int64_t c = 0; c < C; ++c) {
      const float z = pre_activation(x[c], mu[c], a[c], b[c]);
      y[c] = kLeaky ? select(z > 0.f, z, slope * z) : z;
    }
  }
}

// Where the backward finds the LeakyReLU mask: none (no LeakyReLU), the forward output y > 0, or
// the pre-activation recomputed from x with the forward's coefficients (a, b) > 0.
enum class Mask { None, FromY, FromX };

// The per-channel arguments of the backward's element loops.
struct MaskArgs {
  const float* y = nullptr;  // FromY: the forward output (row-major like x)
  const float* a = nullptr;  // FromX: the forward's scale and shift of this slot group
  const float* b = nullptr;
  float slope = 0.f;
};

template <Mask kMask>
inline float masked(float dy, float x, float mu, const MaskArgs& m, int64_t c, const float* y) {
  if constexpr (kMask == Mask::FromY) return select(y[c] > 0.f, dy, m.slope * dy);
  if constexpr (kMask == Mask::FromX)
    return select(pre_activation(x, mu, m.a[c], m.b[c]) > 0.f, dy, m.slope * dy);
  return dy;
}

// dz = dy through the LeakyReLU mask; sdz += dz, sdzx += dz * (x - mu).
template <Mask kMask>
void grad_sums_block(int64_t rows, int64_t C, const float* __restrict dy, const float* __restrict x,
                     MaskArgs m, const float* __restrict mu, double* __restrict sdz,
                     double* __restrict sdzx) {
  const float* __restrict y = m.y;
  for (int64_t row = 0; row < rows; ++row, dy += C, x += C, y += kMask == Mask::FromY ? C : 0) {
    for (int64_t c = 0; c < C; ++c) {
      const float dz = masked<kMask>(dy[c], x[c], mu[c], m, c, y);
      sdz[c] += static_cast<double>(dz);
      sdzx[c] += static_cast<double>(dz) * static_cast<double>(x[c] - mu[c]);
    }
  }
}

// dx = a (dz - b) - e (x - mu). dx may be dy itself: each element is read before it is written at
// the same index, so there is no dependence between iterations (hence ivdep and no __restrict on
// the two).
template <Mask kMask>
void dx_block(int64_t rows, int64_t C, const float* dy, const float* __restrict x, MaskArgs m,
              const float* __restrict mu, const float* __restrict a, const float* __restrict b,
              const float* __restrict e, float* dx) {
  const float* __restrict y = m.y;
  for (int64_t row = 0; row < rows;
       ++row, dy += C, x += C, y += kMask == Mask::FromY ? C : 0, dx += C) {
#pragma GCC ivdep
    for (int64_t c = 0; c < C; ++c) {
      const float dz = masked<kMask>(dy[c], x[c], mu[c], m, c, y);
      dx[c] = a[c] * (dz - b[c]) - e[c] * (x[c] - mu[c]);
    }
  }
}

// Pass 2 of the forward (and the whole inference): y = (x - mu) * a + b, then LeakyReLU, with
// per-slot mu, a, b.
void normalize_pass(const NormConfig& cfg, const Layout& l, const float* x, const float* mu,
                    const float* a, const float* b, float* y) {
  const bool leaky = cfg.leaky;
  const float slope = cfg.slope;
  const int64_t C = l.c;
#pragma omp parallel num_threads(threads_for(l.rows* C))
  for_my_rows(l, [&](int64_t g, int64_t row0, int64_t row1) {
    const int64_t o = g * C;
    if (leaky)
      normalize_block<true>(row1 - row0, C, x + row0 * C, mu + o, a + o, b + o, slope,
                            y + row0 * C);
    else
      normalize_block<false>(row1 - row0, C, x + row0 * C, mu + o, a + o, b + o, slope,
                             y + row0 * C);
  });
}

}  // namespace

NormStepInfo norm_forward_train(const NormConfig& cfg, const Shape& s, const float* x,
                                const float* gamma, const float* beta, float* running_mean,
                                float* running_std, float* y, NormCache cache) {
  check_args(cfg, s);
  const bool batch_kind = cfg.kind != NormKind::InstanceNorm;
  MEDSEG_CHECK(!batch_kind || (running_mean && running_std),
               "batch (re)norm training needs running statistics");
  const Layout l = layout_of(cfg, s);
  const int64_t C = l.c, slots = l.slots();

  // ---- pass 1: shifted sums per slot ----
  std::vector<float> shift(slots);
  for (int64_t g = 0; g < l.groups; ++g)
    for (int64_t c = 0; c < C; ++c) shift[g * C + c] = x[g * l.rows_per_group * C + c];
  const int threads = threads_for(l.rows * C);
  Partials part(threads, slots, 2);
#pragma omp parallel num_threads(threads)
  {
    double* s1_all = part.of_thread(omp_get_thread_num(), 0);
    double* s2_all = part.of_thread(omp_get_thread_num(), 1);
    for_my_rows(l, [&](int64_t g, int64_t row0, int64_t row1) {
      stats_block(row1 - row0, C, x + row0 * C, shift.data() + g * C, s1_all + g * C,
                  s2_all + g * C);
    });
  }
  const std::vector<double> s1 = part.total(threads, 0), s2 = part.total(threads, 1);

  // ---- per-slot scalars: batch statistics, r, d, the affine coefficients of pass 2 ----
  const double m = static_cast<double>(l.rows_per_group);
  const double eps = cfg.eps, sigma_floor = std::sqrt(eps);
  std::vector<double> mu_b(slots), sigma_b(slots);
  std::vector<float> a(slots), b(slots);
  NormStepInfo info;
  bool all_finite = true;
  for (int64_t i = 0; i < slots; ++i) {
    const double mean_shifted = s1[i] / m;
    // Biased variance; the max() only absorbs rounding below zero for (near-)constant groups.
    const double var = std::max(s2[i] / m - mean_shifted * mean_shifted, 0.0);
    mu_b[i] = shift[i] + mean_shifted;
    sigma_b[i] = std::sqrt(var + eps);
    if (!std::isfinite(mu_b[i]) || !std::isfinite(sigma_b[i])) all_finite = false;
    const int64_t c = i % C;
    double r = 1.0, d = 0.0;
    if (cfg.kind == NormKind::BatchRenorm) {
      const double sigma = std::max(static_cast<double>(running_std[c]), sigma_floor);
      const double r_raw = sigma_b[i] / sigma;
      const double d_raw = (mu_b[i] - running_mean[c]) / sigma;
      const double r_lo = 1.0 / cfg.r_max, r_hi = cfg.r_max, d_hi = cfg.d_max;
      r = std::min(std::max(r_raw, r_lo), r_hi);
      d = std::min(std::max(d_raw, -d_hi), d_hi);
      if (r_raw < r_lo || r_raw > r_hi) ++info.r_clipped;
      if (d_raw < -d_hi || d_raw > d_hi) ++info.d_clipped;
    }
    cache.mean[i] = static_cast<float>(mu_b[i]);
    cache.inv_std[i] = static_cast<float>(1.0 / sigma_b[i]);
    cache.r[i] = static_cast<float>(r);
    cache.d[i] = static_cast<float>(d);
    // z = gamma * ((x - mu_B) / sigma_B * r + d) + beta = (x - mu_B) * a + b; keeping x - mu_B
    // (rather than x * a + b') avoids cancellation when |mu_B| >> sigma_B.
    a[i] = static_cast<float>(gamma[c] * r / sigma_b[i]);
    b[i] = static_cast<float>(gamma[c] * d + beta[c]);
  }

  if (cache.scale && cache.shift) {
    std::copy(a.begin(), a.end(), cache.scale);
    std::copy(b.begin(), b.end(), cache.shift);
  }

  // ---- pass 2: normalize + affine + LeakyReLU ----
  normalize_pass(cfg, l, x, cache.mean, a.data(), b.data(), y);

  if (batch_kind) {
    if (!all_finite) {
      info.update_skipped = true;  // a poisoned running sigma would poison every later r and d
    } else {
      const double alpha = cfg.alpha;
      for (int64_t c = 0; c < C; ++c) {
        running_mean[c] = static_cast<float>(running_mean[c] + alpha * (mu_b[c] - running_mean[c]));
        running_std[c] = static_cast<float>(running_std[c] + alpha * (sigma_b[c] - running_std[c]));
      }
    }
  }
  return info;
}

void norm_backward(const NormConfig& cfg, const Shape& s, const float* dy, const float* x,
                   const float* y, const float* gamma, NormCache cache, float* dx, float* dgamma,
                   float* dbeta) {
  check_args(cfg, s);
  const Mask mask = !cfg.leaky ? Mask::None : y ? Mask::FromY : Mask::FromX;
  MEDSEG_CHECK(mask != Mask::FromX || (cache.scale && cache.shift),
               "the LeakyReLU mask needs the forward output y or the cached scale and shift");
  MEDSEG_CHECK(dx != y && dx != x, "norm_backward: dx may alias dy only");
  const Layout l = layout_of(cfg, s);
  const int64_t C = l.c, slots = l.slots();
  // The mask arguments of slot group g (row offsets are added by the block functions).
  auto mask_of = [&](int64_t g, int64_t r0) {
    MaskArgs m;
    m.slope = cfg.slope;
    if (mask == Mask::FromY) m.y = y + r0;
    if (mask == Mask::FromX) m.a = cache.scale + g * C, m.b = cache.shift + g * C;
    return m;
  };

  // ---- pass 1: sum dz and sum dz * (x - mu_B), dz = dy through the LeakyReLU mask ----
  const int threads = threads_for(l.rows * C);
  Partials part(threads, slots, 2);
#pragma omp parallel num_threads(threads)
  {
    double* s1_all = part.of_thread(omp_get_thread_num(), 0);
    double* s2_all = part.of_thread(omp_get_thread_num(), 1);
    for_my_rows(l, [&](int64_t g, int64_t row0, int64_t row1) {
      const int64_t o = g * C, r0 = row0 * C, n = row1 - row0;
      const MaskArgs m = mask_of(g, r0);
      if (mask == Mask::FromY)
        grad_sums_block<Mask::FromY>(n, C, dy + r0, x + r0, m, cache.mean + o, s1_all + o, s2_all + o);
      else if (mask == Mask::FromX)
        grad_sums_block<Mask::FromX>(n, C, dy + r0, x + r0, m, cache.mean + o, s1_all + o, s2_all + o);
      else
        grad_sums_block<Mask::None>(n, C, dy + r0, x + r0, m, cache.mean + o, s1_all + o, s2_all + o);
    });
  }
  const std::vector<double> sum_dz = part.total(threads, 0), sum_dzx = part.total(threads, 1);

  // ---- per-slot coefficients: dx = k (dz - mean(dz)) - k inv_std mean(dz x_bn) (x - mu_B) ----
  // dz - mean(dz) is formed before scaling so that it cancels exactly where it should (m = 1).
  const double m = static_cast<double>(l.rows_per_group);
  std::vector<float> ka(slots), kb(slots), kc(slots);
  std::vector<double> dgamma_acc(C, 0.0), dbeta_acc(C, 0.0);
  for (int64_t i = 0; i < slots; ++i) {
    const int64_t c = i % C;
    const double inv_std = cache.inv_std[i], r = cache.r[i], d = cache.d[i];
    const double sum_dz_xbn = sum_dzx[i] * inv_std;
    const double k = static_cast<double>(gamma[c]) * r * inv_std;
    ka[i] = static_cast<float>(k);
    kb[i] = static_cast<float>(sum_dz[i] / m);
    kc[i] = static_cast<float>(k * inv_std * sum_dz_xbn / m);
    dbeta_acc[c] += sum_dz[i];
    dgamma_acc[c] += r * sum_dz_xbn + d * sum_dz[i];
  }
  for (int64_t c = 0; c < C; ++c) {
    dgamma[c] = static_cast<float>(dgamma_acc[c]);
    dbeta[c] = static_cast<float>(dbeta_acc[c]);
  }

  // ---- pass 2: dx ----
#pragma omp parallel num_threads(threads)
  for_my_rows(l, [&](int64_t g, int64_t row0, int64_t row1) {
    const int64_t o = g * C, r0 = row0 * C, n = row1 - row0;
    const MaskArgs mk = mask_of(g, r0);
    const float *mu = cache.mean + o, *pa = ka.data() + o, *pb = kb.data() + o, *pc = kc.data() + o;
    if (mask == Mask::FromY)
      dx_block<Mask::FromY>(n, C, dy + r0, x + r0, mk, mu, pa, pb, pc, dx + r0);
    else if (mask == Mask::FromX)
      dx_block<Mask::FromX>(n, C, dy + r0, x + r0, mk, mu, pa, pb, pc, dx + r0);
    else
      dx_block<Mask::None>(n, C, dy + r0, x + r0, mk, mu, pa, pb, pc, dx + r0);
  });
}

void norm_forward_infer(const NormConfig& cfg, const Shape& s, const float* x, const float* gamma,
                        const float* beta, const float* running_mean, const float* running_std,
                        float* y) {
  check_args(cfg, s);
  const Layout l = layout_of(cfg, s);
  if (cfg.kind == NormKind::InstanceNorm) {
    // Per-sample statistics, exactly as in training; the cache is scratch.
    std::vector<float> mean(l.slots()), inv_std(l.slots()), r(l.slots()), d(l.slots());
    norm_forward_train(cfg, s, x, gamma, beta, nullptr, nullptr, y,
                       NormCache{mean.data(), inv_std.data(), r.data(), d.data()});
    return;
  }
  MEDSEG_CHECK(running_mean && running_std, "batch (re)norm inference needs running statistics");
  const double sigma_floor = std::sqrt(static_cast<double>(cfg.eps));
  std::vector<float> a(l.c);
  for (int64_t c = 0; c < l.c; ++c)
    a[c] =
        static_cast<float>(gamma[c] / std::max(static_cast<double>(running_std[c]), sigma_floor));
  normalize_pass(cfg, l, x, running_mean, a.data(), beta, y);
}

void norm_forward_apply(const NormConfig& cfg, const Shape& s, const float* x, NormCache cache,
                        float* y) {
  check_args(cfg, s);
  MEDSEG_CHECK(cache.mean && cache.scale && cache.shift,
               "norm_forward_apply needs the cached mean, scale and shift of a training forward");
  MEDSEG_CHECK(x != y, "norm_forward_apply: y may not alias x");
  normalize_pass(cfg, layout_of(cfg, s), x, cache.mean, cache.scale, cache.shift, y);
}

}  // namespace medseg::cpu
