#include "pipelines/evaluate.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/error.hpp"
#include "core/log.hpp"
#include "infer/metrics.hpp"
#include "io/dataset.hpp"
#include "io/image_io.hpp"

namespace medseg::pipelines {

namespace {

bool is_mask_file(const fs::path& p) {
  const std::string name = p.filename().string();
  if (name.empty() || name[0] == '.') return false;  // hidden files, atomic-write temporaries
  return !io::image_extension(name).empty();
}

std::vector<fs::path> mask_files(const fs::path& dir) {
  std::vector<fs::path> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (!is_mask_file(e.path())) continue;
    // A folder or pipe named like a mask is an error, not a case to skip (it would silently drop
    // that case from the means).
    std::error_code fe;
    if (!fs::is_regular_file(e.path(), fe))
      throw IoError(e.path().string() + ": is not a regular file, expected a mask");
    out.push_back(e.path());
  }
  if (ec) throw IoError(dir.string() + ": cannot list folder: " + ec.message());
  std::sort(out.begin(), out.end());
  return out;
}

struct Pair {
  std::string id;
  fs::path pred, ref;
};

std::vector<Pair> match(const EvaluateConfig& cfg) {
  const bool pred_dir = fs::is_directory(cfg.pred), ref_dir = fs::is_directory(cfg.ref);
  if (!fs::exists(cfg.pred)) throw IoError(cfg.pred.string() + ": predictions not found");
  if (!fs::exists(cfg.ref)) throw IoError(cfg.ref.string() + ": references not found");
  if (!pred_dir && !ref_dir) return {{io::case_id_from_path(cfg.pred, false), cfg.pred, cfg.ref}};
  if (pred_dir != ref_dir)
    throw ArgumentError("evaluate: --pred " + cfg.pred.string() + " and --ref " + cfg.ref.string() +
                        " must both be folders or both be files");
  std::vector<Pair> pairs;
  const auto preds = mask_files(cfg.pred), refs = mask_files(cfg.ref);
  for (const auto& p : preds) {
    const fs::path r = cfg.ref / p.filename();
    if (!fs::exists(r))
      throw IoError("no reference for prediction " + p.string() + ": expected " + r.string());
    pairs.push_back({io::case_id_from_path(p, false), p, r});
  }
  for (const auto& r : refs) {
    const fs::path p = cfg.pred / r.filename();
    if (!fs::exists(p))
      throw IoError("no prediction for reference " + r.string() + ": expected " + p.string());
  }
  if (pairs.empty())
    throw IoError(cfg.pred.string() + ": no masks (.nii.gz, .nii, .nrrd, .mha, .mhd) found");
  return pairs;
}

nlohmann::ordered_json number_or_null(double v) {
  if (std::isfinite(v)) return v;
  return nullptr;
}
std::string csv_number(double v) {
  if (!std::isfinite(v)) return "";
  std::ostringstream os;
  os.precision(10);
  os << v;
  return os.str();
}
std::string cell(double v, int width, int decimals) {
  char buf[64];
  if (std::isfinite(v))
    std::snprintf(buf, sizeof buf, "%*.*f", width, decimals, v);
  else
    std::snprintf(buf, sizeof buf, "%*s", width, "n/a");
  return buf;
}

// One table row: case (24 columns), label, then dice, iou (4 decimals), hd95 (2), msd (3).
std::string table_row(const std::string& name, int label, const std::array<double, 4>& v) {
  std::string out;
  char buf[64];
  std::snprintf(buf, sizeof buf, "%-24.24s %7d", name.c_str(), label);
  out += buf;
  const int decimals[4] = {4, 4, 2, 3};
  for (int k = 0; k < 4; ++k) out += cell(v[static_cast<size_t>(k)], 10, decimals[k]);
  return out;
}

struct Stat {
  double mean = std::nan(""), std = std::nan("");
  int n = 0;
};
Stat stat(const std::vector<double>& values) {
  Stat s;
  double sum = 0;
  for (double v : values)
    if (std::isfinite(v)) sum += v, ++s.n;
  if (s.n == 0) return s;
  s.mean = sum / s.n;
  double sq = 0;
  for (double v : values)
    if (std::isfinite(v)) sq += (v - s.mean) * (v - s.mean);
  s.std = std::sqrt(sq / s.n);
  return s;
}

}  // namespace

