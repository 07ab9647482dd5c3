#!/usr/bin/env bash
# Issue 16's GPU figures in one prepared run (about 8 minutes of device time), all on the shipped
# odenet-mnist weights and side by side in each step:
#   1. the CUDA-graph tests (f replayed, whole steps replayed against their eager masked path);
#   2. batch-1 latency and batch-1000 throughput at tol 1e-3: ours, ours with f from CUDA graphs,
#      ours with whole steps from CUDA graphs, torchdiffeq (bench/model_inference.py);
#   3. the solver-overhead ratio on the device (bench/solver_overhead.py);
#   4. the seed's Table 1 on the device: error, NFE and time against tolerance (training evaluate);
#   5. bench/serve_load.py with the servers on the GPU: 64 clients, continuous against static
#      batching (mixed load), where the engine's time goes, and what continuous batching can buy
#      there (static's step cost per row against a full batch's) — with step_graphs off, then on.
#
# Only the checkout travels: run bench/prepare_gpu_session.sh here first, then on the device, with
# carry ["device-data", "device-wheels"]:   bash bench/gpu_inference.sh
# Results land in $OUT (or runs/gpu-inference). SMOKE=1 DEVICE=cpu DATA=../shared/data checks the
# script itself on a CPU in a few minutes (the step_graphs-on run there measures the engine only).
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-device-data}
RESULTS=${OUT:-runs/gpu-inference}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-device-wheels}
mkdir -p "$RESULTS"
for archive in "$DATA"/MNIST/raw/*.gz; do  # torchvision reads MNIST uncompressed
    [ -e "${archive%.gz}" ] || gunzip -k "$archive"
done
export PYTHONPATH="$PWD:$PWD/client${PYTHONPATH:+:$PYTHONPATH}"  # the checkout is not installed there
if [ -d "$WHEELS" ]; then  # what the device lacks (torchdiffeq, pytest, ...), brought along
    "$PYTHON" -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl
fi
batches=(1 1000) repeats=10 overhead_repeats=3 subset=()
serve=(--clients 64 --duration 6 --warmup 2 --repeats 1 --engine-seconds 6)
serve_sections=mixed,engine,ceiling
sections_on=$serve_sections  # those run again with step_graphs on
if [ "${SMOKE:-0}" = 1 ]; then
    batches=(1 50) repeats=2 overhead_repeats=1 subset=(--test-subset 200)
    serve=(--clients 4 --duration 2 --warmup 1 --repeats 1 --max-images 8 --engine-clients 4 --engine-seconds 2)
    # The servers' gRPC path is the same either way; what step_graphs changes is the engine's step.
    sections_on=engine
fi
checkpoint=checkpoints/odenet-mnist.pt
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; } > "$RESULTS/device.txt" 2>&1

"$PYTHON" -m pytest -q -p no:cacheprovider tests/neuralode/test_cuda_graphs.py 2>&1 | tee "$RESULTS/cuda_graphs_test.txt" || true
"$PYTHON" bench/model_inference.py --checkpoint "$checkpoint" --device "$DEVICE" --batch "${batches[@]}" \
    --repeats "$repeats" --out "$RESULTS" | tee "$RESULTS/model_inference.txt"
"$PYTHON" bench/solver_overhead.py --device "$DEVICE" --batch "${batches[@]}" --repeats "$overhead_repeats" \
    --out "$RESULTS" | tee "$RESULTS/solver_overhead.txt"
"$PYTHON" -m training evaluate "$checkpoint" --data-dir "$DATA" --device "$DEVICE" "${subset[@]}" \
    --out "$RESULTS" | tee "$RESULTS/evaluate.txt"
for graphs in off on; do
    sections=$serve_sections
    [ "$graphs" = on ] && sections=$sections_on
    "$PYTHON" bench/serve_load.py --data-dir "$DATA" --sections "$sections" --step-graphs "$graphs" "${serve[@]}" \
        --out "$RESULTS/step-graphs-$graphs" | tee "$RESULTS/serve_load_step_graphs_$graphs.txt"
done
echo "gpu inference session done: $RESULTS"
