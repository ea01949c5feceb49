#!/usr/bin/env bash
# The throughput bench's peers (bench/throughput.py): wrk and the PyTriton venv.
#
#   bash bench/setup_peers.sh            # both
#   bash bench/setup_peers.sh wrk        # only wrk
#   bash bench/setup_peers.sh triton     # only .venv-triton
#
# - wrk: `apt-get install -y wrk` when it is not on PATH (needs root, or sudo).
# - .venv-triton: a Python 3.12 venv (gitignored by `.venv-*/`) with nvidia-pytriton 0.7.0,
#   numpy and onnxruntime 1.32.0, made from PYTHON312 (default: the pyenv 3.12.1 interpreter).
#   PyTriton's bundled Python backend stub links against that interpreter's libpython, so
#   the bench runs the peer with its `lib` dir on LD_LIBRARY_PATH (found from the venv).
# Idempotent: what is already there is left alone.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON312="${PYTHON312:-/root/.pyenv/versions/3.12.1/bin/python}"
VENV="${TRITON_VENV:-.venv-triton}"
what="${1:-all}"

setup_wrk() {
  if command -v wrk >/dev/null 2>&1; then
    echo "wrk: $(command -v wrk) already installed"
    return
  fi
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get install -y wrk || { $sudo apt-get update && $sudo apt-get install -y wrk; }
}

setup_triton() {
  if [ ! -x "$PYTHON312" ]; then
    echo "no Python 3.12 interpreter at $PYTHON312; set PYTHON312=/path/to/python3.12" >&2
    exit 1
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON312" -m venv "$VENV"
  fi
  if "$VENV/bin/python" -c "import pytriton, onnxruntime, numpy" 2>/dev/null; then
    echo "$VENV: pytriton $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("nvidia-pytriton"))') already installed"
    return
  fi
  "$VENV/bin/python" -m pip install --upgrade pip
  "$VENV/bin/python" -m pip install "nvidia-pytriton==0.7.0" numpy "onnxruntime==1.32.0"
}

case "$what" in
  all) setup_wrk; setup_triton ;;
  wrk) setup_wrk ;;
  triton) setup_triton ;;
  *) echo "usage: bash bench/setup_peers.sh [all|wrk|triton]" >&2; exit 2 ;;
esac
