#!/usr/bin/env bash
# Builds the CUDA backend on this (GPU-less) machine and packs what a bare CUDA machine needs to run
# the GPU checks into gpu-bundle/ (ignored by git):
#   gpu-bundle/bin/               the CUDA test executables (tests/cuda_*.cpp, tests/app_cuda.cpp),
#                                 bench_cuda and the medseg binary itself
#   gpu-bundle/peer/              the PyTorch peer (../shared/peers/torch_unet_peer.py), when present
#   gpu-bundle/data/              the hippocampus dataset (../shared/data/Task04_Hippocampus), when
#                                 present, for a short training run (not with NO_DATA=1)
#   gpu-bundle/lib/               shared libraries they need that such a machine lacks (oneDNN, OpenMP,
#                                 libstdc++, OpenCL loader, ...), found with ldd; never libcuda (the
#                                 driver's), libcudart or libcudnn (the machine's CUDA / Python env)
#   gpu-bundle/lib/glibc/         this machine's C library and loader, used only if the target's glibc
#                                 is too old to start the binaries
#   gpu-bundle/cudart-fallback/   libcudart.so.13, used only if the target has no CUDA 13 runtime
#   gpu-bundle/run-gpu-checks.sh  sets LD_LIBRARY_PATH, runs the tests and the benchmarks, writes
#                                 results to $OUT (or gpu-bundle/results)
#   gpu-bundle.tar.gz             the same, as one archive (about 40 MB)
# Usage: scripts/gpu-bundle.sh            (then copy gpu-bundle/ or the archive to the GPU machine
#                                          and run gpu-bundle/run-gpu-checks.sh there)
# The CPU flags are x86-64-v3 (AVX2), not -march=native: the GPU machine's CPU is not this one.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
build="$root/build-gpu"
bundle="$root/gpu-bundle"

if [[ ! -f "$build/CMakeCache.txt" ]]; then
  mkdir -p "$build"
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMEDSEG_CUDA=ON \
    -DMEDSEG_CPU_ARCH=x86-64-v3 >"$build/configure.log" 2>&1 ||
    { cat "$build/configure.log"; exit 1; }
  grep -E "medseg:" "$build/configure.log" || true
fi

targets=(bench_cuda medseg app_cuda)
for src in "$root"/tests/cuda_*.cpp; do
  [[ -e "$src" ]] && targets+=("$(basename "$src" .cpp)")
done
echo "building: ${targets[*]}"
cmake --build "$build" --target "${targets[@]}" -j "$(nproc)"

