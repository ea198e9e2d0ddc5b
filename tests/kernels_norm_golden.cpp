// The normalization kernels (reference and fast) against golden data from PyTorch:
// tests/golden/norm_golden.json, written by scripts/gen_norm_golden.py (batch renorm from the
// specification in torch ops, autograd gradients, float64 from float32 inputs). Compares y, the
// running statistics, r, d, the clip counts, dx, dgamma and dbeta.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kernels/cpu/norm.hpp"

using namespace medseg;
using medseg::cpu::NormCache;
using medseg::cpu::NormConfig;
using medseg::cpu::NormKind;

namespace {

nlohmann::json load_golden() {
  const std::filesystem::path path =
      std::filesystem::path(MEDSEG_SOURCE_DIR) / "tests" / "golden" / "norm_golden.json";
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open golden file " + path.string());
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error("malformed golden file " + path.string() + ": " + e.what());
  }
}

std::vector<float> floats(const nlohmann::json& j, const char* key) {
  return j.at(key).get<std::vector<float>>();
}

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float e : v) m = std::max(m, double(std::abs(e)));
  return m;
}

void expect_close(const std::string& what, const std::vector<float>& got,
                  const std::vector<float>& want, double atol, double rtol) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(double(got[i]) - want[i]);
    if (!(err <= atol + rtol * std::abs(want[i]))) {
      if (bad++ < 5)
        ADD_FAILURE() << what << ": index " << i << " got " << got[i] << " want " << want[i]
                      << " |diff| " << err;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " out of tolerance";
}

NormKind kind_of(const std::string& name) {
  if (name == "batchrenorm") return NormKind::BatchRenorm;
  if (name == "batchnorm") return NormKind::BatchNorm;
  if (name == "instancenorm") return NormKind::InstanceNorm;
  throw std::runtime_error("golden file: unknown norm kind " + name);
}

}  // namespace

TEST(NormGolden, ReferenceAndFastMatchPyTorch) {
  const nlohmann::json golden = load_golden();
  ASSERT_GE(golden.at("cases").size(), 4u);
  for (const auto& c : golden.at("cases")) {
    NormConfig cfg;
    cfg.kind = kind_of(c.at("kind").get<std::string>());
    cfg.eps = c.at("eps").get<float>();
    cfg.alpha = c.at("alpha").get<float>();
    cfg.r_max = c.at("r_max").get<float>();
    cfg.d_max = c.at("d_max").get<float>();
    cfg.leaky = c.at("leaky").get<bool>();
    cfg.slope = c.at("slope").get<float>();
    const auto dims = c.at("shape").get<std::vector<int64_t>>();
    ASSERT_EQ(dims.size(), 5u);
    const Shape s{dims[0], dims[1], dims[2], dims[3], dims[4]};
    const std::vector<float> x = floats(c, "x"), gamma = floats(c, "gamma"),
                             beta = floats(c, "beta"), dy = floats(c, "dy");
    ASSERT_EQ(int64_t(x.size()), s.numel());
    const std::vector<float> want_y = floats(c, "y"), want_dx = floats(c, "dx");
    const size_t slots = cfg.kind == NormKind::InstanceNorm ? size_t(s.n * s.c) : size_t(s.c);

    for (bool fast : {false, true}) {
      const std::string what = c.at("name").get<std::string>() + (fast ? " fast" : " ref");
      const float nan = std::numeric_limits<float>::quiet_NaN();
      std::vector<float> rm = floats(c, "running_mean"), rs = floats(c, "running_std");
      std::vector<float> y(x.size(), nan), mean(slots, nan), inv_std(slots, nan), r(slots, nan),
          d(slots, nan);
      const NormCache cache{mean.data(), inv_std.data(), r.data(), d.data()};
      const bool batch_kind = cfg.kind != NormKind::InstanceNorm;
      auto fwd = fast ? cpu::norm_forward_train : cpu::norm_forward_train_ref;
      const cpu::NormStepInfo info =
          fwd(cfg, s, x.data(), gamma.data(), beta.data(), batch_kind ? rm.data() : nullptr,
              batch_kind ? rs.data() : nullptr, y.data(), cache);
      EXPECT_FALSE(info.update_skipped) << what;
      EXPECT_EQ(info.r_clipped, c.at("r_clipped").get<int64_t>()) << what;
      EXPECT_EQ(info.d_clipped, c.at("d_clipped").get<int64_t>()) << what;
      // The golden values are float64 results rounded to float; ours are float computations with
      // double sums on O(1) values: agreement to ~1e-6 relative of the tensor scale; 1e-5 is the
      // margin. A spec deviation (N-1, eps outside the sqrt, post-update r) is >= 1e-3 off.
      expect_close(what + " y", y, want_y, 1e-5 * max_abs(want_y), 1e-5);
      expect_close(what + " r", r, floats(c, "r"), 1e-6, 1e-6);
      expect_close(what + " d", d, floats(c, "d"), 1e-6, 1e-6);
      expect_close(what + " running mean", rm, floats(c, "running_mean_out"), 1e-6, 1e-6);
      expect_close(what + " running std", rs, floats(c, "running_std_out"), 1e-6, 1e-6);

      std::vector<float> dx(x.size(), 1e30f), dgamma(size_t(s.c), nan), dbeta(size_t(s.c), nan);
      auto bwd = fast ? cpu::norm_backward : cpu::norm_backward_ref;
      bwd(cfg, s, dy.data(), x.data(), y.data(), gamma.data(), cache, dx.data(), dgamma.data(),
          dbeta.data());
      expect_close(what + " dx", dx, want_dx, 1e-5 * max_abs(want_dx), 1e-5);
      // Sums over m <= 144 terms of O(1): 1e-5 of the largest plus float rounding of the sum.
      const std::vector<float> want_dg = floats(c, "dgamma"), want_db = floats(c, "dbeta");
      expect_close(what + " dgamma", dgamma, want_dg, 1e-5 * max_abs(want_dg) + 1e-5, 1e-5);
      expect_close(what + " dbeta", dbeta, want_db, 1e-5 * max_abs(want_db) + 1e-5, 1e-5);
    }
  }
}
