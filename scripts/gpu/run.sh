#!/usr/bin/env bash
# On a bare GPU machine, offline: install what it lacks from the wheelhouse, then run the cuda tests and
# the GPU benchmark, then counts CUDA calls per step, writing everything under $OUT (default gpu-results).
# Bounded at 9 minutes (150 s tests, 300 s benchmark, 2 × 40 s profiles); expected well under 8.
#
#   scripts/gpu/run.sh [WHEELHOUSE]        (default build/gpu-wheelhouse, from prepare-wheelhouse.sh)
#
# The checkout itself is what runs (first on PYTHONPATH); the wheels go into a private folder, never
# into the machine's Python. Not run: an erasure through the embedded stack (PostgreSQL, the broker,
# Redis and Arrow's wheels are ~90 MiB more than the wheelhouse may carry).
set -uo pipefail
cd "$(dirname "$0")/../.."
house=${1:-build/gpu-wheelhouse}
out=${OUT:-gpu-results}
mkdir -p "$out"
site=$(mktemp -d)/site

python -m pip install --quiet --no-index --no-deps --target "$site" "$house"/*.whl 2>"$out/install.txt" || {
    # no pip there: a wheel is a zip of its files
    python - "$site" "$house"/*.whl <<'PY'
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
PY
}
export PYTHONPATH="$PWD:$site" OMP_NUM_THREADS=1 UNLEARN_DEVICE=cuda HF_HUB_OFFLINE=1

{ nvidia-smi; python -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } \
    >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

status=0
cuda_tests=$(grep -l "mark.cuda" tests/test_*.py)
timeout 150 python -m pytest -m cuda -q -rs -p no:cacheprovider $cuda_tests 2>&1 | tee "$out/pytest-cuda.txt"
(( PIPESTATUS[0] == 0 )) || status=1
timeout 300 python -m worker.bench.gpu --out "$out/bench" 2>&1 | tee "$out/bench.txt"
(( PIPESTATUS[0] == 0 )) || status=1
# CUDA runtime calls per step (kernel launches, graph replays, copies, synchronisations), eager then graph
for mode in eager graph; do
    timeout 40 python scripts/profile_steps.py --device cuda --mode "$mode" >"$out/profile-$mode.json" 2>"$out/profile-$mode.err"
    (( $? == 0 )) || status=1
    cat "$out/profile-$mode.json"
done
echo "results under $out (status $status)"
exit $status
