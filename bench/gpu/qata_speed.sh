#!/usr/bin/env bash
# How many epochs a lent GPU gives the shippable QaTa-COV19 recipe (bench/gpu/qata_ship.sh's) per minute with and
# without CUDA graphs: one process, the real training loop on the real data, first without torch.compile for
# EAGER_S seconds, then compiled with mode reduce-overhead (CUDA graphs) until TOTAL_S, each phase at least
# three epochs (the first holds decoding and compiling; a deadline alone stopped a phase after it once) unless its
# hard limit (its deadline + 20 s) ends it. Each phase's metrics.csv (seconds per epoch) and log come back in $OUT.
# Needs .devrun/qata (bench/gpu/prepare.py --qata ROOT --qata-tokens 24 --qata-splits train,val).
# Knobs: EAGER_S (70), TOTAL_S (235), WIDTH (32), PY, OUT. LVIT_DRY_RUN=1: toy scale on this CPU, compile off in
# both phases (CUDA graphs need a GPU; this proves the wiring only).
set -u
cd "$(dirname "$0")/../.."
. bench/gpu/preamble.sh  # START, DRY, OUT, PY, DEVRUN
EAGER_S=${EAGER_S:-70}
TOTAL_S=${TOTAL_S:-235}
WIDTH=${WIDTH:-32}
GRAPHS=reduce-overhead
DRY_FLAG=
LIMIT=
if [ -n "$DRY" ]; then WIDTH=8; GRAPHS=none; DRY_FLAG=--dry-run; LIMIT=16; fi
mkdir -p "$OUT"
WORK=$(mktemp -d /dev/shm/lvit-speed.XXXX 2>/dev/null || mktemp -d)
. bench/gpu/env.sh
left() { local t=$(( $1 - $(date +%s) )); [ "$t" -lt 1 ] && t=1; echo "$t"; }  # timeout 0 would mean none
$PY bench/gpu/prepare.py --unpack-qata "$DEVRUN" --out "$WORK/QaTa" ${LIMIT:+--limit "$LIMIT"} 2>&1 | tail -n 1
if [ "${PIPESTATUS[0]}" -ne 0 ]; then echo "unpacking $DEVRUN failed" >&2; rm -rf "$WORK"; exit 2; fi
sets=()
for kv in model.base_channels=$WIDTH model.vit_heads=4 model.text_tokens=24 model.report_dropout=0.25 \
    optim.lr=1e-3 optim.ema_decay=0.999 trainer.precision=32-true trainer.patience=null trainer.seed=0; do
  sets+=(--set "$kv")
done
for phase in "eager:none" "graphs:$GRAPHS"; do
  IFS=: read -r name mode <<< "$phase"
  # The eager phase gets EAGER_S from its own start (set-up time is not taken from it); compiling gets the rest.
  if [ "$name" = eager ]; then until=$(( $(date +%s) + EAGER_S )); else until=$((START + TOTAL_S)); fi
  echo "== $name (fast.compile=$mode) until $(date -d "@$until" +%T)"
  timeout "$(left $((until + 20)))" $PY bench/gpu/qata_run.py --data "$WORK/QaTa" --runs "$WORK/runs" \
      --text-cache "$DEVRUN/text_cache" --models lvit --name "$name" --until "$until" --no-test --min-epochs 3 \
      $DRY_FLAG \
      --results-json "$OUT/speed-$name.json" "${sets[@]}" --set "fast.compile=$mode" > "$OUT/speed-$name.log" 2>&1
  echo "exit $?"
  cp "$WORK/runs/$name/metrics.csv" "$OUT/speed-$name.csv" 2>/dev/null && cat "$OUT/speed-$name.csv"
done
rm -rf "$WORK"
echo "done in $(( $(date +%s) - START )) s"
