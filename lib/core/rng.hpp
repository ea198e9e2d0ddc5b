// Seeded random numbers, reproducible bit for bit on every platform (no std:: distributions, whose
// output is implementation-defined). xoshiro256** seeded through splitmix64.
#pragma once
#include <array>
#include <cmath>
#include <cstdint>
#include <string>

namespace medseg {

class Rng {
 public:
  explicit Rng(uint64_t seed = 0) { seed_with(seed); }
  void seed_with(uint64_t seed);
  uint64_t next_u64();
  // Uniform in [0, 1).
  double uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  // Uniform integer in [0, n).
  uint64_t below(uint64_t n);
  int64_t integer(int64_t lo, int64_t hi_inclusive) {
    return lo + static_cast<int64_t>(below(static_cast<uint64_t>(hi_inclusive - lo + 1)));
  }
  bool bernoulli(double p) { return uniform() < p; }
  // Standard normal (Box-Muller, both values used).
  double normal();
  double normal(double mean, double std) { return mean + std * normal(); }
  // Independent child stream, e.g. per worker or per rank.
  Rng split(uint64_t stream_id) const;

  // Serialisable state, for exact resume.
  std::array<uint64_t, 4> state() const { return s_; }
  void set_state(const std::array<uint64_t, 4>& s) { s_ = s; has_spare_ = false; }
  std::string state_string() const;
  void set_state_string(const std::string& text);

 private:
  std::array<uint64_t, 4> s_{};
  bool has_spare_ = false;
  double spare_ = 0.0;
};

}  // namespace medseg
