#!/usr/bin/env bash
# The shippable QaTa-COV19 model (issue "A trained chest X-ray model in the box") trained on one lent GPU: the
# width that fits the package's 16 MB model folder in float16 (base width 32, ~7.5M parameters), at the paper's
# 224 px, with the shipped model's recipe (24 text tokens, report dropout 0.25, Adam 1e-3, cosine warm restarts
# T_0 = 10 down to 1e-4, 0.5 Dice + 0.5 BCE), batch 24, a weight average (decay 0.999, about the last 1,000
# steps), one process per seed side by side on the one GPU until TOTAL_S - RESERVE_S from the start.
#   0. the packed train and val splits back to PNG in RAM (bench/gpu/prepare.py --unpack-qata; hashes checked);
#   1. bench/gpu/qata_run.py --no-test per seed: the test split is scored afterwards on its original images, on
#      the machine the data lives on (python bench/gpu/qata_ship.py evaluate);
#   2. each run folder without its training state, best weights in float32, as a tar cut into 15 MB parts
#      ($OUT/<run>.tar.part-aa, -ab: cat them back together), and $OUT/qata_ship.tar.gz (results JSON per run,
#      metrics.csv, config.yaml, logs).
# Needs .devrun/qata from `python bench/gpu/prepare.py --qata ROOT --qata-tokens 24 --qata-splits train,val`.
#
# Knobs (environment): SEEDS ("0 1"), WIDTH (32), TOTAL_S (545), RESERVE_S (35: packing after training),
# TRAIN_SET (extra overrides, "a=b c=d"), DEVRUN, PY, OUT.
# LVIT_DRY_RUN=1: the same steps on this machine's CPU at toy scale (16 records a split, 64 px, base width 8).
set -u
cd "$(dirname "$0")/../.."
. bench/gpu/preamble.sh  # START, DRY, OUT, PY, DEVRUN
SEEDS=${SEEDS:-"0 1"}
WIDTH=${WIDTH:-32}
TRAIN_SET=${TRAIN_SET:-}
if [ -n "$DRY" ]; then
  TOTAL_S=${TOTAL_S:-1800}; RESERVE_S=${RESERVE_S:-60}; LIMIT=16; WIDTH=8; DRY_FLAG=--dry-run
else
  TOTAL_S=${TOTAL_S:-545}; RESERVE_S=${RESERVE_S:-35}; LIMIT=; DRY_FLAG=
fi
RECIPE="model.base_channels=$WIDTH model.vit_heads=4 model.text_tokens=24 model.report_dropout=0.25 \
optim.lr=1e-3 optim.ema_decay=0.999 trainer.precision=32-true trainer.patience=null fast.compile=none"
mkdir -p "$OUT"
SHM_FREE_KB=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
if [ "${SHM_FREE_KB:-0}" -gt 2097152 ]; then WORK=$(mktemp -d /dev/shm/lvit-ship.XXXX 2>/dev/null || mktemp -d)
else WORK=$(mktemp -d); fi
mkdir -p "$WORK/logs" "$WORK/pack" "$WORK/runs"
if [ ! -f "$DEVRUN/data/manifest.json.xz" ]; then
  echo "no $DEVRUN/data: run python bench/gpu/prepare.py --qata ROOT --qata-tokens 24 --qata-splits train,val" >&2
  exit 2
fi
. bench/gpu/env.sh
left() { local t=$(( $1 - $(date +%s) )); [ "$t" -lt 1 ] && t=1; echo "$t"; }  # timeout 0 would mean none

echo "== 0. data ($(date +%T))"
$PY bench/gpu/prepare.py --unpack-qata "$DEVRUN" --out "$WORK/QaTa" ${LIMIT:+--limit "$LIMIT"} 2>&1 \
    | grep -v "warn" | tail -n 3
if [ "${PIPESTATUS[0]}" -ne 0 ]; then echo "unpacking $DEVRUN failed: not training on damaged data" >&2
  rm -rf "$WORK"; exit 2; fi
