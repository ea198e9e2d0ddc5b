// Dataset discovery for the layouts users already have (MSD, nnU-Net v2, plain folders), and the
// validation pass that runs before training so that a bad file is reported by name up front
// instead of failing hours into a run.
#include "io/dataset.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>

#include "core/error.hpp"
#include "core/log.hpp"
#include "io/image_io.hpp"

namespace medseg::io {

namespace {

using json = nlohmann::json;


bool is_image_file(const fs::directory_entry& e) {
  const std::string name = e.path().filename().string();
  // Hidden files include our own ".tmp-..." partial writes and macOS "._" resource forks. Whatever
  // else is named like an image is listed even when it is not a regular file (a folder, a dangling
  // or looping symlink, a FIFO): reading it then reports it by name instead of skipping it.
  return !name.empty() && name[0] != '.' && !image_extension(name).empty();
}

// Image files directly inside `folder`, sorted by name (directory order is not stable).
std::vector<fs::path> list_images(const fs::path& folder) {
  std::vector<fs::path> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(folder, ec))
    if (is_image_file(e)) out.push_back(e.path());
  if (ec) throw IoError(folder.string() + ": cannot list the folder: " + ec.message());
  std::sort(out.begin(), out.end());
  return out;
}

// Channel index of an nnU-Net file name "{CASE}_{XXXX}{ext}", or -1.
int channel_of(const fs::path& p) {
  const std::string name = p.filename().string();
  const std::string stem = name.substr(0, name.size() - image_extension(name).size());
  if (stem.size() < 6 || stem[stem.size() - 5] != '_') return -1;
  int v = 0;
  for (size_t i = stem.size() - 4; i < stem.size(); ++i) {
    if (!std::isdigit(static_cast<unsigned char>(stem[i]))) return -1;
    v = v * 10 + (stem[i] - '0');
  }
  return v;
}

// Resolves a path listed in dataset.json against the root; it must stay inside the root.
fs::path resolve_inside(const fs::path& root, const std::string& entry, const fs::path& json_path,
                        const std::string& where) {
  if (entry.empty()) throw ArgumentError(json_path.string() + ": " + where + ": empty path");
  const fs::path p = fs::path(entry).is_absolute() ? fs::path(entry).lexically_normal()
                                                   : (root / entry).lexically_normal();
  // Lexical containment (symbolic links are followed by the OS as usual: a dataset assembled from
  // links to another disk is legitimate; a listed "../" path is almost always a mistake).
  const fs::path rel = p.lexically_relative(root);
  if (rel.empty() || *rel.begin() == "..")
    throw ArgumentError(json_path.string() + ": " + where + ": path \"" + entry +
                        "\" leaves the dataset folder " + root.string());
  return p;
}

json load_json(const fs::path& path) {
  std::ifstream f(path);
  if (!f) throw IoError(path.string() + ": cannot open");
  try {
    return json::parse(f);
  } catch (const json::exception& e) {
    throw ArgumentError(path.string() + ": malformed JSON: " + e.what());
  }
}

std::string json_string(const json& j, const std::string& key, const fs::path& json_path) {
  if (!j.contains(key)) return "";
  if (!j[key].is_string())
    throw ArgumentError(json_path.string() + ": \"" + key + "\" must be a string, found " +
                        j[key].dump());
  return j[key].get<std::string>();
}

// Parses a non-negative decimal integer key ("0", "12"); nullopt otherwise.
std::optional<int> int_key(const std::string& s) {
  if (s.empty() || s.size() > 6) return std::nullopt;
  int v = 0;
  for (char c : s) {
    if (!std::isdigit(static_cast<unsigned char>(c))) return std::nullopt;
    v = v * 10 + (c - '0');
  }
  return v;
}

// {"0": "MRI", "1": "T2"} -> names in index order; indices must be 0..n-1.
std::vector<std::string> channel_list(const json& j, const char* key, const fs::path& json_path) {
  if (!j.contains(key) || !j[key].is_object() || j[key].empty())
    throw ArgumentError(json_path.string() + ": \"" + key +
                        "\" must be a non-empty object like {\"0\": \"CT\"}");
  std::map<int, std::string> by_index;
  for (const auto& [k, v] : j[key].items()) {
    const auto idx = int_key(k);
    if (!idx || !v.is_string())
      throw ArgumentError(json_path.string() + ": \"" + key + "\" entry \"" + k +
                          "\": " + v.dump() + " is not \"<index>\": \"<name>\"");
    if (!by_index.emplace(*idx, v.get<std::string>()).second)
      throw ArgumentError(json_path.string() + ": \"" + key + "\" has two entries for index " +
                          std::to_string(*idx) + " (\"" + k + "\" repeats it)");
  }
  std::vector<std::string> out;
  for (const auto& [idx, name] : by_index) {
    if (idx != static_cast<int>(out.size()))
      throw ArgumentError(json_path.string() + ": \"" + key + "\" indices must be 0.." +
                          std::to_string(by_index.size() - 1) + ", found " + std::to_string(idx));
    out.push_back(name);
  }
  return out;
}

void add_label(std::vector<LabelInfo>& labels, int value, const std::string& name,
               const fs::path& json_path) {
  if (value < 0 || value > 65535)
    throw ArgumentError(json_path.string() + ": label \"" + name + "\" has value " +
                        std::to_string(value) + ", expected 0..65535");
  for (const auto& l : labels)
    if (l.value == value)
      throw ArgumentError(json_path.string() + ": labels \"" + l.name + "\" and \"" + name +
                          "\" share the value " + std::to_string(value));
  labels.push_back(LabelInfo{value, name, default_label_color(value)});
}

void finish_labels(std::vector<LabelInfo>& labels) {
  std::sort(labels.begin(), labels.end(),
            [](const LabelInfo& a, const LabelInfo& b) { return a.value < b.value; });
  if (labels.empty() || labels.front().value != 0)
    labels.insert(labels.begin(), LabelInfo{0, "background", default_label_color(0)});
}

// MSD: "labels": {"0": "background", "1": "Anterior"}.
std::vector<LabelInfo> msd_labels(const json& j, const fs::path& json_path) {
  std::vector<LabelInfo> labels;
  if (!j.contains("labels") || !j["labels"].is_object())
    throw ArgumentError(json_path.string() +
                        ": \"labels\" must be an object like "
                        "{\"0\": \"background\", \"1\": \"tumour\"}");
  for (const auto& [k, v] : j["labels"].items()) {
    const auto value = int_key(k);
    if (!value || !v.is_string()) {
      // Some datasets keep notes here (e.g. "note": "..."); they are not labels.
      log_warn(json_path.string(), ": \"labels\" entry \"", k, "\": ", v.dump(),
               " is not \"<value>\": \"<name>\"; ignored");
      continue;
    }
    add_label(labels, *value, v.get<std::string>(), json_path);
  }
  finish_labels(labels);
  return labels;
}

// nnU-Net v2: "labels": {"background": 0, "liver": 1}.
std::vector<LabelInfo> nnunet_labels(const json& j, const fs::path& json_path) {
  std::vector<LabelInfo> labels;
  if (!j.contains("labels") || !j["labels"].is_object())
    throw ArgumentError(json_path.string() +
                        ": \"labels\" must be an object like "
                        "{\"background\": 0, \"liver\": 1}");
  for (const auto& [name, v] : j["labels"].items()) {
    if (v.is_array())
      throw ArgumentError(json_path.string() + ": label \"" + name + "\" is a region " + v.dump() +
                          "; region-based training is not supported");
    if (!v.is_number_integer())
      throw ArgumentError(json_path.string() + ": label \"" + name +
                          "\" must map to an integer, "
                          "found " +
                          v.dump());
    // Range-checked before narrowing: 4294967298 must not wrap to 2, 2^64 - 1 to -1.
    if (v.is_number_unsigned() ? v.get<uint64_t>() > 65535u
                               : (v.get<int64_t>() < 0 || v.get<int64_t>() > 65535))
      throw ArgumentError(json_path.string() + ": label \"" + name + "\" has value " + v.dump() +
                          ", expected 0..65535");
    add_label(labels, static_cast<int>(v.get<int64_t>()), name, json_path);
  }
  finish_labels(labels);
  return labels;
}

std::string strip_extension(const std::string& name) {
  return name.substr(0, name.size() - image_extension(name).size());
}

void check_unique_ids(const std::vector<CaseEntry>& cases, const fs::path& where) {
  std::set<std::string> seen;
  for (const auto& c : cases)
    if (!seen.insert(c.id).second)
      throw ArgumentError(where.string() + ": case id \"" + c.id + "\" appears twice");
}

// Plain image files of `images`, one case each (one channel, or MSD's 4-D file of all channels),
// labels of the same file name in `labels` when that folder exists.
std::vector<CaseEntry> one_file_cases(const fs::path& images, const fs::path& labels,
                                            bool label_required) {
  std::vector<CaseEntry> out;
  for (const auto& p : list_images(images)) {
    CaseEntry c;
    c.id = strip_extension(p.filename().string());
    c.images = {p};
    const fs::path l = labels / p.filename();
    // A training case keeps its expected label path even when the file is missing, so that
    // validation reports it by name.
    std::error_code lec;
    if (label_required || fs::exists(l, lec)) c.label = l;
    out.push_back(std::move(c));
  }
  return out;
}

// nnU-Net channel files of `images` grouped by case; every case must have channels 0..n-1.
std::vector<CaseEntry> grouped_cases(const fs::path& images, const fs::path& labels, int channels,
                                     const std::string& ending, bool label_required,
                                     const fs::path& where) {
  std::map<std::string, std::map<int, fs::path>> by_case;
  for (const auto& p : list_images(images)) {
    const std::string name = p.filename().string();
    if (!ending.empty() && (name.size() <= ending.size() ||
                            name.compare(name.size() - ending.size(), ending.size(), ending) != 0))
      continue;  // not this dataset's file type (nnU-Net ignores them too)
    const int ch = channel_of(p);
    if (ch < 0)
      throw ArgumentError(p.string() + ": name lacks the nnU-Net channel suffix _XXXX (e.g. " +
                          strip_extension(name) + "_0000" + image_extension(name) + ")");
    by_case[case_id_from_path(p, true)][ch] = p;
  }
  std::vector<CaseEntry> out;
  for (const auto& [id, files] : by_case) {
    std::string found;
    for (const auto& [ch, p] : files) found += (found.empty() ? "" : ", ") + std::to_string(ch);
    bool ok = static_cast<int>(files.size()) == channels;
    for (int ch = 0; ok && ch < channels; ++ch) ok = files.count(ch) == 1;
    if (!ok)
      throw ArgumentError(where.string() + ": case \"" + id + "\" has channels {" + found +
                          "}, expected 0.." + std::to_string(channels - 1) + " (" +
                          std::to_string(channels) + " channel" + (channels == 1 ? "" : "s") + ")");
    CaseEntry c;
    c.id = id;
    for (const auto& [ch, p] : files) c.images.push_back(p);
    const std::string ext =
        ending.empty() ? image_extension(files.begin()->second.filename().string()) : ending;
    const fs::path l = labels / (id + ext);
    std::error_code lec;
    if (label_required || fs::exists(l, lec)) c.label = l;
    out.push_back(std::move(c));
  }
  return out;
}

Dataset discover_msd(const fs::path& root, const json& j, const fs::path& json_path) {
  Dataset ds;
  ds.root = root;
  ds.layout = "msd";
  ds.name = json_string(j, "name", json_path);
  ds.channel_names = channel_list(j, "modality", json_path);
  // Several modalities: MSD keeps them as the volumes of one 4-D file per case.
  ds.channels_in_volumes = ds.channel_names.size() > 1;
  ds.labels = msd_labels(j, json_path);
  if (!j.contains("training") || !j["training"].is_array())
    throw ArgumentError(json_path.string() +
                        ": \"training\" must be a list of "
                        "{\"image\": ..., \"label\": ...}");
  size_t i = 0;
  for (const auto& item : j["training"]) {
    const std::string where = "training[" + std::to_string(i++) + "]";
    if (!item.is_object() || !item.contains("image") || !item["image"].is_string() ||
        (item.contains("label") && !item["label"].is_string()))
      throw ArgumentError(json_path.string() + ": " + where +
                          " must be {\"image\": \"...\", "
                          "\"label\": \"...\"}, found " +
                          item.dump());
    CaseEntry c;
    c.images = {resolve_inside(root, item["image"].get<std::string>(), json_path, where)};
    c.id = case_id_from_path(c.images[0], false);
    if (item.contains("label"))
      c.label = resolve_inside(root, item["label"].get<std::string>(), json_path, where);
    ds.training.push_back(std::move(c));
  }
  if (j.contains("test") && j["test"].is_array() && !j["test"].empty()) {
    size_t k = 0;
    for (const auto& item : j["test"]) {
      const std::string where = "test[" + std::to_string(k++) + "]";
      // MSD lists test images as plain strings; accept {"image": ...} too.
      std::string entry;
      if (item.is_string())
        entry = item.get<std::string>();
      else if (item.is_object() && item.contains("image") && item["image"].is_string())
        entry = item["image"].get<std::string>();
      else
        throw ArgumentError(json_path.string() + ": " + where + " must be a path, found " +
                            item.dump());
      CaseEntry c;
      c.images = {resolve_inside(root, entry, json_path, where)};
      c.id = case_id_from_path(c.images[0], false);
      const fs::path l = root / "labelsTs" / c.images[0].filename();
      std::error_code lec;
      if (fs::exists(l, lec)) c.label = l;
      ds.test.push_back(std::move(c));
    }
  } else if (fs::is_directory(root / "imagesTs")) {
    ds.test = one_file_cases(root / "imagesTs", root / "labelsTs", false);
  }
  if (j.contains("numTraining") && j["numTraining"].is_number_integer() &&
      j["numTraining"].get<size_t>() != ds.training.size())
    log_warn(json_path.string(), ": numTraining says ", j["numTraining"].get<size_t>(),
             " but \"training\" lists ", ds.training.size(), " cases");
  return ds;
}

Dataset discover_nnunet(const fs::path& root, const json& j, const fs::path& json_path) {
  Dataset ds;
  ds.root = root;
  ds.layout = "nnunet";
  ds.name = json_string(j, "name", json_path);
  ds.channel_names = channel_list(j, "channel_names", json_path);
  ds.labels = nnunet_labels(j, json_path);
  std::string ending = json_string(j, "file_ending", json_path);
  if (ending.empty()) ending = ".nii.gz";  // nnU-Net's own default for NIfTI datasets
  if (!fs::is_directory(root / "imagesTr"))
    throw ArgumentError(root.string() + ": nnU-Net dataset without an imagesTr folder");
  ds.training = grouped_cases(root / "imagesTr", root / "labelsTr", ds.num_channels(), ending, true,
                              root / "imagesTr");
  if (ds.training.empty()) {
    const auto other = list_images(root / "imagesTr");
    if (!other.empty())
      throw ArgumentError(json_path.string() + ": \"file_ending\" is \"" + ending + "\" but " +
                          (root / "imagesTr").string() + " holds " + std::to_string(other.size()) +
                          " image file(s) with other endings, e.g. " +
                          other.front().filename().string());
  }
  if (fs::is_directory(root / "imagesTs"))
    ds.test = grouped_cases(root / "imagesTs", root / "labelsTs", ds.num_channels(), ending, false,
                            root / "imagesTs");
  if (j.contains("numTraining") && j["numTraining"].is_number_integer() &&
      j["numTraining"].get<size_t>() != ds.training.size())
    log_warn(json_path.string(), ": numTraining says ", j["numTraining"].get<size_t>(), " but ",
             root / "imagesTr", " holds ", ds.training.size(), " cases");
  return ds;
}

// The folder layout has no dataset.json: the label set is 0 .. the largest value found in the
// training label files ("background", then "label_<v>"), so that plan and train work as
// documented. Unreadable label files are skipped here (validation reports them by name); more
// than kMaxInferredLabels classes is almost certainly not a label map and needs a dataset.json.
constexpr int kMaxInferredLabels = 64;

void infer_folder_labels(Dataset& ds) {
  int max_value = -1;
  fs::path max_file;
  for (const auto& c : ds.training) {
    std::error_code ec;
    if (!fs::is_regular_file(c.label, ec)) continue;
    LabelVolume l;
    try {
      l = read_labels(c.label);
    } catch (const Error&) {
      continue;
    }
    for (uint16_t v : l.data)
      if (v > max_value) {
        max_value = v;
        max_file = c.label;
      }
  }
  if (max_value < 1) return;  // nothing readable, or background only: make_plan says so
  if (max_value >= kMaxInferredLabels)
    throw ArgumentError(max_file.string() + ": label value " + std::to_string(max_value) +
                        " would make " + std::to_string(max_value + 1) +
                        " classes; a folder dataset infers at most " +
                        std::to_string(kMaxInferredLabels) +
                        " (values 0-" + std::to_string(kMaxInferredLabels - 1) +
                        "): add a dataset.json (MSD or nnU-Net) that declares the labels");
  for (int v = 0; v <= max_value; ++v)
    ds.labels.push_back(
        LabelInfo{v, v == 0 ? "background" : "label_" + std::to_string(v), default_label_color(v)});
  log_info("dataset ", ds.root, ": no dataset.json, labels 0-", max_value,
           " inferred from the label files");
}

Dataset discover_folder(const fs::path& root) {
  Dataset ds;
  ds.root = root;
  ds.layout = "folder";
  ds.name = root.filename().string();
  ds.channel_names = {"unknown"};
  // labels stay empty: the label set is inferred from the label files (see dataset.hpp).
  const bool tr = !fs::is_directory(root / "images") && fs::is_directory(root / "imagesTr");
  const fs::path images = root / (tr ? "imagesTr" : "images");
  const fs::path labels = root / (tr ? "labelsTr" : "labels");
  if (!fs::is_directory(images) || !fs::is_directory(labels))
    throw ArgumentError(root.string() +
                        ": not a dataset: expected dataset.json (MSD or nnU-Net "
                        "v2), or the folders images/ and labels/");
  ds.training = one_file_cases(images, labels, true);
  if (fs::is_directory(root / "imagesTs"))
    ds.test = one_file_cases(root / "imagesTs", root / "labelsTs", false);
  infer_folder_labels(ds);
  return ds;
}

}  // namespace

