#!/usr/bin/env bash
# Set up surfdiff in ./.venv (created when missing).
#   scripts/setup.sh            core + chgnet + sevennet (the main job)
#   scripts/setup.sh test       + dev tools, GPAW (built against Debian libxc/openblas/fftw) and chromium
# torch is installed first as torch==2.13.0 and constrained for every later pip call, so pip never
# swaps it for a multi-GB CUDA build on a CPU machine (on a GPU machine PyPI's 2.13.0 is the CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-main}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
# Reinstalled when the dependencies, the compiled op's sources or the checkout's path change (the editable
# install points at one checkout: a venv moved or shared with another clone would otherwise run the old code).
STAMP="$VENV/.surfdiff-$MODE-$( (cat pyproject.toml setup.py surfdiff_core/ml/csrc/*; pwd -P) | sha1sum | cut -c1-12)"
if [ -f "$STAMP" ]; then exit 0; fi

apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "[setup] apt-get install ${missing[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip wheel setuptools
$VENV/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==2.13.0"
TORCH_VERSION=$($VENV/bin/python -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==$TORCH_VERSION" > "$VENV/constraints.txt"
export PIP_CONSTRAINT="$PWD/$VENV/constraints.txt"

EXTRAS="chgnet,sevennet"
apt_install build-essential  # compiles the C++ message op at install (without it: eager fallback, 5-15x slower)
if [ "$MODE" = "test" ]; then
  apt_install build-essential libxc-dev libopenblas-dev libfftw3-dev chromium chromium-driver slurm-wlm munge
  # GPAW: serial build against the Debian libraries.
  mkdir -p "$HOME/.gpaw"
  cat > "$HOME/.gpaw/siteconfig.py" <<'PYEOF'
mpi = False
compiler = 'g++'  # GPAW >= 26 compiles its C sources as C++
libraries = ['xc', 'openblas', 'fftw3']
fftw = True
scalapack = False
PYEOF
  export GPAW_CONFIG="$HOME/.gpaw/siteconfig.py"
  export CC=g++  # GPAW compiles its C sources as C++
  # --no-build-isolation (below, for the C++ op against the pinned torch) skips build requirements: GPAW's first.
  $PIP install -q "pybind11>=2.6.2" "numpy>=1.20"
  EXTRAS="$EXTRAS,gpaw,hpc,dev"
fi
echo "[setup] pip install -e .[$EXTRAS]"
$PIP install -q --no-build-isolation -e ".[$EXTRAS]"
rm -f "$VENV"/.surfdiff-"$MODE"-*
touch "$STAMP"
echo "[setup] done ($MODE)"
