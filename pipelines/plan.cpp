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
  // Headers only: reading every voxel twice (here and in the fingerprint) would double the time
  // on large CT datasets; the fingerprint reads the voxels and fails on unreadable ones anyway.
  io::ValidationOptions vopt;
  vopt.check_voxels = false;
  const io::ValidationReport report = io::validate_dataset(ds, vopt);
  if (!report.ok()) {
    log_warn("dataset ", cfg.data.string(), ": leaving out ", report.bad_cases.size(),
             " case(s) that failed validation:\n", report.text());
    std::erase_if(ds.training, [&](const io::CaseEntry& e) {
      return std::find(report.bad_cases.begin(), report.bad_cases.end(), e.id) !=
             report.bad_cases.end();
    });
  }
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
