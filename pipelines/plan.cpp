#include "pipelines/plan.hpp"

#include <algorithm>
#include <iostream>

#include "core/error.hpp"
#include "core/log.hpp"
#include "data/plan.hpp"
#include "io/dataset.hpp"
#include "io/image_io.hpp"

namespace medseg::pipelines {

int run_plan(const PlanConfig& cfg) {
  io::Dataset ds = io::discover_dataset(cfg.data);
  // The same validation as `train` (headers and voxels: NaN/Inf, label values): a plan made from
  // a case that training would refuse is no plan. The report goes to stderr.
  const io::ValidationReport report = io::validate_dataset(ds, io::ValidationOptions{});
  if (!report.problems.empty()) std::cerr << report.text() << std::flush;
  io::drop_or_refuse_bad_cases(ds, report, cfg.exclude_bad_cases, cfg.data);
  if (ds.training.empty())
    throw ArgumentError("dataset " + cfg.data.string() + " has no usable training case");

  log_info(
      "fingerprinting ",
      cfg.max_cases > 0 ? std::min<size_t>(cfg.max_cases, ds.training.size()) : ds.training.size(),
      " case(s) of '", ds.name, "'");
  const data::Fingerprint fp = data::fingerprint_dataset(ds, cfg.max_cases);
  data::PlanOptions opt;
  opt.base_filters = cfg.base_filters;
  opt.max_filters = cfg.max_filters;
  opt.max_patch_voxels = cfg.max_patch_voxels;
  opt.memory_budget_gb = cfg.memory_budget_gb;
  opt.batch_size = cfg.batch_size;
  opt.patch_override = cfg.patch;
  const data::Plan plan = data::make_plan(ds, fp, opt);

  std::cout << plan.describe() << std::flush;
  if (!cfg.out.parent_path().empty()) fs::create_directories(cfg.out.parent_path());
  data::write_plan(cfg.out, plan);
  log_info("plan written to ", cfg.out.string());
  if (!cfg.fingerprint_out.empty()) {
    if (!cfg.fingerprint_out.parent_path().empty())
      fs::create_directories(cfg.fingerprint_out.parent_path());
    io::write_text_atomic(cfg.fingerprint_out, fp.to_json().dump(1) + "\n");
  }
  return 0;
}

}  // namespace medseg::pipelines
