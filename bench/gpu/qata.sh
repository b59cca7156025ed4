#!/usr/bin/env bash
# QaTa-COV19 at the paper's scale on one lent GPU, as one command that ends within TOTAL_S (540 s) of starting:
#   0. the packed QaTa-COV19 copy back to PNG files in RAM (bench/gpu/prepare.py --unpack-qata; hashes checked);
#   1. the speed harness at batch 24 on the default model: eager fp32 and each step of the fast GPU path
#      (bf16+channels_last, +fused, +compile, +cuda-graphs, +gpu-data), images/s, MFU, gradient checks;
#   2. bench/gpu/qata_run.py: LViT trained with the preset qata-gpu (the paper's settings + the fast path) until
#      TOTAL_S - RESERVE_S, then tested on the 2,113 test images (per-image and pooled Dice/IoU); the compile
#      mode is the one the speed run predicts gives the most epochs in the time left.
# Needs .devrun/qata from `python bench/gpu/prepare.py --qata /path/to/QaTa` (about 51 MiB; carry that folder).
# Everything it produces is packed into $OUT/qata_gpu.tar.gz (RESULTS.md with the sections "Speed on GPU"-style
# speed_gpu.md and "qata-gpu", the learning curve, results JSON, metrics.csv and test metrics per model, logs).
#
# Knobs (environment): TOTAL_S (540), RESERVE_S (time kept for the last test and packing, 75), MODELS ("lvit";
# "lvit lvit-t unet" shares the training time), SKIP_BENCH=1 (all the time to training), BENCH_ARGS, BENCH_S (hard
# limit of step 1, 270), TRAIN_SET (extra qata_run.py options, e.g. "--set model.text_tokens=24"), PY, OUT.
# LVIT_DRY_RUN=1: the same steps on this machine's CPU at toy scale (16 records a split, 64 px, base width 8, two
# epochs, torch.compile with the aot_eager_decomp_partition backend instead of inductor), to prove the script end
# to end without a GPU. The exit status is qata_run.py's: non-zero when a model failed to train or test.
set -u
cd "$(dirname "$0")/../.."
. bench/gpu/preamble.sh  # START, DRY, OUT, PY, DEVRUN
MODELS=${MODELS:-lvit}
TRAIN_SET=${TRAIN_SET:-}
if [ -n "$DRY" ]; then
  TOTAL_S=${TOTAL_S:-3600}; RESERVE_S=${RESERVE_S:-300}; BENCH_S=${BENCH_S:-1500}; LIMIT=${LIMIT:-16}
  BENCH_ARGS=${BENCH_ARGS:-"--quick --repeats 2 --warmup 3 --variants eager,bf16+channels_last,+gpu-data \
--compile-backend aot_eager_decomp_partition --timeout 1200"}
  DRY_FLAG=--dry-run
else
  TOTAL_S=${TOTAL_S:-540}; RESERVE_S=${RESERVE_S:-75}; BENCH_S=${BENCH_S:-270}; LIMIT=${LIMIT:-}
  BENCH_ARGS=${BENCH_ARGS:-"--device cuda --batch 24 --repeats 10 --warmup 4 --cases default --no-scaling \
--no-dataloader --variants eager,bf16+channels_last,+fused,+compile,+cuda-graphs,+gpu-data --timeout 150"}
  DRY_FLAG=
fi
mkdir -p "$OUT"
# Data (~0.3 GB of PNG) and checkpoints in RAM when /dev/shm has room (a container's may have only 64 MB).
SHM_FREE_KB=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
if [ "${SHM_FREE_KB:-0}" -gt 2097152 ]; then WORK=$(mktemp -d /dev/shm/lvit-qata.XXXX 2>/dev/null || mktemp -d)
else WORK=$(mktemp -d); fi
mkdir -p "$WORK/logs" "$WORK/pack"
if [ ! -f "$DEVRUN/data/manifest.json.xz" ]; then
  echo "no $DEVRUN/data: run python bench/gpu/prepare.py --qata /path/to/QaTa and carry $DEVRUN" >&2; exit 2
