#include "app/options.hpp"
#include "pipelines/plan.hpp"

namespace medseg::app {

namespace po = boost::program_options;

int run_plan_cmd(const std::vector<std::string>& args) {
  po::options_description desc(
      "medseg plan --data DIR [--out plan.json]\n"
      "Fingerprints a dataset (spacings, shapes, foreground intensities) and prints and writes the "
      "training plan: target spacing, normalisation, patch size, network depth");
  pipelines::PlanConfig c;
  std::string patch, fingerprint;
  desc.add_options()
      ("data", po::value<std::string>()->required(), "dataset folder")
      ("out", po::value<std::string>()->default_value("plan.json"), "where to write the plan")
      ("fingerprint", po::value<std::string>(&fingerprint), "also write the fingerprint JSON here")
      ("base-filters", po::value<int>(&c.base_filters)->default_value(c.base_filters), "filters at level 0")
      ("max-filters", po::value<int>(&c.max_filters)->default_value(c.max_filters), "filter cap")
      ("batch-size", po::value<int>(&c.batch_size)->default_value(c.batch_size), "batch size")
      ("memory-gb", po::value<double>(&c.memory_budget_gb)->default_value(c.memory_budget_gb),
       "training memory budget for the patch choice")
      ("patch", po::value<std::string>(&patch), "use this patch D,H,W instead of the computed one")
      ("max-cases", po::value<int>(&c.max_cases)->default_value(-1), "fingerprint at most N cases")
      ("exclude-bad-cases", po::bool_switch(&c.exclude_bad_cases),
       "plan without cases that fail validation instead of stopping");
  add_common(desc, false);
  auto vm = parse(desc, args, "plan");
  if (!vm) return 0;
  apply_common(*vm);
  c.data = (*vm)["data"].as<std::string>();
  c.out = (*vm)["out"].as<std::string>();
  if (!fingerprint.empty()) c.fingerprint_out = fingerprint;
  if (!patch.empty()) c.patch = parse_triple(patch, "patch");
  return pipelines::run_plan(c);
}

}  // namespace medseg::app
