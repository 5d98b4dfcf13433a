#!/usr/bin/env bash
# On a development machine: the wheels `run.sh` installs on a bare GPU machine, which has no network.
#
#   scripts/gpu/prepare-wheelhouse.sh [WHEELHOUSE]     (default build/gpu-wheelhouse, git-ignored)
#
# Downloads the CPython 3.12 manylinux x86_64 wheels listed in requirements.txt (no dependencies
# resolved: torch and the rest are already there) and builds the project's own wheel. Fails if the
# wheelhouse exceeds 60 MiB (what a device run carries beside the checkout).
set -euo pipefail
cd "$(dirname "$0")/../.."
house=${1:-build/gpu-wheelhouse}
python=${PYTHON:-python3}
limit_mib=60

rm -rf "$house"
mkdir -p "$house"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --dest "$house" \
    --requirement scripts/gpu/requirements.txt
"$python" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$house" .

size_mib=$(( $(du -sb "$house" | cut -f1) / 1048576 ))
ls -l "$house"
echo "wheelhouse: $house, $(ls "$house" | wc -l) wheels, ${size_mib} MiB"
if (( size_mib > limit_mib )); then
    echo "over ${limit_mib} MiB" >&2
    exit 1
fi