rm -rf "$bundle"
mkdir -p "$bundle/bin" "$bundle/lib/glibc" "$bundle/cudart-fallback"
for t in "${targets[@]}"; do cp "$build/$t" "$bundle/bin/"; done
strip --strip-unneeded "$bundle"/bin/* 2>/dev/null || true
shared="$root/../shared"
if [[ -f "$shared/peers/torch_unet_peer.py" ]]; then
  mkdir -p "$bundle/peer"
  cp "$shared/peers/torch_unet_peer.py" "$bundle/peer/"
fi
if [[ "${NO_DATA:-0}" != 1 && -d "$shared/data/Task04_Hippocampus" ]]; then
  mkdir -p "$bundle/data"
  cp -r "$shared/data/Task04_Hippocampus" "$bundle/data/"
fi

# Libraries: everything ldd resolves, except the driver / CUDA runtime / cuDNN (the GPU machine's own)
# and the C library family (kept apart in lib/glibc for the fallback loader).
is_glibc() {
  case "$1" in
    libc.so.* | libm.so.* | libdl.so.* | libpthread.so.* | librt.so.* | ld-linux*.so.* | libresolv.so.*) return 0 ;;
    *) return 1 ;;
  esac
}
for t in "${targets[@]}"; do
  ldd "$build/$t" | awk '/=>/ { print $1, $3 }' | while read -r name path; do
    [[ -z "$path" || "$path" == "not" ]] && { echo "unresolved dependency $name of $t" >&2; exit 1; }
    case "$name" in
      libcuda.so.* | libcudart.so.* | libcudnn*.so.* | libnvidia*.so.*) continue ;;
    esac
    if is_glibc "$name"; then
      cp -L -n "$path" "$bundle/lib/glibc/$name"
    else
      cp -L -n "$path" "$bundle/lib/$name"
    fi
  done
done
loader=$(ldd "$build/bench_cuda" | awk '/ld-linux/ { print $1 }')
cp -L -n "$loader" "$bundle/lib/glibc/"
cudart=$(ldd "$build/bench_cuda" | awk '/libcudart.so/ { print $3 }')
cp -L "$cudart" "$bundle/cudart-fallback/"

cat >"$bundle/run-gpu-checks.sh" <<'EOF'
#!/usr/bin/env bash
# Runs the medseg GPU checks: every CUDA test binary (GoogleTest, JSON reports) and bench_cuda.
# Results go to $OUT if set, else gpu-bundle/results. Environment knobs: FULL=1 runs the full
# convolution benchmark (all U-Net levels; default: --quick, the 128^3 shapes), BENCH=0 skips the
# benchmarks, SANITIZE=1 also runs the tests under compute-sanitizer memcheck when it is installed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/results}
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }

# ---- libraries: bundled ones, cuDNN from the Python environment, a CUDA 13 runtime
ld_path="$here/lib"
cudnn_dir=$(python3 -c "import nvidia.cudnn as m, os; print(os.path.dirname(m.__file__) if getattr(m, '__file__', None) else list(m.__path__)[0])" 2>/dev/null || true)
if [[ -n "$cudnn_dir" && -d "$cudnn_dir/lib" ]]; then
  ld_path="$ld_path:$cudnn_dir/lib"
  say "cuDNN from the Python environment: $cudnn_dir/lib"
else
  say "no nvidia.cudnn Python package; relying on the system cuDNN (ldconfig, /usr/local/cuda)"
fi
site=$(python3 -c "import site; print(' '.join(site.getsitepackages()))" 2>/dev/null || true)
cudart_dir=""
for d in $site; do
  f=$(find "$d/nvidia" -name 'libcudart.so.13*' 2>/dev/null | head -1)
  [[ -n "$f" ]] && { cudart_dir=$(dirname "$f"); break; }
done
if [[ -z "$cudart_dir" ]]; then
  for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda-13*/lib64; do
    [[ -e "$d/libcudart.so.13" ]] && { cudart_dir="$d"; break; }
  done
fi
if [[ -z "$cudart_dir" ]] && ldconfig -p 2>/dev/null | grep -q 'libcudart.so.13'; then
  cudart_dir="(system)"
fi
if [[ -z "$cudart_dir" ]]; then
  cudart_dir="$here/cudart-fallback"
  say "no CUDA 13 runtime on this machine: using the bundled libcudart.so.13"
fi
[[ "$cudart_dir" != "(system)" ]] && ld_path="$ld_path:$cudart_dir"
for d in /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu; do
  [[ -d "$d" && ":$ld_path:" != *":$d:"* ]] && ld_path="$ld_path:$d"
done
export LD_LIBRARY_PATH="$ld_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

# ---- start binaries directly, or through the bundled loader when the system glibc is too old
launcher=()
if ! "$here/bin/bench_cuda" --help >/dev/null 2>"$out/start-check.txt"; then
  if grep -q "GLIBC" "$out/start-check.txt"; then
    launcher=("$here/lib/glibc/$(ls "$here/lib/glibc" | grep ld-linux | head -1)" --library-path
              "$LD_LIBRARY_PATH:$here/lib/glibc")
    say "system glibc too old: using the bundled loader"
  elif grep -q "error while loading shared libraries" "$out/start-check.txt"; then
    say "cannot start the binaries: $(cat "$out/start-check.txt")"
    exit 2
  fi
fi
run() { "${launcher[@]}" "$@"; }

{ nvidia-smi 2>&1 || echo "nvidia-smi not available"; } >"$out/nvidia-smi.txt"
say "machine: $(uname -srm), $(nproc) CPUs; GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"

