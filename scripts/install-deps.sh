#!/usr/bin/env bash
# Installs the Debian packages medseg needs to build, test and run. Idempotent; silent when all is there.
# Usage: scripts/install-deps.sh [--with-torch]   (--with-torch adds python3-torch for the PyTorch peer
# benchmark and for regenerating golden test files; nothing else needs it.)
set -euo pipefail
packages=(build-essential cmake ninja-build pkg-config libinsighttoolkit5-dev libdnnl-dev
          libboost-program-options-dev libgtest-dev nlohmann-json3-dev zlib1g-dev
          libopenmpi-dev openmpi-bin
          ocl-icd-opencl-dev)  # oneDNN 2.6's CMake config looks for OpenCL; libdnnl-dev only recommends it
if [[ "${1:-}" == "--with-torch" ]]; then packages+=(python3-torch python3-numpy); fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
echo "medseg: installing ${missing[*]}" >&2
SUDO=""
[[ $(id -u) -ne 0 ]] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
