#include "infer/export.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <iomanip>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/atomic_file.hpp"
#include "core/log.hpp"
#include "core/error.hpp"
#include "io/image_io.hpp"

namespace medseg::infer {

namespace {

// The colour table: background first, then every label given and every value found in the mask.
struct Entry {
  int value;
  std::string name;
  std::array<uint8_t, 3> rgb;
};

std::vector<Entry> build_table(const LabelVolume& mask, const std::vector<io::LabelInfo>& labels) {
  std::map<int, Entry> table;
  for (const auto& l : labels) {
    MEDSEG_CHECK(l.value >= 0 && l.value < 65536, "label value ", l.value, " (", l.name, ")");
    MEDSEG_CHECK(!table.count(l.value), "label value ", l.value, " given twice");
    table[l.value] = {l.value, l.name.empty() ? "label_" + std::to_string(l.value) : l.name,
                      l.color};
  }
  if (!table.count(0)) table[0] = {0, "background", {0, 0, 0}};
  std::set<int> present(mask.data.begin(), mask.data.end());
  for (int v : present)
    if (!table.count(v)) {
      // Only when labels were given: a mask value the model does not know is worth a word.
      if (!labels.empty())
        log_warn("export: the mask holds label value ", v,
                 ", which the model does not name; exported as label_", v);
      table[v] = {v, "label_" + std::to_string(v), io::default_label_color(v)};
    }
  std::vector<Entry> out;
  for (auto& [v, e] : table) out.push_back(e);
  return out;
}

// Names for formats that split on whitespace, and for file names.
std::string no_spaces(const std::string& s) {
  std::string r = s;
  for (char& c : r)
    if (std::isspace(static_cast<unsigned char>(c))) c = '_';
  return r;
}
std::string file_safe(const std::string& s) {
  std::string r;
  for (char c : s) r += (std::isalnum(static_cast<unsigned char>(c)) || c == '-') ? c : '_';
  return r;
}
std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string r = "\"";
  for (char c : s) r += (c == '"') ? std::string("\"\"") : std::string(1, c);
  return r + "\"";
}

std::string slicer_ctbl(const std::string& case_id, const std::vector<Entry>& t) {
  std::ostringstream os;
  os << "# 3D Slicer colour table for " << case_id << " (written by medseg)\n";
  os << "# Columns: index name R G B A\n";
  for (const auto& e : t)
    os << e.value << ' ' << no_spaces(e.name) << ' ' << int(e.rgb[0]) << ' ' << int(e.rgb[1]) << ' '
       << int(e.rgb[2]) << ' ' << (e.value == 0 ? 0 : 255) << '\n';
  return os.str();
}

std::string slicer_csv(const std::vector<Entry>& t) {
  std::ostringstream os;
  os << "LabelValue,Name,Color_R,Color_G,Color_B,Color_A\n";
  for (const auto& e : t)
    os << e.value << ',' << csv_field(e.name) << ',' << int(e.rgb[0]) << ',' << int(e.rgb[1]) << ','
       << int(e.rgb[2]) << ',' << (e.value == 0 ? 0 : 255) << '\n';
  return os.str();
}

std::string itksnap(const std::vector<Entry>& t) {
  std::ostringstream os;
  os << "# ITK-SnAP Label Description File\n"
     << "# File format:\n"
     << "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL\n"
     << "# Fields:\n"
     << "#    IDX:   Zero-based index\n"
     << "#    -R-:   Red color component (0..255)\n"
     << "#    -G-:   Green color component (0..255)\n"
     << "#    -B-:   Blue color component (0..255)\n"
     << "#    -A-:   Label transparency (0.00 .. 1.00)\n"
     << "#    VIS:   Label visibility (0 or 1)\n"
     << "#    MSH:   Label mesh visibility (0 or 1)\n"
     << "#  LABEL:   Label description\n";
  for (const auto& e : t) {
    std::string name = e.value == 0 ? "Clear Label" : e.name;
    std::replace(name.begin(), name.end(), '"', '\'');  // the format has no escape for quotes
    const bool bg = e.value == 0;
    os << std::setw(5) << e.value << ' ' << std::setw(5) << int(bg ? 0 : e.rgb[0]) << ' '
       << std::setw(4) << int(bg ? 0 : e.rgb[1]) << ' ' << std::setw(4) << int(bg ? 0 : e.rgb[2])
       << ' ' << std::setw(8) << (bg ? "0" : "1") << ' ' << std::setw(2) << (bg ? 0 : 1) << ' '
       << std::setw(2) << (bg ? 0 : 1) << "    \"" << name << "\"\n";
  }
  return os.str();
}

std::string niivue(const std::vector<Entry>& t) {
  nlohmann::ordered_json j;
  for (const char* k : {"R", "G", "B", "A", "I", "labels"}) j[k] = nlohmann::ordered_json::array();
  for (const auto& e : t) {
    j["R"].push_back(e.rgb[0]);
    j["G"].push_back(e.rgb[1]);
    j["B"].push_back(e.rgb[2]);
    j["A"].push_back(e.value == 0 ? 0 : 255);
    j["I"].push_back(e.value);
    j["labels"].push_back(e.name);
  }
  return j.dump() + "\n";
}

std::string fmt(double v) {
  std::ostringstream os;
  os << std::setprecision(12) << v;
  return os.str();
}

// ------------------------------------------------------------------ overlays

// Index axis -> (patient axis 0=L 1=P 2=S, sign), from the direction matrix's columns.
struct AxisMap {
  std::array<int, 3> patient_of{0, 1, 2};
  std::array<int, 3> sign{1, 1, 1};
  std::array<int, 3> index_of{0, 1, 2};  // inverse: patient axis -> index axis
};

AxisMap axis_map(const Geometry& g) {
  AxisMap m;
  std::array<bool, 3> used{false, false, false};
  for (int j = 0; j < 3; ++j) {
    int best = 0;
    for (int r = 1; r < 3; ++r)
      if (std::abs(g.direction[r * 3 + j]) > std::abs(g.direction[best * 3 + j])) best = r;
    if (used[best]) return AxisMap{};  // a 45-degree oblique: fall back to index order
    used[best] = true;
    m.patient_of[j] = best;
    m.sign[j] = g.direction[best * 3 + j] < 0 ? -1 : 1;
    m.index_of[best] = j;
  }
  return m;
}

struct Image8 {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;
};

struct Window {
  float lo = 0, hi = 1;
};

Window percentile_window(const Volume& image) {
  const int64_t voxels = image.geo.voxels();
  const int64_t stride = std::max<int64_t>(1, voxels / 4000000);
  std::vector<float> v;
  v.reserve(static_cast<size_t>(voxels / stride + 1));
  for (int64_t i = 0; i < voxels; i += stride)
    v.push_back(image.data[static_cast<size_t>(i * image.channels)]);
  auto at = [&](double q) {
    const auto k = static_cast<size_t>(std::llround(q * static_cast<double>(v.size() - 1)));
    std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(k), v.end());
    return v[k];
  };
  Window w;
  w.lo = at(0.01);
  w.hi = at(0.99);
  return w;
}