status=0
export MEDSEG_BINARY="$here/bin/medseg"  # app_cuda runs the bundled binary
for t in "$here"/bin/cuda_* "$here"/bin/app_cuda; do
  name=$(basename "$t")
  say "== $name"
  run "$t" --gtest_output="json:$out/$name.json" >"$out/$name.log" 2>&1
  rc=$?
  tail -n 25 "$out/$name.log" | tee -a "$summary"
  if grep -q "no CUDA device" "$out/$name.log"; then
    say "!! $name SKIPPED tests: no usable CUDA device (see $out/$name.log)"
    status=1
  fi
  [[ $rc -ne 0 ]] && { say "!! $name exit code $rc"; status=1; }
  if [[ "${SANITIZE:-0}" == 1 ]] && command -v compute-sanitizer >/dev/null; then
    compute-sanitizer --tool memcheck --error-exitcode 9 "${launcher[@]}" "$t" \
      --gtest_filter='CudaOps.*:CudaLoss.*:CudaNorm.*' >"$out/$name.memcheck.log" 2>&1
    say "memcheck $name: exit $? (log $out/$name.memcheck.log)"
  fi
done

if [[ "${BENCH:-1}" == 1 ]]; then
  say "== bench_cuda"
  args=(--quick)
  [[ "${FULL:-0}" == 1 ]] && args=()
  run "$here/bin/bench_cuda" "${args[@]}" >"$out/bench_cuda.log" 2>&1
  rc=$?
  tee -a "$summary" <"$out/bench_cuda.log" >/dev/null
  grep -v '^RESULT ' "$out/bench_cuda.log"
  grep '^RESULT ' "$out/bench_cuda.log" | sed 's/^RESULT //' >"$out/bench_cuda.jsonl"
  [[ $rc -ne 0 ]] && { say "!! bench_cuda exit code $rc"; status=1; }

  # The U-Net step of the issue (batch 2, 128^3, 32 base filters, 4 levels), every norm kind and
  # inference, next to the PyTorch peer on the same GPU (TF32 on in both: PyTorch's cuDNN default).
  say "== medseg bench --device cuda (128^3, batch 2, 32 base filters)"
  peer_args=(--no-peer)
  [[ -f "$here/peer/torch_unet_peer.py" ]] && peer_args=(--peer-script "$here/peer/torch_unet_peer.py" --python "$(command -v python3)")
  run "$here/bin/medseg" bench --device cuda --patch 128 --batch 2 --base-filters 32 --steps 10 \
    "${peer_args[@]}" --json >"$out/medseg_bench_cuda.jsonl" 2>"$out/medseg_bench_cuda.log"
  rc=$?
  tee -a "$summary" <"$out/medseg_bench_cuda.jsonl"
  [[ $rc -ne 0 ]] && { say "!! medseg bench exit code $rc: $(tail -3 "$out/medseg_bench_cuda.log")"; status=1; }
fi

if [[ "${TRAIN:-1}" == 1 && -d "$here/data/Task04_Hippocampus" ]]; then
  say "== medseg train --device cuda on the hippocampus data (${TRAIN_MINUTES:-3} min)"
  run "$here/bin/medseg" train --data "$here/data/Task04_Hippocampus" --out "$out/hippocampus_model" \
    --device cuda --time-limit "${TRAIN_MINUTES:-3}" --seed 42 >"$out/train.log" 2>&1
  rc=$?
  grep -E "device:|network:|validation Dice|steps in|error" "$out/train.log" | tail -8 | tee -a "$summary"
  [[ $rc -ne 0 ]] && { say "!! medseg train exit code $rc"; status=1; }
fi
say "results in $out (exit status $status)"
exit $status
EOF
chmod +x "$bundle/run-gpu-checks.sh"
# One archive for transports with a size limit (the repository's device runner carries 64 MiB).
tar czf "$root/gpu-bundle.tar.gz" -C "$root" gpu-bundle
du -sh "$bundle" "$root/gpu-bundle.tar.gz"
echo "bundle ready: copy $bundle (or gpu-bundle.tar.gz, then tar xzf it) to the GPU machine and run"
echo "gpu-bundle/run-gpu-checks.sh there"
