// The training log of a model bundle: log.jsonl (every logged step and every epoch, one JSON object
// a line, "kind": "step" | "epoch"), log.csv (epochs) and curves.svg (training loss and validation
// Dice against steps). Appends on resume.
#pragma once
#include <filesystem>
#include <fstream>
#include <vector>

#include <nlohmann/json.hpp>

namespace medseg::pipelines {

class TrainLog {
 public:
  TrainLog(const std::filesystem::path& dir, bool append);
  void step(nlohmann::json record);
  void epoch(nlohmann::json record);
  // Rewrites curves.svg and log.csv (atomically) from everything logged so far.
  void write_curves() const;

 private:
  std::filesystem::path dir_;
  std::ofstream jsonl_;
  std::vector<nlohmann::json> steps_, epochs_;
};

// A self-contained SVG line chart: series of (x, y) points, one colour each, with axes and a legend.
struct Series {
  std::string name, colour;
  std::vector<std::pair<double, double>> points;
};
std::string svg_chart(const std::string& title, const std::string& x_label,
                      const std::vector<Series>& series, int width = 720, int height = 300);

}  // namespace medseg::pipelines