int run_evaluate(const EvaluateConfig& cfg) {
  const std::vector<Pair> pairs = match(cfg);
  struct CaseResult {
    Pair pair;
    std::vector<infer::LabelMetrics> metrics;
  };
  std::vector<CaseResult> results;
  std::vector<LabelVolume> preds, refs;  // kept only when labels must be discovered first
  std::set<int> found;
  const bool discover = cfg.labels.empty();
  for (const auto& pr : pairs) {
    LabelVolume p = io::read_labels(pr.pred);
    LabelVolume r = io::read_labels(pr.ref);
    if (!p.geo.same_grid(r.geo))
      throw IoError("prediction " + pr.pred.string() + " and reference " + pr.ref.string() +
                    " are not on the same grid: " + io::geometry_difference(p.geo, r.geo));
    if (discover) {
      for (uint16_t v : p.data) found.insert(v);
      for (uint16_t v : r.data) found.insert(v);
      preds.push_back(std::move(p));
      refs.push_back(std::move(r));
      results.push_back({pr, {}});
    } else {
      results.push_back({pr, infer::evaluate_case(p, r, cfg.labels)});
    }
  }
  std::vector<int> labels = cfg.labels;
  if (discover) {
    found.erase(0);
    labels.assign(found.begin(), found.end());
    if (labels.empty())
      throw ArgumentError(
          "evaluate: every prediction and reference is empty (background only); "
          "name the labels to evaluate with --labels");
    for (size_t i = 0; i < results.size(); ++i)
      results[i].metrics = infer::evaluate_case(preds[i], refs[i], labels);
  }

  // Table, JSON and CSV.
  std::ostringstream table;
  table << "case                       label      dice       iou   hd95_mm    msd_mm   pred_vox    "
           "ref_vox\n";
  nlohmann::ordered_json j;
  j["pred"] = cfg.pred.string();
  j["ref"] = cfg.ref.string();
  j["labels"] = labels;
  j["definitions"] = {
      {"dice", "2|P n R| / (|P| + |R|)"},
      {"iou", "|P n R| / |P u R|"},
      {"hd95_mm", "max of the 95th percentiles of the directed surface distances (mm)"},
      {"msd_mm", "average symmetric surface distance (mm), surfaces = 6-connected borders"},
      {"empty",
       "both empty: dice 1, iou 1, hd95 0, msd 0; one empty: dice 0, iou 0, hd95/msd null"},
      {"std", "population standard deviation over the cases where the value is defined"}};
  j["cases"] = nlohmann::ordered_json::array();
  std::ostringstream csv;
  csv << "case,label,dice,iou,hd95_mm,msd_mm,pred_voxels,ref_voxels\n";
  std::map<int, std::array<std::vector<double>, 4>> per_label;
  for (const auto& res : results) {
    nlohmann::ordered_json c;
    c["case"] = res.pair.id;
    c["pred"] = res.pair.pred.string();
    c["ref"] = res.pair.ref.string();
    c["metrics"] = nlohmann::ordered_json::array();
    for (const auto& m : res.metrics) {
      c["metrics"].push_back({{"label", m.label},
                              {"dice", number_or_null(m.dice)},
                              {"iou", number_or_null(m.iou)},
                              {"hd95_mm", number_or_null(m.hd95)},
                              {"msd_mm", number_or_null(m.msd)},
                              {"pred_voxels", m.pred_voxels},
                              {"ref_voxels", m.ref_voxels}});
      csv << res.pair.id << ',' << m.label << ',' << csv_number(m.dice) << ',' << csv_number(m.iou)
          << ',' << csv_number(m.hd95) << ',' << csv_number(m.msd) << ',' << m.pred_voxels << ','
          << m.ref_voxels << '\n';
      table << table_row(res.pair.id, m.label, {m.dice, m.iou, m.hd95, m.msd}) << ' '
            << std::setw(10) << m.pred_voxels << ' ' << std::setw(10) << m.ref_voxels << '\n';
      auto& pl = per_label[m.label];
      pl[0].push_back(m.dice);
      pl[1].push_back(m.iou);
      pl[2].push_back(m.hd95);
      pl[3].push_back(m.msd);
    }
    j["cases"].push_back(c);
  }
  j["summary"] = nlohmann::ordered_json::array();
  const char* keys[4] = {"dice", "iou", "hd95_mm", "msd_mm"};
  for (int label : labels) {
    const auto& pl = per_label[label];
    nlohmann::ordered_json s;
    s["label"] = label;
    Stat st[4];
    for (int k = 0; k < 4; ++k) {
      st[k] = stat(pl[k]);
      s[keys[k]] = {{"mean", number_or_null(st[k].mean)},
                    {"std", number_or_null(st[k].std)},
                    {"cases", st[k].n}};
    }
    j["summary"].push_back(s);
    for (int r = 0; r < 2; ++r) {
      const char* what = r == 0 ? "mean" : "std";
      csv << what << ',' << label;
      std::array<double, 4> v{};
      for (int k = 0; k < 4; ++k) {
        v[static_cast<size_t>(k)] = r == 0 ? st[k].mean : st[k].std;
        csv << ',' << csv_number(v[static_cast<size_t>(k)]);
      }
      table << table_row(what, label, v) << '\n';
      csv << ",,\n";
    }
  }
  std::cout << table.str() << std::flush;
  fs::path csv_path = cfg.out_json;
  csv_path.replace_extension(".csv");
  if (!cfg.out_json.parent_path().empty()) {
    std::error_code ec;
    fs::create_directories(cfg.out_json.parent_path(), ec);
    if (ec)
      throw IoError(cfg.out_json.parent_path().string() +
                    ": cannot create folder: " + ec.message());
  }
  io::write_text_atomic(cfg.out_json, j.dump(2) + "\n");
  io::write_text_atomic(csv_path, csv.str());
  log_info("evaluate: ", results.size(), " case(s), report ", cfg.out_json.string(), " and ",
           csv_path.string());
  return 0;
}

}  // namespace medseg::pipelines
