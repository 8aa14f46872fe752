#!/usr/bin/env bash
# The GPU benchmarks of issue 7 in one go, within one time budget (TOTAL, 510 s by default):
#   two synthetic 40,000-sample zips -> shards -> `pipeline bench train --device cuda` (the model
#   alone and from shards, workers = cores, bf16, batch 256/512/1024, compile off, then once with
#   --augment-on workers) -> `pipeline bench loader` (1 and all workers) -> two epochs of
#   `pipeline train` (persistent workers across the epoch boundary) -> compile on, last (slowest).
# Steps run most important first; each has its own limit, cut to the time left, so one slow step
# cannot eat the others' time, and a step with under MIN_STEP seconds left is skipped (said so).
# Every result is a JSON file (stdout) and a log (stderr) in $RESULTS, with machine.txt; at the
# end summary.txt holds the headline figures. With BUNDLE set, all of it is also packed into that
# one .tar.gz after every step (the device tool brings back at most 8 files).
#
# Where the project is not installed (the lent GPU machine: its python3 has torch, click, numpy,
# opencv, pillow, tensorboard, tqdm, not the rest), the wheels in .whl/ are installed into
# /tmp/site first and the CLI runs as `python3 -m pipeline` from this checkout. Make them here:
#   bash benchmarks/gpu-wheels.sh            # .whl/ (git-ignored), for the device's Python 3.12
# then, with the device tool: run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=600)
# (there $OUT is the tool's folder: the script then writes the bundle there, see below).
#
# Sizes and the device are env vars, so it can be tried on a CPU first, e.g.:
#   SAMPLES=300 DEVICE=cpu BATCHES="8 16" COMPILE="off on" STEPS=2 WARMUP=1 WORKERS=2 \
#     TRAIN_BATCH=16 TRAIN_STEPS=3 RESULTS=/tmp/gpu-try bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS

# ------------------------------------------------------------------ where the CLI comes from
PY=${PY:-python3}
if [ -n "${PIPELINE:-}" ]; then
  P=$PIPELINE
elif [ -x .venv/bin/pipeline ]; then
  P=.venv/bin/pipeline PY=.venv/bin/python
elif command -v pipeline >/dev/null && pipeline --help >/dev/null 2>&1; then
  P=pipeline  # e.g. inside the Docker image
else
  if ! "$PY" -c "import webdataset, simplejpeg, pytorch_msssim" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || {
      echo "gpu.sh: pipeline is not installed and .whl/ holds no wheels: run benchmarks/gpu-wheels.sh" >&2
      exit 2
    }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  P="$PY -m pipeline"
fi
$P --help >/dev/null  # fails here, loudly, if the set-up above did not work

# ------------------------------------------------------------------ settings
# The device tool sets OUT to the folder it brings back: there, results go to a scratch folder
# and only the bundle (and summary.txt) to $OUT.
if [ -n "${OUT:-}" ] && [ -z "${RESULTS:-}" ] && [ -z "${BUNDLE:-}" ]; then
  RESULTS=$(mktemp -d /tmp/gpu-results.XXXXXX)
  BUNDLE=$OUT/gpu-results.tar.gz
  SUMMARY_COPY=$OUT/summary.txt
fi
RESULTS=${RESULTS:-./gpu-results}
BUNDLE=${BUNDLE:-}
SUMMARY_COPY=${SUMMARY_COPY:-}
WORK=${WORK:-$(mktemp -d /tmp/gpu-bench.XXXXXX)}
SAMPLES=${SAMPLES:-40000}                  # per zip; two zips
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-$(nproc)}               # loader workers: the machine's cores
BATCHES=${BATCHES:-512 1024 256}           # the first is the headline (and the loader's batch)
COMPILE=${COMPILE:-off on}
AMP=${AMP:-bf16}
STEPS=${STEPS:-150}                        # timed steps (after the warm-up and the backlog)
WARMUP=${WARMUP:-15}
TRAIN_EPOCHS=${TRAIN_EPOCHS:-2}
TRAIN_BATCH=${TRAIN_BATCH:-512}
TRAIN_STEPS=${TRAIN_STEPS:-}              # cap the epochs (a CPU trial); empty = whole epochs
LIMIT=${LIMIT:-120}                        # seconds per benchmark command at most (compile: 2x)
TOTAL=${TOTAL:-510}                        # seconds for the whole script, set-up included
MIN_STEP=${MIN_STEP:-20}                   # a step with less time left is skipped
FIRST=$(echo $BATCHES | awk '{print $1}')

