#!/usr/bin/env bash
# The main job: installs what is missing, builds, then trains on sample_data/ (batch 2, Batch
# Renormalization), predicts the test cases with a review export, evaluates, and prints where each
# output is and the Dice per label. Outputs go to medseg-output/ (replaced on every run).
# Environment: MEDSEG_MINUTES (training wall time, default 7.5), MEDSEG_DEVICE (default cpu: the
# validated path on every machine; the CUDA path's tests pass on an H200, see docs/gpu.md; auto or cuda
# to use it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh >/dev/null
bin=build/medseg
out=medseg-output
minutes=${MEDSEG_MINUTES:-7.5}
device=${MEDSEG_DEVICE:-cpu}
rm -rf "$out.tmp" && mkdir -p "$out.tmp"
echo "== training on sample_data/ for ${minutes} min (batch 2, batchrenorm, device $device)"
"$bin" train --data sample_data --out "$out.tmp/model" --batch-size 2 --norm batchrenorm \
  --time-limit "$minutes" --device "$device" --val-fraction 0.2
echo "== predicting sample_data/imagesTs with a review export"
"$bin" predict --model "$out.tmp/model" --input sample_data/imagesTs --output "$out.tmp/predictions" \
  --export "$out.tmp/review" --device "$device"
echo "== evaluating against sample_data/labelsTs"
"$bin" evaluate --pred "$out.tmp/predictions" --ref sample_data/labelsTs --out "$out.tmp/evaluation.json"
rm -rf "$out" && mv "$out.tmp" "$out"
cat <<EOT

Done. Outputs in $out/:
  model bundle     $out/model          (plan.json, model.safetensors, log.jsonl, curves.svg)
  masks            $out/predictions
  review packages  $out/review/<case>  (Slicer/ITK-SNAP/NiiVue colour tables, volumes, PNG overlays)
  metrics          $out/evaluation.json, $out/evaluation.csv
EOT
