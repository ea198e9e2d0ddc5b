#include "core/rng.hpp"

#include <sstream>

#include "core/error.hpp"

namespace medseg {
namespace {
uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
}  // namespace

void Rng::seed_with(uint64_t seed) {
  uint64_t x = seed;
  for (auto& v : s_) v = splitmix64(x);
  has_spare_ = false;
}

uint64_t Rng::next_u64() {
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

uint64_t Rng::below(uint64_t n) {
  MEDSEG_CHECK(n > 0, "Rng::below(0)");
  // Rejection sampling removes modulo bias.
  const uint64_t limit = UINT64_MAX - UINT64_MAX % n;
  uint64_t v;
  do v = next_u64();
  while (v >= limit);
  return v % n;
}

double Rng::normal() {
  if (has_spare_) {
    has_spare_ = false;
    return spare_;
  }
  double u1;
  do u1 = uniform();
  while (u1 <= 0.0);
  const double u2 = uniform();
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double a = 2.0 * M_PI * u2;
  spare_ = r * std::sin(a);
  has_spare_ = true;
  return r * std::cos(a);
}

Rng Rng::split(uint64_t stream_id) const {
  uint64_t x = s_[0] ^ rotl(s_[1], 13) ^ (stream_id * 0xd1b54a32d192ed03ULL);
  return Rng(splitmix64(x));
}

std::string Rng::state_string() const {
  std::ostringstream os;
  os << s_[0] << " " << s_[1] << " " << s_[2] << " " << s_[3];
  return os.str();
}

void Rng::set_state_string(const std::string& text) {
  std::istringstream is(text);
  std::array<uint64_t, 4> s{};
  for (auto& v : s) {
    if (!(is >> v)) throw ArgumentError("malformed random generator state '" + text + "'");
  }
  set_state(s);
}

}  // namespace medseg
