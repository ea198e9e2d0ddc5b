#include "app/options.hpp"
#include "pipelines/predict.hpp"

namespace medseg::app {

namespace po = boost::program_options;

int run_predict_cmd(const std::vector<std::string>& args) {
  po::options_description desc(
      "medseg predict --model MODEL_DIR [MODEL_DIR ...] --input PATH --output PATH [options]\n"
      "Segments one scan or a folder of scans (MSD imagesTs/, nnU-Net _0000 channel files, plain files); "
      "writes one uint8 mask per case on the input's own grid");
  pipelines::PredictConfig c;
  desc.add_options()
      ("model", po::value<std::vector<std::string>>()->required()->multitoken()->composing(),
       "model bundle folder (from medseg train); several (--model A B C) are an ensemble, "
       "their probabilities averaged: e.g. the folds of one plan")
      ("input", po::value<std::string>()->required(), "a scan file or a folder of scans")
      ("output", po::value<std::string>()->required(), "mask file (single input) or folder")
      ("tta", "mirroring test-time augmentation (default when the model was trained with mirroring)")
      ("no-tta", "turn test-time augmentation off (8x faster)")
      ("step", po::value<double>(&c.step)->default_value(c.step), "sliding-window step as a fraction of the patch")
      ("probabilities", po::bool_switch(&c.probabilities), "also write float32 probability maps per class")
      ("export", po::value<std::string>(), "also write a review package per case into this folder")
      ("keep-largest", po::value<int>(&c.keep_largest)->default_value(-1),
       "keep the largest connected component per label: 1 on, 0 off, -1 as recorded in the model")
      ("no-fold", "do not fold normalisation into the convolutions (debugging)")
      ("tiles-per-batch", po::value<int>(&c.tiles_per_batch)->default_value(c.tiles_per_batch),
       "tiles evaluated per forward pass");
  add_common(desc, true);
  auto vm = parse(desc, args, "predict");
  if (!vm) return 0;
  apply_common(*vm);
  for (const auto& m : (*vm)["model"].as<std::vector<std::string>>()) c.models.emplace_back(m);
  c.input = (*vm)["input"].as<std::string>();
  c.output = (*vm)["output"].as<std::string>();
  c.device = (*vm)["device"].as<std::string>();
  c.tf32 = !vm->count("no-tf32");
  if (vm->count("tta") && vm->count("no-tta")) throw ArgumentError("--tta and --no-tta contradict each other");
  if (vm->count("tta")) c.tta = 1;
  if (vm->count("no-tta")) c.tta = 0;
  c.fold_norms = !vm->count("no-fold");
  if (vm->count("export")) c.export_dir = (*vm)["export"].as<std::string>();
  return pipelines::run_predict(c);
}

}  // namespace medseg::app