mkdir -p "$RESULTS" "$WORK"
# Whatever stops the script (set -e in the set-up, a signal), the results so far come back: the
# device tool brings back only $OUT, and the logs are in $RESULTS, a scratch folder there.
finish() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    echo "gpu.sh stopped early (exit $status); the last lines of its newest logs:" >&2
    for f in $(ls -t "$RESULTS"/*.log 2>/dev/null | head -3); do
      echo "--- $f" >&2
      tail -n 8 "$f" >&2
    done
  fi
  pack || true
  if [ -n "$SUMMARY_COPY" ] && [ -f "$RESULTS/summary.txt" ]; then
    cp "$RESULTS/summary.txt" "$SUMMARY_COPY" || true
  fi
}
trap finish EXIT
log() { printf '\n== %s (+%ds)  %s\n' "$(date +%T)" "$((SECONDS - T0))" "$*"; }
pack() {
  if [ -n "$BUNDLE" ]; then
    tar czf "$BUNDLE.part" -C "$RESULTS" . && mv "$BUNDLE.part" "$BUNDLE"
  fi
}
# run NAME SECONDS CMD...: stdout (JSON) to NAME.json, stderr to NAME.log, within SECONDS and
# the time left; a failure, a timeout or a skip is recorded in NAME.log and the script goes on.
run() {
  local name=$1 limit=$2 left
  shift 2
  left=$((TOTAL - (SECONDS - T0) - 10))  # 10 s for the summary and the bundle
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  log "$name (limit ${limit}s)"
  if [ "$limit" -lt "$MIN_STEP" ]; then
    echo "SKIPPED: ${limit}s left of TOTAL=${TOTAL}s" | tee "$RESULTS/$name.log"
    return 0
  fi
  local start=$SECONDS status
  if timeout -k 10 "$limit" "$@" >"$RESULTS/$name.json" 2>"$RESULTS/$name.log"; then
    tail -c 700 "$RESULTS/$name.json"; echo
  else
    status=$?
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
      echo "FAILED: timed out after ${limit}s: see $name.log"
    else
      echo "FAILED (exit $status) after $((SECONDS - start))s: see $name.log"
    fi | tee -a "$RESULTS/$name.log"
    tail -n 5 "$RESULTS/$name.log" | grep -v "^FAILED" || true
  fi
  pack
}
train_bench() {  # train_bench NAME LIMIT BATCH EXTRA...
  local name=$1 limit=$2 batch=$3
  shift 3
  run "$name" "$limit" $P bench train --device "$DEVICE" --batch-size "$batch" --amp "$AMP" \
    --shards "$WORK/shards" --workers "$WORKERS" --steps "$STEPS" --warmup "$WARMUP" --json "$@"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  lscpu | grep -E "^(Model name|CPU\(s\)|Thread|Core)" || true
  free -g | head -2 || true
  echo "CLI: $P"
  $P --version || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" || true
  echo "SAMPLES=$SAMPLES DEVICE=$DEVICE WORKERS=$WORKERS BATCHES=$BATCHES COMPILE=$COMPILE AMP=$AMP STEPS=$STEPS WARMUP=$WARMUP TOTAL=$TOTAL"
  df -h /dev/shm 2>/dev/null || echo "no /dev/shm"
  echo "open files: $(ulimit -n)"
  # Each loader worker keeps a ring of 6 batches (prefetch 4 + 2) in /dev/shm, 83,200 bytes a gray
  # sample: 16 workers at batch 1024 need 8.2 GB. Docker's default /dev/shm is 64 MB; where it
  # is short and this runs as root (the lent machine), make room rather than fail every step
  # (SHM_GROW=0: don't).
  max_batch=$(printf '%s\n' $BATCHES "$TRAIN_BATCH" | sort -n | tail -n 1)
  shm_need=$((WORKERS * 6 * max_batch * 83200 * 9 / 8 / 1024))  # KiB
  shm_free=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
  if [ -n "$shm_free" ] && [ "$shm_free" -gt 0 ] && [ "$shm_free" -lt "$shm_need" ]; then
    echo "/dev/shm: $((shm_free >> 10)) MiB free; the loaders need about $((shm_need >> 10)) MiB"
    if [ "${SHM_GROW:-1}" = 1 ] && [ "$(id -u)" = 0 ] &&
      mount -o remount,size=$(((shm_need >> 10) + 1024))m /dev/shm; then
      df -h /dev/shm
    else
      echo "/dev/shm could not be enlarged: steps with many workers or big batches may fail"
    fi
  fi
} | tee "$RESULTS/machine.txt"

log "synth: 2 zips of $SAMPLES samples, one process each"
$P synth "$WORK/zips" --batches 1 --samples "$SAMPLES" --seed 0 2>"$RESULTS/synth1.log" &
synth1=$!
$P synth "$WORK/zips" --batches 2 --samples "$SAMPLES" --seed 1 2>"$RESULTS/synth2.log" &
synth2=$!
wait "$synth1" || { echo "synth 1 failed: see synth1.log" >&2; exit 1; }
wait "$synth2" || { echo "synth 2 failed: see synth2.log" >&2; exit 1; }
log "convert (both zips train: no test split)"
$P convert "$WORK"/zips/*.zip --out "$WORK/shards" --test-batches 99 --workers 2 --json \
  >"$RESULTS/convert.json" 2>"$RESULTS/convert.log"
echo "data ready after $((SECONDS - T0)) s"
pack

# Most important first: compile off at every batch size (the headline is the first), the loader,
# the other augmentation choice, whole epochs, then compile on.
if [[ " $COMPILE " == *" off "* ]]; then
  for batch in $BATCHES; do
    train_bench "train-b$batch-compile-off" "$LIMIT" "$batch"
  done
fi
run "loader-b$FIRST" "$LIMIT" $P bench loader --shards "$WORK/shards" --workers "$WORKERS" \
  --batch-size "$FIRST" --batches 64 --rounds 1 --no-old --json
train_bench "train-b$FIRST-augment-on-workers" "$LIMIT" "$FIRST" --augment-on workers
# Whole epochs: the second starts without restarting workers (its data wait shows it).
run "train-epochs" "$LIMIT" $P train --shards "$WORK/shards" --out "$WORK/run" \
  --device "$DEVICE" --workers "$WORKERS" --batch-size "$TRAIN_BATCH" --amp "$AMP" \
  --epochs "$TRAIN_EPOCHS" ${TRAIN_STEPS:+--steps-per-epoch "$TRAIN_STEPS"}
grep -h "epoch .*samples/s" "$RESULTS/train-epochs.log" || true
if [[ " $COMPILE " == *" on "* ]]; then
  for batch in $BATCHES; do
    train_bench "train-b$batch-compile-on" "$((2 * LIMIT))" "$batch" --compile
  done
fi

log "summary"
"$PY" benchmarks/gpu_summary.py "$RESULTS" | tee "$RESULTS/summary.txt" || true
log "done: results in $RESULTS${BUNDLE:+ (and $BUNDLE)}, work files in $WORK"