fi
. bench/gpu/env.sh  # wheels, PYTHONPATH (stand-in encoder first: every report must come from the cache)
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"  # shared by the speed run's workers and the training

echo "== 0. data ($(date +%T))"
$PY bench/gpu/prepare.py --unpack-qata "$DEVRUN" --out "$WORK/QaTa" ${LIMIT:+--limit "$LIMIT"} 2>&1 \
    | grep -v "warn" | tail -n 3
cp -r "$DEVRUN/text_cache" "$WORK/text_cache"
$PY -c "import json, lzma, sys; m = json.loads(lzma.decompress(open(sys.argv[1], 'rb').read())); \
print('images:', m['images'], 'coding error:', m['coding_error'])" "$DEVRUN/data/manifest.json.xz" \
    | tee "$WORK/pack/data_note.txt"

BENCH_JSON=
if [ -z "${SKIP_BENCH:-}" ]; then
  echo "== 1. speed harness ($(date +%T))"
  # shellcheck disable=SC2086
  timeout "$BENCH_S" $PY -m lvit bench $BENCH_ARGS --out "$WORK/speed_gpu.md" --force \
      > "$WORK/logs/bench.log" 2>&1
  echo "bench exit $?"
  if [ -f "$WORK/speed_gpu.md" ]; then grep -E "^\| (inference|training) " "$WORK/speed_gpu.md"; BENCH_JSON=$WORK/speed_gpu.json
  else tail -n 20 "$WORK/logs/bench.log"; fi
fi

UNTIL=$((START + TOTAL_S - RESERVE_S))
echo "== 2. QaTa-COV19: ${MODELS} until $(date -d "@$UNTIL" +%T) ($(( (UNTIL - $(date +%s)) / 60 )) min)"
cp bench/RESULTS.md "$WORK/pack/RESULTS.md"  # the section goes into a copy: the repository's file is untouched
NOTE="the packed copy of bench/gpu/prepare.py (masks lossless; images WebP, $(cat "$WORK/pack/data_note.txt" \
| sed -n 's/.*coding error: //p'))"
HARD=$((START + TOTAL_S + 20 - $(date +%s)))
# shellcheck disable=SC2086
timeout "$HARD" $PY bench/gpu/qata_run.py --data "$WORK/QaTa" --runs "$WORK/runs" --text-cache "$WORK/text_cache" \
    --models "${MODELS// /,}" --until "$UNTIL" ${BENCH_JSON:+--bench-json "$BENCH_JSON"} \
    --results-md "$WORK/pack/RESULTS.md" --data-note "$NOTE" --command "bash bench/gpu/qata.sh" \
    $DRY_FLAG $TRAIN_SET 2>&1 | grep -v -E "warn|Warn|^\s*$" | tee "$WORK/logs/qata_run.log" | tail -n 40
RC=${PIPESTATUS[0]}
echo "qata_run exit $RC"

echo "== packing ($(date +%T), $(( $(date +%s) - START )) s since the start)"
cp "$WORK/speed_gpu.md" "$WORK/speed_gpu.json" "$WORK/runs/qata_gpu_results.json" "$WORK/pack/" 2>/dev/null
for m in $MODELS; do
  cp "$WORK/runs/$m/metrics.csv" "$WORK/pack/metrics-$m.csv" 2>/dev/null
  cp "$WORK/runs/$m/config.yaml" "$WORK/pack/config-$m.yaml" 2>/dev/null
  cp "$WORK/runs/$m/test-test/metrics.json" "$WORK/pack/test-metrics-$m.json" 2>/dev/null
done
cp "$WORK"/logs/*.log "$WORK/pack/"
tar -czf "$OUT/qata_gpu.tar.gz" -C "$WORK/pack" .
ls -la "$WORK/pack"
rm -rf "$WORK"
echo "done in $(( $(date +%s) - START )) s"
exit "$RC"