std::string case_id_from_path(const fs::path& p, bool strip_channel) {
  std::string name = strip_extension(p.filename().string());
  if (strip_channel && channel_of(p) >= 0) name = name.substr(0, name.size() - 5);
  return name;
}

std::array<uint8_t, 3> default_label_color(int v) {
  // Strong primaries and secondaries first, as viewers (ITK-SNAP, Slicer) show small label sets,
  // then further colours chosen to stay apart from them and from each other on a dark background.
  static const std::array<uint8_t, 3> kTable[] = {
      {0, 0, 0},       {255, 0, 0},   {0, 255, 0},    {0, 0, 255},     {255, 255, 0},
      {0, 255, 255},   {255, 0, 255}, {255, 128, 0},  {128, 0, 255},   {0, 128, 64},
      {255, 128, 192}, {128, 64, 0},  {0, 128, 255},  {192, 255, 128}, {128, 0, 64},
      {255, 192, 128}, {64, 64, 192}, {192, 192, 0},  {0, 192, 192},   {192, 64, 64},
      {128, 128, 255}, {64, 160, 0},  {255, 64, 128}, {160, 96, 192},  {96, 192, 160}};
  constexpr int kN = static_cast<int>(sizeof kTable / sizeof kTable[0]);
  if (v >= 0 && v < kN) return kTable[v];
  // Beyond the table: a fixed hash of the value (not a random draw, so every run and every
  // export agree), mapped to a saturated hue so that no label comes out grey or black.
  uint64_t h = static_cast<uint64_t>(static_cast<uint32_t>(v)) + 0x9e3779b97f4a7c15ull;
  h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
  h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
  h ^= h >> 31;
  const double hue = static_cast<double>(h % 3600) / 600.0;  // [0, 6)
  const double value = 0.75 + 0.25 * static_cast<double>((h >> 16) % 256) / 255.0;
  const double sat = 0.6 + 0.4 * static_cast<double>((h >> 24) % 256) / 255.0;
  const int sector = static_cast<int>(hue);
  const double f = hue - sector;
  const double p = value * (1 - sat), q = value * (1 - sat * f), t = value * (1 - sat * (1 - f));
  double r, g, b;
  switch (sector) {
    case 0:
      r = value, g = t, b = p;
      break;
    case 1:
      r = q, g = value, b = p;
      break;
    case 2:
      r = p, g = value, b = t;
      break;
    case 3:
      r = p, g = q, b = value;
      break;
    case 4:
      r = t, g = p, b = value;
      break;
    default:
      r = value, g = p, b = q;
      break;
  }
  auto byte = [](double x) { return static_cast<uint8_t>(std::lround(x * 255.0)); };
  return {byte(r), byte(g), byte(b)};
}

