#!/usr/bin/env bash
# The GPU benchmarks of issue 7 in one go (under 10 minutes on a 16-core H200 machine):
#   two synthetic 40,000-sample zips -> shards -> `pipeline bench train --device cuda` (the model
#   alone and from shards, workers = cores, bf16, compile off and on, batch 256/512/1024, and once
#   with --augment-on workers) -> `pipeline bench loader` (1 and all workers) -> two epochs of
#   `pipeline train` (the persistent workers across the epoch boundary).
# Every result is a JSON file in $OUT (default ./gpu-results), with machine.txt describing the
# machine. Each step has its own time limit, so one slow step cannot eat the others' time.
#
# Sizes and the device are env vars, so it can be tried on a CPU first, e.g.:
#   SAMPLES=300 DEVICE=cpu BATCHES="8 16" COMPILE="off" STEPS=2 WARMUP=1 WORKERS=2 \
#     TRAIN_BATCH=16 TRAIN_STEPS=3 OUT=/tmp/gpu-try bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

P=${PIPELINE:-.venv/bin/pipeline}
[ -x "$P" ] || P=pipeline  # e.g. inside the Docker image
OUT=${OUT:-./gpu-results}
WORK=${WORK:-$(mktemp -d /tmp/gpu-bench.XXXXXX)}
SAMPLES=${SAMPLES:-40000}                  # per zip; two zips
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-$(nproc)}               # loader workers: the machine's cores
BATCHES=${BATCHES:-256 512 1024}
COMPILE=${COMPILE:-off on}
AMP=${AMP:-bf16}
STEPS=${STEPS:-60}
WARMUP=${WARMUP:-15}
TRAIN_EPOCHS=${TRAIN_EPOCHS:-2}
TRAIN_BATCH=${TRAIN_BATCH:-512}
TRAIN_STEPS=${TRAIN_STEPS:-}              # cap the epochs (a CPU trial); empty = whole epochs
LIMIT=${LIMIT:-150}                        # seconds per benchmark command (compile: 2x)

mkdir -p "$OUT" "$WORK"
log() { printf '\n== %s  %s\n' "$(date +%T)" "$*"; }
# run NAME SECONDS CMD...: stdout (JSON) to $OUT/NAME.json, stderr to $OUT/NAME.log; a failure
# or timeout is recorded in NAME.log and the script goes on.
run() {
  local name=$1 limit=$2
  shift 2
  log "$name"
  if timeout "$limit" "$@" >"$OUT/$name.json" 2>"$OUT/$name.log"; then
    tail -c 600 "$OUT/$name.json"; echo
  else
    echo "FAILED or timed out after ${limit}s (exit $?): see $OUT/$name.log" | tee -a "$OUT/$name.log"
  fi
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  lscpu | grep -E "^(Model name|CPU\(s\)|Thread|Core)" || true
  free -g | head -2
  "$(dirname "$P")/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>/dev/null || true
  echo "SAMPLES=$SAMPLES DEVICE=$DEVICE WORKERS=$WORKERS BATCHES=$BATCHES COMPILE=$COMPILE AMP=$AMP STEPS=$STEPS WARMUP=$WARMUP"
} | tee "$OUT/machine.txt"

log "synth: 2 zips of $SAMPLES samples, one process each"
start=$SECONDS
$P synth "$WORK/zips" --batches 1 --samples "$SAMPLES" --seed 0 2>"$OUT/synth1.log" &
$P synth "$WORK/zips" --batches 2 --samples "$SAMPLES" --seed 1 2>"$OUT/synth2.log" &
wait
log "convert (both zips train: no test split)"
$P convert "$WORK"/zips/*.zip --out "$WORK/shards" --test-batches 99 --workers 2 --json \
  >"$OUT/convert.json" 2>"$OUT/convert.log"
echo "data ready in $((SECONDS - start)) s"

for compile in $COMPILE; do
  flag=""; limit=$LIMIT
  if [ "$compile" = on ]; then flag="--compile"; limit=$((2 * LIMIT)); fi
  for batch in $BATCHES; do
    run "train-b$batch-compile-$compile" "$limit" $P bench train --device "$DEVICE" \
      --batch-size "$batch" --amp "$AMP" $flag --shards "$WORK/shards" --workers "$WORKERS" \
      --steps "$STEPS" --warmup "$WARMUP" --json
  done
  if [ "$compile" = off ]; then  # the other augmentation choice, once, for the comparison
    batch=$(echo $BATCHES | awk '{print $2 ? $2 : $1}')
    run "train-b$batch-augment-on-workers" "$limit" $P bench train --device "$DEVICE" \
      --batch-size "$batch" --amp "$AMP" --augment-on workers --shards "$WORK/shards" \
      --workers "$WORKERS" --steps "$STEPS" --warmup "$WARMUP" --json
  fi
done

batch=$(echo $BATCHES | awk '{print $2 ? $2 : $1}')
run "loader-b$batch" "$LIMIT" $P bench loader --shards "$WORK/shards" --workers "$WORKERS" \
  --batch-size "$batch" --batches 40 --rounds 1 --no-old --json

# Whole epochs: the second starts without restarting workers (its data wait shows it).
run "train-epochs" "$((2 * LIMIT))" $P train --shards "$WORK/shards" --out "$WORK/run" \
  --device "$DEVICE" --workers "$WORKERS" --batch-size "$TRAIN_BATCH" --amp "$AMP" \
  --epochs "$TRAIN_EPOCHS" ${TRAIN_STEPS:+--steps-per-epoch "$TRAIN_STEPS"}
grep -h "epoch .*samples/s" "$OUT/train-epochs.log" || true

log "done: results in $OUT (work files in $WORK)"
