#!/usr/bin/env bash
# How many epochs a lent GPU gives the shippable QaTa-COV19 recipe (bench/gpu/qata_ship.sh's) per minute with and
# without CUDA graphs: one process, the real training loop on the real data, first without torch.compile until
# EAGER_S from the start, then compiled with mode reduce-overhead (CUDA graphs) until TOTAL_S. Each phase's
# metrics.csv (seconds per epoch; the first epoch holds decoding and compiling) and log come back in $OUT.
# Needs .devrun/qata (bench/gpu/prepare.py --qata ROOT --qata-tokens 24 --qata-splits train,val).
# Knobs: EAGER_S (85), TOTAL_S (235), WIDTH (32), PY, OUT. LVIT_DRY_RUN=1: toy scale on this CPU, compile off in
# both phases (CUDA graphs need a GPU; this proves the wiring only).
set -u
cd "$(dirname "$0")/../.."
START=$(date +%s)
OUT=${OUT:-/tmp/lvit-gpu-out}
PY=${PY:-python3}
export DEVRUN=${DEVRUN:-.devrun/qata}
EAGER_S=${EAGER_S:-85}
TOTAL_S=${TOTAL_S:-235}
WIDTH=${WIDTH:-32}
GRAPHS=reduce-overhead
DRY_FLAG=
LIMIT=
if [ -n "${LVIT_DRY_RUN:-}" ]; then WIDTH=8; GRAPHS=none; DRY_FLAG=--dry-run; LIMIT=16; fi
mkdir -p "$OUT"
WORK=$(mktemp -d /dev/shm/lvit-speed.XXXX 2>/dev/null || mktemp -d)
. bench/gpu/env.sh
$PY bench/gpu/prepare.py --unpack-qata "$DEVRUN" --out "$WORK/QaTa" ${LIMIT:+--limit "$LIMIT"} 2>&1 | tail -n 1
sets=()
for kv in model.base_channels=$WIDTH model.vit_heads=4 model.text_tokens=24 model.report_dropout=0.25 \
    optim.lr=1e-3 optim.ema_decay=0.999 trainer.precision=32-true trainer.patience=null trainer.seed=0; do
  sets+=(--set "$kv")
done
for phase in "eager:none:$((START + EAGER_S))" "graphs:$GRAPHS:$((START + TOTAL_S))"; do
  IFS=: read -r name mode until <<< "$phase"
  echo "== $name (fast.compile=$mode) until $(date -d "@$until" +%T)"
  timeout $((until + 20 - $(date +%s))) $PY bench/gpu/qata_run.py --data "$WORK/QaTa" --runs "$WORK/runs" \
      --text-cache "$DEVRUN/text_cache" --models lvit --name "$name" --until "$until" --no-test $DRY_FLAG \
      --results-json "$OUT/speed-$name.json" "${sets[@]}" --set "fast.compile=$mode" > "$OUT/speed-$name.log" 2>&1
  echo "exit $?"
  cp "$WORK/runs/$name/metrics.csv" "$OUT/speed-$name.csv" 2>/dev/null && cat "$OUT/speed-$name.csv"
done
rm -rf "$WORK"
echo "done in $(( $(date +%s) - START )) s"
