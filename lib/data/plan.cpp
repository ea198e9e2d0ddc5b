// Pure planning arithmetic and the plan's JSON form. Reading datasets lives in plan_io.cpp.
#include "data/plan.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iomanip>
#include <sstream>

#include "core/error.hpp"

namespace medseg::data {

namespace {

// Bumped whenever preprocess_case changes its output for the same plan, so that caches are redone.
constexpr int kPreprocessVersion = 1;

double median_of(std::vector<double> v) {
  MEDSEG_CHECK(!v.empty(), "median of an empty list");
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Linear interpolation between order statistics (numpy's default), q in [0, 100]; v sorted.
double percentile_sorted(const std::vector<float>& v, double q) {
  if (v.empty()) return 0.0;
  const double pos = q / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  const double w = pos - static_cast<double>(lo);
  return (1.0 - w) * v[lo] + w * v[hi];
}

int64_t round_up(int64_t v, int64_t m) {
  return (v + m - 1) / m * m;
}

int64_t voxels_of(const std::array<int64_t, 3>& p) {
  return p[0] * p[1] * p[2];
}

std::string join_shape(const std::array<int64_t, 3>& s) {
  return std::to_string(s[0]) + " x " + std::to_string(s[1]) + " x " + std::to_string(s[2]);
}

[[noreturn]] void malformed(const std::string& field, const std::string& what) {
  throw ArgumentError("plan: field '" + field + "' " + what);
}

const nlohmann::json& need(const nlohmann::json& j, const char* key) {
  if (!j.is_object()) malformed(key, "cannot be read: the plan is not a JSON object");
  auto it = j.find(key);
  if (it == j.end()) malformed(key, "is missing");
  return *it;
}

int need_int(const nlohmann::json& j, const char* key, int lo, int hi) {
  const auto& v = need(j, key);
  if (!v.is_number_integer()) malformed(key, "must be an integer, found " + v.dump());
  const int64_t x = v.get<int64_t>();
  if (x < lo || x > hi)
    malformed(key, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], found " +
                       std::to_string(x));
  return static_cast<int>(x);
}

double need_number(const nlohmann::json& j, const char* key) {
  const auto& v = need(j, key);
  if (!v.is_number() || !std::isfinite(v.get<double>()))
    malformed(key, "must be a finite number, found " + v.dump());
  return v.get<double>();
}

std::array<int64_t, 3> need_shape(const nlohmann::json& j, const char* key) {
  const auto& v = need(j, key);
  if (!v.is_array() || v.size() != 3) malformed(key, "must be 3 integers, found " + v.dump());
  std::array<int64_t, 3> s{};
  for (int a = 0; a < 3; ++a) {
    if (!v[a].is_number_integer() || v[a].get<int64_t>() < 1)
      malformed(key, "must be 3 positive integers, found " + v.dump());
    s[a] = v[a].get<int64_t>();
  }
  return s;
}

}  // namespace

// ------------------------------------------------------------------------------ fingerprint

nlohmann::json Fingerprint::to_json() const {
  nlohmann::json j;
  j["median_spacing"] = median_spacing;
  j["median_shape"] = median_shape;
  j["channels"] = nlohmann::json::array();
  for (const auto& c : channels)
    j["channels"].push_back({{"mean", c.mean},
                             {"std", c.std},
                             {"percentile_00_5", c.p00_5},
                             {"percentile_99_5", c.p99_5},
                             {"samples", c.samples}});
  j["cases"] = nlohmann::json::array();
  for (const auto& c : cases)
    j["cases"].push_back({{"id", c.id},
                          {"spacing", c.spacing},
                          {"shape", c.shape},
                          {"cropped_shape", c.cropped_shape}});
  return j;
}

Fingerprint summarize_fingerprint(std::vector<CaseFingerprint> cases,
                                  std::vector<std::vector<float>> samples) {
  MEDSEG_CHECK(!cases.empty(), "a fingerprint needs at least one case");
  Fingerprint fp;
  for (int a = 0; a < 3; ++a) {
    std::vector<double> sp, sh;
    for (const auto& c : cases) {
      sp.push_back(c.spacing[a]);
      sh.push_back(static_cast<double>(c.cropped_shape[a]));
    }
    fp.median_spacing[a] = median_of(sp);
    fp.median_shape[a] = std::llround(median_of(sh));
  }
  for (auto& s : samples) {
    ChannelStats st;
    st.samples = static_cast<int64_t>(s.size());
    if (!s.empty()) {
      double sum = 0, sum2 = 0;
      for (float v : s) sum += v;
      st.mean = sum / static_cast<double>(s.size());
      for (float v : s) sum2 += (v - st.mean) * (v - st.mean);
      st.std = std::sqrt(sum2 / static_cast<double>(s.size()));
      std::sort(s.begin(), s.end());
      st.p00_5 = percentile_sorted(s, 0.5);
      st.p99_5 = percentile_sorted(s, 99.5);
    }
    fp.channels.push_back(st);
  }
  fp.cases = std::move(cases);
  return fp;
}

// ------------------------------------------------------------------------------ planning

std::array<double, 3> plan_target_spacing(const Fingerprint& fp) {
  MEDSEG_CHECK(!fp.cases.empty(), "plan_target_spacing: the fingerprint has no case");
  std::array<double, 3> target = fp.median_spacing;
  int coarse = 0, fine = 0;
  for (int a = 1; a < 3; ++a) {
    if (target[a] > target[coarse]) coarse = a;
    if (target[a] < target[fine]) fine = a;
  }
  // nnU-Net's anisotropy rule: resampling a thick-slice axis to its median would interpolate
  // through most cases' slices; the 10th percentile keeps more of the finer cases' resolution.
  if (target[coarse] > 3.0 * target[fine]) {
    std::vector<float> s;
    for (const auto& c : fp.cases) s.push_back(static_cast<float>(c.spacing[coarse]));
    std::sort(s.begin(), s.end());
    double p10 = percentile_sorted(s, 10.0);
    double other_max = 0;
    for (int a = 0; a < 3; ++a)
      if (a != coarse) other_max = std::max(other_max, target[a]);
    target[coarse] = std::max(p10, other_max);  // never finer than the in-plane target
  }
  return target;
}

int Plan::filters_at(int level) const {
  int64_t f = base_filters;
  for (int l = 0; l < level && f < max_filters; ++l) f *= 2;
  return static_cast<int>(std::min<int64_t>(f, max_filters));
}

double estimate_training_memory_gb(const std::array<int64_t, 3>& patch, int levels,
                                   int base_filters, int max_filters, int batch_size,
                                   int in_channels, int num_classes) {
  // Per level and voxel, in units of that level's filters f: what nn::UNet held up to session 6
  // (since then it holds less, docs/architecture.md, so this is an upper bound; kept so that plans,
  // and with them every dataset's patch, stay as they were): the encoder's tape
  // is 2 x (conv output, norm output) = 4f; the decoder's is the concatenation (2f) and 4f; the
  // backward adds the concatenation's gradient (2f), the skip gradient (f) and the pool of three
  // short-lived gradient buffers (3f). The bottleneck has the encoder's 4f and the pool.
  double floats = 0;
  int64_t f = base_filters;
  double vox = static_cast<double>(voxels_of(patch));
  for (int l = 0; l < levels; ++l) {
    const bool bottleneck = l == levels - 1;
    floats += vox * static_cast<double>(f) * (bottleneck ? 7.0 : 16.0);
    vox /= 8.0;
    f = std::min<int64_t>(f * 2, max_filters);
  }
  floats += static_cast<double>(voxels_of(patch)) * (in_channels + 3.0 * num_classes);
  return floats * 4.0 * batch_size / 1e9;
}

int levels_for_patch(const std::array<int64_t, 3>& patch, int max_levels) {
  int best = 1;
  for (int l = 2; l <= max_levels; ++l) {
    const int64_t div = int64_t{1} << (l - 1);
    bool ok = true;
    for (int64_t p : patch) ok = ok && p % div == 0 && p / div >= 4;
    if (ok) best = l;
  }
  return best;
}

Plan make_plan(const io::Dataset& ds, const Fingerprint& fp, const PlanOptions& opt) {
  MEDSEG_CHECK(!fp.cases.empty(), "make_plan: the fingerprint of dataset '", ds.name,
               "' has no case");
  MEDSEG_CHECK(opt.base_filters >= 1 && opt.max_filters >= opt.base_filters,
               "make_plan: filters base ", opt.base_filters, " max ", opt.max_filters);
  MEDSEG_CHECK(opt.max_levels >= 1 && opt.max_levels <= 7, "make_plan: max_levels ",
               opt.max_levels);
  MEDSEG_CHECK(opt.max_patch_voxels >= 64, "make_plan: max_patch_voxels ", opt.max_patch_voxels);
  MEDSEG_CHECK(opt.batch_size >= 1, "make_plan: batch_size ", opt.batch_size);
  if (ds.num_channels() < 1)
    throw ArgumentError("dataset '" + ds.name + "' (" + ds.root.string() + ") declares no channel");
  if (static_cast<int>(fp.channels.size()) != ds.num_channels())
    throw ArgumentError("dataset '" + ds.name + "' declares " + std::to_string(ds.num_channels()) +
                        " channels but its fingerprint has " + std::to_string(fp.channels.size()));
  if (ds.labels.size() < 2)
    throw ArgumentError("dataset '" + ds.name + "' (" + ds.root.string() +
                        ") declares fewer than 2 labels (background and one structure needed)");
  for (size_t i = 0; i < ds.labels.size(); ++i)
    if (ds.labels[i].value != static_cast<int>(i))
      throw ArgumentError("dataset '" + ds.name + "' (" + ds.root.string() +
                          "): label values must be 0, 1, ..., K-1; entry " + std::to_string(i) +
                          " has value " + std::to_string(ds.labels[i].value));

  Plan plan;
  plan.dataset_name = ds.name;
  plan.in_channels = ds.num_channels();
  plan.channel_names = ds.channel_names;
  plan.labels = ds.labels;
  plan.base_filters = opt.base_filters;
  plan.max_filters = opt.max_filters;
  plan.batch_size = opt.batch_size;
  plan.target_spacing = plan_target_spacing(fp);

  for (int c = 0; c < plan.in_channels; ++c) {
    std::string name = ds.channel_names[c];
    std::transform(name.begin(), name.end(), name.begin(),
                   [](unsigned char ch) { return static_cast<char>(std::toupper(ch)); });
    ChannelNorm n;
    if (name == "CT") {
      const ChannelStats& st = fp.channels[c];
      if (st.samples == 0)
        throw ArgumentError("dataset '" + ds.name + "': CT channel " + std::to_string(c) +
                            " has no foreground voxel to take clipping statistics from");
      n.scheme = "ct";
      n.clip_lo = st.p00_5;
      n.clip_hi = st.p99_5;
      n.mean = st.mean;
      // A constant foreground would divide by 0; 1e-8 keeps the values finite, and such a channel
      // carries no information anyway.
      n.std = std::max(st.std, 1e-8);
    }
    plan.normalization.push_back(n);
  }

  // Median shape (z, y, x) in the target spacing.
  for (int a = 0; a < 3; ++a) {
    std::vector<double> s;
    for (const auto& c : fp.cases)
      s.push_back(static_cast<double>(c.cropped_shape[a]) * c.spacing[a] / plan.target_spacing[a]);
    plan.median_shape[2 - a] = std::max<int64_t>(1, std::llround(median_of(s)));
  }

  auto fits = [&](const std::array<int64_t, 3>& p, int levels) {
    return voxels_of(p) <= opt.max_patch_voxels &&
           estimate_training_memory_gb(p, levels, opt.base_filters, opt.max_filters, opt.batch_size,
                                       plan.in_channels,
                                       plan.num_classes()) <= opt.memory_budget_gb;
  };

  if (opt.patch_override) {
    const auto& p = *opt.patch_override;
    for (int64_t v : p)
      if (v < 4)
        throw ArgumentError("patch override " + join_shape(p) + ": every axis needs >= 4 voxels");
    plan.patch = p;
    plan.levels = levels_for_patch(p, opt.max_levels);
    return plan;
  }

  // Initial patch: shaped by 1/spacing (same physical extent per axis), max_patch_voxels in volume,
  // clipped to the median shape.
  const std::array<double, 3> spacing_zyx{plan.target_spacing[2], plan.target_spacing[1],
                                          plan.target_spacing[0]};
  const std::array<int64_t, 3>& m = plan.median_shape;
  double inv_prod = 1;
  for (double s : spacing_zyx) inv_prod /= s;
  const double scale = std::cbrt(static_cast<double>(opt.max_patch_voxels) / inv_prod);
  std::array<double, 3> p0{};
  std::array<bool, 3> clipped{};
  for (int a = 0; a < 3; ++a) {
    p0[a] = scale / spacing_zyx[a];
    clipped[a] = p0[a] >= static_cast<double>(m[a]);
    p0[a] = std::min(p0[a], static_cast<double>(m[a]));
  }
  const double min_p0 = std::min({p0[0], p0[1], p0[2]});
  int levels = min_p0 >= 4 ? 1 + static_cast<int>(std::floor(std::log2(min_p0 / 4.0))) : 1;
  levels = std::clamp(levels, 1, opt.max_levels);

  auto rounded = [&](int lv) {
    const int64_t div = int64_t{1} << (lv - 1);
    std::array<int64_t, 3> p{};
    for (int a = 0; a < 3; ++a) {
      // An axis clipped to the median shape rounds up (the case is covered, the rest is padding);
      // a budget-limited axis rounds to the nearest multiple.
      int64_t v = clipped[a] ? round_up(static_cast<int64_t>(std::ceil(p0[a] - 1e-9)), div)
                             : std::llround(p0[a] / static_cast<double>(div)) * div;
      p[a] = std::max(v, 4 * div);
    }
    return p;
  };
  std::array<int64_t, 3> p = rounded(levels);

  // At least 3 levels when the budget allows, even if that pads beyond the median shape: fewer
  // levels leave the network too little receptive field to be useful.
  if (levels < 3 && opt.max_levels >= 3) {
    std::array<int64_t, 3> q{};
    for (int a = 0; a < 3; ++a) q[a] = round_up(std::max<int64_t>(p[a], 16), 4);
    if (fits(q, 3)) {
      p = q;
      levels = 3;
    }
  }

  // Shrink until it fits: take one step of 2^(levels-1) off the axis that exceeds its share of the
  // median shape the most (nnU-Net's rule); when no axis can shrink, drop a level.
  while (!fits(p, levels)) {
    const int64_t div = int64_t{1} << (levels - 1);
    int best = -1;
    double best_ratio = -1;
    for (int a = 0; a < 3; ++a) {
      if (p[a] - div < 4 * div) continue;
      const double r = static_cast<double>(p[a]) / static_cast<double>(std::max<int64_t>(m[a], 1));
      if (r > best_ratio) {
        best_ratio = r;
        best = a;
      }
    }
    if (best >= 0) {
      p[best] -= div;
    } else if (levels > 1) {
      --levels;
    } else {
      break;  // 4 x 4 x 4 with one level: nothing smaller is a network; the budget is overrun.
    }
  }
  // Rounding may allow more levels than the unrounded shape did (e.g. 64 on an axis of 60).
  const int more = levels_for_patch(p, opt.max_levels);
  if (more > levels && fits(p, more)) levels = more;
  plan.patch = p;
  plan.levels = levels;
  return plan;
}

// ------------------------------------------------------------------------------ JSON

nlohmann::json Plan::to_json() const {
  nlohmann::json j;
  j["format"] = "medseg-plan";
  j["version"] = 1;
  j["dataset_name"] = dataset_name;
  j["in_channels"] = in_channels;
  j["channel_names"] = channel_names;
  j["labels"] = nlohmann::json::array();
  for (const auto& l : labels)
    j["labels"].push_back({{"value", l.value}, {"name", l.name}, {"color", l.color}});
  j["target_spacing"] = target_spacing;
  j["normalization"] = nlohmann::json::array();
  for (const auto& n : normalization)
    j["normalization"].push_back({{"scheme", n.scheme},
                                  {"clip_lo", n.clip_lo},
                                  {"clip_hi", n.clip_hi},
                                  {"mean", n.mean},
                                  {"std", n.std}});
  j["patch"] = patch;
  j["levels"] = levels;
  j["base_filters"] = base_filters;
  j["max_filters"] = max_filters;
  j["batch_size"] = batch_size;
  j["median_shape"] = median_shape;
  j["axis_order"] = {{"target_spacing", "x,y,z"}, {"patch", "z,y,x"}, {"median_shape", "z,y,x"}};
  return j;
}

Plan Plan::from_json(const nlohmann::json& j) {
  if (!j.is_object()) throw ArgumentError("plan: expected a JSON object, found " + j.dump());
  if (j.contains("format") && j["format"] != "medseg-plan")
    malformed("format", "must be \"medseg-plan\", found " + j["format"].dump());
  // Version 1 is the only one written so far; a later one may mean fields this build misreads.
  if (j.contains("version") && !(j["version"].is_number_integer() && j["version"] == 1))
    malformed("version", "is " + j["version"].dump() + "; this medseg reads version 1 plans");
  Plan p;
  const auto& name = need(j, "dataset_name");
  if (!name.is_string()) malformed("dataset_name", "must be a string");
  p.dataset_name = name.get<std::string>();
  p.in_channels = need_int(j, "in_channels", 1, 1024);

  const auto& cn = need(j, "channel_names");
  if (!cn.is_array() || static_cast<int>(cn.size()) != p.in_channels)
    malformed("channel_names", "must list in_channels (" + std::to_string(p.in_channels) +
                                   ") names, found " + cn.dump());
  for (const auto& c : cn) {
    if (!c.is_string()) malformed("channel_names", "must hold strings, found " + c.dump());
    p.channel_names.push_back(c.get<std::string>());
  }

  const auto& labels = need(j, "labels");
  if (!labels.is_array() || labels.size() < 2)
    malformed("labels", "must list at least background and one structure, found " + labels.dump());
  for (size_t i = 0; i < labels.size(); ++i) {
    const auto& l = labels[i];
    io::LabelInfo info;
    info.value = need_int(l, "value", 0, 65535);
    if (info.value != static_cast<int>(i))
      malformed("labels", "values must be 0, 1, ..., K-1; entry " + std::to_string(i) + " has " +
                              std::to_string(info.value));
    const auto& n = need(l, "name");
    if (!n.is_string()) malformed("labels", "name must be a string, found " + n.dump());
    info.name = n.get<std::string>();
    if (l.contains("color")) {
      const auto& c = l["color"];
      if (!c.is_array() || c.size() != 3) malformed("labels", "color must be [r, g, b]");
      for (int k = 0; k < 3; ++k) {
        if (!c[k].is_number_integer() || c[k].get<int>() < 0 || c[k].get<int>() > 255)
          malformed("labels", "color components must be integers 0-255, found " + c.dump());
        info.color[k] = static_cast<uint8_t>(c[k].get<int>());
      }
    } else {
      info.color = io::default_label_color(info.value);
    }
    p.labels.push_back(info);
  }

  const auto& ts = need(j, "target_spacing");
  if (!ts.is_array() || ts.size() != 3) malformed("target_spacing", "must be 3 numbers");
  for (int a = 0; a < 3; ++a) {
    if (!ts[a].is_number() || !(ts[a].get<double>() > 0) || !std::isfinite(ts[a].get<double>()))
      malformed("target_spacing", "must be 3 positive finite numbers, found " + ts.dump());
    p.target_spacing[a] = ts[a].get<double>();
  }

  const auto& norm = need(j, "normalization");
  if (!norm.is_array() || static_cast<int>(norm.size()) != p.in_channels)
    malformed("normalization", "must have one entry per channel (" + std::to_string(p.in_channels) +
                                   "), found " + norm.dump());
  for (const auto& n : norm) {
    ChannelNorm cn_;
    const auto& s = need(n, "scheme");
    if (!s.is_string() || (s != "zscore" && s != "ct"))
      malformed("normalization", "scheme must be \"zscore\" or \"ct\", found " + s.dump());
    cn_.scheme = s.get<std::string>();
    cn_.clip_lo = need_number(n, "clip_lo");
    cn_.clip_hi = need_number(n, "clip_hi");
    cn_.mean = need_number(n, "mean");
    cn_.std = need_number(n, "std");
    if (cn_.scheme == "ct" && (!(cn_.std > 0) || cn_.clip_lo > cn_.clip_hi))
      malformed("normalization", "ct needs std > 0 and clip_lo <= clip_hi, found " + n.dump());
    p.normalization.push_back(cn_);
  }

  p.patch = need_shape(j, "patch");
  p.levels = need_int(j, "levels", 1, 7);  // the U-Net's range
  // 1024 per axis and 2^27 voxels (512^3) per patch: beyond, a damaged plan would ask for
  // terabytes before anything could say what is wrong.
  if (std::any_of(p.patch.begin(), p.patch.end(), [](int64_t v) { return v > 1024; }) ||
      p.patch[0] * p.patch[1] * p.patch[2] > (int64_t{1} << 27))
    malformed("patch", join_shape(p.patch) + " is too large (at most 1024 per axis, 512^3 voxels)");
  const int64_t div = int64_t{1} << (p.levels - 1);
  for (int64_t v : p.patch)
    if (v % div != 0 || v / div < 4)
      malformed("patch", join_shape(p.patch) + " must be divisible by 2^(levels-1) = " +
                             std::to_string(div) + " with >= 4 voxels per axis at the bottleneck");
  p.base_filters = need_int(j, "base_filters", 1, 4096);
  p.max_filters = need_int(j, "max_filters", p.base_filters, 65536);
  p.batch_size = j.contains("batch_size") ? need_int(j, "batch_size", 1, 4096) : 2;
  p.median_shape = need_shape(j, "median_shape");
  return p;
}

std::string Plan::preprocessing_hash() const {
  nlohmann::json j;
  j["preprocess_version"] = kPreprocessVersion;
  j["target_spacing"] = target_spacing;
  j["in_channels"] = in_channels;
  j["num_classes"] = num_classes();
  j["normalization"] = to_json()["normalization"];
  const std::string s = j.dump();
  uint64_t h = 1469598103934665603ULL;  // FNV-1a 64
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

std::string Plan::describe() const {
  std::ostringstream os;
  os << "Plan for dataset '" << dataset_name << "'\n";
  os << "  channels: " << in_channels << "\n";
  for (int c = 0; c < in_channels; ++c) {
    const auto& n = normalization[c];
    os << "    " << c << ": " << channel_names[c] << " -> ";
    if (n.scheme == "ct")
      os << "CT: clip to [" << n.clip_lo << ", " << n.clip_hi << "], then (v - " << n.mean << ") / "
         << n.std << "\n";
    else
      os << "z-score per image\n";
  }
  os << "  classes: " << num_classes() << " (";
  for (size_t i = 0; i < labels.size(); ++i)
    os << (i ? ", " : "") << labels[i].value << " " << labels[i].name;
  os << ")\n";
  os << std::setprecision(4) << "  target spacing (x, y, z): " << target_spacing[0] << " x "
     << target_spacing[1] << " x " << target_spacing[2] << " mm\n";
  os << "  median shape after resampling and cropping (z, y, x): " << join_shape(median_shape)
     << "\n";
  const int64_t div = int64_t{1} << (levels - 1);
  os << "  patch (z, y, x): " << join_shape(patch) << " (" << voxels_of(patch) << " voxels)\n";
  os << "  levels: " << levels << " (bottleneck "
     << join_shape({patch[0] / div, patch[1] / div, patch[2] / div}) << ")\n";
  os << "  filters per level:";
  for (int l = 0; l < levels; ++l) os << " " << filters_at(l);
  os << "\n";
  os << "  batch size: " << batch_size << ", estimated training memory "
     << estimate_training_memory_gb(patch, levels, base_filters, max_filters, batch_size,
                                    in_channels, num_classes())
     << " GB\n";
  return os.str();
}

}  // namespace medseg::data
