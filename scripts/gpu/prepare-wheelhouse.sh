#!/usr/bin/env bash
# On a development machine: the wheels a device run installs on a bare GPU machine, which has no network.
#
#   scripts/gpu/prepare-wheelhouse.sh [WHEELHOUSE] [REQUIREMENTS]
#     run.sh's: default build/gpu-wheelhouse and scripts/gpu/requirements.txt
#     e2e.sh's: build/gpu-wheelhouse-e2e scripts/gpu/requirements-e2e.txt
#
# Downloads the CPython manylinux x86_64 wheels the requirements list (no dependencies resolved:
# torch and the rest are already there) and builds the project's own wheel. Fails if the wheelhouse
# exceeds 60 MiB (what a device run carries beside the checkout). PY_VERSION (default 3.12, the GPU
# machine's) picks the wheels' Python: 3.11 makes one this machine can try out.
set -euo pipefail
cd "$(dirname "$0")/../.."
house=${1:-build/gpu-wheelhouse}
requirements=${2:-scripts/gpu/requirements.txt}
python=${PYTHON:-python3}
limit_mib=60

rm -rf "$house"
mkdir -p "$house"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --dest "$house" --requirement "$requirements"
"$python" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$house" .

size_mib=$(( $(du -sb "$house" | cut -f1) / 1048576 ))
ls -l "$house"
echo "wheelhouse: $house, $(ls "$house" | wc -l) wheels, ${size_mib} MiB"
if (( size_mib > limit_mib )); then
    echo "over ${limit_mib} MiB" >&2
    exit 1
fi
