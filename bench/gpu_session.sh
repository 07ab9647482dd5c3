#!/usr/bin/env bash
# The GPU figures in one prepared run (about 13 minutes of device time): train the paper's
# ODE-Net with the gpu-paper preset, evaluate it (the seed's Table 1), measure inference against
# torchdiffeq on the same weights, the solver overhead, and the served load, all on the GPU.
#
# Only the checkout travels to the device: run bench/prepare_gpu_session.sh here first, then
# on the device, with carry ["device-data", "device-wheels"]:   bash bench/gpu_session.sh
# Results land in $OUT (or runs/gpu-session).
#
# Settings by environment: DEVICE (cuda), BUDGET (training seconds, 450), DATA (device-data),
# WHEELS (device-wheels), SMOKE=1 (a few minutes on a CPU, to check the script itself).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-450}
DATA=${DATA:-device-data}
RESULTS=${OUT:-runs/gpu-session}
mkdir -p "$RESULTS"
PYTHON=${PYTHON:-python3}
# torchvision reads MNIST's uncompressed files; unpack what travelled compressed
for archive in "$DATA"/MNIST/raw/*.gz; do
    [ -e "${archive%.gz}" ] || gunzip -k "$archive"
done
export PYTHONPATH="$PWD:$PWD/client${PYTHONPATH:+:$PYTHONPATH}"  # the checkout is not installed there
WHEELS=${WHEELS:-device-wheels}
if [ -d "$WHEELS" ]; then  # what the device lacks, brought along (no network there)
    "$PYTHON" -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl
fi
subset=() model_batches=(1 1000) overhead_repeats=3
if [ "${SMOKE:-0}" = 1 ]; then
    subset=(--test-subset 200) model_batches=(1 50) overhead_repeats=1
fi

"$PYTHON" -m pytest -q tests/neuralode/test_cuda_graphs.py 2>&1 | tee "$RESULTS/cuda_graphs_test.txt" || true

checkpoint="$RESULTS/odenet-mnist-gpu.pt"
"$PYTHON" -m training odenet --preset gpu-paper --device "$DEVICE" --time-budget "$BUDGET" "${subset[@]}" \
    --data-dir "$DATA" --out "$checkpoint" 2>&1 | tr '\r' '\n' | grep -v "it/s" | tee "$RESULTS/train.txt"
"$PYTHON" -m training evaluate "$checkpoint" --data-dir "$DATA" --device "$DEVICE" "${subset[@]}" --out "$RESULTS" | tee "$RESULTS/evaluate.txt"
"$PYTHON" bench/model_inference.py --checkpoint "$checkpoint" --device "$DEVICE" --batch "${model_batches[@]}" --out "$RESULTS" | tee "$RESULTS/model_inference.txt"
"$PYTHON" bench/solver_overhead.py --device "$DEVICE" --batch "${model_batches[@]}" --repeats "$overhead_repeats" --out "$RESULTS" | tee "$RESULTS/solver_overhead.txt"
if [ "$DEVICE" = cuda ]; then  # the server puts models on the GPU when there is one
    "$PYTHON" bench/serve_load.py --data-dir "$DATA" --sections mixed,engine --clients 64 --duration 10 --repeats 1 \
        --out "$RESULTS" | tee "$RESULTS/serve_load.txt"  # the shipped checkpoints, served from the GPU
fi
echo "gpu session done: $RESULTS"
