#!/usr/bin/env bash
# The one GPU check of the whole GPU path, for a CUDA machine such as the H200 test machine
# (Python 3.12 with numpy, torch (CUDA), CuPy and pytest, nvcc; no pycuda, no network):
#
#   bash bench/gpu_prepare.sh          # HERE (network): fills .gpu/ (wheels, MNIST test split, wrk)
#   bash bench/gpu_check.sh            # THERE, from the repo root, with .gpu/ carried along
#
# 1. installs .gpu/wheels (pycuda + the serving stack) into /tmp/site, no network;
# 2. builds the decoder fatbin with nvcc (sm_80/86/89/90 + compute_90 PTX) into a fresh cache;
# 3. runs every `gpu` test: the kernels against the numpy reference, the persistent device
#    decoders against the host decoder, and the server with `--engine torch --device cuda`
#    (f on CUDA streams as workers) answering real MNIST requests, uncoded against the CPU
#    engine and coded with a worker killed under load;
# 4. `bench kernel` on the full grid (and the one-shot grid at 4 waves, k = 2 and 4);
# 5. `bench latency`, the paper setup (+100 ms on one worker per group) on GPU streams and on
#    the CPU side by side, and a short `bench throughput --device cuda` if wrk runs there;
# then prints every figure and one verdict line per target. The log and every result file
# go to $OUT when set (the device tool brings them back), else bench/results/gpu/.
# Budget: < 8 minutes on an H200; each step has its own timeout, and a failed step does not
# stop the next (the verdicts say which failed).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
GPU_DIR="${GPU_DIR:-.gpu}"
RESULTS="${OUT:-bench/results/gpu}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
exec > >(tee "$LOG") 2>&1
started=$(date +%s)
declare -A verdict
step() { echo; echo "=== [$(( $(date +%s) - started ))s] $*"; }
run_step() {  # name timeout_s command...: records PASS / FAIL (rc) for the verdict lines
    local name=$1 limit=$2; shift 2
    if timeout "$limit" "$@"; then verdict[$name]=PASS; else verdict[$name]="FAIL (rc $?)"; fi
}

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader || true
"$PY" --version
command -v nvcc && nvcc --version | tail -1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" || true

