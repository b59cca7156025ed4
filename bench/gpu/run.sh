#!/usr/bin/env bash
# The GPU checks, as one command for a lent GPU machine (about 9 minutes):
#   1. the speed harness (`lvit bench`) at batch 24: eager fp32, bf16 autocast (AMP) and compiled inference,
#      MFU against the GPU's fp32 and bf16 matmul rates measured in the same run;
#   2. MoNuSeg with the official settings (bench/monuseg.py): LViT (text), LViT without text and U-Net trained
#      side by side on the one GPU for a fixed wall-clock budget each, tested, rendered as the RESULTS.md
#      section "monuseg-gpu".
# Needs .devrun/ from `python bench/gpu/prepare.py` (carried along: the 224 px MoNuSeg copy, the text cache,
# wheels of the pure-Python packages the GPU image lacks). Everything it produces is packed into
# $OUT/gpu_results.tar.gz (RESULTS.md, curve PNG, metrics.csv per model, results.json, speed_gpu.md/json, logs).
#
# Knobs (environment): SKIP_BENCH=1, MODELS ("lvit lvit-t unet"), BENCH_ARGS, BENCH_S (hard limit of step 1), MONUSEG_MIN (training minutes per model),
# MONUSEG_S (hard limit of step 2), MONUSEG_EXTRA (extra bench/monuseg.py options), PY.
# A dry run on a CPU machine: BENCH_ARGS="--quick" MONUSEG_MIN=0.05 \
#   MONUSEG_EXTRA="--limit 2 --image-size 64 --base-channels 8" bash bench/gpu/run.sh
set -u
cd "$(dirname "$0")/../.."
REPO=$PWD
OUT=${OUT:-/tmp/lvit-gpu-out}
PY=${PY:-python3}
BENCH_ARGS=${BENCH_ARGS:-"--device cuda --batch 24 --repeats 20 --warmup 5 --variants eager,bf16,inference:compile --no-scaling --timeout 110"}
BENCH_S=${BENCH_S:-230}
MONUSEG_MIN=${MONUSEG_MIN:-3.7}
MONUSEG_S=${MONUSEG_S:-300}
MONUSEG_EXTRA=${MONUSEG_EXTRA:-}
mkdir -p "$OUT"
WORK=$(mktemp -d /dev/shm/lvit-gpu.XXXX 2>/dev/null || mktemp -d)  # checkpoints in RAM: no disk contention
RUNS=$WORK/runs
mkdir -p "$RUNS" "$WORK/logs"
. bench/gpu/env.sh  # wheels, PYTHONPATH (stand-in encoder first), import check

MODELS=${MODELS:-"lvit lvit-t unet"}
if [ -z "${SKIP_BENCH:-}" ]; then
echo "== 1. speed harness ($(date +%T))"
# shellcheck disable=SC2086
timeout "$BENCH_S" $PY -m lvit bench $BENCH_ARGS --out "$WORK/speed_gpu.md" --force \
    > "$WORK/logs/bench.log" 2>&1
echo "bench exit $?"; tail -n 40 "$WORK/logs/bench.log"
fi

echo "== 2. MoNuSeg, three models side by side ($(date +%T))"
cp -r .devrun/text_cache "$RUNS/text_cache"
NOTE="a copy resized once to 224 px by bench/gpu/prepare.py (images bilinear with antialias as lvit resizes them, \
masks as the official loader), so the lvit test column is measured at 224 px, not at the 1000 px originals."
pids=()
for m in $MODELS; do
  # shellcheck disable=SC2086
  timeout "$MONUSEG_S" $PY bench/monuseg.py --data .devrun/MoNuSeg224 --runs "$RUNS" --models "$m" \
      --minutes "$MONUSEG_MIN" --no-write --no-progress --data-note "$NOTE" $MONUSEG_EXTRA \
      > "$WORK/logs/monuseg-$m.log" 2>&1 &
  pids+=($!)
done
for i in "${!pids[@]}"; do wait "${pids[$i]}"; echo "monuseg process $i exit $?"; done
for m in $MODELS; do grep -E "^(lvit|lvit-t|unet):|Error|error" "$WORK/logs/monuseg-$m.log" | tail -n 5; done
$PY bench/monuseg.py --render-only --runs "$RUNS" --section monuseg-gpu --minutes "$MONUSEG_MIN" \
    --data .devrun/MoNuSeg224 2>&1 | tail -n 3

echo "== packing ($(date +%T))"
mkdir -p "$WORK/pack"
cp bench/RESULTS.md bench/monuseg_gpu_curve.png "$WORK/speed_gpu.md" "$WORK/speed_gpu.json" "$RUNS/results.json" \
   "$WORK/pack/" 2>/dev/null
for m in $MODELS; do cp "$RUNS/$m/metrics.csv" "$WORK/pack/metrics-$m.csv" 2>/dev/null; done
cp "$WORK"/logs/*.log "$WORK/pack/"
tar -czf "$OUT/gpu_results.tar.gz" -C "$WORK/pack" .
ls -la "$WORK/pack"
rm -rf "$WORK"
