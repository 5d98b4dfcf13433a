#!/usr/bin/env bash
# On a bare GPU machine, offline, as a device call of its own (after run.sh's): erasures end to end
# with the Celery worker training on the GPU. The embedded stack (tansu, PostgreSQL, Redis from
# their wheels) comes up, `unlearn bench --only e2e --quick` trains SISA on `digits`, runs a real
# `unlearn intake` and `unlearn worker` (UNLEARN_DEVICE=cuda), erases subjects one at a time and
# in a burst, and times each event → new model version → receipt; the stack goes down after.
# Writes under $OUT (default gpu-results); bounded at 8 minutes (2 stack, 6 benchmark).
#
#   scripts/gpu/e2e.sh [WHEELHOUSE]   (default build/gpu-wheelhouse-e2e, made here by
#                                      scripts/gpu/prepare-wheelhouse.sh build/gpu-wheelhouse-e2e
#                                      scripts/gpu/requirements-e2e.txt: 49 MiB)
set -uo pipefail
cd "$(dirname "$0")/../.."
house=${1:-build/gpu-wheelhouse-e2e}
out=${OUT:-gpu-results}
mkdir -p "$out"
out=$(realpath "$out")
source scripts/gpu/install.sh
# The project's own wheel (built from this checkout by prepare-wheelhouse.sh) runs here, from
# outside the checkout: the checkout keeps the event schemas in schemas/, which only the wheel
# installs as `worker.schemas`, and `python -m` puts the working directory first on the path.
export PYTHONPATH="$site" UNLEARN_STACK_DIR="$PWD/.stack"
cd "$(mktemp -d)"
unlearn=(python -m worker.cli)  # no `unlearn` script on that Python

timeout 120 "${unlearn[@]}" stack up 2>&1 | tee "$out/stack.txt"
if (( PIPESTATUS[0] != 0 )); then
    echo "the stack did not come up (see $out/stack.txt)" >&2
    exit 1
fi
status=0
timeout 360 "${unlearn[@]}" bench --only e2e --quick --out "$out/e2e" 2>&1 | tee "$out/e2e.txt"
(( PIPESTATUS[0] == 0 )) || status=1
[[ -f "$out/e2e/e2e.json" ]] || { echo "no e2e results: skipped or failed (see $out/e2e/report.md)" >&2; status=1; }
# the worker's pool processes say which device they train on; the logs' ends, any error a child met
{ grep -h "trains on" "$UNLEARN_STACK_DIR"/bench/demo/worker.log; tail -n 40 "$UNLEARN_STACK_DIR"/bench/demo/*.log; } \
    >"$out/e2e-processes.txt" 2>&1
timeout 60 "${unlearn[@]}" stack down >/dev/null 2>&1
echo "results under $out (status $status)"
exit $status
