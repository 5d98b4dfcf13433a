# Sourced by run.sh and e2e.sh on a bare GPU machine, offline: installs the wheels of the
# wheelhouse $house into a private folder (never into the machine's Python) and puts the checkout
# itself first on PYTHONPATH, then that folder. Leaves $site set; pip's output in $out/install.txt.
site=$(mktemp -d)/site
python -m pip install --quiet --no-index --no-deps --target "$site" "$house"/*.whl 2>"$out/install.txt" || {
    # no pip there: a wheel is a zip of its files
    python - "$site" "$house"/*.whl <<'PY'
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
PY
}
export PYTHONPATH="$PWD:$site" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 UNLEARN_DEVICE=${UNLEARN_DEVICE:-cuda}