// One view: the slice `slice` along patient axis `normal`; columns run along patient axis
// `col_axis` (increasing to the right when col_increasing), rows along `row_axis` (increasing
// downwards when row_increasing).
Image8 render_view(const Volume& image, const LabelVolume& mask, const std::vector<Entry>& table,
                   const AxisMap& am, const Window& win, int normal, int64_t slice, int col_axis,
                   bool col_increasing, int row_axis, bool row_increasing) {
  const Geometry& g = image.geo;
  const int jc = am.index_of[col_axis], jr = am.index_of[row_axis], js = am.index_of[normal];
  const int64_t nc = g.size[jc], nr = g.size[jr];
  // Flip when the index axis runs against the wanted patient direction.
  const bool flip_c = (am.sign[jc] > 0) != col_increasing;
  const bool flip_r = (am.sign[jr] > 0) != row_increasing;
  const double sc = g.spacing[jc], sr = g.spacing[jr];
  int64_t fc = 1, fr = 1;
  if (sr >= sc)
    fr = std::max<int64_t>(1, std::llround(sr / sc));
  else
    fc = std::max<int64_t>(1, std::llround(sc / sr));
  const int64_t short_side = std::min(nc * fc, nr * fr);
  const int64_t m = std::max<int64_t>(1, (256 + short_side - 1) / short_side);
  fc *= m;
  fr *= m;
  Image8 out;
  out.width = static_cast<int>(nc * fc);
  out.height = static_cast<int>(nr * fr);
  out.rgb.assign(static_cast<size_t>(out.width) * out.height * 3, 0);

  auto voxel_index = [&](int64_t c, int64_t r) {
    std::array<int64_t, 3> idx{};
    idx[jc] = flip_c ? nc - 1 - c : c;
    idx[jr] = flip_r ? nr - 1 - r : r;
    idx[js] = slice;
    return (idx[2] * g.size[1] + idx[1]) * g.size[0] + idx[0];
  };
  // The label and grey value of each source pixel of the slice.
  std::vector<uint16_t> lab(static_cast<size_t>(nc * nr));
  std::vector<uint8_t> grey(static_cast<size_t>(nc * nr));
  const float span = win.hi > win.lo ? win.hi - win.lo : 1.0f;
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t v = voxel_index(c, r);
      lab[static_cast<size_t>(r * nc + c)] = mask.data[static_cast<size_t>(v)];
      const float t = std::clamp(
          (image.data[static_cast<size_t>(v * image.channels)] - win.lo) / span, 0.f, 1.f);
      grey[static_cast<size_t>(r * nc + c)] = static_cast<uint8_t>(std::lround(t * 255.0f));
    }
  std::map<int, std::array<uint8_t, 3>> colour;
  for (const auto& e : table) colour[e.value] = e.rgb;
  // Outline: output pixels of a label whose neighbours up to `w` pixels away (4-neighbourhood) map
  // to another source label or leave the slice; w = half the smaller repeat factor, so outlines
  // stay thin but visible after upscaling.
  const int64_t w = std::max<int64_t>(1, std::min(fc, fr) / 2);
  const int64_t W = out.width, H = out.height;
  auto src_label = [&](int64_t x, int64_t y) -> int {
    if (x < 0 || y < 0 || x >= W || y >= H) return -1;
    return lab[static_cast<size_t>((y / fr) * nc + x / fc)];
  };
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; ++x) {
      const int l = src_label(x, y);
      uint8_t* px = out.rgb.data() + (y * W + x) * 3;
      bool edge = false;
      if (l != 0)
        for (int64_t d = 1; d <= w && !edge; ++d)
          edge = src_label(x - d, y) != l || src_label(x + d, y) != l || src_label(x, y - d) != l ||
                 src_label(x, y + d) != l;
      if (edge) {
        const auto& c = colour[l];
        px[0] = c[0], px[1] = c[1], px[2] = c[2];
      } else {
        const uint8_t gv = grey[static_cast<size_t>((y / fr) * nc + x / fc)];
        px[0] = px[1] = px[2] = gv;
      }
    }
  return out;
}

