#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what the GPU test machine lacks for bench/gpu_check.sh. That
# machine has Python 3.12, numpy, torch with CUDA, CuPy, pytest and nvcc, and no network:
#   .gpu/wheels/  pycuda (../shared/wheels/cp312-gpu) and CPython 3.12 manylinux wheels of the
#                 serving stack: onnxruntime, aiohttp, uvloop, orjson, prometheus-client and
#                 their dependencies (no numpy: it is there; no gRPC: the check serves HTTP)
#   .gpu/data/mnist/  the MNIST test split (the check's real requests; read, never committed)
#   .gpu/bin/     wrk and the libraries it links that a stock image may lack (luajit), for the
#                 check's short throughput run; skipped there with the reason if it cannot run
# Run here, where PyPI is reachable, then name `.gpu` in the device tool's `carry` (the whole
# carry, working tree included, is limited to 64 MiB; .gpu/ is about 43 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_DIR="${GPU_DIR:-.gpu}"
SHARED="${SHARED:-../shared}"
PIP="${PIP:-.venv/bin/pip}"
mkdir -p "$GPU_DIR/wheels" "$GPU_DIR/data/mnist" "$GPU_DIR/bin"
cp "$SHARED"/wheels/cp312-gpu/*.whl "$GPU_DIR/wheels/"
# --no-deps with the dependency closure spelled out, so pip does not add numpy (16 MB of the
# carry). Versions are the serve extra's (pyproject.toml).
"$PIP" download -q --no-deps -d "$GPU_DIR/wheels" --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
    "onnxruntime==1.32.0" flatbuffers packaging "protobuf==6.33.6" \
    "aiohttp==3.14.5" aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl idna typing_extensions \
    "uvloop==0.23.0" "orjson==3.13.0" "prometheus-client==0.26.0"
cp "$SHARED"/data/mnist/t10k-images-idx3-ubyte.gz "$SHARED"/data/mnist/t10k-labels-idx1-ubyte.gz "$GPU_DIR/data/mnist/"
if command -v wrk >/dev/null; then
    cp "$(command -v wrk)" "$GPU_DIR/bin/"
    ldd "$(command -v wrk)" | awk '/luajit/ {print $3}' | xargs -r -I{} cp -L {} "$GPU_DIR/bin/"
else
    echo "wrk is not installed here (apt-get install wrk): the GPU check will skip its throughput run"
fi
du -sh "$GPU_DIR"