Dataset discover_dataset(const fs::path& root_in) {
  std::error_code ec;
  if (!fs::is_directory(root_in, ec))
    throw ArgumentError(root_in.string() + ": dataset folder not found");
  const fs::path root = fs::absolute(root_in).lexically_normal();
  // lexically_normal keeps a trailing separator ("/data/set/"); drop it so names and relative
  // paths work the same either way.
  const fs::path clean = root.has_filename() ? root : root.parent_path();
  const fs::path json_path = clean / "dataset.json";
  Dataset ds;
  if (fs::exists(json_path)) {
    if (!fs::is_regular_file(json_path, ec))
      throw ArgumentError(json_path.string() + ": is not a regular file (expected the dataset's JSON)");
    const json j = load_json(json_path);
    if (!j.is_object())
      throw ArgumentError(json_path.string() + ": expected a JSON object, found " +
                          std::string(j.type_name()));
    if (j.contains("channel_names"))
      ds = discover_nnunet(clean, j, json_path);
    else if (j.contains("modality") || j.contains("training"))
      ds = discover_msd(clean, j, json_path);
    else
      throw ArgumentError(json_path.string() +
                          ": neither \"channel_names\" (nnU-Net v2) nor "
                          "\"modality\"/\"training\" (MSD): layout not recognised");
  } else {
    ds = discover_folder(clean);
  }
  if (ds.name.empty()) ds.name = clean.filename().string();
  if (ds.training.empty())
    throw ArgumentError(clean.string() + ": no training cases found (" + ds.layout + " layout)");
  check_unique_ids(ds.training, clean);
  check_unique_ids(ds.test, clean);
  return ds;
}

