#!/usr/bin/env bash
# Configures and builds medseg into build/ (Release). Extra arguments go to cmake's configure step.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
jobs=$(nproc)
if [[ ! -f build/CMakeCache.txt ]]; then
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >build-configure.log 2>&1 ||
    { cat build-configure.log; exit 1; }
  grep -E "medseg:|\*\*\*" build-configure.log || true
fi
cmake --build build -j "$jobs"
