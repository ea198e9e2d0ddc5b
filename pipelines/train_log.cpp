#include "pipelines/train_log.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "core/atomic_file.hpp"
#include "core/error.hpp"

namespace medseg::pipelines {

using json = nlohmann::json;

TrainLog::TrainLog(const std::filesystem::path& dir, bool append) : dir_(dir) {
  const auto path = dir / "log.jsonl";
  if (append && std::filesystem::exists(path)) {
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
      try {
        auto j = json::parse(line);
        (j.value("kind", "") == "epoch" ? epochs_ : steps_).push_back(j);
      } catch (const json::exception&) {
        // A line cut by a kill: ignored (everything after the last checkpoint is redone anyway).
      }
    }
  }
  jsonl_.open(path, append ? std::ios::app : std::ios::trunc);
  if (!jsonl_) throw IoError("cannot write " + path.string());
}

void TrainLog::step(json record) {
  record["kind"] = "step";
  jsonl_ << record.dump() << "\n" << std::flush;
  steps_.push_back(std::move(record));
}

void TrainLog::epoch(json record) {
  record["kind"] = "epoch";
  jsonl_ << record.dump() << "\n" << std::flush;
  epochs_.push_back(std::move(record));
}

void TrainLog::write_curves() const {
  Series loss{"training loss", "#1f77b4", {}};
  for (const auto& s : steps_)
    if (s.contains("loss") && s["loss"].is_number()) loss.points.push_back({s["step"], s["loss"]});
  std::vector<Series> dice;
  const char* colours[] = {"#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"};
  Series mean{"mean validation Dice", "#000000", {}};
  std::ostringstream csv;
  csv << "step,train_loss,mean_val_dice,lr,r_max,d_max,elapsed_s\n";
  for (const auto& e : epochs_) {
    if (e.contains("val_dice") && e["val_dice"].is_object()) {
      size_t i = 0;
      for (auto& [name, v] : e["val_dice"].items()) {
        if (dice.size() <= i) dice.push_back({name, colours[i % 6], {}});
        if (v.is_number()) dice[i].points.push_back({e["step"], v});
        ++i;
      }
    }
    if (e.contains("mean_val_dice") && e["mean_val_dice"].is_number())
      mean.points.push_back({e["step"], e["mean_val_dice"]});
    auto num = [&](const char* k) {
      return e.contains(k) && e[k].is_number() ? std::to_string(e[k].get<double>()) : std::string();
    };
    csv << num("step") << "," << num("train_loss") << "," << num("mean_val_dice") << "," << num("lr")
        << "," << num("r_max") << "," << num("d_max") << "," << num("elapsed_s") << "\n";
  }
  dice.push_back(mean);
  std::string svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"720\" height=\"620\">\n";
  svg += "<g>" + svg_chart("Training loss (Dice + CE)", "step", {loss}) + "</g>\n";
  svg += "<g transform=\"translate(0,310)\">" + svg_chart("Validation Dice", "step", dice) + "</g>\n";
  svg += "</svg>\n";
  write_text_file_atomic(dir_ / "curves.svg", svg);
  write_text_file_atomic(dir_ / "log.csv", csv.str());
}

std::string svg_chart(const std::string& title, const std::string& x_label,
                      const std::vector<Series>& series, int width, int height) {
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  for (const auto& s : series)
    for (auto [x, y] : s.points) {
      x0 = std::min(x0, x);
      x1 = std::max(x1, x);
      y0 = std::min(y0, y);
      y1 = std::max(y1, y);
    }
  if (!(x1 > x0)) { x0 = 0; x1 = std::isfinite(x1) ? x1 + 1 : 1; }
  if (!(y1 > y0)) { y0 = std::isfinite(y0) ? y0 - 0.5 : 0; y1 = y0 + 1; }
  const double L = 60, R = 170, T = 30, B = 40;
  const double pw = width - L - R, ph = height - T - B;
  auto px = [&](double x) { return L + (x - x0) / (x1 - x0) * pw; };
  auto py = [&](double y) { return T + (1 - (y - y0) / (y1 - y0)) * ph; };
  std::ostringstream o;
  o.precision(4);
  o << "<rect x=\"0\" y=\"0\" width=\"" << width << "\" height=\"" << height << "\" fill=\"white\"/>";
  o << "<text x=\"" << L << "\" y=\"18\" font-family=\"sans-serif\" font-size=\"14\">" << title << "</text>";
  o << "<rect x=\"" << L << "\" y=\"" << T << "\" width=\"" << pw << "\" height=\"" << ph
    << "\" fill=\"none\" stroke=\"#888\"/>";
  for (int i = 0; i <= 4; ++i) {
    const double y = y0 + (y1 - y0) * i / 4, x = x0 + (x1 - x0) * i / 4;
    o << "<text x=\"" << L - 5 << "\" y=\"" << py(y) + 4
      << "\" text-anchor=\"end\" font-family=\"sans-serif\" font-size=\"10\">" << y << "</text>";
    o << "<text x=\"" << px(x) << "\" y=\"" << T + ph + 14
      << "\" text-anchor=\"middle\" font-family=\"sans-serif\" font-size=\"10\">" << static_cast<long>(x)
      << "</text>";
  }
  o << "<text x=\"" << L + pw / 2 << "\" y=\"" << height - 6
    << "\" text-anchor=\"middle\" font-family=\"sans-serif\" font-size=\"11\">" << x_label << "</text>";
  int li = 0;
  for (const auto& s : series) {
    if (s.points.empty()) continue;
    o << "<polyline fill=\"none\" stroke=\"" << s.colour << "\" stroke-width=\"1.5\" points=\"";
    for (auto [x, y] : s.points) o << px(x) << "," << py(y) << " ";
    o << "\"/>";
    o << "<rect x=\"" << L + pw + 10 << "\" y=\"" << T + 14 * li << "\" width=\"10\" height=\"10\" fill=\""
      << s.colour << "\"/><text x=\"" << L + pw + 24 << "\" y=\"" << T + 9 + 14 * li
      << "\" font-family=\"sans-serif\" font-size=\"10\">" << s.name << "</text>";
    ++li;
  }
  return o.str();
}

}  // namespace medseg::pipelines