std::vector<CaseEntry> discover_inputs(const fs::path& input, int channels) {
  MEDSEG_CHECK(channels >= 1, "channels must be >= 1, got ", channels);
  std::error_code ec;
  if (!fs::exists(input, ec)) throw IoError(input.string() + ": input not found");
  if (!fs::is_directory(input, ec)) {
    // A lone "case_0000.nii.gz" is a one-channel nnU-Net case: name the output after the case.
    // With several channels one file is MSD's 4-D layout (its volumes are checked when read).
    return {CaseEntry{case_id_from_path(input, channels == 1), {fs::absolute(input)}, {}}};
  }
  const fs::path folder = fs::absolute(input).lexically_normal();
  const std::vector<fs::path> files = list_images(folder);
  if (files.empty())
    throw ArgumentError(folder.string() + ": no image files (.nii.gz, .nii, .nrrd, .mha) found");
  const bool all_channel_files =
      std::all_of(files.begin(), files.end(), [](const fs::path& p) { return channel_of(p) >= 0; });
  std::vector<CaseEntry> out;
  if (all_channel_files) {
    out = grouped_cases(folder, fs::path(), channels, "", false, folder);
    for (auto& c : out) c.label.clear();
  } else if (channels == 1 || std::none_of(files.begin(), files.end(), [](const fs::path& p) {
               return channel_of(p) >= 0;
             })) {
    // One file per case: 3-D, or with several channels MSD's 4-D files (one volume per channel).
    out = one_file_cases(folder, fs::path(), false);
    for (auto& c : out) c.label.clear();
  } else {
    const auto bad = std::find_if(files.begin(), files.end(),
                                  [](const fs::path& p) { return channel_of(p) < 0; });
    throw ArgumentError(bad->string() + ": the model takes " + std::to_string(channels) +
                        " channels, and this folder mixes nnU-Net channel files {CASE}_XXXX with "
                        "files without that suffix (MSD's 4-D files, one volume per channel); "
                        "give one kind per folder");
  }
  check_unique_ids(out, folder);
  return out;
}