const char* kReadme = R"(medseg review package
=====================

Files per case (CASE = the case name):

  CASE_mask.nii.gz         The segmentation: one integer label per voxel, same grid (size,
                           spacing, origin, direction) as the scan it was predicted from. The
                           scan itself is not copied here: open it from where it is.
  CASE_slicer.ctbl         3D Slicer colour table (names and colours of the labels).
  CASE_slicer.csv          The same table in Slicer's newer CSV colour-table format.
  CASE_itksnap.txt         ITK-SNAP label description file.
  CASE_niivue.json         NiiVue label colour map.
  CASE_volumes.csv/.json   Per structure: voxel count, volume in mL (voxels x voxel volume / 1000),
                           bounding box (voxel indices x, y, z, inclusive) and centroid (LPS mm, the
                           physical coordinates ITK and Slicer's "LPS" mode show).
  CASE_overlay_*.png       Axial, coronal and sagittal slices through each structure's centroid,
                           the scan in grey (1st-99th percentile window) with the label outlines
                           in colour.
                           Radiological convention: patient left on the image right.

3D Slicer
  1. Drag the scan and CASE_slicer.ctbl (or CASE_slicer.csv) into Slicer.
  2. Drag CASE_mask.nii.gz in; in the "Add data" dialog tick "Show Options", choose "LabelMapVolume"
     (or "Segmentation") and pick the colour table CASE_slicer as its colour node.
  3. Segment Editor / Segmentations lists the structures by name.

ITK-SNAP
  1. File > Open Main Image: the scan.
  2. Segmentation > Open Segmentation: CASE_mask.nii.gz.
  3. Segmentation > Import Label Descriptions: CASE_itksnap.txt.

NiiVue (https://niivue.com, or any page embedding it)
  Load the scan as the first volume and CASE_mask.nii.gz as the second, then apply the colour map:
    const cmap = await (await fetch("CASE_niivue.json")).json();
    nv.volumes[1].setColormapLabel(cmap);
    nv.updateGLVolume();

Volumes are computed on the mask's own grid; no resampling is involved.
)";

}  // namespace

