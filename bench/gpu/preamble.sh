# Sourced first by the QaTa-COV19 GPU scripts (qata.sh, qata_ship.sh, qata_speed.sh), after `set -u` and the cd to
# the repository root: the start time their deadlines count from, and the knobs they share.
START=$(date +%s)
DRY=${LVIT_DRY_RUN:-}
OUT=${OUT:-/tmp/lvit-gpu-out}
PY=${PY:-python3}
export DEVRUN=${DEVRUN:-.devrun/qata}