// ---------------------------------------------------------------- validation

std::string ValidationReport::text() const {
  std::ostringstream os;
  for (const auto& p : problems)
    os << p.case_id << ": " << p.file.string() << ": " << (p.fatal ? "" : "warning: ") << p.message
       << "\n";
  return os.str();
}

namespace {

struct CaseChecker {
  const Dataset& ds;
  const ValidationOptions& opt;
  const CaseEntry& c;
  std::vector<ValidationProblem>& problems;

  void add(const fs::path& file, std::string message, bool fatal = true) {
    problems.push_back(ValidationProblem{c.id, file, std::move(message), fatal});
  }

  // Header of one file, or nullopt after recording why it cannot be used.
  std::optional<ImageHeader> header(const fs::path& file, const char* role,
                                    bool allow_volumes = false) {
    std::error_code ec;
    if (!fs::exists(file, ec) && !fs::is_symlink(fs::symlink_status(file, ec))) {
      add(file, std::string(role) + " file is missing");
      return std::nullopt;
    }
    try {
      return read_header(file, allow_volumes);
    } catch (const Error& e) {
      add(file, strip_path(e.what(), file));
      return std::nullopt;
    }
  }

  // Our IoErrors start with "<path>: "; the report already names the file.
  static std::string strip_path(const std::string& msg, const fs::path& file) {
    const std::string prefix = file.string() + ": ";
    return msg.rfind(prefix, 0) == 0 ? msg.substr(prefix.size()) : msg;
  }