cp -r "$DEVRUN/text_cache" "$WORK/text_cache"
# What this call ran with, for the results (bench/gpu/qata_ship.py evaluate reads it back).
TOTAL_S=$TOTAL_S RESERVE_S=$RESERVE_S SEEDS=$SEEDS WIDTH=$WIDTH TRAIN_SET=$TRAIN_SET RECIPE=$RECIPE $PY -c "
import json, os
keys = ('TOTAL_S', 'RESERVE_S', 'SEEDS', 'WIDTH', 'TRAIN_SET')
env = {k: os.environ[k] for k in keys}
command = ' '.join(f'{k}={env[k]!r}' if ' ' in env[k] or not env[k] else f'{k}={env[k]}' for k in keys)
print(json.dumps({**env, 'recipe': os.environ['RECIPE'].split(), 'command': command + ' bash bench/gpu/qata_ship.sh'}))
" > "$WORK/pack/settings.json"

UNTIL=$((START + TOTAL_S - RESERVE_S))
echo "== 1. seeds ${SEEDS} side by side until $(date -d "@$UNTIL" +%T) ($(( (UNTIL - $(date +%s)) / 60 )) min)"
# One seed: the fast GPU path first; if that process fails while there is still time for a useful run (the fast
# path's data-on-GPU and fused optimiser first meet a GPU here), the same recipe again on the ordinary path.
train_seed() {  # name seed
  local name=$1 s=$2 sets=() kv
  for kv in $RECIPE trainer.seed=$s $TRAIN_SET; do sets+=(--set "$kv"); done
  timeout "$(left $((UNTIL + 15)))" $PY bench/gpu/qata_run.py --data "$WORK/QaTa" --runs "$WORK/runs" \
      --text-cache "$WORK/text_cache" --models lvit --name "$name" --until "$UNTIL" --no-test \
      --results-json "$WORK/runs/result-$name.json" --command "bash bench/gpu/qata_ship.sh" $DRY_FLAG \
      "${sets[@]}" > "$WORK/logs/$name.log" 2>&1 && return 0
  if [ $((UNTIL - $(date +%s))) -lt 150 ]; then return 1; fi
  echo "$name: the fast path failed; again without it" | tee -a "$WORK/logs/$name.log"
  timeout "$(left $((UNTIL + 15)))" $PY bench/gpu/qata_run.py --data "$WORK/QaTa" --runs "$WORK/runs" \
      --text-cache "$WORK/text_cache" --models lvit --name "$name" --until "$UNTIL" --no-test \
      --results-json "$WORK/runs/result-$name.json" --command "bash bench/gpu/qata_ship.sh" $DRY_FLAG \
      "${sets[@]}" --set fast.enabled=false --set data.num_workers=5 > "$WORK/logs/$name-plain.log" 2>&1
}
pids=()
names=()
for s in $SEEDS; do
  name=w$WIDTH-s$s
  names+=("$name")
  train_seed "$name" "$s" &
  pids+=($!)
done
RC=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; rc=$?; [ "$rc" -ne 0 ] && RC=$rc
  echo "${names[$i]}: exit $rc"
  for f in "$WORK/logs/${names[$i]}.log" "$WORK/logs/${names[$i]}-plain.log"; do
    [ -f "$f" ] && grep -v -E "warn|Warn|^\s*$" "$f" | tail -n 6
  done
done

echo "== 2. packing ($(date +%T), $(( $(date +%s) - START )) s since the start)"
for name in "${names[@]}"; do
  [ -f "$WORK/runs/$name/checkpoints/best.safetensors" ] || continue
  tar -cf - -C "$WORK/runs" --exclude=last.ckpt --exclude=last.safetensors --exclude=tensorboard "$name" \
      | split -b 15000000 - "$OUT/$name.tar.part-"
  cp "$WORK/runs/$name/metrics.csv" "$WORK/pack/metrics-$name.csv"
  cp "$WORK/runs/$name/config.yaml" "$WORK/pack/config-$name.yaml"
  cp "$WORK/runs/result-$name.json" "$WORK/pack/" 2>/dev/null
done
cp "$WORK"/logs/*.log "$WORK/pack/"
nvidia-smi --query-gpu=name,memory.used --format=csv > "$WORK/pack/nvidia-smi.txt" 2>/dev/null
tar -czf "$OUT/qata_ship.tar.gz" -C "$WORK/pack" .
ls -la "$OUT"
rm -rf "$WORK"
echo "done in $(( $(date +%s) - START )) s"
exit "$RC"