std::vector<StructureVolume> structure_volumes(const LabelVolume& mask,
                                               const std::vector<io::LabelInfo>& labels) {
  const auto& n = mask.geo.size;
  MEDSEG_CHECK(static_cast<int64_t>(mask.data.size()) == mask.geo.voxels(), "mask holds ",
               mask.data.size(), " voxels, geometry says ", mask.geo.voxels());
  std::map<int, size_t> slot;
  std::vector<StructureVolume> out;
  std::vector<io::LabelInfo> sorted = labels;
  std::sort(sorted.begin(), sorted.end(), [](auto& a, auto& b) { return a.value < b.value; });
  for (const auto& l : sorted) {
    if (l.value <= 0) continue;
    StructureVolume s;
    s.label = l.value;
    s.name = l.name;
    s.bbox_min = {n[0], n[1], n[2]};
    slot[l.value] = out.size();
    out.push_back(s);
  }
  std::vector<std::array<double, 3>> sum(out.size(), {0, 0, 0});
  for (int64_t z = 0; z < n[2]; ++z)
    for (int64_t y = 0; y < n[1]; ++y)
      for (int64_t x = 0; x < n[0]; ++x) {
        const uint16_t v = mask.at(x, y, z);
        if (v == 0) continue;
        auto it = slot.find(v);
        if (it == slot.end()) continue;
        StructureVolume& s = out[it->second];
        ++s.voxels;
        const int64_t c[3] = {x, y, z};
        for (int a = 0; a < 3; ++a) {
          s.bbox_min[a] = std::min(s.bbox_min[a], c[a]);
          s.bbox_max[a] = std::max(s.bbox_max[a], c[a]);
          sum[it->second][a] += static_cast<double>(c[a]);
        }
      }
  for (size_t i = 0; i < out.size(); ++i) {
    StructureVolume& s = out[i];
    s.volume_ml = static_cast<double>(s.voxels) * mask.geo.voxel_volume_mm3() / 1000.0;
    if (s.voxels == 0) {
      s.bbox_min = {0, 0, 0};
      s.bbox_max = {-1, -1, -1};
      continue;
    }
    const double k = 1.0 / static_cast<double>(s.voxels);
    s.centroid_lps = mask.geo.index_to_physical(sum[i][0] * k, sum[i][1] * k, sum[i][2] * k);
  }
  return out;
}

