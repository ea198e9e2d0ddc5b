#include "pipelines/sample_data.hpp"

#include <algorithm>

#include "core/error.hpp"
#include "core/log.hpp"
#include "infer/synthetic.hpp"

namespace medseg::pipelines {

int run_sample_data(const SampleDataConfig& cfg) {
  if (cfg.cases < 1)
    throw ArgumentError("sample-data: --cases must be at least 1, got " +
                        std::to_string(cfg.cases));
  infer::SyntheticOptions o;
  o.train_cases = cfg.cases;
  o.test_cases = std::max(1, cfg.cases / 4);
  o.seed = cfg.seed;
  infer::generate_synthetic_dataset(cfg.out, o);
  log_info("sample-data: wrote ", o.train_cases, " training and ", o.test_cases, " test cases (",
           o.size[0], "x", o.size[1], "x", o.size[2], " voxels, seed ", o.seed, ") to ",
           cfg.out.string());
  return 0;
}

}  // namespace medseg::pipelines
