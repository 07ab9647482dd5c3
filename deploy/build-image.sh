#!/usr/bin/env bash
# Build the odeserve image with no registry and no network inside the build:
#   1. a Debian bookworm base made by debootstrap and `docker import`ed (needs root; skipped
#      when the base image exists already, or when BASE_IMAGE names one you can pull),
#   2. a wheelhouse in deploy/wheelhouse/ from pip download (the runtime dependencies of the
#      server and of the client in client/, for CPython 3.11 on x86_64; torch's CPU wheel),
#   3. docker build --network none with PIP_OFFLINE=1.
#
#   deploy/build-image.sh                      # -> odeserve:0.1.0
#   IMAGE=odeserve:dev BASE_IMAGE=python:3.11-slim-bookworm deploy/build-image.sh
#
# Settings (environment): IMAGE, BASE_IMAGE, TORCH (a requirement or a wheel file; default:
# a local torch CPU wheel under /opt/wheels when there is one, else torch from
# download.pytorch.org's CPU index), DEBIAN_MIRROR, ODESERVE_BUILD_CACHE (where the base's root
# file system is kept), DOCKER_HOST (a daemon of your own).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-odeserve:$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)}
BASE_IMAGE=${BASE_IMAGE:-odeserve-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${ODESERVE_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/odeserve-build}
PYTHON=${PYTHON:-python3}
step() { printf '\n== %s (%ss)\n' "$1" "$SECONDS"; }

step "base image $BASE_IMAGE"
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "present"
elif [[ "$BASE_IMAGE" != odeserve-base:* ]]; then
    docker pull "$BASE_IMAGE"
else
    rootfs="$CACHE/rootfs-bookworm"
    if [[ ! -x "$rootfs/usr/bin/python3" ]]; then
        rm -rf "$rootfs" && mkdir -p "$CACHE"
        debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$DEBIAN_MIRROR"
        # What a container never needs: package caches and lists, documentation, translations.
        rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
            "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*
    fi
    tar --numeric-owner -C "$rootfs" -c . | docker import \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_IMAGE"
fi

step "wheelhouse deploy/wheelhouse"
if [[ -z "${TORCH:-}" ]]; then
    TORCH=$(ls /opt/wheels/torch-*+cpu-cp311-*x86_64.whl 2>/dev/null | sort -V | tail -n 1 || true)
fi
torch_index=()
if [[ -z "$TORCH" ]]; then
    TORCH=torch
    torch_index=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
# pip resolves what the two distributions need from their own pyproject files (the server, ".",
# depends on the client, ./client, which is on no index) and downloads it; their build backends too.
mapfile -t build_requirements < <("$PYTHON" - <<'PY'
import tomllib
for project in ("client/pyproject.toml", "pyproject.toml"):
    print("\n".join(tomllib.load(open(project, "rb"))["build-system"]["requires"]))
PY
)
"$PYTHON" -m pip download --quiet --dest deploy/wheelhouse --only-binary :all: \
    --python-version 3.11 --implementation cp --abi cp311 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    "${torch_index[@]}" "$TORCH" ./client . "${build_requirements[@]}"
du -sh deploy/wheelhouse

step "docker build $IMAGE (no network)"
docker build --network none --file deploy/Dockerfile --tag "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg PIP_OFFLINE=1 .
docker image ls "$IMAGE"
step "built $IMAGE"
