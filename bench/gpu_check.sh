#!/usr/bin/env bash
# One-command GPU check of the fused decoder kernels (issue 6), for a CUDA machine such as the
# H200 test machine (python3 with torch + CuPy + pytest, nvcc, no pycuda, no network):
#
#   bash bench/gpu_check.sh            # from the repo root, with the pycuda wheels in .whl/
#
# 1. installs pycuda from .whl/ (copy /work/shared/wheels/cp312-gpu/*.whl there; see that
#    folder's README) into /tmp/site unless pycuda is already importable,
# 2. builds the fatbin with nvcc (sm_80/86/89/90 + compute_90 PTX) into a fresh cache,
# 3. runs the GPU correctness tests: pytest -m gpu tests/kernels (kernels vs numpy reference),
# 4. runs the kernel benchmark on the full grid and prints its table and the targets.
# Results (log, JSON, PNG) go to $OUT when set, else bench/results/kernel/. Budget: well under 8 min
# (build ~1 min, tests ~1 min, benchmark ~2 min on an H200); each step has its own timeout.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
RESULTS="${OUT:-bench/results/kernel}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
exec > >(tee "$LOG") 2>&1
started=$(date +%s)
status=0
step() { echo; echo "=== [$(( $(date +%s) - started ))s] $*"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader || true
"$PY" --version
command -v nvcc && nvcc --version | tail -1

step "pycuda"
if "$PY" -c "import pycuda" 2>/dev/null; then
    echo "pycuda already importable"
elif compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "FAILED: pip install of .whl/*.whl"; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "FAILED: pycuda is not importable and .whl/ holds no wheels:"
    echo "  copy /work/shared/wheels/cp312-gpu/*.whl into .whl/ (see /work/shared/wheels/README.md)"
    exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import pycuda, pycuda.driver as d; print('pycuda', pycuda.VERSION_TEXT, 'built for CUDA', d.get_version())"

step "build the fatbin"
export CODED_INVNET_CACHE_DIR="$(mktemp -d /tmp/coded-invnet-kernels.XXXX)"
if ! timeout 300 "$PY" -m kernels build; then
    echo "FAILED: kernel build"
    exit 1
fi
echo "ptxas resource usage on sm_90 (registers, spills):"
nvcc -cubin -O3 -std=c++17 -arch=sm_90 -Xptxas -v -o /dev/null kernels/decoder.cu 2>&1 \
    | awk "/Compiling entry/ {name=\$NF; sub(/'for/, \"\", name); fn=\$(NF-2)} /spill/ {spill=\$0} /Used/ {print fn, \$5, \$6, spill}" \
    | sed "s/'//g; s/ *0 bytes stack frame,/ /" || true

step "GPU correctness tests (kernels vs kernels.reference)"
# The image has no pytest-asyncio: ignore the config warnings about its ini keys.
timeout 300 "$PY" -m pytest -m gpu tests/kernels -q -rs -p no:cacheprovider \
    -W ignore::pytest.PytestConfigWarning --junitxml="$RESULTS/gpu_tests.xml" || { status=1; echo "FAILED: GPU tests"; }

step "kernel benchmark"
timeout 360 "$PY" -m bench kernel --backend cuda --out-dir "$RESULTS" || { status=1; echo "FAILED: benchmark"; }

step "done in $(( $(date +%s) - started ))s, status $status; files in $RESULTS:"
ls -la "$RESULTS"
sleep 1  # let tee flush the log before $OUT is collected
exit $status
