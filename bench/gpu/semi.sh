#!/usr/bin/env bash
# The semi-supervised benchmark (bench/semi_supervised.py) on a lent GPU machine, every run side by side:
# LViT and LViT-T x {sup-25, epi-25, epi+lv-25, sup-100} on the synthetic set packed by
#   python bench/gpu/prepare.py --synth 640,64,96
# (640 training images, so the 25% subset holds 160 masks: as many as the CPU table's 100% row).
# Rendered as the section "semi-gpu" of a copy of bench/RESULTS.md; packed into $OUT/semi_gpu.tar.gz (that
# RESULTS.md, results JSON, metrics.csv per run, logs).
#
# Knobs (environment): EPOCHS (40), WARMUP (20), MINUTES (wall-clock cap per run, 6.5), DEVICE (gpu),
# RUNS ("model:setting[:extra bench options, comma-separated]" ...), WORKERS (data workers per run, 1), PY,
# PREVIOUS (a results JSON of earlier calls, default bench/gpu/results/semi/semi_gpu_results.json: its runs are
# kept, not rerun, and rendered).
# A dry run on a CPU machine: DEVICE=cpu EPOCHS=2 WARMUP=1 RUNS="lvit:epi+lv-25 lvit-t:sup-25" bash bench/gpu/semi.sh
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/lvit-gpu-out}
PY=${PY:-python3}
EPOCHS=${EPOCHS:-40}
WARMUP=${WARMUP:-20}
MINUTES=${MINUTES:-6.5}
DEVICE=${DEVICE:-gpu}
WORKERS=${WORKERS:-1}
RUNS=${RUNS:-"lvit:sup-25 lvit:sup-25-steps lvit:epi-25 lvit:epi+lv-25 lvit:sup-100 lvit-t:sup-25 \
lvit-t:sup-25-steps lvit-t:epi-25 lvit-t:epi+lv-25 lvit-t:sup-100"}
PREVIOUS=${PREVIOUS:-bench/gpu/results/semi/semi_gpu_results.json}
mkdir -p "$OUT"
WORK=$(mktemp -d /dev/shm/lvit-semi.XXXX 2>/dev/null || mktemp -d)  # checkpoints in RAM: no disk contention
mkdir -p "$WORK/logs"
if [ ! -d .devrun/synth ]; then
  echo "no .devrun/synth: run python bench/gpu/prepare.py --synth 640,64,96 and carry .devrun" >&2; exit 2
fi
. bench/gpu/env.sh  # wheels, PYTHONPATH (stand-in encoder first), import check
cp -r .devrun/synth_text_cache "$WORK/text_cache"
[ -f "$PREVIOUS" ] && cp "$PREVIOUS" "$WORK/semi_gpu_results.json"

COMMON=(--config synth --data .devrun/synth --work "$WORK" --results "$WORK/semi_gpu_results.json"
        --text-cache "$WORK/text_cache" --device "$DEVICE" --n-train 640 --n-val 64 --n-test 96 --size 128
        --base-channels 16 --epochs "$EPOCHS" --warmup "$WARMUP" --threads 1 --num-workers "$WORKERS" --minutes "$MINUTES")
echo "== semi-supervised runs side by side ($(date +%T)): $RUNS"
pids=()
for run in $RUNS; do
  IFS=: read -r model setting extra <<< "$run"
  # shellcheck disable=SC2086
  $PY bench/semi_supervised.py "${COMMON[@]}" --models "$model" --settings "$setting" --no-write ${extra//,/ } \
      > "$WORK/logs/$model-$setting${extra//[ ,-]/_}.log" 2>&1 &
  pids+=($!)
done
for i in "${!pids[@]}"; do wait "${pids[$i]}"; echo "run $i exit $?"; done
grep -h -E "^(lvit|lvit-t) |Error|error" "$WORK"/logs/*.log | tail -n 30
cp bench/RESULTS.md "$WORK/RESULTS.md"  # rendered into a copy: the repository's file is never touched here
$PY bench/semi_supervised.py "${COMMON[@]}" --models lvit,lvit-t --render-only --section semi-gpu \
    --results-md "$WORK/RESULTS.md" \
    --command "bash bench/gpu/semi.sh (EPOCHS=$EPOCHS WARMUP=$WARMUP MINUTES=$MINUTES)" 2>&1 | tail -n 25

echo "== packing ($(date +%T))"
mkdir -p "$WORK/pack"
cp "$WORK/RESULTS.md" "$WORK/semi_gpu_results.json" "$WORK/pack/"
for d in "$WORK"/runs/*/; do cp "$d/metrics.csv" "$WORK/pack/metrics-$(basename "$d").csv" 2>/dev/null; done
cp "$WORK"/logs/*.log "$WORK/pack/"
tar -czf "$OUT/semi_gpu.tar.gz" -C "$WORK/pack" .
ls -la "$WORK/pack"
rm -rf "$WORK"
