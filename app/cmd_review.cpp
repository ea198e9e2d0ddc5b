// export, evaluate and sample-data.
#include <sstream>

#include "app/options.hpp"
#include "pipelines/evaluate.hpp"
#include "pipelines/export.hpp"
#include "pipelines/model.hpp"
#include "pipelines/sample_data.hpp"

namespace medseg::app {

namespace po = boost::program_options;

int run_export_cmd(const std::vector<std::string>& args) {
  po::options_description desc(
      "medseg export --model MODEL_DIR --image IMG --mask MASK --out DIR\n"
      "Writes a review package: the mask, 3D Slicer / ITK-SNAP / NiiVue colour tables with the model's "
      "label names and colours, volumes per label (CSV, JSON), PNG overlays and a README");
  desc.add_options()
      ("model", po::value<std::string>()->required(), "model bundle (for label names and colours)")
      ("image", po::value<std::string>()->required(), "the scan")
      ("mask", po::value<std::string>()->required(), "its label mask (same grid)")
      ("out", po::value<std::string>()->required(), "output folder");
  add_common(desc, false);
  auto vm = parse(desc, args, "export");
  if (!vm) return 0;
  apply_common(*vm);
  pipelines::ExportConfig c;
  c.image = (*vm)["image"].as<std::string>();
  c.mask = (*vm)["mask"].as<std::string>();
  c.out = (*vm)["out"].as<std::string>();
  const auto plan = pipelines::read_bundle_plan((*vm)["model"].as<std::string>());
  c.labels = plan.labels;
  c.channels = plan.in_channels;
  return pipelines::run_export(c);
}

int run_evaluate_cmd(const std::vector<std::string>& args) {
  po::options_description desc(
      "medseg evaluate --pred DIR --ref DIR [--labels 1,2] [--out FILE.json]\n"
      "Dice, IoU, 95th-percentile Hausdorff distance and mean surface distance (mm) per case and label, "
      "with mean and std per label; masks are matched by file name");
  std::string labels;
  desc.add_options()
      ("pred", po::value<std::string>()->required(), "folder of predicted masks")
      ("ref", po::value<std::string>()->required(), "folder of reference masks")
      ("labels", po::value<std::string>(&labels), "labels to evaluate, e.g. 1,2 (default: all found)")
      ("out", po::value<std::string>()->default_value("evaluation.json"),
       "JSON report (a CSV is written next to it)");
  add_common(desc, false);
  auto vm = parse(desc, args, "evaluate");
  if (!vm) return 0;
  apply_common(*vm);
  pipelines::EvaluateConfig c;
  c.pred = (*vm)["pred"].as<std::string>();
  c.ref = (*vm)["ref"].as<std::string>();
  c.out_json = (*vm)["out"].as<std::string>();
  // The report is FILE.json plus FILE.csv beside it: a --out ending in .csv would be written twice.
  if (c.out_json.extension() != ".json")
    throw ArgumentError("--out " + c.out_json.string() +
                        ": the report is a .json file (the table goes to the same name with .csv)");
  if (!labels.empty()) {
    std::stringstream ss(labels);
    std::string part;
    while (std::getline(ss, part, ',')) {
      try {
        size_t pos = 0;
        const int v = std::stoi(part, &pos);
        if (pos != part.size() || v < 1 || v > 65535) throw std::invalid_argument("");
        c.labels.push_back(v);
      } catch (...) {
        throw ArgumentError("--labels: expected label values 1..65535 separated by commas, got '" + labels + "'");
      }
    }
  }
  return pipelines::run_evaluate(c);
}

int run_sample_data_cmd(const std::vector<std::string>& args) {
  po::options_description desc(
      "medseg sample-data --out DIR [--cases N] [--seed S]\n"
      "Generates the deterministic synthetic MSD dataset the main job trains on");
  pipelines::SampleDataConfig c;
  desc.add_options()
      ("out", po::value<std::string>()->required(), "output folder")
      ("cases", po::value<int>(&c.cases)->default_value(16), "training cases (test cases: a quarter)")
      ("seed", po::value<uint64_t>(&c.seed)->default_value(1), "random seed");
  add_common(desc, false);
  auto vm = parse(desc, args, "sample-data");
  if (!vm) return 0;
  apply_common(*vm);
  c.out = (*vm)["out"].as<std::string>();
  return pipelines::run_sample_data(c);
}

}  // namespace medseg::app