std::vector<fs::path> write_review_package(const fs::path& out_dir, const std::string& case_id,
                                           const Volume& image, const LabelVolume& mask,
                                           const std::vector<io::LabelInfo>& labels) {
  MEDSEG_CHECK(!case_id.empty(), "empty case id");
  if (!image.geo.same_grid(mask.geo))
    throw ArgumentError("review package for " + case_id + ": the mask's grid (" +
                        mask.geo.describe() + ") differs from the scan's (" + image.geo.describe() +
                        ")");
  MEDSEG_CHECK(static_cast<int64_t>(image.data.size()) == image.geo.voxels() * image.channels &&
                   image.channels >= 1,
               "image holds ", image.data.size(), " values for ", image.geo.voxels(), " voxels x ",
               image.channels, " channels");
  MEDSEG_CHECK(static_cast<int64_t>(mask.data.size()) == mask.geo.voxels(), "mask holds ",
               mask.data.size(), " voxels, geometry says ", mask.geo.voxels());

  // Everything is computed before the first file is written, so bad input leaves no file behind.
  const std::vector<Entry> table = build_table(mask, labels);
  std::vector<io::LabelInfo> infos;
  for (const auto& e : table) infos.push_back({e.value, e.name, e.rgb});
  const auto volumes = structure_volumes(mask, infos);

  std::vector<std::pair<std::string, std::string>> texts;  // file name, content
  texts.emplace_back(case_id + "_slicer.ctbl", slicer_ctbl(case_id, table));
  texts.emplace_back(case_id + "_slicer.csv", slicer_csv(table));
  texts.emplace_back(case_id + "_itksnap.txt", itksnap(table));
  texts.emplace_back(case_id + "_niivue.json", niivue(table));
  {
    std::ostringstream csv;
    csv << "label,name,voxels,volume_ml,bbox_min_x,bbox_min_y,bbox_min_z,bbox_max_x,bbox_max_y,"
           "bbox_max_z,centroid_L_mm,centroid_P_mm,centroid_S_mm\n";
    nlohmann::ordered_json j;
    j["case"] = case_id;
    j["spacing_mm"] = mask.geo.spacing;
    j["voxel_volume_mm3"] = mask.geo.voxel_volume_mm3();
    j["structures"] = nlohmann::ordered_json::array();
    for (const auto& s : volumes) {
      nlohmann::ordered_json e;
      e["label"] = s.label;
      e["name"] = s.name;
      e["voxels"] = s.voxels;
      e["volume_ml"] = s.volume_ml;
      csv << s.label << ',' << csv_field(s.name) << ',' << s.voxels << ',' << fmt(s.volume_ml);
      if (s.voxels > 0) {
        e["bbox_min_voxel"] = s.bbox_min;
        e["bbox_max_voxel"] = s.bbox_max;
        e["centroid_lps_mm"] = s.centroid_lps;
        for (auto v : s.bbox_min) csv << ',' << v;
        for (auto v : s.bbox_max) csv << ',' << v;
        for (auto v : s.centroid_lps) csv << ',' << fmt(v);
      } else {  // absent structure: no box, no centroid
        e["bbox_min_voxel"] = nullptr;
        e["bbox_max_voxel"] = nullptr;
        e["centroid_lps_mm"] = nullptr;
        csv << ",,,,,,,,,";
      }
      csv << '\n';
      j["structures"].push_back(e);
    }
    texts.emplace_back(case_id + "_volumes.csv", csv.str());
    texts.emplace_back(case_id + "_volumes.json", j.dump(2) + "\n");
  }

  std::vector<std::pair<std::string, Image8>> pngs;
  if (!volumes.empty()) {
    const AxisMap am = axis_map(image.geo);
    const Window win = percentile_window(image);
    for (const auto& s : volumes) {
      if (s.voxels == 0) continue;
      // Centroid back in index space (mean index), per patient axis.
      std::array<double, 3> mean_idx{};
      {
        double acc[3] = {0, 0, 0};
        int64_t count = 0;
        const auto& n = mask.geo.size;
        for (int64_t z = s.bbox_min[2]; z <= s.bbox_max[2]; ++z)
          for (int64_t y = s.bbox_min[1]; y <= s.bbox_max[1]; ++y)
            for (int64_t x = s.bbox_min[0]; x <= s.bbox_max[0]; ++x)
              if (mask.at(x, y, z) == s.label) acc[0] += x, acc[1] += y, acc[2] += z, ++count;
        for (int a = 0; a < 3; ++a)
          mean_idx[a] = std::clamp<double>(std::round(acc[a] / count), 0, n[a] - 1);
      }
      const std::string base =
          case_id + "_overlay_" + std::to_string(s.label) + "_" + file_safe(s.name) + "_";
      auto slice_of = [&](int patient_axis) {
        return static_cast<int64_t>(mean_idx[am.index_of[patient_axis]]);
      };
      // axial: normal S, columns L to the right, rows P downwards (anterior up)
      pngs.emplace_back(base + "axial.png",
                        render_view(image, mask, table, am, win, 2, slice_of(2), 0, true, 1, true));
      // coronal: normal P, columns L to the right, rows S upwards
      pngs.emplace_back(base + "coronal.png", render_view(image, mask, table, am, win, 1,
                                                          slice_of(1), 0, true, 2, false));
      // sagittal: normal L, columns P to the right (anterior left), rows S upwards
      pngs.emplace_back(base + "sagittal.png", render_view(image, mask, table, am, win, 0,
                                                           slice_of(0), 1, true, 2, false));
    }
  }

  std::vector<fs::path> written;
  try {
    std::error_code ec;
    fs::create_directories(out_dir, ec);
    if (ec) throw IoError(out_dir.string() + ": cannot create folder: " + ec.message());
    const fs::path mask_path = out_dir / (case_id + "_mask.nii.gz");
    io::write_labels(mask_path, mask);
    written.push_back(mask_path);
    for (const auto& [name, content] : texts) {
      io::write_text_atomic(out_dir / name, content);
      written.push_back(out_dir / name);
    }
    for (const auto& [name, img] : pngs) {
      io::write_png_rgb(out_dir / name, img.width, img.height, img.rgb);
      written.push_back(out_dir / name);
    }
    io::write_text_atomic(out_dir / "README.txt", kReadme);
    written.push_back(out_dir / "README.txt");
  } catch (...) {
    for (const auto& p : written) {
      if (p.filename() == "README.txt") continue;
      std::error_code ec;
      fs::remove(p, ec);
    }
    throw;
  }
  return written;
}