  static std::string size_string(const std::array<int64_t, 3>& s) {
    return std::to_string(s[0]) + "x" + std::to_string(s[1]) + "x" + std::to_string(s[2]);
  }

  void run() {
    if (c.images.empty()) {
      add(ds.root, "case has no image file");
      return;
    }
    if (ds.channels_in_volumes) {
      if (c.images.size() != 1) {
        add(c.images[0], "case has " + std::to_string(c.images.size()) +
                             " image files, expected one 4-D file with a volume per modality");
        return;
      }
    } else if (static_cast<int>(c.images.size()) != ds.num_channels() && ds.num_channels() > 0) {
      add(c.images[0], "case has " + std::to_string(c.images.size()) +
                           " channel files, the "
                           "dataset declares " +
                           std::to_string(ds.num_channels()));
    }
    std::optional<Geometry> ref;
    fs::path ref_file;
    for (size_t ch = 0; ch < c.images.size(); ++ch) {
      const fs::path& file = c.images[ch];
      const auto h = header(file, "image", ds.channels_in_volumes);
      if (!h) continue;
      if (ds.channels_in_volumes && h->volumes != ds.num_channels())
        add(file, "has " + std::to_string(h->volumes) + " volume" + (h->volumes == 1 ? "" : "s") +
                      " along its 4th axis, dataset.json declares " +
                      std::to_string(ds.num_channels()) + " modalities (one volume each)");
      if (!ref) {
        ref = h->geo;
        ref_file = file;
        const auto& s = h->geo.size;
        const int wide = (s[0] >= opt.min_slice) + (s[1] >= opt.min_slice) + (s[2] >= opt.min_slice);
        if (wide < 2)
          add(file, "image size " + size_string(s) + " is not a volume or a slice: at least two axes "
                        "need " + std::to_string(opt.min_slice) + " voxels or more");
      } else if (!h->geo.same_grid(*ref)) {
        add(file, "channel " + std::to_string(ch) + " geometry differs from channel 0 (" +
                      ref_file.filename().string() + "): " + geometry_difference(h->geo, *ref));
      }
      if (opt.check_voxels) check_image_voxels(file);
    }
    if (c.label.empty()) {
      add(c.images[0], "case has no label file");
      return;
    }
    const auto lh = header(c.label, "label");
    if (!lh) return;
    if (ref && !lh->geo.same_grid(*ref))
      add(c.label, "label geometry differs from image: " + geometry_difference(lh->geo, *ref));
    if (opt.check_voxels) check_label_voxels();
  }