step "install .gpu/wheels (no network)"
if compgen -G "$GPU_DIR/wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$GPU_DIR"/wheels/*.whl || { echo "FAILED: pip install of $GPU_DIR/wheels"; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
elif ! "$PY" -c "import pycuda, onnxruntime, aiohttp" 2>/dev/null; then
    echo "FAILED: $GPU_DIR/wheels is empty and pycuda/onnxruntime/aiohttp are not importable:"
    echo "  run bash bench/gpu_prepare.sh on a machine with network and carry $GPU_DIR"
    exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$GPU_DIR/data/mnist" ] && export CODED_INVNET_DATA="$PWD/$GPU_DIR/data"
"$PY" -c "import pycuda, pycuda.driver as d; print('pycuda', pycuda.VERSION_TEXT, 'built for CUDA', d.get_version())"

step "build the fatbin"
export CODED_INVNET_CACHE_DIR="$(mktemp -d /tmp/coded-invnet-kernels.XXXX)"
run_step build 300 "$PY" -m kernels build
echo "ptxas resource usage on sm_90 (registers, spills):"
nvcc -cubin -O3 -std=c++17 -arch=sm_90 -Xptxas -v -o /dev/null kernels/decoder.cu 2>&1 \
    | awk "/Compiling entry/ {name=\$NF; sub(/'for/, \"\", name); fn=\$(NF-2)} /spill/ {spill=\$0} /Used/ {print fn, \$5, \$6, spill}" \
    | sed "s/'//g; s/ *0 bytes stack frame,/ /" || true

step "every gpu test (kernels, device decoders, the server on CUDA streams)"
# The image has no pytest-asyncio: ignore the config warnings about its ini keys.
run_step gpu_tests 300 "$PY" -m pytest -m gpu tests/kernels tests/runtime/test_gpu_serving.py -q -rs \
    -p no:cacheprovider -W ignore::pytest.PytestConfigWarning --junitxml="$RESULTS/gpu_tests.xml"

step "kernel benchmark (full grid, one wave), then the one-shot grid at 4 waves for k = 2, 4"
run_step kernel_bench 240 "$PY" -m bench kernel --backend cuda --out-dir "$RESULTS"
run_step kernel_waves 90 "$PY" -m bench kernel --backend cuda --ks 2,4 --ds 65536,1048576 --batches 256 \
    --grid-waves 4 --tag waves4 --out-dir "$RESULTS"

step "coded server on GPU streams vs CPU: paper setup, +100 ms on one worker per group"
run_step latency_gpu 150 "$PY" -m bench latency bundles/mnist-default --modes reference,coded-clean,uncoded,coded \
    --num-queries 1000 --server-args "--engine torch --device cuda" --tag gpu --out-dir "$RESULTS" \
    --run-dir /tmp/gpu-check-latency-gpu
run_step latency_cpu 150 "$PY" -m bench latency bundles/mnist-default --modes reference,coded-clean,uncoded,coded \
    --num-queries 1000 --tag cpu --out-dir "$RESULTS" --run-dir /tmp/gpu-check-latency-cpu

step "short throughput run on GPU streams (wrk)"
if LD_LIBRARY_PATH="$PWD/$GPU_DIR/bin" "$GPU_DIR/bin/wrk" -v 2>&1 | grep -q "^wrk "; then
    export PATH="$PWD/$GPU_DIR/bin:$PATH" LD_LIBRARY_PATH="$PWD/$GPU_DIR/bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    run_step throughput 120 "$PY" -m bench throughput bundles/mnist-default --modes coded,uncoded --batches 1,32 \
        --bodies binary --duration-s 5 --warmup-s 1 --no-peer --server-args "--engine torch --device cuda" \
        --tag gpu --out-dir "$RESULTS" --run-dir /tmp/gpu-check-throughput
else
    why=$(LD_LIBRARY_PATH="$PWD/$GPU_DIR/bin" "$GPU_DIR/bin/wrk" -v 2>&1 | head -1)
    verdict[throughput]="SKIPPED (wrk from $GPU_DIR/bin does not run here: $why)"
fi

step "figures and verdicts"
"$PY" - "$RESULTS" <<'PYEOF'
import glob, json, sys
results = sys.argv[1]
for path in sorted(glob.glob(f"{results}/kernel_*.json")):
    record = json.load(open(path))
    print(path, "device", record.get("device"), "copy GB/s", round(record.get("copy_gbps", 0)))
    for name, target in record.get("targets", {}).items():
        if isinstance(target, dict):
            print(f"  TARGET {name}: {'MET' if target.get('met') else 'MISSED'} {json.dumps(target)}")
for path in sorted(glob.glob(f"{results}/latency*.json")):
    record = json.load(open(path))
    print(path)
    for bundle in record.get("bundles", []):
        for mode in bundle.get("modes", []):
            stats = mode.get("paper", {}).get("stats", {})
            print(f"  {mode['mode']:<12} p50 {stats.get('p50_ms', float('nan')):7.2f} ms  "
                  f"p99.9 {stats.get('p99.9_ms', float('nan')):7.2f} ms  {stats.get('throughput_rps', 0):7.1f} req/s  "
                  f"failed {stats.get('failed')}  rebuilt {stats.get('reconstructed_fraction')}")
        for name, target in (bundle.get("targets") or {}).items():
            print(f"  TARGET {name}: {json.dumps(target)}")
for path in sorted(glob.glob(f"{results}/throughput*.json")):
    print(path, "(images/s per mode and batch inside)")
PYEOF
echo
for name in build gpu_tests kernel_bench kernel_waves latency_gpu latency_cpu throughput; do
    echo "VERDICT $name: ${verdict[$name]:-NOT RUN}"
done
status=0
for name in build gpu_tests kernel_bench; do [ "${verdict[$name]:-}" = PASS ] || status=1; done
step "done in $(( $(date +%s) - started ))s, status $status; files in $RESULTS:"
ls -la "$RESULTS"
sleep 1  # let tee flush the log before $OUT is collected
exit $status