// ------------------------------------------------------------------ parsers

namespace {

[[noreturn]] void parse_fail(const fs::path& path, int line, const std::string& what) {
  throw IoError(path.string() + ":" + std::to_string(line) + ": " + what);
}

uint8_t colour_value(const fs::path& path, int line, long v) {
  if (v < 0 || v > 255)
    parse_fail(path, line, "colour component " + std::to_string(v) + " outside 0-255");
  return static_cast<uint8_t>(v);
}

}  // namespace

std::vector<io::LabelInfo> read_slicer_ctbl(const fs::path& path) {
  std::istringstream in(read_file(path));
  std::vector<io::LabelInfo> out;
  std::string line;
  int no = 0;
  while (std::getline(in, line)) {
    ++no;
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ls(line);
    io::LabelInfo l;
    long r, g, b, a;
    if (!(ls >> l.value >> l.name >> r >> g >> b >> a))
      parse_fail(path, no, "expected 'index name R G B A', found '" + line + "'");
    l.color = {colour_value(path, no, r), colour_value(path, no, g), colour_value(path, no, b)};
    colour_value(path, no, a);
    out.push_back(l);
  }
  return out;
}

std::vector<io::LabelInfo> read_itksnap_labels(const fs::path& path) {
  std::istringstream in(read_file(path));
  std::vector<io::LabelInfo> out;
  std::string line;
  int no = 0;
  bool header = false;
  while (std::getline(in, line)) {
    ++no;
    if (line.rfind("# ITK-SnAP Label Description File", 0) == 0) header = true;
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ls(line);
    io::LabelInfo l;
    long r, g, b;
    double a;
    int vis, msh;
    if (!(ls >> l.value >> r >> g >> b >> a >> vis >> msh))
      parse_fail(path, no, "expected 'IDX R G B A VIS MSH \"LABEL\"', found '" + line + "'");
    if (a < 0 || a > 1) parse_fail(path, no, "alpha " + std::to_string(a) + " outside 0-1");
    const auto q1 = line.find('"'), q2 = line.rfind('"');
    if (q1 == std::string::npos || q2 == q1) parse_fail(path, no, "label name not in quotes");
    l.name = line.substr(q1 + 1, q2 - q1 - 1);
    l.color = {colour_value(path, no, r), colour_value(path, no, g), colour_value(path, no, b)};
    out.push_back(l);
  }
  if (!header) parse_fail(path, 1, "missing the '# ITK-SnAP Label Description File' header");
  return out;
}

std::vector<io::LabelInfo> read_niivue_colormap(const fs::path& path) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw IoError(path.string() + ": not valid JSON: " + e.what());
  }
  std::vector<io::LabelInfo> out;
  try {
    const auto& I = j.at("I");
    const size_t n = I.size();
    for (const char* k : {"R", "G", "B", "A", "labels"})
      if (j.at(k).size() != n)
        throw IoError(path.string() + ": array " + k + " has " + std::to_string(j.at(k).size()) +
                      " entries, I has " + std::to_string(n));
    for (size_t i = 0; i < n; ++i) {
      io::LabelInfo l;
      l.value = I[i].get<int>();
      l.name = j["labels"][i].get<std::string>();
      l.color = {colour_value(path, 0, j["R"][i].get<long>()),
                 colour_value(path, 0, j["G"][i].get<long>()),
                 colour_value(path, 0, j["B"][i].get<long>())};
      out.push_back(l);
    }
  } catch (const nlohmann::json::exception& e) {
    throw IoError(path.string() + ": not a NiiVue colour map {R,G,B,A,I,labels}: " + e.what());
  }
  return out;
}

}  // namespace medseg::infer