  void check_image_voxels(const fs::path& file) {
    try {
      const NonFiniteVoxels nf = count_nonfinite_voxels(file);
      if (nf.count > 0) {
        std::ostringstream os;
        os << nf.count << " NaN/Inf voxel" << (nf.count == 1 ? "" : "s")
           << " (first: " << nf.first_value << " at voxel "
           << voxel_string(read_geometry(file), nf.first_index) << ")";
        os << " as 32-bit floats";
        add(file, os.str());
      }
    } catch (const Error& e) {
      add(file, strip_path(e.what(), file));
    }
  }

  void check_label_voxels() {
    LabelVolume l;
    try {
      l = read_labels(c.label);
    } catch (const Error& e) {
      add(c.label, strip_path(e.what(), c.label));
      return;
    }
    std::map<int, int64_t> counts;
    for (uint16_t v : l.data) ++counts[v];
    if (!ds.labels.empty()) {
      std::set<int> declared;
      for (const auto& li : ds.labels) declared.insert(li.value);
      std::string undeclared;
      for (const auto& [v, n] : counts)
        if (!declared.count(v))
          undeclared += (undeclared.empty() ? "" : ", ") + std::to_string(v) + " (" +
                        std::to_string(n) + " voxel" + (n == 1 ? "" : "s") + ")";
      if (!undeclared.empty()) {
        std::string decl;
        for (int v : declared) decl += (decl.empty() ? "" : ", ") + std::to_string(v);
        add(c.label, "label values not declared in dataset.json: " + undeclared + "; declared: {" +
                         decl + "}");
      }
    }
    if (counts.size() == 1 && counts.begin()->first == 0)
      add(c.label, "label contains only background (0)", false);
  }
};

}  // namespace

