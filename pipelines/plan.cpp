#include "pipelines/plan.hpp"

#include <algorithm>
#include <iostream>
#include <set>

#include "core/error.hpp"
#include "core/log.hpp"
#include "data/plan.hpp"
#include "io/dataset.hpp"
#include "io/image_io.hpp"

namespace medseg::pipelines {

int run_plan(const PlanConfig& cfg) {
  if (cfg.batch_size < 1) throw ArgumentError("--batch-size must be >= 1");
  if (cfg.base_filters < 1 || cfg.base_filters > 4096)
    throw ArgumentError("--base-filters must be 1 to 4096");
  if (cfg.max_filters < cfg.base_filters)
    throw ArgumentError("--max-filters must be at least --base-filters");
  if (!(cfg.memory_budget_gb > 0 && cfg.memory_budget_gb < 1e6))
    throw ArgumentError("--memory-gb must be a positive number of GB");
  io::Dataset ds = io::discover_dataset(cfg.data);
  // The plan and fingerprint must not replace a file of the dataset they describe.
  {
    std::set<fs::path> own{fs::weakly_canonical(ds.root / "dataset.json")};
    for (const auto& list : {ds.training, ds.test})
      for (const auto& c : list) {
        for (const auto& i : c.images) own.insert(fs::weakly_canonical(i));
        if (!c.label.empty()) own.insert(fs::weakly_canonical(c.label));
      }
    for (const fs::path& out : {cfg.out, cfg.fingerprint_out})
      if (!out.empty() && own.count(fs::weakly_canonical(out)))
        throw ArgumentError(out.string() + " is a file of the dataset " + cfg.data.string() +
                            "; write the plan elsewhere");
  }
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
