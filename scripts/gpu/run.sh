#!/usr/bin/env bash
# On a bare GPU machine, offline: install what it lacks from the wheelhouse, then run the cuda tests and
# the GPU benchmark, then counts CUDA calls per step; under $OUT (default gpu-results): the machine,
# the cuda tests' output, the benchmark's report, the profiles, and everything in results.tar.gz.
# Bounded at 9 minutes (150 s tests, 300 s benchmark, 2 × 40 s profiles); expected well under 8.
#
#   scripts/gpu/run.sh [WHEELHOUSE]        (default build/gpu-wheelhouse, from prepare-wheelhouse.sh)
#
# The checkout itself is what runs (first on PYTHONPATH); the wheels go into a private folder, never
# into the machine's Python (install.sh). An erasure through the embedded stack is e2e.sh's, in a
# second call: its wheels and these are more than one call may carry.
set -uo pipefail
cd "$(dirname "$0")/../.."
house=${1:-build/gpu-wheelhouse}
dest=${OUT:-gpu-results}  # what comes back from a device run: at most 8 files
out=$(mktemp -d)          # everything, packed into $dest/results.tar.gz at the end
mkdir -p "$dest"
source scripts/gpu/install.sh

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
tar -czf "$dest/results.tar.gz" -C "$out" .
cp "$out/machine.txt" "$out/pytest-cuda.txt" "$out"/profile-*.json "$dest"/ 2>/dev/null
cp "$out/bench/report.md" "$dest/bench-report.md" 2>/dev/null
echo "results under $dest: the headlines, and every log and figure in results.tar.gz (status $status)"
exit $status