ValidationReport validate_dataset(const Dataset& ds, const ValidationOptions& opt) {
  ValidationReport report;
  for (const auto& c : ds.training) {
    const size_t before = report.problems.size();
    CaseChecker{ds, opt, c, report.problems}.run();
    const bool bad =
        std::any_of(report.problems.begin() + static_cast<std::ptrdiff_t>(before),
                    report.problems.end(), [](const ValidationProblem& p) { return p.fatal; });
    if (bad) report.bad_cases.push_back(c.id);
  }
  return report;
}

void drop_or_refuse_bad_cases(Dataset& ds, const ValidationReport& report, bool exclude,
                              const std::filesystem::path& data) {
  if (report.ok()) return;
  if (!exclude)
    throw ArgumentError(std::to_string(report.bad_cases.size()) + " case(s) of " + data.string() +
                        " failed validation; fix them or pass --exclude-bad-cases to go on without "
                        "them");
  const std::set<std::string> bad(report.bad_cases.begin(), report.bad_cases.end());
  const size_t before = ds.training.size();
  std::erase_if(ds.training, [&](const CaseEntry& c) { return bad.count(c.id) > 0; });
  std::string names;
  for (const auto& b : report.bad_cases) names += (names.empty() ? "" : ", ") + b;
  log_warn("excluding ", before - ds.training.size(), " case(s): ", names);
}

}  // namespace medseg::io
