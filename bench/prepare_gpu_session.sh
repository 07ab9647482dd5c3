#!/usr/bin/env bash
# Run on the development machine before bench/gpu_session.sh goes to the device: puts MNIST
# (compressed) and the wheels the device lacks into two folders git ignores locally, to be
# named in the device run's `carry`: ["device-data", "device-wheels"].
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_SOURCE=${DATA_SOURCE:-../shared/data}
rm -rf device-data device-wheels  # fresh: no unpacked data from an earlier smoke run
mkdir -p device-data/MNIST/raw device-wheels
for file in "$DATA_SOURCE"/MNIST/raw/*-ubyte; do  # compressed to travel: 55 MB become 11 MB
    gzip -c "$file" > "device-data/MNIST/raw/$(basename "$file").gz"
done
# The device has torch, torchvision, grpcio and prometheus-client for Python 3.12.
python3 -m pip download --quiet --dest device-wheels --python-version 3.12 --only-binary=:all: \
    tqdm "torchdiffeq>=0.2.4,<0.3" "grpcio-health-checking>=1.85.1" "grpcio-reflection>=1.85.1" "protobuf>=7.35,<8" \
    matplotlib --no-deps
python3 -m pip download --quiet --dest device-wheels --python-version 3.12 --only-binary=:all: \
    contourpy cycler fonttools kiwisolver pyparsing python-dateutil six packaging pillow pytest iniconfig pluggy \
    --no-deps
for folder in device-data device-wheels; do
    grep -qx "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >> .git/info/exclude
done
du -sh device-data device-wheels
